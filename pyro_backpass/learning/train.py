"""Training a generative model end to end, in resumable stages (the ``pyro-backpass train`` command
drives it; see :mod:`pyro_backpass.cli.train`).

Stages, each ending in an atomically written checkpoint in ``out_dir``:

1. ``observation.safetensors``: the model after :func:`fit_observation_model` on rendered scenes;
2. ``hard_em.safetensors``: after :func:`fit_hard_em` on rendered single objects;
3. ``model.safetensors``: with, when the configuration asks for them (the default does), β and
   σ2 per channel fitted on the training scenes (:func:`fit_background`) and σ0 of the upper
   levels calibrated on validation scenes (:func:`calibrate_scale_td`) — issue #10's levers —
   and the mask threshold chosen on validation objects (:func:`tune_mask_threshold`, after the
   calibration), then — unless ``readout_objects_per_category`` is 0 — a learned mask readout
   of F̂ (:func:`fit_mask_readout`) fitted on training objects, its threshold on the validation
   objects, attached as the model's mask.

``log.json`` holds per-round errors and component usage, the validation IoU of every mask
threshold tried, and the seconds of every stage.

``config.json`` records the configuration; ``resume=True`` checks it against the one given
(a clear error when they differ) and skips every completed stage. Each stage depends only on
the configuration and the previous stage's checkpoint (every random draw is seeded from
``config.seed``), so a resumed run gives the parameters of an uninterrupted one.

Under several processes (``world``; ``torchrun``, see :mod:`pyro_backpass.cli.train`) each rank
renders and holds a contiguous shard of the scenes, objects and validation objects; the stages
reduce across ranks (:mod:`.observation_fit`, :mod:`.hard_em`, :mod:`.evaluation`), so every rank
ends a stage with the same parameters, equal to a single process's up to float rounding. Only
rank 0 writes ``out_dir`` (every rank reads it on ``resume``: one machine, or a shared folder).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pyro_backpass.backbone import SHIPPED_BACKBONES, Backbone
from pyro_backpass.data import CATEGORIES, OBJECT_SCALE, RenderedObjects, Scenes, split_seed
from pyro_backpass.files import atomic_write_json, check_keys, read_json
from pyro_backpass.learning.calibration import UPPER_LEVELS, calibrate_scale_td
from pyro_backpass.learning.distributed import SINGLE_PROCESS, World
from pyro_backpass.learning.evaluation import tune_mask_threshold
from pyro_backpass.learning.hard_em import EMConfig, fit_hard_em
from pyro_backpass.learning.mask_fit import fit_mask_readout
from pyro_backpass.learning.observation_fit import fit_background, fit_observation_model
from pyro_backpass.levels import levels_up_to
from pyro_backpass.model import GenerativeModel

__all__ = ["PRESETS", "TrainConfig", "render_object_set", "train_mask_readout", "train_model"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (stored in ``config.json``)."""

    categories: tuple[str, ...] = CATEGORIES  # modelled categories (the backbone's by default)
    # "default", "compositional" or "localised" (the shipped backbones), or the path of a checkpoint
    # written by `pyro-backpass train-backbone` (recorded in the model, reattached on load).
    backbone: str = "default"
    objects_per_category: int = 200  # single objects for hard EM (train split)
    # Render scales of those objects (bounding-sphere diameter / image size), split evenly;
    # add data.SCENE_SCALE to train also on objects as small as in cluttered scenes.
    object_scales: tuple[tuple[float, float], ...] = (OBJECT_SCALE,)
    scenes: int = 100  # cluttered scenes for the observation model (train split)
    validation_per_category: int = 20  # objects that choose the mask threshold (validation)
    mask_multipliers: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)  # × λ
    components_top: int = 20  # K of the level just below the category (the paper: 500)
    components: int = 5  # K of every other level (the paper: 5)
    # The top hidden level, just below the category (issue #10, lever 3: "pool3" is finer);
    # the backbone's levels above it are not modelled.
    top_level: str = "pool4"
    # δ of the top level: {−r..r}² cells (2 on pool4's 4×4 map reaches ±32 px on 64 px images;
    # pool3's 8×8 map needs 4 to reach as far).
    top_offset_radius: int = 2
    em: EMConfig = field(default_factory=EMConfig)  # hard EM options
    # Issue #10's levers (benchmarks/clutter_levers.py measured them on validation scenes):
    background_per_channel: bool = True  # β, σ2 per channel from the training scenes
    calibration_scenes: int = 20  # validation scenes that choose the σ0 multiplier (0: off)
    calibration_levels: tuple[str, ...] = UPPER_LEVELS
    calibration_multipliers: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    # The mask readout (issue #9): training objects per category (the first of hard EM's; 0: no
    # readout, masks by the mask_threshold rule), hidden channels (0: one logistic filter),
    # Adam epochs; training scenes whose objects (top level clamped) join its training set, and
    # validation scenes whose objects join the choice of its threshold; whether it also reads
    # the input's activations (MaskReadout's reads_input; issue #10 measured it and made it the
    # default: runs written before then used False, see _ADDED_OPTIONS).
    readout_objects_per_category: int = 200
    readout_hidden: int = 16
    readout_input: bool = True
    readout_epochs: int = 30
    readout_scenes: int = 150
    readout_validation_scenes: int = 30
    seed: int = 0  # base seed of the data splits and of EM

    def __post_init__(self) -> None:
        if isinstance(self.top_offset_radius, bool) or not (
            isinstance(self.top_offset_radius, int) and self.top_offset_radius >= 0
        ):
            raise ValueError(
                f"top_offset_radius must be an int >= 0, got {self.top_offset_radius!r}"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["categories"] = list(self.categories)
        d["mask_multipliers"] = list(self.mask_multipliers)
        d["object_scales"] = [list(s) for s in self.object_scales]
        d["calibration_levels"] = list(self.calibration_levels)
        d["calibration_multipliers"] = list(self.calibration_multipliers)
        return d


PRESETS: dict[str, TrainConfig] = {
    # Seconds: exercises every stage and checkpoint (tests, `make demo`-sized).
    "smoke": TrainConfig(
        objects_per_category=3,
        scenes=2,
        components_top=2,
        components=2,
        calibration_scenes=1,
        calibration_multipliers=(1.0, 0.25),
        readout_objects_per_category=3,
        readout_hidden=2,
        readout_epochs=2,
        readout_scenes=1,
        readout_validation_scenes=1,
        em=EMConfig(iterations=1, epochs=1, init_epochs=1, batch_size=8, top_init_iterations=1),
    ),  # fmt: skip
    # The shipped model: ≤ 30 min on 2 CPU cores.
    "default": TrainConfig(),
}


def render_object_set(
    categories: tuple[str, ...],
    n: int,
    *,
    seed: int,
    backbone: Backbone,
    scales: tuple[tuple[float, float], ...] = (OBJECT_SCALE,),
    part: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` rendered objects per category: images, masks and label indices into the
    backbone's categories (what :func:`fit_hard_em` takes). With several ``scales`` the ``n``
    are split evenly between them (the first scale takes the remainder); each scale draws
    from its own seed, so the default single scale renders what it always did.

    :param part: the slice of the ``len(categories) · n`` objects (category-major, then scale)
        to render: one rank's shard (``World.shard``); all of them by default.
    """
    if not scales:
        raise ValueError("scales must name at least one (lo, hi) render scale")
    counts = [n // len(scales) + (n % len(scales) if j == 0 else 0) for j in range(len(scales))]
    sets = {
        (cat, j): RenderedObjects(cat, count, seed=seed if j == 0 else (seed, j),
                                  scale=tuple(scale))
        for cat in categories
        for j, (scale, count) in enumerate(zip(scales, counts, strict=True))
    }  # fmt: skip
    order = [(cat, j, i) for cat in categories for j in range(len(scales))
             for i in range(counts[j])][part]  # fmt: skip
    images, masks, labels = [], [], []
    for cat, j, i in order:
        image, mask = sets[(cat, j)][i]
        images.append(image), masks.append(mask), labels.append(backbone.category_index(cat))
    return torch.stack(images), torch.stack(masks), torch.tensor(labels)


def train_mask_readout(
    gm: GenerativeModel,
    backbone: Backbone,
    config: TrainConfig = TrainConfig(),
    *,
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
    world: World = SINGLE_PROCESS,
) -> dict[str, float]:
    """The last step of :func:`train_model`: fit ``config``'s mask readout of ``gm`` (on the
    first ``readout_objects_per_category`` training objects per category and the objects of
    ``readout_scenes`` training scenes; its threshold on the ``validation_per_category``
    validation objects and the objects of ``readout_validation_scenes`` validation scenes) and
    attach it; returns the fit's report.

    ``validation``: those validation objects when already rendered (this rank's share).
    Applied to a trained model without a readout, it gives the readout that ``train_model``
    with ``config`` fits at the end of its last stage."""
    if config.readout_objects_per_category < 1:
        raise ValueError("config.readout_objects_per_category is 0: the config fits no readout")
    shard = world.shard  # this rank's share of every object set
    if validation is None:
        validation = render_object_set(
            config.categories, config.validation_per_category,
            seed=split_seed("validation", config.seed), backbone=backbone,
            part=shard(len(config.categories) * config.validation_per_category),
        )  # fmt: skip
    objects = render_object_set(
        config.categories, config.readout_objects_per_category,
        seed=split_seed("train", config.seed), backbone=backbone,
        part=shard(len(config.categories) * config.readout_objects_per_category),
    )  # fmt: skip

    def scenes(split: str, n: int) -> list:  # this rank's share, rendered
        if n == 0:
            return []
        every = Scenes(n, seed=split_seed(split, config.seed))
        return [every[i] for i in range(*world.bounds(n))]

    _, report = fit_mask_readout(
        gm, backbone, objects, validation,
        scenes=scenes("train", config.readout_scenes),
        validation_scenes=scenes("validation", config.readout_validation_scenes),
        hidden=config.readout_hidden, reads_input=config.readout_input,
        epochs=config.readout_epochs, seed=config.seed,
        progress=progress, world=world,
    )  # fmt: skip
    return report


def _backbone(name: str) -> Backbone:
    """A shipped backbone by name, or a ``train-backbone`` checkpoint by path."""
    if name in SHIPPED_BACKBONES:
        return Backbone.shipped(name)
    try:
        return Backbone.load(name)
    except FileNotFoundError as err:
        raise ValueError(
            f"backbone must be one of {list(SHIPPED_BACKBONES)} or a checkpoint written by "
            f"`pyro-backpass train-backbone`; {err}"
        ) from None


def _training_scenes(config: TrainConfig, world: World, progress: bool) -> list:
    """This rank's contiguous share of the training scenes, rendered."""
    scenes = Scenes(config.scenes, seed=split_seed("train", config.seed))
    mine = range(*world.bounds(config.scenes))
    return [scenes[i] for i in tqdm(mine, desc="render scenes", disable=not progress)]


# Options added to TrainConfig after runs were written, with the value those runs used.
_ADDED_OPTIONS: dict[str, Any] = {
    "top_level": "pool4",
    "top_offset_radius": 2,
    "readout_objects_per_category": 0,
    "readout_hidden": 16,
    "readout_epochs": 30,
    "readout_scenes": 150,
    "readout_validation_scenes": 30,
    "readout_input": False,
}
_READOUT_OPTIONS = (
    "readout_hidden",
    "readout_epochs",
    "readout_scenes",
    "readout_validation_scenes",
    "readout_input",
)


def _check_resume(path: Path, config: TrainConfig) -> None:
    saved = read_json(path)
    check_keys(saved, [], source=path)
    # Options added after a run was written take their defaults (which that run used).
    saved = dict(_ADDED_OPTIONS) | saved
    want = json.loads(json.dumps(config.to_json()))
    if 0 in (saved.get("readout_objects_per_category"), want["readout_objects_per_category"]):
        for c in (saved, want):  # without a readout its other options do not matter
            for key in _READOUT_OPTIONS:
                c.pop(key, None)
    if saved != want:
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        raise ValueError(
            f"{path} was written for another configuration (differs in {diff}); use another "
            "--out folder, or drop --resume to start over"
        )


def train_model(
    config: TrainConfig = TrainConfig(),
    *,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    world: World = SINGLE_PROCESS,
) -> GenerativeModel:
    """Fit a generative model of the shipped backbone's activations, stage by stage.

    :param out_dir: the folder of the checkpoints (created).
    :param resume: continue from the last completed stage in ``out_dir`` (same config only).
    :param world: the processes sharing the work (``World.current()`` under ``torchrun``); one
        by default. Every rank must call this with the same arguments.
    :returns: the trained model, with its backbone attached (on every rank).
    """
    if config.backbone not in SHIPPED_BACKBONES:  # a checkpoint: one spelling of its path
        config = replace(config, backbone=str(Path(config.backbone).resolve()))
    backbone = _backbone(config.backbone)
    unknown = [c for c in config.categories if c not in backbone.categories]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; the backbone knows {backbone.categories}")
    # image … the top level, category (a clear error for an unknown top level)
    levels = levels_up_to(backbone.levels, config.top_level)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if resume and config_path.exists():
        _check_resume(config_path, config)
    elif not resume and any(out.glob("*.safetensors")):
        raise FileExistsError(f"{out} holds checkpoints already; pass --resume or a new --out")
    world.barrier()  # every rank has checked the folder before rank 0 writes to it
    main = world.is_main
    progress = progress and main
    if main:
        atomic_write_json(config_path, config.to_json())
    torch.manual_seed(config.seed)
    log: dict[str, Any] = {"seconds": {}}
    log_path = out / "log.json"
    if resume and log_path.exists():
        log = read_json(log_path, keys=["seconds"])

    stage1, stage2 = out / "observation.safetensors", out / "hard_em.safetensors"
    stage3 = out / "model.safetensors"
    if resume and stage3.exists():
        return GenerativeModel.load(stage3, backbone=backbone)
    if resume and stage1.exists():
        gm = GenerativeModel.load(stage1, backbone=backbone)
    else:
        start = time.perf_counter()
        ks = {s.name: config.components for s in levels[:-1]}
        ks[config.top_level] = config.components_top
        gm = GenerativeModel.for_backbone(
            backbone, num_components=ks, top_level=config.top_level,
            offsets={config.top_level: config.top_offset_radius}, backbone_name=config.backbone,
            backbone_path=None if config.backbone in SHIPPED_BACKBONES else config.backbone,
        )  # fmt: skip
        scenes = _training_scenes(config, world, progress)
        fit_observation_model(gm, backbone, scenes, progress=progress, world=world)
        log["seconds"]["observation"] = round(time.perf_counter() - start, 1)
        if main:
            gm.save(stage1)
            atomic_write_json(log_path, log)
    if resume and stage2.exists():
        gm = GenerativeModel.load(stage2, backbone=backbone)
    else:
        start = time.perf_counter()
        objects = render_object_set(
            config.categories, config.objects_per_category,
            seed=split_seed("train", config.seed), backbone=backbone,
            scales=config.object_scales,
            part=world.shard(len(config.categories) * config.objects_per_category),
        )  # fmt: skip
        em = replace(config.em, seed=config.seed)
        result = fit_hard_em(gm, backbone, objects, config=em, progress=progress, world=world)
        log["seconds"]["hard_em"] = round(time.perf_counter() - start, 1)
        log["em"] = result.to_dict()["log"]
        if main:
            gm.save(stage2)
            atomic_write_json(log_path, log)
    start = time.perf_counter()
    validation = render_object_set(
        config.categories, config.validation_per_category,
        seed=split_seed("validation", config.seed), backbone=backbone,
        part=world.shard(len(config.categories) * config.validation_per_category),
    )  # fmt: skip
    if config.background_per_channel:
        fit_background(gm, backbone, _training_scenes(config, world, progress), world=world)
    scores = tune_mask_threshold(gm, backbone, validation, multipliers=config.mask_multipliers,
                                 world=world)  # fmt: skip
    log["mask_threshold_iou"] = {str(m): v for m, v in scores.items()}
    if config.calibration_scenes > 0:
        # A few scenes: every rank calibrates on all of them (the same answer everywhere).
        val_scenes = list(Scenes(config.calibration_scenes,
                                 seed=split_seed("validation", config.seed)))  # fmt: skip
        calib = calibrate_scale_td(
            gm, backbone, val_scenes, levels=config.calibration_levels,
            multipliers=config.calibration_multipliers, progress=progress,
        )  # fmt: skip
        log["scale_td_calibration_iou"] = {str(m): v for m, v in calib.items()}
        # The masks changed with σ0: choose their threshold again.
        scores = tune_mask_threshold(gm, backbone, validation, world=world,
                                     multipliers=config.mask_multipliers)  # fmt: skip
        log["mask_threshold_iou_after_calibration"] = {str(m): v for m, v in scores.items()}
    log["seconds"]["mask_threshold"] = round(time.perf_counter() - start, 1)
    if config.readout_objects_per_category > 0:
        start = time.perf_counter()
        log["mask_readout"] = train_mask_readout(gm, backbone, config, validation=validation,
                                                 progress=progress, world=world)  # fmt: skip
        log["seconds"]["mask_readout"] = round(time.perf_counter() - start, 1)
    if main:
        gm.save(stage3)
        log["processes"] = world.size
        atomic_write_json(log_path, log)
    world.barrier()  # the checkpoint is on disk before any rank returns
    return gm

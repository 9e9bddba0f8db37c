"""Training the built-in backbone (library code; the ``pyro-backpass train-backbone`` command
in :mod:`pyro_backpass.cli.train_backbone` drives it).

A :class:`SmallVGG` is trained from scratch as a classifier on the rendered categories. The
training set is rendered once into memory (rendering dominates a naive loader's cost), then
trained with AdamW and a one-cycle learning rate; images are flipped left–right at random
(an object seen from azimuth ``a`` mirrored is the same category seen from ``−a``).

``--compositional`` adds the objective of Stone et al. (2017): each step also takes a batch of
cluttered scenes and every object in them rendered alone at the same place; the loss is the
classification loss on the single objects, on the objects alone and on the scenes (soft target:
uniform over the categories present), plus ``penalty_weight`` times the compositionality
penalty of :mod:`.penalty` at ``penalty_levels`` (default: every conv and pool level,
relative normalisation; chosen by measurement, see that module). That method is covered by US patent
11,216,727; it is an option here, not a default.

``--localised`` (issue #10, lever 3) uses the same batches of cluttered scenes for the objective
of :mod:`.localisation`: per-cell category labels at the top level from the instance masks
(clutter and background cells negative for every category) and, at ``background_levels``, a
penalty on activation energy off the objects relative to on them. Off by default.

References:
    Stone, Wang, Lee, Xie, Yuille (2017). Teaching compositionality to CNNs. CVPR.
    Smith, Topin (2019). Super-convergence (one-cycle learning rate). SPIE.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pyro_backpass.backbone.backbone import Backbone
from pyro_backpass.backbone.localisation import background_ratio, cell_targets, localisation_loss
from pyro_backpass.backbone.penalty import PenaltyKind, compositional_penalty
from pyro_backpass.backbone.small_vgg import DEFAULT_CFG, SmallVGG
from pyro_backpass.data import CATEGORIES, DEFAULT_SIZE
from pyro_backpass.data.rendered import ScenePairs, render_objects, render_scene_pairs
from pyro_backpass.levels import level_names

__all__ = ["SMOKE", "TrainConfig", "TrainResult", "train_backbone"]

# Held-out sets are rendered from seeds this far from the training seed.
HELD_OUT_SEED_OFFSET = 1_000_003


def _loss_parts(config: TrainConfig) -> tuple[str, ...]:
    """The per-epoch means a run records in its history: the loss, the compositional penalty
    (0 for a plain run, as before the localised objective existed), and what it computes."""
    parts = ("loss",) + (("penalty",) if config.compositional or not config.localised else ())
    if config.localised:
        parts += ("localisation",) + (("background",) if config.background_levels else ())
    return parts


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint's JSON."""

    cfg: tuple[int | str, ...] = DEFAULT_CFG
    image_size: int = DEFAULT_SIZE
    categories: tuple[str, ...] = CATEGORIES
    n_train: int = 3000  # rendered training objects per category
    n_test: int = 200  # held-out objects per category (another seed)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3  # peak of the one-cycle schedule
    weight_decay: float = 1e-4
    seed: int = 0
    # Compositional objective (Stone et al. 2017); off by default.
    compositional: bool = False
    # None: every conv and pool level of cfg. Chosen by measurement (benchmarks/results/
    # backbone_penalty_selection.json): all levels, relative, keeps conv1 from collapsing and
    # the top from going input-independent.
    penalty_levels: tuple[str, ...] | None = None
    penalty: PenaltyKind = "relative"
    penalty_weight: float = 1.0
    n_scenes: int = 1500  # rendered training scenes (each with its objects alone)
    scene_batch: int = 8  # scenes per step, beside `batch_size` single objects
    # Scene localisation objective (issue #10, lever 3; .localisation); off by default.
    localised: bool = False
    localisation_weight: float = 1.0  # weight of the per-cell multi-label loss
    full_cover: float = 0.25  # a top-level cell this covered by a category is a full positive
    background_levels: tuple[str, ...] = ()  # levels of the background penalty (none: off)
    background_weight: float = 1.0


@dataclass(frozen=True)
class TrainResult:
    backbone: Backbone
    held_out_accuracy: float
    train_seconds: float
    render_seconds: float
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)


def _check_config(config: TrainConfig) -> None:
    unknown = [c for c in config.categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {list(CATEGORIES)}")
    if len(config.categories) < 2:
        raise ValueError("train on at least two categories")
    names = level_names(config.cfg)
    if config.compositional and config.penalty_levels is not None:
        bad = [lv for lv in config.penalty_levels if lv not in names]
        if bad or not config.penalty_levels:
            raise ValueError(f"penalty levels {bad or '()'} are not levels of cfg: {names}")
    for key in ("n_train", "n_test", "epochs", "batch_size", "n_scenes", "scene_batch"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(config, key)}")
    if config.background_levels and not config.localised:
        raise ValueError("background_levels act only with localised=True")
    bad = [lv for lv in config.background_levels if lv not in names]
    if bad:
        raise ValueError(f"background levels {bad} are not levels of cfg: {names}")
    for key in ("localisation_weight", "background_weight"):
        if not (getattr(config, key) >= 0 and math.isfinite(getattr(config, key))):
            raise ValueError(f"{key} must be a finite number >= 0, got {getattr(config, key)}")
    if not 0.0 < config.full_cover <= 1.0:
        raise ValueError(f"full_cover must be in (0, 1], got {config.full_cover}")


def _flip(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror the images ``x[i]`` (any ``(N, ..., W)``) where ``flip[i]``."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.where(flip.view(shape), x.flip(-1), x)


@torch.no_grad()
def accuracy(backbone: Backbone, images: Tensor, labels: Tensor, *, batch_size: int = 256) -> float:
    """Fraction of ``images`` whose predicted category index equals ``labels``."""
    correct = sum(
        int((backbone.predict(images[i : i + batch_size]) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def penalised_levels(config: TrainConfig) -> tuple[str, ...]:
    """The levels the compositional penalty acts on: ``penalty_levels`` or all of cfg's."""
    if config.penalty_levels is not None:
        return tuple(config.penalty_levels)
    return tuple(level_names(config.cfg))


def _scene_loss(
    backbone: Backbone, pairs: ScenePairs, idx: Tensor, config: TrainConfig, gen: torch.Generator
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """The scene objectives for scenes ``idx``: the weighted terms to add to the loss, and the
    parts to record by name.

    Compositional: classification on scenes and objects alone, and the penalty. Localised:
    the per-cell multi-label loss and the background penalty (skipped for a batch with
    nothing to compare, see :func:`.localisation.background_ratio`)."""
    sel = torch.isin(pairs.scene_index, idx)
    remap = torch.full((len(pairs.scenes),), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(idx))
    scene_index = remap[pairs.scene_index[sel]]  # (O,) into the scene batch
    flip = torch.rand(len(idx), generator=gen) < 0.5
    scenes = _flip(pairs.scenes[idx], flip)  # (S, 3, H, W)
    objects = _flip(pairs.objects[sel], flip[scene_index])  # (O, 3, H, W)
    masks = _flip(pairs.masks[sel], flip[scene_index])  # (O, H, W)
    labels = pairs.labels[sel]
    scene_acts = backbone(scenes)
    terms: list[Tensor] = []
    parts: dict[str, Tensor] = {}
    if config.localised:
        top = scene_acts.levels[-1]
        targets = cell_targets(
            masks, labels, scene_index, n_scenes=len(idx), num_classes=len(backbone.categories),
            size=(top.height, top.width), full_cover=config.full_cover,
        )  # fmt: skip
        parts["localisation"] = localisation_loss(backbone.cell_logits(scene_acts), targets)
        terms.append(config.localisation_weight * parts["localisation"])
        if config.background_levels:
            ratio = background_ratio(
                scene_acts, masks, scene_index, levels=config.background_levels
            )
            if torch.isfinite(ratio):
                parts["background"] = ratio
                terms.append(config.background_weight * ratio)
    if not config.compositional:
        return terms, parts
    alone_acts = backbone(objects)
    # Soft scene target: uniform over the categories present in the scene.
    target = torch.zeros(len(idx), len(backbone.categories))
    target[scene_index, labels] = 1.0
    target = target / target.sum(-1, keepdim=True)
    cls = F.cross_entropy(backbone.logits(scene_acts), target) + F.cross_entropy(
        backbone.logits(alone_acts), labels
    )
    pen = compositional_penalty(
        scene_acts,
        alone_acts,
        masks,
        scene_index,
        levels=penalised_levels(config),
        kind=config.penalty,
    )
    parts["penalty"] = pen
    return terms + [cls, config.penalty_weight * pen], parts


def train_backbone(config: TrainConfig = TrainConfig(), *, progress: bool = True) -> TrainResult:
    """Render the data, train a :class:`SmallVGG` on CPU threads torch already has, evaluate."""
    _check_config(config)
    t0 = time.perf_counter()
    cats = config.categories
    x_train, y_train = render_objects(
        cats, config.n_train, size=config.image_size, seed=config.seed, progress=progress
    )
    x_test, y_test = render_objects(
        cats,
        config.n_test,
        size=config.image_size,
        seed=config.seed + HELD_OUT_SEED_OFFSET,
        progress=progress,
    )
    pairs = None
    if config.compositional or config.localised:
        pairs = render_scene_pairs(
            config.n_scenes,
            categories=cats,
            size=config.image_size,
            seed=config.seed,
            progress=progress,
        )
    render_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    # Normalisation from the training set, stored with the weights.
    mean = x_train.mean(dim=(0, 2, 3)).tolist()
    std = x_train.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    net = SmallVGG(config.cfg, num_classes=len(cats))
    backbone = Backbone.from_small_vgg(
        net, categories=cats, image_size=config.image_size, mean=mean, std=std
    )
    steps_per_epoch = max(1, len(x_train) // config.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
    )
    history: list[dict[str, float]] = []
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        desc="train-backbone"
        + (" (compositional)" if config.compositional else "")
        + (" (localised)" if config.localised else ""),
        disable=not progress,
        unit="step",
    )
    for epoch in range(config.epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        sums = dict.fromkeys(_loss_parts(config), 0.0)
        for step in range(steps_per_epoch):
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            loss = F.cross_entropy(backbone.logits(_flip(x_train[idx], flip)), y_train[idx])
            if pairs is not None:
                scene_idx = torch.randint(len(pairs.scenes), (config.scene_batch,), generator=gen)
                terms, parts = _scene_loss(backbone, pairs, scene_idx.unique(), config, gen)
                for term in terms:
                    loss = loss + term
                for key, value in parts.items():
                    sums[key] += value.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["loss"] += loss.item()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        acc = accuracy(backbone, x_test, y_test)
        record = {k: v / steps_per_epoch for k, v in sums.items()}
        history.append({"epoch": epoch + 1, **record, "held_out_accuracy": acc})
        bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.3f}", acc=f"{acc:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - t1
    acc = history[-1]["held_out_accuracy"]
    backbone.info["training"] = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "held_out_accuracy": acc,
        "n_held_out": len(x_test),
        "render_seconds": round(render_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(render_seconds + train_seconds, 2),
        "history": history,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} logical CPUs",
    }
    backbone.eval()
    return TrainResult(backbone, acc, train_seconds, render_seconds, tuple(history))


# ------------------------------------------------------------------------------------- CLI

SMOKE = {
    "cfg": (4, "M", 4, "M", 8, "M", 8, "M"),
    "n_train": 4,
    "n_test": 2,
    "epochs": 1,
    "batch_size": 8,
    "n_scenes": 2,
    "scene_batch": 2,
}

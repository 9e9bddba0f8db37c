"""Fitting a :class:`~pyro_backpass.model.MaskReadout`: the object mask read from F̂ of a few
levels by a logistic filter or a small net, fitted on training objects (their rendered masks),
its threshold chosen on validation objects."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pyro_backpass.backbone import Backbone
from pyro_backpass.data import Scene
from pyro_backpass.inference import greedy_map
from pyro_backpass.learning.calibration import top_clamped_passes
from pyro_backpass.learning.distributed import SINGLE_PROCESS, World
from pyro_backpass.learning.evaluation import mask_iou
from pyro_backpass.levels import full_resolution_level
from pyro_backpass.model import GenerativeModel, MaskReadout

__all__ = [
    "DEFAULT_READOUT_LEVELS",
    "LOGIT_GRID",
    "fit_mask_readout",
    "fit_readout_net",
    "object_reconstructions",
    "scene_object_reconstructions",
    "standardise_readout",
]

#: The levels read by default (those present in the model): the full-resolution level and the
#: two above it (on the default backbone's validation objects, adding ``pool2`` and ``conv3_1``
#: did not raise the IoU).
DEFAULT_READOUT_LEVELS = ("conv1_1", "pool1", "conv2_1")
#: The thresholds on the readout's logits its fit tries on the validation objects.
LOGIT_GRID = tuple(x / 4 for x in range(-12, 13))
#: Key of a level's input activations in the maps returned ``with_input``.
INPUT_KEY = "input/{}"


def _split(maps: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """``(F̂ by level, input activations by level or None)`` of maps that may hold both."""
    prefix = INPUT_KEY.format("")
    td = {n: v for n, v in maps.items() if not n.startswith(prefix)}
    bu = {n[len(prefix) :]: v for n, v in maps.items() if n.startswith(prefix)}
    return td, (bu or None)


@torch.no_grad()
def object_reconstructions(
    gm: GenerativeModel,
    backbone: Backbone,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    levels: Sequence[str],
    batch_size: int = 64,
    with_input: bool = False,
) -> dict[str, torch.Tensor]:
    """F̂ of ``levels`` from the backward pass on each image's own activations, category given:
    ``{level: (N, C, H, W)}``; ``with_input`` adds the images' activations of the same levels
    under ``INPUT_KEY.format(level)``."""
    keys = [*levels, *(INPUT_KEY.format(n) for n in levels if with_input)]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        bu = {k: v for k, v in backbone(images[sl]).items() if k in gm.hidden_levels}
        td = greedy_map(gm, bu, category=labels[sl]).td
        for n in levels:
            out[n].append(td[n])
            if with_input:
                out[INPUT_KEY.format(n)].append(bu[n])
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def scene_object_reconstructions(
    gm: GenerativeModel,
    backbone: Backbone,
    scenes: Sequence[Scene],
    *,
    levels: Sequence[str],
    with_input: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """F̂ of ``levels`` for every visible object of ``gm``'s categories in ``scenes``, from the
    pass on its scene with the top level clamped to the object's own E-step assignment
    (:func:`~pyro_backpass.learning.top_clamped_passes`), and the objects' visible masks:
    ``({level: (M, C, H, W)}, (M, H, W) bool)``; ``with_input`` adds the scene's activations
    of the same levels under ``INPUT_KEY.format(level)``."""
    specs = {s.name: s for s in gm.levels}
    keys = [*levels, *(INPUT_KEY.format(n) for n in levels if with_input)]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    masks = []
    for scene in scenes:
        bu = backbone(scene.image[None]) if with_input else {}
        for inst, result in top_clamped_passes(gm, backbone, [scene]):
            for n in levels:
                out[n].append(result.td[n].cpu())
                if with_input:
                    out[INPUT_KEY.format(n)].append(bu[n].cpu())
            masks.append(inst.mask[None])
    if not masks:  # still the right shapes: gathered across ranks
        h, w = gm.levels[0].height, gm.levels[0].width  # the image's: the masks' size
        empty = {k: torch.zeros(0, *specs[k.split("/")[-1]].shape, dtype=gm.dtype) for k in keys}
        return empty, torch.zeros(0, h, w, dtype=torch.bool)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(masks)


def fit_mask_readout(
    gm: GenerativeModel,
    backbone: Backbone,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    scenes: Sequence[Scene] = (),
    validation_scenes: Sequence[Scene] = (),
    levels: Sequence[str] | None = None,
    kernel_size: int = 5,
    hidden: int = 16,
    reads_input: bool = False,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 3e-3,
    max_iter: int = 100,
    seed: int = 0,
    attach: bool = True,
    progress: bool = False,
    world: World = SINGLE_PROCESS,
) -> tuple[MaskReadout, dict[str, float]]:
    """Fit a mask readout of ``gm``'s F̂ and (with ``attach``) make it the model's mask.

    :param train, validation: ``(images (N, 3, H, W), masks (N, H, W) bool, labels (N,))``
        rendered objects alone; the readout is fitted on ``train`` (logistic loss), its
        threshold on the logits chosen on ``validation`` (best mean mask IoU).
    :param scenes: training scenes whose visible objects join the training set, each read from
        the pass on its scene with the top level clamped to its own E-step assignment
        (:func:`~pyro_backpass.learning.top_clamped_passes`): a readout fitted on objects alone
        learns that every "on" element of F̂ is the object's and lets clutter in.
    :param validation_scenes: their objects (read the same way) join the threshold's choice:
        the threshold maximises the mean of the single-object and the scene-object IoU.
    :param levels: hidden levels to read (default: those of :data:`DEFAULT_READOUT_LEVELS` the
        model has, else its full-resolution level).
    :param hidden: 0: one logistic ``kernel_size``² filter, fitted by L-BFGS (``max_iter``,
        full batch); > 0: :class:`MaskReadout`'s small net, fitted by Adam (``epochs`` over
        shuffled batches of ``batch_size`` objects, learning rate ``lr`` on a cosine schedule;
        initialisation and order drawn from ``seed``). 16 is the default: fitted with training
        scenes it beat the logistic filter on the shipped model's validation objects and scene
        objects alike (``benchmarks/results/mask_readout_compare.json``).
    :param reads_input: the readout also reads the input's activations of ``levels``
        (:class:`MaskReadout`'s ``reads_input``); then every mask of the model needs them,
        which every backward pass of the library passes.
    :param world: under several processes ``train`` and ``validation`` are this rank's shares;
        their reconstructions are gathered, and every rank fits the same readout.
    :returns: the readout and ``{"validation_iou", "validation_iou_threshold_rule",
        "train_iou", "threshold"}`` (the rule: the model's ``mask_threshold`` on one level),
        with ``validation_scenes`` also ``"validation_scene_iou"`` and
        ``"validation_scene_iou_threshold_rule"``, with ``scenes`` ``"train_scene_objects"``.
    """
    if levels is None:
        levels = [n for n in DEFAULT_READOUT_LEVELS if n in gm.hidden_levels]
        levels = levels or [full_resolution_level(gm.levels)]
    unknown = [n for n in levels if n not in gm.hidden_levels]
    if unknown:
        raise ValueError(f"mask readout: unknown levels {unknown}; hidden: {gm.hidden_levels}")
    if not isinstance(reads_input, bool):
        raise ValueError(f"fit_mask_readout: reads_input must be a bool, got {reads_input!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fit_mask_readout: {name} must be an int >= 1, got {value!r}")
    for what, (images, masks, labels) in (("train", train), ("validation", validation)):
        if masks.dtype != torch.bool or masks.shape != images.shape[:1] + images.shape[2:]:
            raise ValueError(f"{what}: masks must be bool (N, H, W) matching the images, got "
                             f"{masks.dtype} {tuple(masks.shape)}")  # fmt: skip
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{what}: need one label per image, got {tuple(labels.shape)}")
    specs = {s.name: s for s in gm.levels}
    full = specs[full_resolution_level(gm.levels)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the net's initialisation
        readout = MaskReadout(
            [specs[n] for n in levels], size=(full.height, full.width), kernel_size=kernel_size,
            hidden=hidden, reads_input=reads_input,
        ).to(dtype=gm.dtype)  # fmt: skip
    # Validation passes keep the rule's level too, for the rule's IoU beside the readout's.
    val_levels = list(dict.fromkeys([*levels, full.name]))

    def gathered(td: dict[str, torch.Tensor], masks: torch.Tensor):
        # Every rank fits on all objects (F̂ at the levels' own sizes: small beside features).
        return {n: world.all_gather_rows(v) for n, v in td.items()}, world.all_gather_rows(masks)

    td_train, train_masks = gathered(
        object_reconstructions(gm, backbone, train[0], train[2], levels=levels,
                               with_input=reads_input),
        train[1],
    )  # fmt: skip
    td_val, val_masks = gathered(
        object_reconstructions(
            gm, backbone, validation[0], validation[2], levels=val_levels, with_input=reads_input
        ),
        validation[1],
    )
    # Whether any rank holds scenes (a rank's share may be empty; all must gather alike).
    use_scenes = sum(world.sizes(len(scenes))) > 0
    use_validation_scenes = sum(world.sizes(len(validation_scenes))) > 0
    n_scene_objects = 0
    if use_scenes:
        td_scene, scene_masks = gathered(*scene_object_reconstructions(
            gm, backbone, scenes, levels=levels, with_input=reads_input))  # fmt: skip
        n_scene_objects = scene_masks.shape[0]
        td_train = {n: torch.cat([v, td_scene[n]]) for n, v in td_train.items()}
        train_masks = torch.cat([train_masks, scene_masks])
    if use_validation_scenes:
        td_val_scene, val_scene_masks = gathered(
            *scene_object_reconstructions(
                gm, backbone, validation_scenes, levels=val_levels, with_input=reads_input
            )
        )
        if val_scene_masks.shape[0] == 0:
            raise ValueError("validation_scenes hold no visible object of the model's categories")
    n_train = train_masks.shape[0]
    standardise_readout(readout, td_train, batch_size=64)

    def features(td: dict[str, torch.Tensor], rows) -> torch.Tensor:  # (b, C_total, H, W)
        return readout.features(*_split({n: v[rows] for n, v in td.items()}))

    with torch.enable_grad():
        if hidden == 0:
            _fit_logistic(
                readout, readout.features(*_split(td_train)), train_masks, max_iter=max_iter
            )
        else:
            fit_readout_net(readout, lambda rows: features(td_train, rows), train_masks,
                            epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                            progress=progress)  # fmt: skip
    readout.requires_grad_(False)
    with torch.no_grad():

        def logits(td: dict[str, torch.Tensor], n: int) -> torch.Tensor:  # (n, H, W)
            return torch.cat([readout.logits_of_features(features(td, rows))
                              for rows in torch.arange(n).split(64)])  # fmt: skip

        def ious_over_grid(td: dict[str, torch.Tensor], masks: torch.Tensor) -> dict:
            lg = logits(td, masks.shape[0])
            return {t: float(mask_iou(lg > t, masks).mean()) for t in LOGIT_GRID}

        def rule_iou(td: dict[str, torch.Tensor], masks: torch.Tensor) -> float:
            rule = td[full.name].amax(dim=-3) >= gm.observations[full.name].mask_threshold
            return float(mask_iou(rule, masks).mean())

        ious = ious_over_grid(td_val, val_masks)
        score = dict(ious)
        if use_validation_scenes:
            scene_ious = ious_over_grid(td_val_scene, val_scene_masks)
            score = {t: (ious[t] + scene_ious[t]) / 2 for t in LOGIT_GRID}
        best = max(score, key=lambda t: (score[t], -abs(t)))
        readout.threshold.fill_(best)
        train_iou = float(mask_iou(logits(td_train, n_train) > best, train_masks).mean())
        report = {
            "validation_iou": ious[best],
            "validation_iou_threshold_rule": rule_iou(td_val, val_masks),
            "train_iou": train_iou,
            "threshold": float(best),
        }
        if use_validation_scenes:
            report["validation_scene_iou"] = scene_ious[best]
            report["validation_scene_iou_threshold_rule"] = rule_iou(td_val_scene, val_scene_masks)
        if use_scenes:
            report["train_scene_objects"] = n_scene_objects
    if attach:
        gm.attach_mask_readout(readout)
    return readout, report


def _fit_logistic(
    readout: MaskReadout, x: torch.Tensor, masks: torch.Tensor, *, max_iter: int
) -> None:
    """The logistic filter on all features ``x`` ``(N, C, H, W)`` at once: L-BFGS (convex)."""
    target = masks.to(x.dtype)
    opt = torch.optim.LBFGS([readout.weight, readout.bias], max_iter=max_iter,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(readout.logits_of_features(x), target)
        loss.backward()
        return loss

    opt.step(closure)


def fit_readout_net(
    readout: MaskReadout,
    features: Callable[[torch.Tensor], torch.Tensor],
    masks: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> None:
    """The net by Adam over shuffled batches (``features(rows)``: their standardised features,
    made per batch so that all of them never sit in memory), cosine learning-rate schedule."""
    n = masks.shape[0]
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(readout.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-n // batch_size))
    for _ in tqdm(range(epochs), desc="mask readout", disable=not progress):
        for rows in torch.randperm(n, generator=generator).split(batch_size):
            opt.zero_grad()
            logits = readout.logits_of_features(features(rows))
            F.binary_cross_entropy_with_logits(logits, masks[rows].to(logits.dtype)).backward()
            opt.step()
            schedule.step()


@torch.no_grad()
def standardise_readout(
    readout: MaskReadout, td: dict[str, torch.Tensor], *, batch_size: int
) -> None:
    """Set the readout's per-channel mean and scale to those of its features on ``td`` (maps
    by the names the readout reads; ``INPUT_KEY`` entries are its input's activations)."""
    n = next(iter(td.values())).shape[0]
    total = total_sq = None
    for rows in torch.arange(n).split(batch_size):
        raw = readout.features(*_split({k: v[rows] for k, v in td.items()})).double()  # mean 0
        s, sq = raw.sum(dim=(0, 2, 3)), raw.square().sum(dim=(0, 2, 3))
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
    count = n * readout.size[0] * readout.size[1]
    mean = total / count
    var = (total_sq / count - mean.square()) * count / max(count - 1, 1)  # unbiased, like std()
    readout.mean.copy_(mean)
    readout.scale.copy_(var.clamp_min(0).sqrt().clamp_min(1e-6))

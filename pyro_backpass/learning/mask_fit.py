"""Fitting a :class:`~pyro_backpass.model.MaskReadout`: the object mask read from F̂ of a few
levels by a logistic filter or a small net, fitted on training objects (their rendered masks),
its threshold chosen on validation objects."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pyro_backpass.backbone import Backbone
from pyro_backpass.inference import greedy_map
from pyro_backpass.learning.distributed import SINGLE_PROCESS, World
from pyro_backpass.learning.evaluation import mask_iou
from pyro_backpass.levels import full_resolution_level
from pyro_backpass.model import GenerativeModel, MaskReadout

__all__ = ["DEFAULT_READOUT_LEVELS", "fit_mask_readout", "object_reconstructions"]

#: The levels read by default (those present in the model): the full-resolution level and the
#: two above it (on the default backbone's validation objects, adding ``pool2`` and ``conv3_1``
#: did not raise the IoU).
DEFAULT_READOUT_LEVELS = ("conv1_1", "pool1", "conv2_1")
_LOGIT_GRID = tuple(x / 4 for x in range(-12, 13))  # thresholds tried on the logits


@torch.no_grad()
def object_reconstructions(
    gm: GenerativeModel,
    backbone: Backbone,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    levels: Sequence[str],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """F̂ of ``levels`` from the backward pass on each image's own activations, category given:
    ``{level: (N, C, H, W)}``."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in levels}
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        bu = {k: v for k, v in backbone(images[sl]).items() if k in gm.hidden_levels}
        td = greedy_map(gm, bu, category=labels[sl]).td
        for n in levels:
            out[n].append(td[n])
    return {n: torch.cat(v) for n, v in out.items()}


def fit_mask_readout(
    gm: GenerativeModel,
    backbone: Backbone,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    levels: Sequence[str] | None = None,
    kernel_size: int = 5,
    hidden: int = 16,
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
    :param levels: hidden levels to read (default: those of :data:`DEFAULT_READOUT_LEVELS` the
        model has, else its full-resolution level).
    :param hidden: 0: one logistic ``kernel_size``² filter, fitted by L-BFGS (``max_iter``,
        full batch); > 0: :class:`MaskReadout`'s small net, fitted by Adam (``epochs`` over
        shuffled batches of ``batch_size`` objects, learning rate ``lr`` on a cosine schedule;
        initialisation and order drawn from ``seed``). 16 is the default: on the shipped model's
        validation objects (100 training objects per category) it beat the logistic filter
        (``benchmarks/mask_readout.py`` reports both).
    :param world: under several processes ``train`` and ``validation`` are this rank's shares;
        their reconstructions are gathered, and every rank fits the same readout.
    :returns: the readout and ``{"validation_iou", "validation_iou_threshold_rule",
        "train_iou", "threshold"}`` (the rule: the model's ``mask_threshold`` on one level).
    """
    if levels is None:
        levels = [n for n in DEFAULT_READOUT_LEVELS if n in gm.hidden_levels]
        levels = levels or [full_resolution_level(gm.levels)]
    unknown = [n for n in levels if n not in gm.hidden_levels]
    if unknown:
        raise ValueError(f"mask readout: unknown levels {unknown}; hidden: {gm.hidden_levels}")
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
            hidden=hidden,
        ).to(dtype=gm.dtype)  # fmt: skip
    td_train = object_reconstructions(gm, backbone, train[0], train[2], levels=levels)
    # Validation passes keep the rule's level too, for the rule's IoU beside the readout's.
    val_levels = list(dict.fromkeys([*levels, full.name]))
    td_val = object_reconstructions(gm, backbone, validation[0], validation[2], levels=val_levels)
    # Every rank fits on all objects (F̂ at the levels' own sizes: small beside the features).
    td_train = {n: world.all_gather_rows(v) for n, v in td_train.items()}
    td_val = {n: world.all_gather_rows(v) for n, v in td_val.items()}
    train_masks, val_masks = world.all_gather_rows(train[1]), world.all_gather_rows(validation[1])
    n_train = train_masks.shape[0]
    _standardise(readout, td_train, batch_size=64)

    def features(td: dict[str, torch.Tensor], rows) -> torch.Tensor:  # (b, C_total, H, W)
        return readout.features({n: v[rows] for n, v in td.items()})

    if hidden == 0:
        x, target = readout.features(td_train), train_masks.to(gm.dtype)
        params = [readout.weight, readout.bias]
        opt = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(readout.logits_of_features(x), target)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
    else:
        generator = torch.Generator().manual_seed(seed)
        steps = epochs * -(-n_train // batch_size)
        opt = torch.optim.Adam(readout.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        with torch.enable_grad():
            for _ in tqdm(range(epochs), desc="mask readout", disable=not progress):
                order = torch.randperm(n_train, generator=generator)
                for rows in order.split(batch_size):
                    opt.zero_grad()
                    logits = readout.logits_of_features(features(td_train, rows))
                    target = train_masks[rows].to(logits.dtype)
                    F.binary_cross_entropy_with_logits(logits, target).backward()
                    opt.step()
                    schedule.step()
    readout.requires_grad_(False)
    with torch.no_grad():

        def logits(td: dict[str, torch.Tensor], n: int) -> torch.Tensor:  # (n, H, W)
            return torch.cat([readout.logits_of_features(features(td, rows))
                              for rows in torch.arange(n).split(64)])  # fmt: skip

        val_logits = logits(td_val, val_masks.shape[0])
        ious = {t: float(mask_iou(val_logits > t, val_masks).mean()) for t in _LOGIT_GRID}
        best = max(ious, key=lambda t: (ious[t], -abs(t)))
        readout.threshold.fill_(best)
        train_iou = float(mask_iou(logits(td_train, n_train) > best, train_masks).mean())
        rule = td_val[full.name].amax(dim=-3) >= gm.observations[full.name].mask_threshold
    report = {
        "validation_iou": ious[best],
        "validation_iou_threshold_rule": float(mask_iou(rule, val_masks).mean()),
        "train_iou": train_iou,
        "threshold": float(best),
    }
    if attach:
        gm.attach_mask_readout(readout)
    return readout, report


@torch.no_grad()
def _standardise(readout: MaskReadout, td: dict[str, torch.Tensor], *, batch_size: int) -> None:
    """Set the readout's per-channel mean and scale to those of its features on ``td``."""
    n = next(iter(td.values())).shape[0]
    total = total_sq = None
    for rows in torch.arange(n).split(batch_size):
        raw = readout.features({k: v[rows] for k, v in td.items()}).double()  # mean 0, scale 1
        s, sq = raw.sum(dim=(0, 2, 3)), raw.square().sum(dim=(0, 2, 3))
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
    count = n * readout.size[0] * readout.size[1]
    mean = total / count
    var = (total_sq / count - mean.square()) * count / max(count - 1, 1)  # unbiased, like std()
    readout.mean.copy_(mean)
    readout.scale.copy_(var.clamp_min(0).sqrt().clamp_min(1e-6))

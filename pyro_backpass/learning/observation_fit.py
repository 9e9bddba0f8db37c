"""Fitting the observation model P(F_bu | F_td) of every level (paper §2.3.1).

Data: cluttered scenes and, for every object in them, the object rendered alone at the same
place. F_bu is the backbone's activations of the scene, F_td those of the object alone masked
to the object (:func:`~pyro_backpass.learning.targets.masked_activations`). Elements where the
object is hidden by something in front are left out (neither branch of eq. 9 describes them).

For a given λ the other parameters are closed-form maximum-likelihood estimates::

    on  = F_td ≥ λ:   σ1[c]² = mean_on,c (F_bu − F_td)²          (per channel)
    off = F_td < λ:   β = mean_off F_bu,   σ2² = var_off F_bu

The paper picks λ by maximum likelihood over a dense grid. On our backbone that drives λ to
about 0 on most levels, and then the on-branch claims the whole background (the learning
issue's feasibility run: mask IoU 0.12). So the default is a documented quantile rule,
λ = ``factor`` × the ``quantile`` of the positive targets (1.5 × the 25 % quantile), with the
maximum-likelihood λ and the log-likelihood over the grid reported beside it.

Constraint (default on): σ0² + σ1² ≤ σ2². Fitted freely, σ1 exceeds σ2 on upper levels, and then
a large bottom-up activation is always better explained as "on" even where φ = 0, so clutter
enters the object; capping σ1 keeps the background at least as broad as the on-branch. The
unconstrained σ1 is reported beside the capped one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pyro_backpass.backbone import Backbone
from pyro_backpass.data import Scene
from pyro_backpass.learning.targets import masked_activations, max_pool_mask
from pyro_backpass.model import GenerativeModel

__all__ = [
    "LevelFit",
    "ObservationFit",
    "fit_background",
    "fit_level",
    "fit_observation_model",
    "scene_pairs",
]


@dataclass(frozen=True)
class LevelFit:
    """The fitted observation parameters of one level and what they came from."""

    threshold: float  # λ used (the quantile rule unless told otherwise)
    background: float  # β
    scale_on: torch.Tensor  # σ1 per channel, (C,), after the constraint
    scale_off: float  # σ2
    scale_on_free: torch.Tensor  # σ1 per channel without the constraint, (C,)
    threshold_ml: float  # λ of maximum likelihood over the grid
    grid: torch.Tensor  # (G,) the λ grid
    log_lik: torch.Tensor  # (G,) mean log-likelihood per element at each λ of the grid
    on_fraction: float  # fraction of F_td elements ≥ λ
    n_elements: int  # elements used


@dataclass(frozen=True)
class ObservationFit:
    """Per-level fits of :func:`fit_observation_model` (level → :class:`LevelFit`)."""

    levels: dict[str, LevelFit]
    n_objects: int


@torch.no_grad()
def scene_pairs(
    backbone: Backbone, scenes: Sequence[Scene], *, batch_size: int = 64
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """F_bu, F_td and the used-element mask of every object in ``scenes``, level by level.

    :returns: ``(bu, td, used)``: level → ``(O, C, h, w)`` for O objects (``used`` is bool
        ``(O, 1, h, w)``: False where the object is hidden by something in front).
    """
    scene_images, alone, masks, hidden, index = [], [], [], [], []
    for s, scene in enumerate(scenes):
        scene_images.append(scene.image)
        for inst in scene.instances:
            if not bool(inst.mask.any()):
                continue
            alone.append(inst.image_alone)
            masks.append(inst.amodal_mask)
            hidden.append(inst.amodal_mask & ~inst.mask)
            index.append(s)
    if not alone:
        raise ValueError("the scenes hold no visible object to fit the observation model on")
    idx = torch.tensor(index)
    bu_parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(scene_images), batch_size):
        acts = backbone(torch.stack(scene_images[start : start + batch_size]))
        for name, x in acts.items():
            bu_parts.setdefault(name, []).append(x)
    bu_scenes = {name: torch.cat(v) for name, v in bu_parts.items()}
    td_parts: dict[str, list[torch.Tensor]] = {}
    used_parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(alone), batch_size):
        sl = slice(start, start + batch_size)
        m, h = torch.stack(masks[sl]), torch.stack(hidden[sl])
        td = masked_activations(backbone, torch.stack(alone[sl]), m)
        for name, x in td.items():
            td_parts.setdefault(name, []).append(x)
            occluded = max_pool_mask(h, tuple(x.shape[-2:]))  # (b, h, w)
            used_parts.setdefault(name, []).append(~occluded.unsqueeze(1))
    td_all = {name: torch.cat(v) for name, v in td_parts.items()}
    used = {name: torch.cat(v) for name, v in used_parts.items()}
    bu = {name: x[idx] for name, x in bu_scenes.items()}  # (O, C, h, w): each object's scene
    return bu, td_all, used


def fit_level(
    bu: torch.Tensor,
    td: torch.Tensor,
    used: torch.Tensor | None = None,
    *,
    scale_td: float,
    quantile: float = 0.25,
    factor: float = 1.5,
    threshold: float | None = None,
    grid_size: int = 64,
    constrain: bool = True,
    min_on: int = 20,
    floor: float = 1e-3,
) -> LevelFit:
    """Closed-form observation parameters of one level from paired ``(O, C, h, w)`` tensors.

    :param used: bool, broadcastable to ``bu``: elements to fit on (None: all).
    :param scale_td: σ0 of the level (for the constraint σ0² + σ1² ≤ σ2²).
    :param threshold: λ to use; None applies the quantile rule.
    :param min_on: a channel with fewer "on" elements takes the level's pooled σ1.
    :param floor: smallest σ1, σ2.
    """
    if bu.shape != td.shape or bu.dim() != 4:
        raise ValueError(
            f"bu and td must both be (O, C, h, w), got {tuple(bu.shape)}, {tuple(td.shape)}"
        )
    if not (torch.isfinite(bu).all() and torch.isfinite(td).all()):
        raise ValueError("bu or td contains NaN or inf")
    used = torch.ones_like(bu, dtype=torch.bool) if used is None else used.expand(bu.shape)
    bu, td = bu.double(), td.double()
    positive = td[used & (td > 0)]
    if positive.numel() == 0:
        raise ValueError("no positive target activation at this level: nothing is 'on'")
    rule = factor * float(
        torch.quantile(positive[:: max(1, positive.numel() // 1_000_000)], quantile)
    )
    top = float(torch.quantile(positive[:: max(1, positive.numel() // 1_000_000)], 0.99))
    grid = torch.linspace(0.0, max(top, rule), grid_size, dtype=torch.float64)
    lls = _log_lik_grid(bu, td, used, grid, floor)
    lam = rule if threshold is None else float(threshold)
    beta, s2, s1_free, on_fraction, n = _params(bu, td, used, lam, min_on, floor)
    s1 = s1_free
    if constrain:
        cap = math.sqrt(max(s2**2 - scale_td**2, floor**2))
        s1 = s1_free.clamp(max=cap)
    return LevelFit(
        threshold=lam, background=beta, scale_on=s1.float(), scale_off=s2,
        scale_on_free=s1_free.float(), threshold_ml=float(grid[int(lls.argmax())]),
        grid=grid.float(), log_lik=lls.float(), on_fraction=on_fraction, n_elements=n,
    )  # fmt: skip


def _params(bu, td, used, lam: float, min_on: int, floor: float):
    """β, σ2, per-channel σ1, the on fraction and the element count at threshold ``lam``."""
    on = used & (td >= lam)
    off = used & ~on
    n_off = int(off.sum())
    if n_off == 0:
        raise ValueError(f"λ = {lam:.4g}: every element is 'on'; no background to fit")
    beta = float(bu[off].mean())
    s2 = max(float(bu[off].std(correction=0)), floor)
    sq = (bu - td).square() * on  # (O, C, h, w)
    count = on.sum(dim=(0, 2, 3))  # (C,)
    pooled = float(sq.sum() / on.sum().clamp_min(1)) if bool(on.any()) else s2**2
    per_channel = sq.sum(dim=(0, 2, 3)) / count.clamp_min(1)
    var = torch.where(count >= min_on, per_channel, torch.full_like(per_channel, pooled))
    s1 = var.sqrt().clamp_min(floor)  # (C,)
    return beta, s2, s1, float(on.sum() / used.sum()), int(used.sum())


def _log_lik_grid(bu, td, used, grid: torch.Tensor, floor: float) -> torch.Tensor:
    """Mean log-likelihood per used element of eq. (9), with the closed-form fit at every λ of
    ``grid`` ``(G,)``: one sort per channel and suffix sums, not one pass over the data per λ."""
    c = bu.shape[1]
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    b_all, t_all, u_all = (
        v.transpose(0, 1).reshape(c, -1) for v in (bu, td, used.expand(bu.shape))
    )
    n_used = int(u_all.sum())
    g = grid.shape[0]
    on_n = torch.zeros(g, dtype=torch.float64)
    on_b = torch.zeros(g, dtype=torch.float64)  # Σ bu over on elements (for the off stats)
    on_b2 = torch.zeros(g, dtype=torch.float64)
    ll_on = torch.zeros(g, dtype=torch.float64)
    for ch in range(c):
        keep = u_all[ch]
        t, b = t_all[ch][keep], b_all[ch][keep]
        t, order = t.sort()
        b = b[order]
        r2 = (b - t).square()

        def suffix(x):  # suffix[i] = Σ x[i:], with a trailing 0
            return torch.cat([x.flip(0).cumsum(0).flip(0), x.new_zeros(1)])

        first = torch.searchsorted(t, grid)  # first index with t ≥ λ
        n_c = (t.numel() - first).double()
        s_r2 = suffix(r2)[first]
        var = s_r2 / n_c.clamp_min(1)
        s1 = var.sqrt().clamp_min(floor)
        ll_c = -0.5 * s_r2 / s1.square() - n_c * (s1.log() + half_log_2pi)
        ll_on += torch.where(n_c > 0, ll_c, torch.zeros_like(ll_c))
        on_n += n_c
        on_b += suffix(b)[first]
        on_b2 += suffix(b.square())[first]
    keep = u_all
    tot_n, tot_b, tot_b2 = (
        float(keep.sum()),
        float(b_all[keep].sum()),
        float(b_all[keep].square().sum()),
    )
    off_n = tot_n - on_n
    off_mean = (tot_b - on_b) / off_n.clamp_min(1)
    off_var = ((tot_b2 - on_b2) / off_n.clamp_min(1) - off_mean.square()).clamp_min(0)
    s2 = off_var.sqrt().clamp_min(floor)
    ll_off = -0.5 * off_n * off_var / s2.square() - off_n * (s2.log() + half_log_2pi)
    ll = (ll_on + ll_off) / n_used
    return torch.where(off_n > 0, ll, torch.full_like(ll, -math.inf))


def fit_observation_model(
    gm: GenerativeModel,
    backbone: Backbone,
    scenes: Sequence[Scene],
    *,
    levels: Sequence[str] | None = None,
    quantile: float = 0.25,
    factor: float = 1.5,
    grid_size: int = 64,
    constrain: bool = True,
    progress: bool = True,
) -> ObservationFit:
    """Fit λ, β, σ2 and per-channel σ1 of every level of ``gm`` from scenes, in place.

    :param scenes: cluttered scenes with their objects rendered alone (``make_scene``).
    :param levels: the levels to fit (default: every level of ``gm`` but ``category``).
    :param quantile, factor: the λ rule, ``λ = factor × quantile(positive F_td)``.
    :param constrain: cap σ1 so that σ0² + σ1² ≤ σ2² (σ0 from ``gm``'s top-down steps).
    :returns: :class:`ObservationFit` with the maximum-likelihood λ and log-likelihood grid.

    Example::

        fit = fit_observation_model(gm, Backbone.default(), Scenes(200, seed=1))
        fit.levels["conv1_1"].threshold, fit.levels["conv1_1"].threshold_ml
    """
    names = [n for n in gm.hidden_levels] if levels is None else list(levels)
    unknown = [n for n in names if n not in gm.hidden_levels]
    if unknown:
        raise ValueError(f"unknown levels {unknown}; the model's levels: {list(gm.hidden_levels)}")
    missing = [n for n in names if n not in {s.name for s in backbone.levels}]
    if missing:
        raise ValueError(f"the backbone has no levels {missing}")
    bu, td, used = scene_pairs(backbone, list(scenes))
    fits = {}
    for name in tqdm(names, desc="observation model", disable=not progress):
        fit = fit_level(
            bu[name], td[name], used[name], scale_td=float(gm.steps[name].scale_td),
            quantile=quantile, factor=factor, grid_size=grid_size, constrain=constrain,
        )  # fmt: skip
        obs = gm.observations[name]
        with torch.no_grad():
            obs.threshold.fill_(fit.threshold)
            obs.mask_threshold.fill_(fit.threshold)  # λ until tuned (tune_mask_threshold)
            obs.background.fill_(fit.background)
            obs.scale_off.fill_(fit.scale_off)
            obs.scale_on.copy_(fit.scale_on.view(-1, 1, 1).to(obs.scale_on))
        fits[name] = fit
    return ObservationFit(levels=fits, n_objects=int(next(iter(bu.values())).shape[0]))


@torch.no_grad()
def fit_background(
    gm: GenerativeModel,
    backbone: Backbone,
    scenes: Sequence[Scene],
    *,
    levels: Sequence[str] | None = None,
    floor_factor: float = 1.0,
    batch_size: int = 32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fit β and σ2 **per channel**, in place: the mean and standard deviation of each channel's
    scene activations outside every instance (the plain background and the clutter), with σ2
    floored at the level's pooled σ2 × ``floor_factor`` (default: never narrower than the
    pooled fit of :func:`fit_observation_model`).

    The pooled fit gives every channel one background; on our backbone a plain background of a
    saturated colour drives a few low-level channels far above it, and clutter drives upper
    channels, so those activations were explained "on" wherever φ allowed it. Issue #10's
    lever table (``benchmarks/clutter_levers.py``) measures what the per-channel fit buys.

    :param scenes: cluttered scenes (``make_scene``); instance masks, max-pooled to each level,
        mark what is left out.
    :returns: level → ``(β, σ2)``, each ``(C,)``.
    """
    names = [n for n in gm.hidden_levels] if levels is None else list(levels)
    unknown = [n for n in names if n not in gm.hidden_levels]
    if unknown:
        raise ValueError(f"unknown levels {unknown}; the model's levels: {list(gm.hidden_levels)}")
    if not floor_factor > 0:
        raise ValueError(f"floor_factor must be > 0, got {floor_factor}")
    scenes = list(scenes)
    if not scenes:
        raise ValueError("fit_background needs at least one scene")
    sums: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(scenes), batch_size):
        part = scenes[start : start + batch_size]
        acts = backbone(torch.stack([s.image for s in part]))
        objects = torch.stack(
            [torch.stack([i.amodal_mask for i in s.instances]).any(0) if s.instances
             else torch.zeros(s.image.shape[-2:], dtype=torch.bool) for s in part]
        )  # (b, H, W)  # fmt: skip
        for name in names:
            a = acts[name].double()  # (b, C, h, w)
            outside = ~max_pool_mask(objects, tuple(a.shape[-2:])).unsqueeze(1)  # (b, 1, h, w)
            w = outside.to(a.dtype)
            acc = sums.setdefault(name, [a.new_zeros(a.shape[1]), a.new_zeros(a.shape[1]), 0.0])
            acc[0] += (a * w).sum(dim=(0, 2, 3))
            acc[1] += (a.square() * w).sum(dim=(0, 2, 3))
            acc[2] += float(w.sum())
    fitted = {}
    for name, (s1, s2, n) in sums.items():
        if n == 0:
            raise ValueError(f"{name}: no element outside the instances to fit the background on")
        obs = gm.observations[name]
        mean = s1 / n
        std = (s2 / n - mean.square()).clamp_min(0).sqrt()
        floor = float(obs.scale_off.min()) * floor_factor
        std = std.clamp_min(floor)
        obs.per_channel_background()
        obs.background.copy_(mean.view(-1, 1, 1).to(obs.background))
        obs.scale_off.copy_(std.view(-1, 1, 1).to(obs.scale_off))
        fitted[name] = (mean.float(), std.float())
    return fitted

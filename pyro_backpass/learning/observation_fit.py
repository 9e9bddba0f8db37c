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

Across processes (``world``): each rank holds the objects of its shard of the scenes; every
estimate above is a ratio of sums (counts, Σ F_bu, Σ (F_bu − F_td)² per channel, and the same
per λ of the grid), all-reduced; the quantile of the rule is taken on rank 0 over a strided
subsample gathered from every rank (the one a single process would take) and broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pyro_backpass.backbone import Backbone
from pyro_backpass.data import Scene
from pyro_backpass.learning.distributed import SINGLE_PROCESS, World
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
    world: World = SINGLE_PROCESS,
) -> LevelFit:
    """Closed-form observation parameters of one level from paired ``(O, C, h, w)`` tensors.

    :param used: bool, broadcastable to ``bu``: elements to fit on (None: all).
    :param scale_td: σ0 of the level (for the constraint σ0² + σ1² ≤ σ2²).
    :param threshold: λ to use; None applies the quantile rule.
    :param min_on: a channel with fewer "on" elements takes the level's pooled σ1.
    :param floor: smallest σ1, σ2.
    :param world: the processes holding shares of the objects (one by default).
    """
    if bu.shape != td.shape or bu.dim() != 4:
        raise ValueError(
            f"bu and td must both be (O, C, h, w), got {tuple(bu.shape)}, {tuple(td.shape)}"
        )
    finite = torch.isfinite(bu).all() & torch.isfinite(td).all()
    if int(world.all_reduce_sum(finite.long()[None])) < world.size:  # every rank raises
        raise ValueError("bu or td contains NaN or inf")
    used = torch.ones_like(bu, dtype=torch.bool) if used is None else used.expand(bu.shape)
    bu, td = bu.double(), td.double()
    positive = td[used & (td > 0)]
    sizes = world.sizes(positive.numel())
    if sum(sizes) == 0:
        raise ValueError("no positive target activation at this level: nothing is 'on'")
    # Every stride-th positive element in the global order (≤ ~1M of them), on rank 0.
    stride = max(1, sum(sizes) // 1_000_000)
    sample = world.gather_rows(positive[(-sum(sizes[: world.rank])) % stride :: stride])
    quantiles = torch.zeros(2, dtype=torch.float64)  # (the rule's quantile, the 99 % one)
    if sample is not None:
        quantiles = torch.quantile(sample, sample.new_tensor([quantile, 0.99]))
    q, top = world.broadcast(quantiles).tolist()
    rule = factor * q
    grid = torch.linspace(0.0, max(top, rule), grid_size, dtype=torch.float64)
    lls = _log_lik_grid(bu, td, used, grid, floor, world)
    lam = rule if threshold is None else float(threshold)
    beta, s2, s1_free, on_fraction, n = _params(bu, td, used, lam, min_on, floor, world)
    s1 = s1_free
    if constrain:
        cap = math.sqrt(max(s2**2 - scale_td**2, floor**2))
        s1 = s1_free.clamp(max=cap)
    return LevelFit(
        threshold=lam, background=beta, scale_on=s1.float(), scale_off=s2,
        scale_on_free=s1_free.float(), threshold_ml=float(grid[int(lls.argmax())]),
        grid=grid.float(), log_lik=lls.float(), on_fraction=on_fraction, n_elements=n,
    )  # fmt: skip


def _params(bu, td, used, lam: float, min_on: int, floor: float, world: World):
    """β, σ2, per-channel σ1, the on fraction and the element count at threshold ``lam``
    (each from all-reduced sums; σ2 in two passes, as a stable variance is computed)."""
    on = used & (td >= lam)
    off = used & ~on
    off_bu = bu[off]
    n_off, sum_off = world.all_reduce_sum(torch.stack([off_bu.new_tensor(off_bu.numel()),
                                                       off_bu.sum()])).tolist()  # fmt: skip
    if n_off == 0:
        raise ValueError(f"λ = {lam:.4g}: every element is 'on'; no background to fit")
    beta = sum_off / n_off
    s2 = max(math.sqrt(float(world.all_reduce_sum((off_bu - beta).square().sum())) / n_off),
             floor)  # fmt: skip
    sq = world.all_reduce_sum(((bu - td).square() * on).sum(dim=(0, 2, 3)))  # (C,)
    count = world.all_reduce_sum(on.sum(dim=(0, 2, 3)))  # (C,)
    n_on, n_used = world.all_reduce_sum(torch.stack([on.sum(), used.sum()])).tolist()
    pooled = float(sq.sum()) / n_on if n_on > 0 else s2**2
    per_channel = sq / count.clamp_min(1)
    var = torch.where(count >= min_on, per_channel, torch.full_like(per_channel, pooled))
    s1 = var.sqrt().clamp_min(floor)  # (C,)
    return beta, s2, s1, n_on / n_used, int(n_used)


def _log_lik_grid(bu, td, used, grid: torch.Tensor, floor: float, world: World) -> torch.Tensor:
    """Mean log-likelihood per used element of eq. (9), with the closed-form fit at every λ of
    ``grid`` ``(G,)``: one sort per channel and suffix sums, not one pass over the data per λ.
    The sums per channel and λ are the sufficient statistics that ranks all-reduce."""
    c = bu.shape[1]
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    b_all, t_all, u_all = (
        v.transpose(0, 1).reshape(c, -1) for v in (bu, td, used.expand(bu.shape))
    )
    g = grid.shape[0]
    n_on = torch.zeros(c, g, dtype=torch.float64)  # per channel: elements with F_td ≥ λ
    r2_on = torch.zeros(c, g, dtype=torch.float64)  # per channel: Σ (F_bu − F_td)² over them
    b_on = torch.zeros(2, g, dtype=torch.float64)  # Σ F_bu, Σ F_bu² over on elements
    for ch in range(c):
        keep = u_all[ch]
        t, b = t_all[ch][keep], b_all[ch][keep]
        t, order = t.sort()
        b = b[order]
        r2 = (b - t).square()

        def suffix(x):  # suffix[i] = Σ x[i:], with a trailing 0
            return torch.cat([x.flip(0).cumsum(0).flip(0), x.new_zeros(1)])

        first = torch.searchsorted(t, grid)  # first index with t ≥ λ
        n_on[ch] = (t.numel() - first).double()
        r2_on[ch] = suffix(r2)[first]
        b_on[0] += suffix(b)[first]
        b_on[1] += suffix(b.square())[first]
    kept = b_all[u_all]
    totals = torch.stack([kept.new_tensor(kept.numel()), kept.sum(), kept.square().sum()])
    n_on, r2_on, b_on, totals = (world.all_reduce_sum(x) for x in (n_on, r2_on, b_on, totals))
    s1 = (r2_on / n_on.clamp_min(1)).sqrt().clamp_min(floor)  # (C, G)
    ll_c = -0.5 * r2_on / s1.square() - n_on * (s1.log() + half_log_2pi)
    ll_on = torch.where(n_on > 0, ll_c, torch.zeros_like(ll_c)).sum(dim=0)  # (G,)
    on_n, (on_b, on_b2) = n_on.sum(dim=0), b_on
    tot_n, tot_b, tot_b2 = totals.tolist()
    n_used = tot_n
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
    world: World = SINGLE_PROCESS,
) -> ObservationFit:
    """Fit λ, β, σ2 and per-channel σ1 of every level of ``gm`` from scenes, in place.

    :param scenes: cluttered scenes with their objects rendered alone (``make_scene``).
    :param levels: the levels to fit (default: every level of ``gm`` but ``category``).
    :param quantile, factor: the λ rule, ``λ = factor × quantile(positive F_td)``.
    :param constrain: cap σ1 so that σ0² + σ1² ≤ σ2² (σ0 from ``gm``'s top-down steps).
    :param world: the processes sharing the scenes; ``scenes`` is this rank's shard of them.
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
            world=world,
        )  # fmt: skip
        obs = gm.observations[name]
        with torch.no_grad():
            obs.threshold.fill_(fit.threshold)
            obs.mask_threshold.fill_(fit.threshold)  # λ until tuned (tune_mask_threshold)
            obs.background.fill_(fit.background)
            obs.scale_off.fill_(fit.scale_off)
            obs.scale_on.copy_(fit.scale_on.view(-1, 1, 1).to(obs.scale_on))
        fits[name] = fit
    n_objects = sum(world.sizes(int(next(iter(bu.values())).shape[0])))
    return ObservationFit(levels=fits, n_objects=n_objects)


@torch.no_grad()
def fit_background(
    gm: GenerativeModel,
    backbone: Backbone,
    scenes: Sequence[Scene],
    *,
    levels: Sequence[str] | None = None,
    floor_factor: float = 1.0,
    batch_size: int = 32,
    world: World = SINGLE_PROCESS,
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
        mark what is left out; under several processes, this rank's shard of them (the sums
        are all-reduced).
    :returns: level → ``(β, σ2)``, each ``(C,)``.
    """
    names = [n for n in gm.hidden_levels] if levels is None else list(levels)
    unknown = [n for n in names if n not in gm.hidden_levels]
    if unknown:
        raise ValueError(f"unknown levels {unknown}; the model's levels: {list(gm.hidden_levels)}")
    if not floor_factor > 0:
        raise ValueError(f"floor_factor must be > 0, got {floor_factor}")
    scenes = list(scenes)
    if not sum(world.sizes(len(scenes))):
        raise ValueError("fit_background needs at least one scene")
    # Per level: Σ a, Σ a² per channel and the element count (every rank, scenes or not).
    sums = {n: torch.zeros(2 * gm.steps[n].out.shape[0] + 1, dtype=torch.float64) for n in names}
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
            c = a.shape[1]
            sums[name][:c] += (a * w).sum(dim=(0, 2, 3))
            sums[name][c : 2 * c] += (a.square() * w).sum(dim=(0, 2, 3))
            sums[name][-1] += w.sum()
    fitted = {}
    for name, total in sums.items():
        total = world.all_reduce_sum(total)
        c = (total.shape[0] - 1) // 2
        s1, s2, n = total[:c], total[c : 2 * c], float(total[-1])
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

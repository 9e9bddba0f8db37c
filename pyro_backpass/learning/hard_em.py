"""Hard EM for the top-down model P(H) P(F_td | H) (paper §2.3.2).

F_td is observed (the backbone's activations of single objects, masked to the object:
:func:`~pyro_backpass.learning.targets.masked_activations`), so the E-step imputes every γ_l, δ_l
top-down by the layer-wise problem (11) *without* the bottom-up term::

    (γ_l, δ_l) = argmax log P(γ_l | parents) + log P(δ_l) + Σ_i log N(F^l_i; φ_i(U, γ, δ), σ0)

and the M-step refits the γ tables in closed form (Dirichlet posterior mode, α > 1, so no
probability is ever 0) and each level's kernels by a few epochs of SGD given the assignments
(the top level's templates in closed form: the mean of the aligned members). σ0 of a level is
the RMS residual of the fit.

What each level's kernels see as input U^{l+1} is an option (``inputs``): ``"targets"``, the
clean F^{l+1}_td; or ``"greedy"``, the closed-form F̂^{l+1} that the backward pass produces from
the level above (given the object's own activations as F_bu), which is what the kernels meet at
inference time (the learning issue's feasibility run: mask IoU 0.35 → 0.60).

Initialisation: the top level by k-means over (template, shift) — k-means++ seeding, then E- and
M-steps with uniform priors; lower levels by one kernel set fitted to all samples, then a
k-means split of the residuals into K groups, one kernel set fitted per group. Components with
fewer than ``reseed_fraction`` · N / K members after an E-step are reseeded from the members of
the worst-fitted component.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm import tqdm

from pyro_backpass.backbone import Backbone
from pyro_backpass.inference import greedy_map
from pyro_backpass.learning.targets import masked_activations
from pyro_backpass.model import GenerativeModel, NGramPrior, TopDownStep, shift_select

__all__ = [
    "EMConfig",
    "EMIteration",
    "EMResult",
    "e_step_level",
    "fit_hard_em",
    "object_targets",
    "window_scores",
]

InputKind = Literal["greedy", "targets"]


@dataclass(frozen=True)
class EMConfig:
    """Options of :func:`fit_hard_em` (every default commented)."""

    iterations: int = 3  # E/M rounds after the initialisation
    epochs: int = 4  # SGD epochs per level per M-step (not to convergence, as in the paper)
    init_epochs: int = 6  # SGD epochs of the initial single kernel set and of each group
    lr: float = 3e-3  # Adam step size of the kernel fits
    batch_size: int = 64  # objects per SGD step and per greedy/E-step chunk
    inputs: InputKind = "greedy"  # what each level's kernels take as input (module docstring)
    concentration: float = 2.0  # Dirichlet α of the γ tables: α = 2 is add-one smoothing
    reseed_fraction: float = 0.2  # reseed components with < this · N / K members
    top_init_iterations: int = 8  # k-means rounds over (template, shift) for the top level
    seed: int = 0  # k-means seeding, SGD order, reseeding noise


@dataclass(frozen=True)
class EMIteration:
    """One round's diagnostics: per level, RMS error of the fit and members per component."""

    iteration: int
    rms_error: dict[str, float]
    usage: dict[str, list[int]]


@dataclass(frozen=True)
class EMResult:
    """What :func:`fit_hard_em` did: the log of every round, and the final assignment."""

    log: list[EMIteration] = field(default_factory=list)
    assignment: dict[str, torch.Tensor] = field(default_factory=dict)  # site → (N,)

    def to_dict(self) -> dict:
        return {"log": [asdict(it) for it in self.log]}


# ------------------------------------------------------------------------------ targets
def object_targets(
    backbone: Backbone,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    batch_size: int = 128,
) -> dict[str, torch.Tensor]:
    """F_td of every object, level → ``(N, C, h, w)`` (batched :func:`masked_activations`)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        for name, x in masked_activations(backbone, images[sl], masks[sl]).items():
            parts.setdefault(name, []).append(x)
    return {name: torch.cat(v) for name, v in parts.items()}


# ------------------------------------------------------------------------------ E-step
def _windows(dy: int, dx: int, h: int, w: int):
    """φ's window and the target's window that meet at offset (dy, dx), or None if empty."""
    y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))


def window_scores(
    target: torch.Tensor, phi: torch.Tensor, offsets: torch.Tensor, *, scale_td: float
) -> torch.Tensor:
    """``Σ_i log N(F_i; shift(φ_k, δ)_i, σ0)`` for every component and offset: ``(B, K, D)``.

    ``‖F − shift(φ, δ)‖² = ‖F‖² − 2 ⟨F, shift(φ, δ)⟩ + ‖shift(φ, δ)‖²``; a zero-filled shift
    keeps the window of φ that stays on the map, so both terms are sums over one window per
    offset (no shifted copies).

    :param target: ``(B, C, H, W)`` F_td of the level. :param phi: ``(B, K, C, H, W)``.
    """
    b, k, (c, h, w) = phi.shape[0], phi.shape[1], phi.shape[-3:]
    sq_target = target.square().sum(dim=(-3, -2, -1))[:, None]  # (B, 1)
    out = phi.new_empty(b, k, offsets.shape[0])
    for d, (dy, dx) in enumerate(offsets.tolist()):
        win = _windows(dy, dx, h, w)
        if win is None:
            out[:, :, d] = sq_target
            continue
        (py, px), (ty, tx) = win
        pw = phi[..., py, px]  # (B, K, C, h', w')
        cross = (pw * target[:, None, :, ty, tx]).sum(dim=(-3, -2, -1))  # (B, K)
        out[:, :, d] = sq_target - 2 * cross + pw.square().sum(dim=(-3, -2, -1))
    norm = c * h * w * (math.log(scale_td) + 0.5 * math.log(2 * math.pi))
    return -0.5 * out.clamp_min(0) / scale_td**2 - norm


@torch.no_grad()
def e_step_level(
    step: TopDownStep,
    upper: torch.Tensor,
    target: torch.Tensor,
    *,
    log_prior_gamma: torch.Tensor | None = None,
    log_prior_delta: torch.Tensor | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The E-step of one level: the best (γ, δ) of every object given its input and target.

    :param upper: the level's input (category indices ``(B,)`` for the top level's templates).
    :param target: ``(B, C, H, W)`` F_td of the level.
    :param log_prior_gamma: ``(B, K)`` log P(γ | parents) (None: uniform).
    :param log_prior_delta: ``(D,)`` log P(δ) (None: uniform).
    :param batch_size: objects per chunk (φ of all K components is made per chunk).
    :returns: ``(γ, δ, score)``, each ``(B,)``; ties go to the lowest flat index (γ, then δ).
    """
    bests, flats = [], []
    for start in range(0, target.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        phi = step.phi_all(upper[sl])  # (B', K, C, H, W)
        scores = window_scores(target[sl], phi, step.offsets, scale_td=float(step.scale_td))
        if log_prior_gamma is not None:
            scores = scores + log_prior_gamma[sl, :, None]
        if log_prior_delta is not None:
            scores = scores + log_prior_delta[None, None, :]
        best, flat = scores.reshape(scores.shape[0], -1).max(dim=-1)  # first maximum
        bests.append(best), flats.append(flat)
    best, flat = torch.cat(bests), torch.cat(flats)
    d = step.num_offsets
    return flat // d, flat % d, best


# ------------------------------------------------------------------------------ M-step
def _fit_kernels(
    step: TopDownStep,
    upper: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    delta: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """A few epochs of Adam on ``‖F − shift(φ(U, γ), δ)‖²`` given the assignments."""
    if step.kind == "template":
        _fit_templates(step, upper, target, gamma, delta)
        return
    params = [step.weight, step.bias]
    opt = torch.optim.Adam(params, lr=lr)
    n = upper.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                pred = shift_select(step.phi_per_sample(upper[idx], gamma[idx]), step.offsets,
                                    delta[idx])  # fmt: skip
                loss = (pred - target[idx]).square().sum(dim=(-3, -2, -1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def _align(target: torch.Tensor, offsets: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Each target shifted back by its δ (zero fill): what an unshifted template should match."""
    return shift_select(target, -offsets, delta)


@torch.no_grad()
def _fit_templates(step, upper, target, gamma, delta) -> None:
    """Top level: each (category, γ) template = the mean of its members' aligned targets."""
    aligned = _align(target, step.offsets, delta)  # (B, C, H, W)
    for c in range(step.weight.shape[0]):
        for k in range(step.num_components):
            members = (upper == c) & (gamma == k)
            if bool(members.any()):
                step.weight[c, k] = aligned[members].mean(dim=0)


@torch.no_grad()
def _residual_rms(step, upper, target, gamma, delta, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, upper.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        pred = shift_select(step.phi_per_sample(upper[sl], gamma[sl]), step.offsets, delta[sl])
        total += float((pred - target[sl]).square().sum())
        count += pred.numel()
    return math.sqrt(total / max(count, 1))


def _kmeans(
    x: torch.Tensor, k: int, *, iterations: int, generator: torch.Generator
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on rows of ``x`` ``(N, F)``: labels ``(N,)``."""
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (), generator=generator))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).square().min(dim=1).values
        if float(d2.sum()) <= 0:
            centres.append(x[int(torch.randint(n, (), generator=generator))])
            continue
        centres.append(x[int(torch.multinomial(d2, 1, generator=generator))])
    c = torch.stack(centres)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        labels = torch.cdist(x, c).argmin(dim=1)
        for j in range(k):
            if bool((labels == j).any()):
                c[j] = x[labels == j].mean(dim=0)
    return labels


# ------------------------------------------------------------------------------ the loop
@torch.no_grad()
def _greedy_inputs(gm, targets, labels, batch_size: int) -> dict[str, torch.Tensor]:
    """F̂ of every level from the backward pass on each object's own activations."""
    out: dict[str, list[torch.Tensor]] = {}
    n = labels.shape[0]
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        bu = {name: t[sl] for name, t in targets.items() if name in gm.hidden_levels}
        result = greedy_map(gm, bu, category=labels[sl])
        for name, x in result.td.items():
            out.setdefault(name, []).append(x)
    return {name: torch.cat(v) for name, v in out.items()}


def _level_input(gm, name, labels, targets, fed) -> torch.Tensor:
    """U^{l+1}: the category indices for the top level, else the level above in ``fed``."""
    upper = gm.levels[[s.name for s in gm.levels].index(name) + 1].name
    return labels if upper == "category" else fed[upper]


def _log_prior_gamma(gm, name, assignment, n) -> torch.Tensor:
    prior = gm.priors[f"gamma_{name}"]
    table = prior.log_probs()
    return (
        table[tuple(assignment[p] for p in prior.parents)] if prior.parents else table.expand(n, -1)
    )


def _refit_tables(gm, assignment, concentration: float) -> None:
    """γ tables: the Dirichlet posterior mode of the counts (α > 1: never a zero)."""
    for name in gm.hidden_levels:
        prior = gm.priors[f"gamma_{name}"]
        if not isinstance(prior, NGramPrior):
            continue
        counts = torch.zeros_like(prior.probs)
        index = tuple(assignment[p] for p in prior.parents) + (assignment[f"gamma_{name}"],)
        counts.index_put_(index, torch.ones(index[0].shape[0]), accumulate=True)
        prior.concentration = concentration
        prior.probs.copy_(prior.map_estimate(counts))


def fit_hard_em(
    gm: GenerativeModel,
    backbone: Backbone,
    objects: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    config: EMConfig = EMConfig(),
    progress: bool = True,
) -> EMResult:
    """Fit ``gm``'s kernels, templates, γ tables and σ0 by hard EM, in place.

    :param objects: ``(images (N, 3, H, W), masks (N, H, W) bool, labels (N,))`` — single
        objects on a plain background, their masks and category indices into ``gm.categories``.
    :param config: :class:`EMConfig`.
    :returns: :class:`EMResult` with per-round RMS error and component usage per level.

    Example::

        gm = GenerativeModel.for_backbone(bb, num_components={"pool4": 20} | {...: 5})
        log = fit_hard_em(gm, bb, (images, masks, labels), config=EMConfig(iterations=2))
    """
    images, masks, labels = objects
    n = images.shape[0]
    if masks.shape != (n, *images.shape[-2:]) or masks.dtype != torch.bool:
        raise ValueError(f"masks must be (N, H, W) bool for {n} images, got {tuple(masks.shape)}")
    if labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels must be (N,) integer category indices, got {tuple(labels.shape)}")
    if n < 2 or int(labels.min()) < 0 or int(labels.max()) >= len(gm.categories):
        raise ValueError(f"need ≥ 2 objects with labels in [0, {len(gm.categories)})")
    missing = [s for s in gm.hidden_levels if s not in {v.name for v in backbone.levels}]
    if missing:
        raise ValueError(f"the backbone has no levels {missing} of the model")
    gen = torch.Generator().manual_seed(config.seed)
    labels = labels.long()
    targets = object_targets(backbone, images, masks)
    order = list(reversed(gm.hidden_levels))  # top-down
    result = EMResult()
    bar = tqdm(total=len(order) * (1 + config.iterations), desc="hard EM", disable=not progress)

    # Initialisation on the clean targets (there is no model to run the backward pass yet).
    assignment: dict[str, torch.Tensor] = {"category": labels}
    for name in order:
        step = gm.steps[name]
        upper = _level_input(gm, name, labels, targets, targets)
        _initialise(step, upper, targets[name], config, gen)
        gamma, delta, _ = e_step_level(step, upper, targets[name])
        assignment[f"gamma_{name}"], assignment[f"delta_{name}"] = gamma, delta
        step.scale_td.fill_(max(_residual_rms(step, upper, targets[name], gamma, delta,
                                              config.batch_size), 1e-3))  # fmt: skip
        bar.update()
    _refit_tables(gm, assignment, config.concentration)
    result.log.append(_diagnostics(gm, 0, targets, labels, targets, assignment, config))

    for it in range(1, config.iterations + 1):
        if config.inputs == "targets":
            fed = targets
        else:
            fed = _greedy_inputs(gm, targets, labels, config.batch_size)
        for name in order:
            step = gm.steps[name]
            upper = _level_input(gm, name, labels, targets, fed)
            gamma, delta, _ = e_step_level(
                step, upper, targets[name],
                log_prior_gamma=_log_prior_gamma(gm, name, assignment, n),
                log_prior_delta=gm.priors[f"delta_{name}"].log_probs(),
            )  # fmt: skip
            gamma = _reseed(step, upper, targets[name], gamma, delta, config, gen)
            _fit_kernels(step, upper, targets[name], gamma, delta, epochs=config.epochs,
                         lr=config.lr, batch_size=config.batch_size, generator=gen)  # fmt: skip
            assignment[f"gamma_{name}"], assignment[f"delta_{name}"] = gamma, delta
            step.scale_td.fill_(max(_residual_rms(step, upper, targets[name], gamma, delta,
                                                  config.batch_size), 1e-3))  # fmt: skip
            bar.update()
        _refit_tables(gm, assignment, config.concentration)
        result.log.append(_diagnostics(gm, it, targets, labels, fed, assignment, config))
    bar.close()
    result.assignment.update(assignment)
    return result


def _initialise(step, upper, target, config: EMConfig, gen) -> None:
    k, n = step.num_components, upper.shape[0]
    if step.kind == "template":
        # Per category: k-means++ on the targets, then (template, shift) k-means rounds.
        with torch.no_grad():
            for c in range(step.weight.shape[0]):
                members = (upper == c).nonzero().squeeze(1)
                if members.numel() == 0:
                    continue
                x = target[members]
                labels = _kmeans(x.reshape(x.shape[0], -1), min(k, x.shape[0]), iterations=10,
                                 generator=gen)  # fmt: skip
                for j in range(k):
                    pick = x[labels == j] if bool((labels == j).any()) else x[j % x.shape[0]][None]
                    step.weight[c, j] = pick.mean(dim=0)
        for _ in range(config.top_init_iterations):
            gamma, delta, _ = e_step_level(step, upper, target)
            _fit_templates(step, upper, target, gamma, delta)
        return
    # Random kernels (zero kernels would sit at the ReLU's kink, where no gradient flows), then
    # one kernel set for every sample (component 0 at δ = the offset closest to (0, 0)).
    step.reset_parameters(gen)
    centre = int(step.offsets.abs().sum(dim=1).argmin())
    zeros = torch.zeros(n, dtype=torch.long)
    delta = torch.full((n,), centre, dtype=torch.long)
    _fit_kernels(step, upper, target, zeros, delta, epochs=config.init_epochs, lr=config.lr,
                 batch_size=config.batch_size, generator=gen)  # fmt: skip
    with torch.no_grad():
        for j in range(1, k):
            step.weight[j] = step.weight[0]
            step.bias[j] = step.bias[0]
    if k == 1:
        return
    # k-means split of the residuals (random projection to ≤ 128 dims), one fit per group.
    with torch.no_grad():
        resid = []
        for start in range(0, n, config.batch_size):
            sl = slice(start, start + config.batch_size)
            pred = shift_select(step.phi_per_sample(upper[sl], zeros[sl]), step.offsets, delta[sl])
            resid.append((target[sl] - pred).reshape(pred.shape[0], -1))
        resid = torch.cat(resid)
        proj = torch.randn(resid.shape[1], min(128, resid.shape[1]), generator=gen)
        groups = _kmeans(resid @ proj, k, iterations=10, generator=gen)
    _fit_kernels(step, upper, target, groups, delta, epochs=config.init_epochs, lr=config.lr,
                 batch_size=config.batch_size, generator=gen)  # fmt: skip


def _reseed(step, upper, target, gamma, delta, config: EMConfig, gen) -> torch.Tensor:
    """Give components with too few members half of the worst-fitted component's members."""
    k, n = step.num_components, gamma.shape[0]
    if k == 1:
        return gamma
    counts = torch.bincount(gamma, minlength=k)
    dead = (counts < config.reseed_fraction * n / k).nonzero().squeeze(1).tolist()
    if not dead or step.kind == "template":
        return gamma
    gamma = gamma.clone()
    with torch.no_grad():
        err = torch.zeros(k)
        for start in range(0, n, config.batch_size):
            sl = slice(start, start + config.batch_size)
            pred = shift_select(step.phi_per_sample(upper[sl], gamma[sl]), step.offsets, delta[sl])
            e = (pred - target[sl]).square().sum(dim=(-3, -2, -1))
            err.index_add_(0, gamma[sl], e)
        for j in dead:
            worst = int(err.argmax())
            members = (gamma == worst).nonzero().squeeze(1)
            if members.numel() < 2:
                break
            take = members[torch.randperm(members.numel(), generator=gen)[: members.numel() // 2]]
            gamma[take] = j
            step.weight[j] = step.weight[worst] * (
                1 + 0.01 * torch.randn(step.weight[j].shape, generator=gen)
            )
            step.bias[j] = step.bias[worst]
            err[worst] = err[worst] / 2
    return gamma


@torch.no_grad()
def _diagnostics(gm, it, targets, labels, fed, assignment, config) -> EMIteration:
    rms, usage = {}, {}
    for name in gm.hidden_levels:
        step = gm.steps[name]
        upper = _level_input(gm, name, labels, targets, fed)
        g, d = assignment[f"gamma_{name}"], assignment[f"delta_{name}"]
        rms[name] = _residual_rms(step, upper, targets[name], g, d, config.batch_size)
        usage[name] = torch.bincount(g, minlength=step.num_components).tolist()
    return EMIteration(iteration=it, rms_error=rms, usage=usage)

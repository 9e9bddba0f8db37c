"""Hard EM for the top-down model P(H) P(F_td | H) (paper §2.3.2).

F_td is observed (the backbone's activations of single objects, masked to the object:
:func:`~pyro_backpass.learning.targets.masked_activations`), so the E-step imputes every γ_l, δ_l
top-down by the layer-wise problem (11) *without* the bottom-up term::

    (γ_l, δ_l) = argmax log P(γ_l | parents) + log P(δ_l) + Σ_i log N(F^l_i; φ_i(U, γ, δ), σ0)

and the M-step refits the γ tables in closed form (Dirichlet posterior mode, α > 1, so no
probability is ever 0) and each level's kernels by a few epochs of SGD given the assignments
(the top level's templates in closed form: the mean of the aligned members). σ0 of a level is
the RMS residual of the fit.

Across processes (``world``, :class:`~pyro_backpass.learning.distributed.World`): each rank holds
a contiguous shard of the objects. E-steps and the backward passes that feed the kernels are per
object, so they run on the shard; the γ-table counts, the templates' sums, residual sums and
component usage are all-reduced; each SGD step draws one global minibatch (the same permutation
on every rank), every rank computes its members' share of the loss and
:class:`~torch.nn.parallel.DistributedDataParallel` sums the gradients; the k-means
initialisations run on rank 0 over gathered rows and their result (and the generator state) is
broadcast. The parameters equal the single-process run's up to float rounding.

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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pyro_backpass.backbone import Backbone
from pyro_backpass.inference import greedy_map
from pyro_backpass.learning.distributed import SINGLE_PROCESS, World
from pyro_backpass.learning.e_step import e_step_level
from pyro_backpass.learning.targets import masked_activations
from pyro_backpass.model import GenerativeModel, NGramPrior, TopDownStep, shift_select

__all__ = ["EMConfig", "EMIteration", "EMResult", "fit_hard_em", "object_targets"]

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


# ------------------------------------------------------------------------------ M-step
class _KernelLoss(nn.Module):
    """``Σ_samples ‖F − shift(φ(U, γ), δ)‖²`` of the samples given: the module that
    DistributedDataParallel wraps (its parameters are the step's kernels)."""

    def __init__(self, step: TopDownStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, upper, target, gamma, delta) -> torch.Tensor:
        step = self.step
        if upper.shape[0] == 0:  # none of this minibatch on this rank: a zero that still
            return (step.weight.sum() + step.bias.sum()) * 0.0  # reaches every parameter
        pred = shift_select(step.phi_per_sample(upper, gamma), step.offsets, delta)
        return (pred - target).square().sum()


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
    world: World,
) -> None:
    """A few epochs of Adam on ``‖F − shift(φ(U, γ), δ)‖²`` given the assignments.

    Minibatches are drawn from the global order (one permutation of all N objects, the same on
    every rank); each rank computes the loss of the members it holds, scaled so that the
    gradients DDP averages are those of the minibatch's mean loss.
    """
    if step.kind == "template":
        _fit_templates(step, upper, target, gamma, delta, world)
        return
    sizes = world.sizes(upper.shape[0])
    n, lo = sum(sizes), sum(sizes[: world.rank])
    hi = lo + upper.shape[0]
    loss_of: nn.Module = _KernelLoss(step)
    if world.distributed:
        loss_of = DistributedDataParallel(loss_of)
    opt = torch.optim.Adam([step.weight, step.bias], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]  # global indices
                mine = idx[(idx >= lo) & (idx < hi)] - lo  # this rank's members, local indices
                total = loss_of(upper[mine], target[mine], gamma[mine], delta[mine])
                loss = total * (world.size / idx.numel())  # DDP divides by world.size
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def _align(target: torch.Tensor, offsets: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Each target shifted back by its δ (zero fill): what an unshifted template should match."""
    return shift_select(target, -offsets, delta)


@torch.no_grad()
def _fit_templates(step, upper, target, gamma, delta, world: World) -> None:
    """Top level: each (category, γ) template = the mean of its members' aligned targets
    (sums and counts all-reduced)."""
    aligned = _align(target, step.offsets, delta)  # (B, C, H, W)
    n_cat, k = step.weight.shape[:2]
    cell = upper * k + gamma  # (B,) flat (category, γ)
    sums = aligned.new_zeros((n_cat * k, *aligned.shape[1:])).index_add_(0, cell, aligned)
    counts = torch.bincount(cell, minlength=n_cat * k)  # (Ncat*K,)
    sums, counts = world.all_reduce_sum(sums), world.all_reduce_sum(counts)
    weight = step.weight.view(n_cat * k, *step.weight.shape[2:])  # (Ncat*K, C, H, W)
    has = counts > 0
    weight[has] = sums[has] / counts[has].to(sums.dtype)[:, None, None, None]


@torch.no_grad()
def _residual_rms(step, upper, target, gamma, delta, batch_size: int, world: World) -> float:
    total = torch.zeros(2, dtype=torch.float64)  # (Σ squared residual, element count)
    for start in range(0, upper.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        pred = shift_select(step.phi_per_sample(upper[sl], gamma[sl]), step.offsets, delta[sl])
        total[0] += float((pred - target[sl]).square().sum())
        total[1] += pred.numel()
    total = world.all_reduce_sum(total)
    return math.sqrt(float(total[0]) / max(float(total[1]), 1.0))


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


def _refit_tables(gm, assignment, concentration: float, world: World) -> None:
    """γ tables: the Dirichlet posterior mode of the counts (α > 1: never a zero); the counts
    are all-reduced."""
    for name in gm.hidden_levels:
        prior = gm.priors[f"gamma_{name}"]
        if not isinstance(prior, NGramPrior):
            continue
        counts = torch.zeros_like(prior.probs)
        index = tuple(assignment[p] for p in prior.parents) + (assignment[f"gamma_{name}"],)
        counts.index_put_(index, torch.ones(index[0].shape[0]), accumulate=True)
        counts = world.all_reduce_sum(counts)
        prior.concentration = concentration
        prior.probs.copy_(prior.map_estimate(counts))


def fit_hard_em(
    gm: GenerativeModel,
    backbone: Backbone,
    objects: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    config: EMConfig = EMConfig(),
    progress: bool = True,
    world: World = SINGLE_PROCESS,
) -> EMResult:
    """Fit ``gm``'s kernels, templates, γ tables and σ0 by hard EM, in place.

    :param objects: ``(images (N, 3, H, W), masks (N, H, W) bool, labels (N,))`` — single
        objects on a plain background, their masks and category indices into ``gm.categories``;
        under several processes, this rank's contiguous shard (``world.shard(N)``) of them.
    :param config: :class:`EMConfig`.
    :param world: the processes sharing the work (module docstring); one by default.
    :returns: :class:`EMResult` with per-round RMS error and component usage per level, and
        the assignment of all N objects (gathered from every rank).

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
    bad = bool(n) and (int(labels.min()) < 0 or int(labels.max()) >= len(gm.categories))
    sizes = world.sizes(n)
    if sum(sizes) < 2 or int(world.all_reduce_sum(torch.tensor([int(bad)]))) > 0:  # on every rank
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
        _initialise(step, upper, targets[name], config, gen, world)
        gamma, delta, _ = e_step_level(step, upper, targets[name])
        assignment[f"gamma_{name}"], assignment[f"delta_{name}"] = gamma, delta
        step.scale_td.fill_(max(_residual_rms(step, upper, targets[name], gamma, delta,
                                              config.batch_size, world), 1e-3))  # fmt: skip
        bar.update()
    _refit_tables(gm, assignment, config.concentration, world)
    result.log.append(_diagnostics(gm, 0, targets, labels, targets, assignment, config, world))

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
            gamma = _reseed(step, upper, targets[name], gamma, delta, config, gen, world)
            _fit_kernels(step, upper, targets[name], gamma, delta, epochs=config.epochs,
                         lr=config.lr, batch_size=config.batch_size, generator=gen,
                         world=world)  # fmt: skip
            assignment[f"gamma_{name}"], assignment[f"delta_{name}"] = gamma, delta
            step.scale_td.fill_(max(_residual_rms(step, upper, targets[name], gamma, delta,
                                                  config.batch_size, world), 1e-3))  # fmt: skip
            bar.update()
        _refit_tables(gm, assignment, config.concentration, world)
        result.log.append(_diagnostics(gm, it, targets, labels, fed, assignment, config, world))
    bar.close()
    result.assignment.update({s: world.all_gather_rows(v) for s, v in assignment.items()})
    return result


@torch.no_grad()
def _kmeans_on_main(x: torch.Tensor, k: int, *, gen, world: World) -> torch.Tensor:
    """:func:`_kmeans` of every rank's rows of ``x`` ``(n_r, F)``, run on rank 0 and broadcast
    (with the generator state it leaves); returns this rank's labels ``(n_r,)``."""
    sizes = world.sizes(x.shape[0])
    full = world.gather_rows(x)
    if full is not None:
        labels = _kmeans(full, k, iterations=10, generator=gen)
    else:
        labels = torch.zeros(sum(sizes), dtype=torch.long)
    labels = world.broadcast(labels)
    world.sync_generator(gen)
    lo = sum(sizes[: world.rank])
    return labels[lo : lo + x.shape[0]]


def _initialise(step, upper, target, config: EMConfig, gen, world: World) -> None:
    k, n = step.num_components, upper.shape[0]
    if step.kind == "template":
        # Per category: k-means++ on the targets (rank 0, over every rank's objects), then
        # (template, shift) k-means rounds (sharded).
        with torch.no_grad():
            every_upper = world.gather_rows(upper)
            every_target = world.gather_rows(target)
            if every_upper is not None:
                for c in range(step.weight.shape[0]):
                    members = (every_upper == c).nonzero().squeeze(1)
                    if members.numel() == 0:
                        continue
                    x = every_target[members]
                    labels = _kmeans(x.reshape(x.shape[0], -1), min(k, x.shape[0]),
                                     iterations=10, generator=gen)  # fmt: skip
                    for j in range(k):
                        has = bool((labels == j).any())
                        pick = x[labels == j] if has else x[j % x.shape[0]][None]
                        step.weight[c, j] = pick.mean(dim=0)
            world.broadcast_(step.weight)
            world.sync_generator(gen)
        for _ in range(config.top_init_iterations):
            gamma, delta, _ = e_step_level(step, upper, target)
            _fit_templates(step, upper, target, gamma, delta, world)
        return
    # Random kernels (zero kernels would sit at the ReLU's kink, where no gradient flows), then
    # one kernel set for every sample (component 0 at δ = the offset closest to (0, 0)).
    step.reset_parameters(gen)
    centre = int(step.offsets.abs().sum(dim=1).argmin())
    zeros = torch.zeros(n, dtype=torch.long)
    delta = torch.full((n,), centre, dtype=torch.long)
    _fit_kernels(step, upper, target, zeros, delta, epochs=config.init_epochs, lr=config.lr,
                 batch_size=config.batch_size, generator=gen, world=world)  # fmt: skip
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
        features = math.prod(target.shape[1:])
        resid = torch.cat(resid) if resid else target.new_zeros(0, features)  # (n, C*H*W)
        proj = torch.randn(features, min(128, features), generator=gen)
        groups = _kmeans_on_main(resid @ proj, k, gen=gen, world=world)
    _fit_kernels(step, upper, target, groups, delta, epochs=config.init_epochs, lr=config.lr,
                 batch_size=config.batch_size, generator=gen, world=world)  # fmt: skip


def _reseed(step, upper, target, gamma, delta, config: EMConfig, gen, world: World):
    """Give components with too few members half of the worst-fitted component's members.

    Members are numbered globally (rank order), so every rank draws the same permutation and
    moves the members of it that it holds.
    """
    k = step.num_components
    if k == 1:
        return gamma
    counts = world.all_reduce_sum(torch.bincount(gamma, minlength=k))
    n = int(counts.sum())
    dead = (counts < config.reseed_fraction * n / k).nonzero().squeeze(1).tolist()
    if not dead or step.kind == "template":
        return gamma
    gamma = gamma.clone()
    with torch.no_grad():
        err = torch.zeros(k)
        for start in range(0, gamma.shape[0], config.batch_size):
            sl = slice(start, start + config.batch_size)
            pred = shift_select(step.phi_per_sample(upper[sl], gamma[sl]), step.offsets, delta[sl])
            e = (pred - target[sl]).square().sum(dim=(-3, -2, -1))
            err.index_add_(0, gamma[sl], e)
        err = world.all_reduce_sum(err)
        for j in dead:
            worst = int(err.argmax())
            members = (gamma == worst).nonzero().squeeze(1)  # this rank's, local indices
            sizes = world.sizes(members.numel())
            total, first = sum(sizes), sum(sizes[: world.rank])
            if total < 2:
                break
            take = torch.randperm(total, generator=gen)[: total // 2]  # global member numbers
            mine = take[(take >= first) & (take < first + members.numel())] - first
            gamma[members[mine]] = j
            step.weight[j] = step.weight[worst] * (
                1 + 0.01 * torch.randn(step.weight[j].shape, generator=gen)
            )
            step.bias[j] = step.bias[worst]
            err[worst] = err[worst] / 2
    return gamma


@torch.no_grad()
def _diagnostics(gm, it, targets, labels, fed, assignment, config, world) -> EMIteration:
    rms, usage = {}, {}
    for name in gm.hidden_levels:
        step = gm.steps[name]
        upper = _level_input(gm, name, labels, targets, fed)
        g, d = assignment[f"gamma_{name}"], assignment[f"delta_{name}"]
        rms[name] = _residual_rms(step, upper, targets[name], g, d, config.batch_size, world)
        usage[name] = world.all_reduce_sum(torch.bincount(g, minlength=step.num_components))
        usage[name] = usage[name].tolist()
    return EMIteration(iteration=it, rms_error=rms, usage=usage)

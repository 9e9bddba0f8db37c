"""Exact joint MAP of the backward pass's objective, by Pyro's ``infer_discrete``.

The objective is the *profile* objective of :func:`~pyro_backpass.inference.greedy`: each F̂^l_td is
the closed-form maximiser (eq. 13) given the levels above, so the search is over the discrete
sites (category, γ, δ) alone. This is **not** eq. (10) with F_td free: it is the exact optimum
of the same function greedy approximates, which is what a comparison of the two needs.

It runs a *profile variant* of ``gm.model``, in which F̂_td is deterministic and each level's
Σ_i log_score_i enters through ``pyro.factor`` (``infer_discrete`` would sample continuous
``td`` sites rather than maximise them), under ``infer_discrete(temperature=0)`` (max-product
with parallel enumeration of every discrete site). The work is chunked over the top level's
choices (category, γ_top, δ_top), each chunk conditioned on one choice; the best chunk wins
per image (ties: the lowest top-level flat index, as in greedy).

Reference: Wang et al. 2016, eq. (10)–(13); Pyro's ``pyro.infer.infer_discrete``.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import infer_discrete
from pyro.ops.indexing import Vindex
from tqdm.auto import tqdm

from pyro_backpass.inference.closed_form import closed_form_with
from pyro_backpass.inference.inputs import check_map_inputs
from pyro_backpass.inference.objective import (
    NonFiniteScoreError,
    category_term,
    finite_sum,
    log_joint,
    object_mask,
    top_down_pass,
)
from pyro_backpass.model.generative_model import ENUMERATE
from pyro_backpass.model.priors import SitePrior
from pyro_backpass.results import MapResult, ranked_modes

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["DEFAULT_MAX_MEMORY", "SLOW_SECONDS", "chunk_bytes", "exact_map", "joint_states"]

DEFAULT_MAX_MEMORY = 4 * 2**30  # bytes per chunk
SLOW_SECONDS = 30.0  # a call projected to take longer warns, with its estimate
PROGRESS_STATES = 100_000  # from this many joint states per image, a progress bar by default
_TEMPORARIES = 8  # closed-form temporaries alive at once, per enumerated element


def _profile_model(gm, bu, masks, priors, fixed: Mapping[str, torch.Tensor], b: int) -> None:
    """The model with F̂_td deterministic and the per-level scores as factors."""
    values: dict[str, torch.Tensor] = {}

    def site(name: str) -> torch.Tensor:
        table, parents = priors[name].log_probs(), priors[name].parents
        logits = Vindex(table)[tuple(values[p] for p in parents) + (slice(None),)]
        values[name] = pyro.sample(
            name, dist.Categorical(logits=logits), obs=fixed.get(name), infer=ENUMERATE
        )
        return values[name]

    with pyro.plate("images", b, dim=-1):
        upper = site("category")
        pyro.factor("score_category", category_term(gm, upper, bu, masks))
        for name in reversed(gm.hidden_levels):
            step = gm.steps[name]
            phi = step.phi(upper, site(f"gamma_{name}"), site(f"delta_{name}"))
            upper, score = closed_form_with(gm.constants(name), bu.get(name), phi,
                                       observed=masks.get(name))  # fmt: skip
            pyro.factor(f"score_{name}", finite_sum(name, score, bu.get(name)))


def joint_states(gm: GenerativeModel, clamped: set[str] | frozenset[str] = frozenset()) -> int:
    """The number of joint discrete states per image (clamped sites count once)."""
    return math.prod(n for s, n in gm.site_sizes.items() if s not in clamped)


def chunk_bytes(gm: GenerativeModel, clamped: set[str], b: int) -> int:
    """Peak memory of one chunk: every level's φ over all enumerated states down to it.

    A level's φ is built for every state of the levels above times its own (γ, δ), then the
    closed form keeps a few temporaries of that size alive.
    """
    sizes, states, peak = gm.site_sizes, 1, 0
    itemsize = torch.finfo(gm.dtype).bits // 8
    for name in reversed(gm.hidden_levels[:-1]):
        for site in (f"gamma_{name}", f"delta_{name}"):
            states *= 1 if site in clamped else sizes[site]
        step = gm.steps[name]
        elements = states * step.out.numel * b
        peak = max(peak, elements * itemsize * _TEMPORARIES)
    return peak


def exact_map(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    *,
    category: Any = None,
    clamp: Mapping[str, Any] | None = None,
    priors: Mapping[str, SitePrior] | None = None,
    observed: Mapping[str, torch.Tensor] | None = None,
    top_k: int = 1,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    progress: bool | None = None,
) -> MapResult:
    """The joint MAP over all (category,) γ, δ of greedy's (profile) objective.

    Same options as :func:`~pyro_backpass.inference.greedy`; ``top_k > 1`` lists the best completion
    of each of the k best top-level choices (by their exact completed log-joint).
    Raises ``MemoryError`` with the sizes involved when one chunk would need more than
    ``max_memory_bytes`` (the default, 4 GiB, admits well over 10⁶ joint states per image on
    the small models this is meant for). The work runs one chunk per top-level choice: with
    ``progress`` (default: from 10⁵ joint states per image) a tqdm bar counts them, and a call
    whose first chunk projects more than :data:`SLOW_SECONDS` in all warns with the estimate
    of time and memory.
    """
    inputs = check_map_inputs(
        gm, bu, category=category, clamp=clamp, priors=priors, observed=observed, top_k=top_k
    )
    bu, masks, clamps, priors, b = (
        inputs.bu, inputs.masks, inputs.clamps, inputs.priors, inputs.batch
    )  # fmt: skip
    if type(max_memory_bytes) is not int or max_memory_bytes < 1:
        raise ValueError(f"max_memory_bytes must be a positive int, got {max_memory_bytes!r}")
    need = chunk_bytes(gm, set(clamps), b)
    states = joint_states(gm, set(clamps))
    top = gm.hidden_levels[-1]
    top_sites = ("category", f"gamma_{top}", f"delta_{top}")
    sizes = gm.site_sizes
    num_top = math.prod(1 if s in clamps else sizes[s] for s in top_sites)
    if need > max_memory_bytes:
        raise MemoryError(
            f"exact_map: {states:,} joint states per image in {num_top:,} chunks; one chunk "
            f"of {b} image(s) needs ~{need / 2**30:.2f} GiB, over the limit of "
            f"{max_memory_bytes / 2**30:.2f} GiB. Pass fewer images, clamp sites, or raise "
            f"max_memory_bytes."
        )
    if top_k > num_top:
        raise ValueError(f"top_k={top_k} exceeds the {num_top} top-level hypotheses")
    choices = [
        [clamps[s]] if s in clamps else [torch.full((b,), v, device=gm.device) for v in range(n)]
        for s, n in ((s, sizes[s]) for s in top_sites)
    ]
    found: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
    show = states >= PROGRESS_STATES if progress is None else bool(progress)
    bar = tqdm(total=num_top, desc="exact_map", unit="chunk", disable=not show, leave=False)
    start = time.perf_counter()
    with torch.no_grad(), bar:
        for combo in itertools.product(*choices):
            fixed = {s: v for s, v in clamps.items()} | dict(zip(top_sites, combo, strict=True))
            decoder = infer_discrete(_profile_model, first_available_dim=-2, temperature=0)
            try:
                trace = poutine.trace(decoder).get_trace(gm, bu, masks, priors, fixed, b)
            except NonFiniteScoreError as err:  # without the trace shapes Pyro appends
                raise NonFiniteScoreError(str(err).split("\n")[0]) from None
            # A site that no image's data distinguishes comes back un-broadcast, e.g. (1,).
            assignment = {s: trace.nodes[s]["value"].reshape(-1).expand(b).long() for s in gm.sites}
            score = log_joint(gm, bu, assignment, observed=observed, priors=priors)
            found.append((assignment, score))
            bar.update()
            if len(found) == 1 and num_top > 1:
                first = time.perf_counter() - start
                if first * num_top > SLOW_SECONDS:
                    warnings.warn(
                        f"exact_map: {states:,} joint states per image in {num_top:,} chunks of "
                        f"~{need / 2**30:.2f} GiB each; the first chunk took {first:.2f} s, so "
                        f"about {first * num_top:.0f} s in all. Clamp sites or pass fewer "
                        "images to shrink it (greedy_map takes milliseconds).",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        scores = torch.stack([s for _, s in found], dim=1)  # (B, chunks), in top flat order
        order = scores.sort(dim=1, descending=True, stable=True).indices
        best = order[:, 0]
        per_chunk = {s: torch.stack([a[s] for a, _ in found], dim=1) for s in gm.sites}
        assignment = {s: v.gather(1, best[:, None]).squeeze(1) for s, v in per_chunk.items()}
        td, _ = top_down_pass(gm, assignment, bu, masks)
        modes = None
        if top_k > 1:
            modes = ranked_modes(per_chunk, scores, order[:, :top_k])  # (B, chunks) each
        return MapResult(
            assignment=assignment,
            td=td,
            log_joint=scores.gather(1, best[:, None]).squeeze(1),
            mask=object_mask(gm, td, bu, masks),
            modes=modes,
        )

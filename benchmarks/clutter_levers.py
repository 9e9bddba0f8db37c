"""Issue #10's levers, one at a time, on cluttered scenes: which change makes the backward pass
land on an airplane instead of clutter?

Every lever is a change of the shipped model's parameters or of the top-level choice, applied to
a copy of ``GenerativeModel.default()`` (no retraining). For each, on scenes of one split:

- ``hit@0.5`` / ``hit@0.3``: share of scenes whose first backward pass (category clamped to
  airplane) has visible-mask IoU ≥ 0.5 / 0.3 with one of the scene's airplanes;
- ``best_iou``: that pass's mean best IoU over the scene's airplanes;
- ``top_clamped``: mean IoU of the pass with the top level clamped to each airplane's own
  E-step assignment (the oracle ladder's rung (b): only the lower levels decide);
- ``alone_plain``: mean IoU of each airplane alone on the plain background (rung (d));
- ``true_rank``: median over scenes of the best rank, among all top-level hypotheses of the
  airplane category, of an airplane's true top-level (γ, δ) by the score the choice uses (1 =
  chosen);
- ``bound@0.5``: share of scenes where *some* top-level hypothesis, completed greedily, hits
  an airplane at IoU ≥ 0.5 (``--bound``; 500 descents per scene).

Levers (``--levers``): ``base``; ``s0x<f>@<levels>``: σ0 × f on those levels (``upper`` =
``pool4 conv4_1 pool3 conv3_1``, ``all``); ``lamx<f>@<levels>``: λ × f; ``s2x<f>@<levels>``:
σ2 × f; ``maskx<f>@conv1_1``: the mask threshold × f; ``bgfit[<q>]``: β, σ2 per channel
(:func:`~pyro_backpass.learning.fit_background`); ``onoff[<n>]``: lever 1 at the element
level — λ, σ0 and per-channel β, σ1, σ2 of every level refitted, top level first, so that the
closed form's on/off decision under the oracle assignment (every level clamped to the object's
own, from its pass alone) classifies the object's on-elements (its masked activations ≥ λ)
against the rest of its scene (logistic loss on score_on − score_off, ``n`` train scenes,
default 15; the mask threshold becomes the new λ of its level); ``rank[<n>]``: lever 1 at the
top level — λ, σ0 and per-channel β, σ1, σ2 of the top level refitted to maximise the
posterior probability, among all top-level hypotheses of the object's category, of the scene's
true ones (:func:`fit_top_ranking`, ``n`` train scenes, default 60); ``dprior[<n>]``: the
prior on δ of every level below the top with more than one offset learned from the offsets the
pass picks on ``n`` lone train objects per category (default 100), not uniform
(:func:`use_offset_priors`); ``dpriortop[<n>]``: the same on the top level too; a dprior
lever followed by ``,verified``: the verified pass with those priors per call; several of
the levers above joined by commas; ``footprintall``
(alone, as the next two): lever 2 on every
level below the top — each level's (γ, δ) chosen by its log-likelihood ratio against the
all-background explanation (plus its prior terms) divided by its footprint, given F̂ of the
level above (:func:`level_descent`; the top level as greedy chooses it, or clamped for
rung (b)); ``sharp<f>``: the same pass with greedy's choice but φ set to 0 below f × its
maximum on every level below the top (:func:`level_descent`'s ``sharpen``); ``clutter[<n>]``:
the same pass with an explicit clutter branch per element beside on and off, its Gaussian per
channel and its prior weight π fitted on the clutter of ``n`` train scenes (default 40;
:func:`three_branch`, :func:`fit_clutter`), ``clutter<n>x<f>``: π × f;
``footprint``:
the top level chosen by the log-likelihood ratio against the all-background explanation
divided by the template's footprint (elements with φ > 0), the rest of the pass unchanged;
``topk<k>``: the best of greedy's ``top_k=k`` completed descents by total log-joint;
``cam<w>``: the plain pass with a prior on the top level's δ from the backbone's class
activation map, log-weight ``w ×`` airplane's per-cell logit where the shifted object is
centred (:func:`~pyro_backpass.class_map_prior`; the location prior of the feasibility run,
for the localised backbones of lever 3);
``rerank<k>[x<n>]``: the best of the same descents by a per-level weighted log-likelihood ratio
— weights on each level's LLR against background, the prior terms and the mask's log area,
fitted on ``n`` train scenes (default 60) so that, among each scene's ``k`` descents, the ones
that hit an airplane (IoU ≥ 0.5) get the most posterior mass (listwise softmax, L2;
:func:`fit_reranker`); ``stat<k>``: the best of the same descents by the shipped parser's
stop statistic (the fitted log-odds of "new object" from the descent's log-likelihood ratio
against background and its mask's pixels, at the first step; the criterion of
:func:`~pyro_backpass.parsing.default_threshold`); ``verify<k>``: the best of the same descents
by the backbone classifier's log-probability of airplane for the image shown only inside the
descent's mask (:func:`~pyro_backpass.inference.region_views`); ``verified``: the pass of
:func:`~pyro_backpass.verified_map`, whose learned :class:`~pyro_backpass.DescentVerifier`
(shipped, or ``--verifier FILE``) scores the descents from the model's per-level ratios and
what the backbone sees in each descent's region; ``verified2``: the same with its second stage
(``verified_map(..., lower=True)``, or ``--lower-verifier FILE``), which keeps the chosen top
level and chooses among the completions of the two levels under it.

``--category-unknown`` adds, per lever, the first pass with the category left to the model
(hit rates against the airplanes, and how often it chose airplane).

Choose on ``--split validation``; report the chosen ones on ``--split test``. One thread.
Writes ``benchmarks/results/clutter_levers_<split>.json``.

Usage: ``python benchmarks/clutter_levers.py --split validation --levers base bgfit ...``
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, hidden_bu, learned_model, machine, rendered_objects  # noqa: E402

from pyro_backpass import (  # noqa: E402
    DescentVerifier,
    GenerativeModel,
    Scenes,
    class_map_prior,
    greedy_map,
    verified_map,
)
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import (  # noqa: E402
    background_log_likelihood,
    closed_form_with,
    freeze_priors,
    object_mask,
    region_views,
    top_level_scores,
)
from pyro_backpass.learning import (  # noqa: E402
    fit_background,
    fit_offset_priors,
    mask_iou,
    masked_activations,
    max_pool_mask,
    own_top_assignment,
)
from pyro_backpass.model import closed_form_constants, shift_all  # noqa: E402

UPPER = ("pool4", "conv4_1", "pool3", "conv3_1")


def _levels(gm: GenerativeModel, spec: str) -> tuple[str, ...]:
    if spec == "upper":
        return tuple(n for n in UPPER if n in gm.hidden_levels)
    if spec == "all":
        return tuple(gm.hidden_levels)
    names = tuple(spec.split("+"))
    unknown = [n for n in names if n not in gm.hidden_levels]
    if unknown:
        raise SystemExit(f"unknown levels {unknown}; the model has {gm.hidden_levels}")
    return names


def _number(lever: str, text: str, kind: type, *, above: float, below: float | None = None):
    """``text`` as ``kind``, in (``above``, ``below``), or a clear error naming the lever."""
    try:
        value = kind(text)
    except ValueError:
        raise SystemExit(f"lever {lever!r}: {text!r} is not a {kind.__name__}") from None
    if not value > above or (below is not None and not value < below):
        bounds = f"> {above}" + ("" if below is None else f" and < {below}")
        raise SystemExit(f"lever {lever!r}: {text!r} must be {bounds}")
    return value


def apply_lever(gm: GenerativeModel, lever: str) -> tuple[GenerativeModel, bool | int]:
    """A copy of ``gm`` with the lever's parameter change, and how the top level is chosen:
    True for the footprint-normalised ratio, an int k > 1 for the best of greedy's ``top_k``
    completed descents by total log-joint, False for the plain pass. ``dprior…,verified``: the
    verified pass on the unchanged model (the shipped verifier's fingerprint covers the
    priors) with the lever's δ priors passed per call."""
    head, sep, last = lever.rpartition(",")
    if sep and last in ("verified", "verified2"):
        if "," in head or not head.startswith("dprior"):
            raise SystemExit(f"lever {lever!r}: only a dprior lever may precede {last!r}")
        out, _ = apply_lever(gm, head)
        priors = {site: out.priors[site] for site in gm.site_sizes if site.startswith("delta_")
                  and out.priors[site] is not gm.priors[site]}  # fmt: skip
        return gm, ("verified", last == "verified2", priors)
    if lever in ("base", "footprint"):
        return gm, lever == "footprint"
    if lever == "footprintall":
        return gm, ("descent", {"footprint": True})
    if lever.startswith("sharp"):
        return gm, ("descent", {"sharpen": _number(lever, lever[5:], float, above=0.0,
                                                   below=1.0)})  # fmt: skip
    if lever.startswith("clutter"):
        n, _, factor = lever[7:].partition("x")
        n = _number(lever, n or "40", int, above=0)
        factor = _number(lever, factor or "1", float, above=0.0)
        fit = fit_clutter(gm, list(Scenes(n, seed=split_seed("train"))))
        if not fit:
            raise SystemExit(f"{lever}: the {n} train scenes have no clutter off the objects")
        scale = math.log(factor)  # π × factor (the background keeps 1 − π)
        fit = {name: (mu, sigma, min(log_pi + scale, -1e-6))
               for name, (mu, sigma, log_pi) in fit.items()}  # fmt: skip
        return gm, ("descent", {"clutter": fit})
    if lever.startswith("topk"):
        return gm, int(lever[4:])
    if lever.startswith("cam"):
        return gm, ("cam", float(lever[3:] or 1.0))
    if lever.startswith("stat"):
        return gm, ("stat", int(lever[4:]))
    if lever in ("verified", "verified2"):
        return gm, ("verified", lever == "verified2")
    if lever.startswith("verify"):
        return gm, ("verify", int(lever[6:] or 32))
    if lever.startswith("rerank"):
        k, _, n = lever[6:].partition("x")
        scenes = list(Scenes(int(n or 60), seed=split_seed("train")))
        return gm, ("rerank", int(k or 32), fit_reranker(gm, scenes, top_k=int(k or 32)))
    out = copy.deepcopy(gm)
    for part in lever.split(","):
        if part.startswith("bgfit"):
            fit_background_per_channel(out, part)
            continue
        if part.startswith("rank"):
            fit_top_ranking(out, list(Scenes(int(part[4:] or 60), seed=split_seed("train"))))
            continue
        if part.startswith("onoff"):
            fit_on_off(out, list(Scenes(int(part[5:] or 15), seed=split_seed("train"))))
            continue
        if part.startswith("dpriortop"):
            use_offset_priors(out, _number(lever, part[9:] or "100", int, above=0), top=True)
            continue
        if part.startswith("dprior"):
            use_offset_priors(out, _number(lever, part[6:] or "100", int, above=0))
            continue
        kind, _, rest = part.partition("x")
        factor, _, where = rest.partition("@")
        for name in _levels(out, where or "all"):
            if kind == "s0":
                out.steps[name].scale_td.mul_(float(factor))
            elif kind == "lam":
                out.observations[name].threshold.mul_(float(factor))
            elif kind == "s2":
                out.observations[name].scale_off.mul_(float(factor))
            elif kind == "mask":
                out.observations[name].mask_threshold.mul_(float(factor))
            else:
                raise SystemExit(f"unknown lever {part!r}")
    return out, False


def fit_background_per_channel(gm: GenerativeModel, part: str) -> None:
    """``bgfit`` / ``bgfit<q>``: β and σ2 per channel of every hidden level from 40 train-split
    scenes (:func:`~pyro_backpass.learning.fit_background`, σ2 floored at the level's pooled
    σ2 × ``q``, default 1)."""
    scenes = list(Scenes(40, seed=split_seed("train")))
    fit_background(gm, gm.backbone, scenes, floor_factor=float(part[5:] or 1.0))


@torch.no_grad()
def level_descent(gm: GenerativeModel, bu: dict, category: int, *,
                  top: tuple[int, int] | None = None, footprint: bool = False,
                  sharpen: float = 0.0, clutter: dict | None = None
                  ) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """A backward pass of one image written out level by level, for the levers that change how
    the levels below the top decide: its assignment (site → ``(1,)``) and mask ``(1, H, W)``.

    The top level's (γ, δ) is greedy's (or ``top``). On every level below, given F̂ of the
    level above, every (γ, δ) is scored by its data score plus its prior terms (greedy's
    choice), or with ``footprint`` (the ``footprintall`` lever: lever 2 "on every level") by
    its log-likelihood ratio against the all-background explanation of that level plus its
    prior terms, divided by its footprint (the elements where φ > 0). With ``sharpen`` f > 0
    (the ``sharp<f>`` lever) φ is first set to 0 wherever it is below f × its maximum over the
    level, so that F̂ cannot follow the bottom-up activations in φ's faint margins. With
    ``clutter`` (the ``clutter`` lever; level → :func:`fit_clutter`'s statistics) every element
    has a third branch beside on and off (:func:`three_branch`). F̂ in closed form as in every
    pass; with no option this is ``greedy_map``'s pass."""
    label = torch.tensor([category])
    names = list(reversed(gm.hidden_levels))
    if top is None:
        first = greedy_map(gm, bu, category=label).assignment
        top = (int(first[f"gamma_{names[0]}"]), int(first[f"delta_{names[0]}"]))
    values = {"category": label}
    td = {"category": gm.observation_td(label)}
    upper = label
    for name in names:
        step = gm.steps[name]
        if name == names[0]:
            gamma, delta = torch.tensor([top[0]]), torch.tensor([top[1]])
        else:
            k, d = step.num_components, step.num_offsets
            gamma, delta = torch.arange(k).repeat_interleave(d), torch.arange(d).repeat(k)
        n = gamma.numel()
        all_k = None if step.kind == "template" else step.phi_all(upper)  # one conv, all K
        phi = step.phi(upper, gamma, delta, all_k=all_k)  # (n, C, H, W)
        if sharpen > 0 and name != names[0]:
            peak = phi.flatten(1).amax(1).reshape(n, 1, 1, 1)
            phi = torch.where(phi >= sharpen * peak, phi, torch.zeros_like(phi))
        level_bu = bu[name].expand(n, *bu[name].shape[1:])
        if clutter is not None and name in clutter:
            f_td, score = three_branch(gm.constants(name), level_bu, phi, *clutter[name])
        else:
            f_td, score = closed_form_with(gm.constants(name), level_bu, phi)
        if n > 1:
            gp = gm.priors[f"gamma_{name}"]
            lp_gamma = gp.log_probs()[tuple(values[p] for p in gp.parents)].reshape(-1)
            lp_delta = gm.priors[f"delta_{name}"].log_probs()
            total = score.sum(dim=(1, 2, 3)) + lp_gamma[gamma] + lp_delta[delta]
            if footprint:
                total = total - background_log_likelihood(gm, {name: bu[name]})
                total = total / (phi > 0).flatten(1).sum(1).clamp_min(1).to(total.dtype)
            i = int(total.argmax())
        else:
            i = 0
        values[f"gamma_{name}"], values[f"delta_{name}"] = gamma[i : i + 1], delta[i : i + 1]
        upper = f_td[i : i + 1]
        td[name] = upper
    return values, object_mask(gm, td, bu)


def three_branch(c, bu: torch.Tensor, phi: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                 log_pi: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The closed form with an explicit clutter branch per element: F̂ and each element's score.

    Beside "on" (the object explains f_bu) and "off" (background, f_bu ~ N(β, σ2)), an element
    may be clutter: the object is off there (F ≤ λ, as on the off branch) and f_bu ~ N(μ_c,
    σ_c), per channel, with prior weight π (the background keeps 1 − π). Each element takes its
    best branch (the closed form's max, now over three); F̂ is the on value where "on" wins,
    else the off value. ``c``: the level's :class:`ClosedFormConstants`."""
    f_on, s_on, f_off, s_off = _branches(c, bu, phi, off_max=c.below)
    sigma2 = torch.as_tensor(0.5 / c.half_prec_off, dtype=bu.dtype).sqrt()
    log_n0_sigma2 = -0.5 * math.log(2 * math.pi) - sigma2.log()  # log N(0; 0, σ2)
    log_clutter = (-0.5 * math.log(2 * math.pi) - sigma.log()
                   - 0.5 * ((bu - mu) / sigma).square())  # fmt: skip
    # The off branch with f_bu's background density N(β, σ2) swapped for clutter's.
    td_off = c.half_prec_td * (f_off - phi).square()
    s_clutter = c.const_off - log_n0_sigma2 + log_clutter - td_off + log_pi
    s_bad = torch.maximum(s_off + math.log1p(-math.exp(log_pi)), s_clutter)
    on = s_on >= s_bad
    return torch.where(on, f_on, f_off), torch.where(on, s_on, s_bad)


@torch.no_grad()
def fit_clutter(gm: GenerativeModel, scenes: list) -> dict:
    """The ``clutter`` lever's statistics, per level: the mean and standard deviation per
    channel ``(C, 1, 1)`` of the bottom-up activations over the elements that clutter covers
    and no object does (the masks max-pooled to the level), and log π, the log of their share
    among the elements no object covers, on ``scenes`` (train split)."""
    sums: dict = {}
    for scene in scenes:
        acts = gm.backbone(scene.image[None])
        objects = torch.zeros_like(scene.clutter_mask)
        for inst in scene.instances:
            objects |= inst.mask
        for name in gm.hidden_levels:
            x = acts[name][0]  # (C, h, w)
            size = tuple(x.shape[-2:])
            on_object = max_pool_mask(objects[None], size)[0]
            cells = max_pool_mask(scene.clutter_mask[None], size)[0] & ~on_object
            free = (~on_object).sum()
            v = x[:, cells].double()  # (C, n)
            acc = sums.setdefault(name, [0, 0.0, 0.0, 0])
            acc[0] += v.shape[1]
            acc[1] = acc[1] + v.sum(1)
            acc[2] = acc[2] + v.square().sum(1)
            acc[3] += int(free)
    out = {}
    for name, (n, s1, s2, n_free) in sums.items():
        if n < 2:
            continue
        mean = s1 / n
        std = (s2 / n - mean.square()).clamp_min(1e-12).sqrt()
        floor = std.mean() * 0.1 + 1e-6  # no channel with a zero-width clutter branch
        dtype = gm.dtype
        out[name] = (mean.to(dtype).reshape(-1, 1, 1),
                     std.clamp_min(floor).to(dtype).reshape(-1, 1, 1),
                     math.log(n / n_free))  # fmt: skip
        print(f"clutter {name}: pi {n / n_free:.3f}", flush=True)
    return out


def use_offset_priors(gm: GenerativeModel, n: int, *, top: bool = False) -> dict:
    """The ``dprior`` lever, in place: on every level below the top (and the top too with
    ``top``: the ``dpriortop`` lever) with more than one offset, the prior on δ becomes
    :func:`~pyro_backpass.learning.fit_offset_priors`'s (α = 2) from ``n`` lone train-split
    objects per category, instead of uniform. (A prior on δ given the same level's γ is not a
    site of the model: the parents of a site must lie on higher levels.) Returns the priors."""
    images, _, labels = rendered_objects(gm, n, "train")
    levels = [name for name in (gm.hidden_levels if top else gm.hidden_levels[:-1])
              if gm.steps[name].num_offsets > 1]  # fmt: skip
    priors = fit_offset_priors(gm, images, labels, levels=levels)
    for site, prior in priors.items():
        gm.priors[site] = prior
        print(f"dprior {site[6:]}: {[round(float(p), 3) for p in prior.probs]}", flush=True)
    return priors


def _branch_scores(params: dict, bu: torch.Tensor, phi: torch.Tensor):
    """The closed form's two branch maxima (on, off) per element as differentiable functions
    of ``params`` (``log_lam``, ``beta``, ``log_s0``, ``log_s1``, ``log_s2``) — the same
    arithmetic as :func:`~pyro_backpass.inference.closed_form_with`, kept here with gradients."""
    c = closed_form_constants(
        threshold=params["log_lam"].exp(), background=params["beta"],
        scale_td=params["log_s0"].exp(), scale_on=params["log_s1"].exp(),
        scale_off=params["log_s2"].exp(), like=phi,
    )  # fmt: skip
    _, s_on, _, s_off = _branches(c, bu, phi, off_max=c.threshold)
    return s_on, s_off


def _branches(c, bu: torch.Tensor, phi: torch.Tensor, *, off_max):
    """The closed form's two branches per element from the constants ``c``: ``(f_on, s_on,
    f_off, s_off)``, the off branch's F clamped at ``off_max`` (λ, or the float below it)."""
    f_on = (c.weight_on * bu + c.weight_td * phi).clamp_min(c.threshold)
    f_off = phi.clamp_max(off_max)
    s_on = c.const_on - (c.half_prec_on * (bu - f_on).square()
                         + c.half_prec_td * (f_on - phi).square())  # fmt: skip
    s_off = c.const_off - (c.half_prec_off * (bu - c.background).square()
                           + c.half_prec_td * (f_off - phi).square())  # fmt: skip
    return f_on, s_on, f_off, s_off


def _observation_params(gm: GenerativeModel, name: str, dtype: torch.dtype) -> dict:
    """Level ``name``'s λ, σ0 (log, scalars) and β, σ1, σ2 (per channel) as fresh leaves."""
    obs, step = gm.observations[name], gm.steps[name]
    channels = gm.steps[name].out.channels

    def per_channel(v: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(v, dtype=dtype).expand(channels, 1, 1).clone()

    return {
        "log_lam": obs.threshold.detach().to(dtype).log().clone(),
        "beta": per_channel(obs.background),
        "log_s1": per_channel(obs.scale_on).log(),
        "log_s2": per_channel(obs.scale_off).log(),
        "log_s0": step.scale_td.detach().to(dtype).log().clone(),
    }


@torch.no_grad()
def _write_params(gm: GenerativeModel, name: str, params: dict) -> None:
    obs, step = gm.observations[name], gm.steps[name]
    dtype = obs.background.dtype
    obs.threshold.copy_(params["log_lam"].exp())
    obs.background.data = params["beta"].detach().to(dtype)
    obs.scale_on.data = params["log_s1"].exp().detach().to(dtype)
    obs.scale_off.data = params["log_s2"].exp().detach().to(dtype)
    step.scale_td.copy_(params["log_s0"].exp())


def fit_on_off(gm: GenerativeModel, scenes: list, *, steps: int = 150) -> None:
    """The ``onoff`` lever, in place (see the module docstring): per level, top first, Adam on
    the logistic loss of the closed form's on-minus-off score margin for "this element is one of
    the object's own on-elements", with φ from the oracle assignment under the parameters fitted
    so far."""
    hidden = gm.hidden_levels
    items = []
    with torch.no_grad():
        for scene in scenes:
            bu = hidden_bu(gm, scene.image)
            for inst in scene.instances:
                if not inst.mask.any():
                    continue
                label = torch.tensor([gm.categories.index(inst.category)])
                alone = greedy_map(gm, hidden_bu(gm, inst.image_alone), category=label)
                target = masked_activations(gm.backbone, inst.image_alone[None], inst.mask[None])
                items.append((bu, label, dict(alone.assignment), target))
    for i in range(len(hidden) - 1, -1, -1):
        name, parent = hidden[i], (hidden[i + 1] if i + 1 < len(hidden) else None)
        obs, step = gm.observations[name], gm.steps[name]
        with torch.no_grad():
            phis = []
            for bu, label, a, _ in items:
                upper = greedy_map(gm, bu, category=label, clamp=a).td[parent] if parent else label
                phis.append(step.phi(upper, a[f"gamma_{name}"], a[f"delta_{name}"]))
            phi = torch.cat(phis)  # (n, C, H, W)
            bu = torch.cat([it[0][name] for it in items])
            on = (torch.cat([it[3][name] for it in items]) >= obs.threshold).to(phi.dtype)
        params = _observation_params(gm, name, phi.dtype)
        for v in params.values():
            v.requires_grad_(True)
        opt = torch.optim.Adam(params.values(), lr=0.03)
        for _ in range(steps):
            with torch.enable_grad():  # apply_lever runs inside evaluate's no_grad
                s_on, s_off = _branch_scores(params, bu, phi)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(s_on - s_off, on)
                opt.zero_grad()
                loss.backward()
                opt.step()
        _write_params(gm, name, params)
        with torch.no_grad():
            obs.mask_threshold.copy_(obs.threshold)
    gm.check_parameters()


def _top_scores_differentiable(gm, bu_top, category: int, params) -> torch.Tensor:
    """``(n, K*D)`` top-level scores of ``n`` images ``bu_top`` ``(n, C, H, W)`` for one
    category as a function of ``params`` (the closed form summed over the level, plus
    log P(γ | c) and log P(δ))."""
    top = gm.hidden_levels[-1]
    step = gm.steps[top]
    tmpl = torch.relu(step.weight[category])  # (K, C, H, W)
    phi = shift_all(tmpl, step.offsets).to(bu_top.dtype)  # (K, D, C, H, W)
    s_on, s_off = _branch_scores(params, bu_top[:, None, None], phi)  # (n, K, D, C, H, W)
    data = torch.maximum(s_on, s_off).sum(dim=(-3, -2, -1))  # (n, K, D)
    prior_g = gm.priors[f"gamma_{top}"].log_probs()[category].to(data.dtype)  # (K,)
    prior_d = gm.priors[f"delta_{top}"].log_probs().to(data.dtype)  # (D,)
    return (data + prior_g[:, None] + prior_d[None, :]).reshape(data.shape[0], -1)


def fit_top_ranking(gm: GenerativeModel, scenes: list, *, steps: int = 200) -> None:
    """The ``rank`` lever, in place: the top level's observation parameters that maximise
    Σ_scenes log Σ_{true h} P(h | scene, c) over the top-level hypotheses h = (γ, δ) of each
    scene's categories (its instances' own top-level assignments, from their masked activations
    alone, as the oracle ladder takes them). Checks first that the differentiable scores equal
    :func:`~pyro_backpass.inference.top_level_scores` up to a constant (the category's term)."""
    top = gm.hidden_levels[-1]
    step = gm.steps[top]
    d = step.num_offsets
    items = []  # (bu_top (1, C, H, W), category, true flat indices)
    with torch.no_grad():
        for scene in scenes:
            bu = hidden_bu(gm, scene.image)
            truth: dict[int, list[int]] = {}
            for inst in scene.instances:
                if not inst.mask.any():
                    continue
                cat = gm.categories.index(inst.category)
                gamma, delta = own_top_assignment(gm, gm.backbone, inst)
                truth.setdefault(cat, []).append(int(gamma) * d + int(delta))
            items += [(bu[top], cat, sorted(set(h))) for cat, h in truth.items()]
    # Per category: the images stacked and a (n, K*D) bool of their true hypotheses.
    groups = []
    for cat in sorted({it[1] for it in items}):
        mine = [it for it in items if it[1] == cat]
        true = torch.zeros(len(mine), step.num_components * d, dtype=torch.bool)
        for row, it in enumerate(mine):
            true[row, it[2]] = True
        groups.append((torch.cat([it[0] for it in mine]), cat, true))
    params = _observation_params(gm, top, items[0][0].dtype)
    with torch.no_grad():  # the oracle check: same ranking scores as the library's
        bu0, cat0, _ = items[0]
        ours = _top_scores_differentiable(gm, bu0, cat0, params)[0]
        frozen = freeze_priors(gm.resolve_priors(None))
        lib, _ = top_level_scores(gm, {top: bu0}, {}, frozen, batch=1, chunk_elements=2**25,
                                  constants=gm.constants(top))  # fmt: skip
        diff = ours - lib[0, cat0].reshape(-1).to(ours.dtype)
        if float(diff.max() - diff.min()) > 1e-3 + 1e-5 * float(ours.abs().max()):
            raise AssertionError(f"rank lever: scores differ from top_level_scores by {diff}")

    def nll() -> torch.Tensor:
        total = 0.0
        for bu_top, cat, true in groups:
            s = _top_scores_differentiable(gm, bu_top, cat, params)  # (n, K*D)
            hit = s.masked_fill(~true, -torch.inf)
            total = total + (torch.logsumexp(s, 1) - torch.logsumexp(hit, 1)).sum()
        return total / len(items)

    def mean_rank() -> float:
        ranks = []
        for bu_top, cat, true in groups:
            s = _top_scores_differentiable(gm, bu_top, cat, params)
            best_true = s.masked_fill(~true, -torch.inf).amax(1, keepdim=True)
            ranks += ((s > best_true).sum(1) + 1).tolist()
        return statistics.median(ranks)

    with torch.no_grad():
        before, rank_before = float(nll()), mean_rank()
    for v in params.values():
        v.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=0.02)
    with torch.enable_grad():  # apply_lever runs inside evaluate's no_grad
        for _ in range(steps):
            loss = nll()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(nll())
        print(f"rank lever ({len(items)} scene-categories): NLL {before:.2f} -> {after:.2f}, "
              f"median train rank {rank_before} -> {mean_rank()}", flush=True)  # fmt: skip
    _write_params(gm, top, params)
    gm.check_parameters()


@torch.no_grad()
def top_scores(gm: GenerativeModel, bu: dict, category: int, *, footprint: bool) -> torch.Tensor:
    """``(K*D,)`` the scores the top-level choice compares for one image and category."""
    top = gm.hidden_levels[-1]
    consts = gm.constants(top)
    priors = freeze_priors(gm.resolve_priors(None))
    scores, _ = top_level_scores(
        gm, bu, {}, priors, batch=1, chunk_elements=2**25, constants=consts
    )  # (1, N, K, D)
    s = scores[0, category].reshape(-1)
    if not footprint:
        return s
    step = gm.steps[top]
    # Log-likelihood ratio against the all-background explanation (φ = 0 everywhere): the
    # background's score is the same for every hypothesis, so the ratio is s − s_bg.
    _, s_bg = closed_form_with(consts, bu[top], torch.zeros_like(bu[top]))
    s_bg = s_bg.sum()
    k = step.num_components
    tmpl = torch.relu(step.weight).reshape(-1, k, *step.out.shape)[category]  # (K, C, H, W)
    shifted = shift_all(tmpl, step.offsets)  # (K, D, C, H, W)
    area = (shifted > 0).flatten(2).sum(-1).reshape(-1).clamp_min(1).to(s.dtype)  # (K*D,)
    return (s - s_bg) / area


@torch.no_grad()
def best_by_classifier(gm: GenerativeModel, bu: dict, label: torch.Tensor, *, top_k: int):
    """Of greedy's ``top_k`` completed descents, the one whose region the backbone's
    classifier, shown only that region (:func:`~pyro_backpass.inference.region_views`), gives
    the most probability of ``label``. Returns an object with ``.mask`` ``(1, H, W)``."""
    from types import SimpleNamespace

    _, masks = descent_features(gm, bu, label, top_k=top_k)
    views = region_views(bu["image"][0].clamp(0, 1), masks)
    logp = torch.log_softmax(gm.backbone.logits(views), -1)[:, int(label[0])]
    best = max(range(len(logp)), key=lambda i: (float(logp[i]), -i))
    return SimpleNamespace(mask=masks[best : best + 1])


@torch.no_grad()
def descent_features(gm: GenerativeModel, bu: dict, label: torch.Tensor, *, top_k: int):
    """Greedy's ``top_k`` completed descents (category ``label``): their features ``(k, F)`` —
    each hidden level's log-likelihood ratio against the all-background explanation (its data
    score minus the level's background score), the prior terms (log-joint minus the data), the
    log of 1 + the mask's pixels — and their masks ``(k, H, W)``."""
    from pyro_backpass.inference import background_log_likelihood, object_mask, top_down_pass

    result = greedy_map(gm, bu, category=label, top_k=top_k)
    modes = result.modes[0]
    values = {s: torch.tensor([a[s] for a, _ in modes]) for s in modes[0][0]}
    rep = {k: v.expand(len(modes), *v.shape[1:]) for k, v in bu.items()}
    td, scores = top_down_pass(gm, values, rep, {})  # scores: top level first
    masks = object_mask(gm, td, rep)
    # Each level's all-background score, the terms background_log_likelihood sums: (L,).
    bg = torch.cat([background_log_likelihood(gm, {name: bu[name]})
                    for name in reversed(gm.hidden_levels)])  # fmt: skip
    data = torch.stack(scores, 1)  # (k, L)
    llr = data - bg[None]
    prior = torch.tensor([lj for _, lj in modes]) - data.sum(1)
    area = masks.flatten(1).sum(1).to(llr.dtype).log1p()
    return torch.cat([llr, prior[:, None], area[:, None]], 1), masks


def fit_reranker(gm: GenerativeModel, scenes: list, *, top_k: int, l2: float = 1.0):
    """Weights ``(F,)`` (and the features' mean and scale) of the linear score of
    :func:`descent_features` that puts the most softmax mass, among each training scene's
    ``top_k`` descents, on the ones hitting an airplane (IoU ≥ 0.5); scenes with none are
    skipped."""
    label = torch.tensor([gm.categories.index("airplane")])
    feats, targets = [], []
    for scene in tqdm(scenes, desc="rerank: train descents", leave=False):
        planes = [i for i in scene.instances if i.category == "airplane" and i.mask.any()]
        if not planes:
            continue
        bu = {k: v for k, v in gm.backbone(scene.image[None]).items() if k in gm.hidden_levels}
        x, masks = descent_features(gm, bu, label, top_k=top_k)
        iou = torch.stack([mask_iou(masks, i.mask[None].expand_as(masks)) for i in planes]).amax(0)
        if bool((iou >= 0.5).any()):
            feats.append(x.double()), targets.append((iou >= 0.5).double())
    if not feats:  # nothing to fit (e.g. a smoke model): all weights 0, the first descent
        print("rerank: no training scene has a hitting descent; weights 0", flush=True)
        n_feat = len(gm.hidden_levels) + 2
        return torch.zeros(n_feat, dtype=torch.float64), torch.zeros(n_feat), torch.ones(n_feat)
    allx = torch.cat(feats)
    mean, scale = allx.mean(0), allx.std(0).clamp_min(1e-9)
    w = torch.zeros(allx.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        total = 0.5 * l2 * (w * w).sum()
        for x, y in zip(feats, targets, strict=True):
            logp = torch.log_softmax(((x - mean) / scale) @ w, 0)
            total = total - torch.logsumexp(logp[y > 0], 0)  # mass on the hitting descents
        total.backward()
        return total

    with torch.enable_grad():
        opt.step(loss)
    print(f"rerank: {len(feats)} train scenes with a hit among {top_k}; weights "
          f"{[round(v, 2) for v in w.detach().tolist()]}", flush=True)  # fmt: skip
    return w.detach(), mean, scale


@torch.no_grad()
def best_by_reranker(gm, bu, label, *, top_k: int, fit) -> object:
    from types import SimpleNamespace

    w, mean, scale = fit
    x, masks = descent_features(gm, bu, label, top_k=top_k)
    s = ((x.double() - mean) / scale) @ w
    best = int(s.argmax())
    return SimpleNamespace(mask=masks[best : best + 1])


@torch.no_grad()
def best_by_statistic(gm: GenerativeModel, bu: dict, label: torch.Tensor, *, top_k: int):
    """Of greedy's ``top_k`` completed descents (category ``label``), the one with the largest
    stop statistic of the parser's criterion for ``gm`` at a parse's first step (nothing
    claimed yet: visible = amodal mask). Returns an object with ``.mask`` ``(1, H, W)``."""
    from types import SimpleNamespace

    from pyro_backpass.parsing import default_threshold

    crit = default_threshold(gm)["criterion"]
    x, masks = descent_features(gm, bu, label, top_k=top_k)
    llr = x[:, : len(gm.hidden_levels) + 1].sum(1)  # Σ per-level LLR + priors = log-joint − bg
    stats = [crit.statistic(llr=float(v), visible=float(m.sum()), amodal=float(m.sum()), step=0)
             for v, m in zip(llr, masks, strict=True)]  # fmt: skip
    best = max(range(len(stats)), key=lambda i: (stats[i], -i))
    return SimpleNamespace(mask=masks[best : best + 1])


@torch.no_grad()
def category_unknown(gm: GenerativeModel, lever: str, scenes: list) -> dict:
    """The first backward pass with the category left to the model (the plain pass of the
    lever's parameters): share of scenes whose mask has IoU ≥ 0.5 / 0.3 with one of the
    airplanes, share whose chosen category is airplane, and the mean best IoU."""
    model, _ = apply_lever(gm, lever)
    airplane = model.categories.index("airplane")
    hits5, hits3, chose, best = [], [], [], []
    for scene in tqdm(scenes, desc=f"{lever} (category unknown)", leave=False):
        acts = gm.backbone(scene.image[None])
        bu = {k: v for k, v in acts.items() if k in model.hidden_levels}
        planes = [i for i in scene.instances if i.category == "airplane" and i.mask.any()]
        if not planes:
            continue
        free = greedy_map(model, bu)
        ious = [float(mask_iou(free.mask, i.mask[None])[0]) for i in planes]
        hits5.append(max(ious) >= 0.5), hits3.append(max(ious) >= 0.3)
        chose.append(int(free.assignment["category"][0]) == airplane)
        best.append(statistics.mean(ious))
    mean = statistics.mean
    return {"hit@0.5": mean(hits5), "hit@0.3": mean(hits3), "chose_airplane": mean(chose),
            "best_iou": mean(best)}  # fmt: skip


def evaluate(gm: GenerativeModel, lever: str, scenes: list, *, bound: bool,
             verifier: DescentVerifier | None = None,
             lower: DescentVerifier | bool = True) -> dict:  # fmt: skip
    model, choice = apply_lever(gm, lever)
    bb = gm.backbone
    top = model.hidden_levels[-1]
    step = model.steps[top]
    airplane = model.categories.index("airplane")
    label = torch.tensor([airplane])
    hits5, hits3, best, clamped_iou, alone_iou, ranks, bound5 = [], [], [], [], [], [], []
    for scene in tqdm(scenes, desc=lever, leave=False):
        acts = bb(scene.image[None])
        bu = {k: v for k, v in acts.items() if k in model.hidden_levels}
        planes = [i for i in scene.instances if i.category == "airplane" and i.mask.any()]
        if not planes:
            continue
        s = top_scores(model, bu, airplane, footprint=choice is True)
        d = step.num_offsets
        if isinstance(choice, tuple) and choice[0] == "descent":
            free = SimpleNamespace(mask=level_descent(model, bu, airplane, **choice[1])[1])
        elif isinstance(choice, tuple) and choice[0] == "verified":
            free = verified_map(model, bu, category=label, verifier=verifier,
                                lower=lower if choice[1] else False,
                                priors=choice[2] if len(choice) > 2 else None)  # fmt: skip
        elif isinstance(choice, tuple) and choice[0] == "cam":
            prior = class_map_prior(model, acts, airplane, weight=choice[1])
            free = greedy_map(model, bu, category=label, priors={f"delta_{top}": prior})
        elif isinstance(choice, tuple) and choice[0] == "verify":
            free = best_by_classifier(model, bu, label, top_k=choice[1])
        elif isinstance(choice, tuple) and choice[0] == "rerank":
            free = best_by_reranker(model, bu, label, top_k=choice[1], fit=choice[2])
        elif isinstance(choice, tuple):
            free = best_by_statistic(model, bu, label, top_k=choice[1])
        elif choice is not True and choice > 1:
            free = greedy_map(model, bu, category=label, top_k=choice)
        elif choice:
            flat = int(s.argmax())
            clamp = {f"gamma_{top}": flat // d, f"delta_{top}": flat % d}
            free = greedy_map(model, bu, category=label, clamp=clamp)
        else:
            free = greedy_map(model, bu, category=label)
        ious = [float(mask_iou(free.mask, i.mask[None])[0]) for i in planes]
        hits5.append(max(ious) >= 0.5), hits3.append(max(ious) >= 0.3)
        best.append(statistics.mean(ious))
        order = s.argsort(descending=True, stable=True)
        rank_of = torch.empty_like(order)
        rank_of[order] = torch.arange(1, order.numel() + 1)
        scene_ranks = []
        for inst in planes:
            gamma, delta = own_top_assignment(model, bb, inst)
            scene_ranks.append(int(rank_of[int(gamma) * d + int(delta)]))
            alone_acts = bb(inst.image_alone[None])
            alone_bu = {k: v for k, v in alone_acts.items() if k in model.hidden_levels}
            if isinstance(choice, tuple) and choice[0] == "descent":
                clamped_mask = level_descent(model, bu, airplane, top=(int(gamma), int(delta)),
                                             **choice[1])[1]  # fmt: skip
                alone_mask = level_descent(model, alone_bu, airplane, **choice[1])[1]
            else:
                clamped_mask = greedy_map(model, bu, category=label,
                                          clamp={f"gamma_{top}": gamma,
                                                 f"delta_{top}": delta}).mask  # fmt: skip
                alone_mask = greedy_map(model, alone_bu, category=label).mask
            clamped_iou.append(float(mask_iou(clamped_mask, inst.mask[None])[0]))
            alone_iou.append(float(mask_iou(alone_mask, inst.amodal_mask[None])[0]))
        ranks.append(min(scene_ranks))
        if bound:
            n = step.num_components * d
            masks = []
            for start in range(0, n, 100):
                idx = torch.arange(start, min(n, start + 100))
                rep = {k: v.expand(len(idx), *v.shape[1:]) for k, v in bu.items()}
                clamp = {f"gamma_{top}": idx // d, f"delta_{top}": idx % d}
                r = greedy_map(model, rep, category=airplane, clamp=clamp)
                masks.append(r.mask)
            all_masks = torch.cat(masks)
            bound5.append(
                max(
                    float(mask_iou(all_masks, i.mask[None].expand_as(all_masks)).max())
                    for i in planes
                )
                >= 0.5  # fmt: skip
            )
    mean = statistics.mean
    return {
        "scenes": len(hits5),
        "hit@0.5": mean(hits5),
        "hit@0.3": mean(hits3),
        "best_iou": mean(best),
        "top_clamped": mean(clamped_iou),
        "alone_plain": mean(alone_iou),
        "true_rank_median": statistics.median(ranks),
        "top_hypotheses": step.num_components * step.num_offsets,
        "bound@0.5": mean(bound5) if bound else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--levers", nargs="+", default=["base"])
    parser.add_argument("--bound", action="store_true", help="also the best-of-all bound")
    parser.add_argument("--category-unknown", action="store_true",
                        help="also the first pass with the category left to the model")  # fmt: skip
    parser.add_argument("--verifier", type=Path, default=None,
                        help="the verified lever's verifier file (default: shipped)")  # fmt: skip
    parser.add_argument("--lower-verifier", type=Path, default=None,
                        help="verified2's second stage (default: shipped)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    n = 2 if args.smoke else args.scenes
    scenes = list(Scenes(n, seed=split_seed(args.split)))
    out = args.out or RESULTS / f"clutter_levers_{args.split}.json"
    descent = [v for v in args.levers if v == "footprintall" or v.startswith(("sharp", "clutter"))]
    if descent and (args.bound or args.category_unknown):
        # Their bound and category-unknown rows would be greedy_map's, not the lever's.
        raise SystemExit(f"--bound and --category-unknown are not measured for {descent}")
    rows = {}
    for lever in args.levers:
        start = time.perf_counter()
        verifier = None if args.verifier is None else DescentVerifier.load(args.verifier)
        lower = True if args.lower_verifier is None else DescentVerifier.load(args.lower_verifier)
        rows[lever] = evaluate(gm, lever, scenes, bound=args.bound, verifier=verifier,
                               lower=lower)  # fmt: skip
        if args.category_unknown:
            rows[lever]["category_unknown"] = category_unknown(gm, lever, scenes)
        rows[lever]["seconds"] = round(time.perf_counter() - start, 1)
        print(lever, {k: (round(v, 3) if isinstance(v, float) else v)
                      for k, v in rows[lever].items()}, flush=True)  # fmt: skip
    atomic_write_json(out, {"machine": machine(), "threads": 1, "model": model_name,
                            "split": args.split, "levers": rows})  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

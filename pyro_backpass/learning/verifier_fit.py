"""Fit a :class:`~pyro_backpass.model.DescentVerifier` on training scenes (issue #10).

For each training scene and each category with an instance in it, greedy's ``top_k`` best
top-level hypotheses of that category are completed to the image; a descent is a *hit* when
its mask has IoU ≥ ``hit_iou`` with the visible mask of one of the scene's instances of the
category. Per category, the weights maximise, summed over the scenes that have a hit, the
softmax mass the linear score puts on the hits among the scene's descents (a listwise loss),
with an L2 penalty on the standardised weights; L-BFGS, float64. Scenes without a hit among
the k descents carry no information about the choice and are skipped.

A second stage (``levels_below=n``) is fitted the same way on other lists: for each scene, the
``first_stage`` verifier's choice keeps its top level and the completions of every joint
(γ, δ) of the n levels under it (:func:`~pyro_backpass.inference.lower_completions`) are the
descents (:func:`lower_descent_examples`).

With ``hidden=H`` each category is scored instead by an ensemble of ``ensemble`` networks
(dropout 0.2, a hidden layer of H ReLU units, dropout 0.2, one output), each fitted by AdamW
(learning rate 1e-3, weight decay 0.01) on the same listwise loss in minibatches of 16 scenes
for ``epochs`` epochs from its own seed; the score is their mean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from pyro_backpass.inference import (
    READ_LEVELS,
    descent_features,
    greedy_map,
    lower_descent_features,
    lower_levels,
    mode_values,
    verified_map,
    verifier_fingerprint,
)
from pyro_backpass.inference.verification import check_verifier
from pyro_backpass.learning.evaluation import mask_iou
from pyro_backpass.model.descent_verifier import DescentVerifier

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = [
    "VerifierExample",
    "descent_examples",
    "fit_descent_verifier",
    "listwise_loss",
    "lower_descent_examples",
]


@dataclass(frozen=True)
class VerifierExample:
    """One scene's descents of one category: ``features`` ``(k, F)``, ``hits`` ``(k,)`` bool,
    ``iou`` ``(k,)`` each descent's best IoU with an instance of the category; the
    ``read_levels`` and ``top_k`` they were made with (None: not recorded). For a second
    stage's lists, ``levels_below`` (n > 0) and ``anchor``: the index of the first stage's
    own descent among the completions (its choice, which the second stage starts from).
    ``refine``: the masks were the colour CRF's (:func:`descent_examples`)."""

    category: int
    features: torch.Tensor
    hits: torch.Tensor
    iou: torch.Tensor
    read_levels: tuple[str, ...] | None = None
    top_k: int | None = None
    levels_below: int | None = None
    anchor: int | None = None
    refine: bool = False


@torch.no_grad()
def descent_examples(
    gm: GenerativeModel,
    scenes: Iterable,
    *,
    top_k: int = 100,
    categories: Sequence[str] | None = None,
    read_levels: Sequence[str] = READ_LEVELS,
    hit_iou: float = 0.5,
    progress: bool = True,
    refine: bool = False,
) -> list[VerifierExample]:
    """:class:`VerifierExample` of every scene (objects with ``.image`` ``(3, H, W)`` and
    ``.instances`` with ``.category`` and a visible ``.mask``, as :class:`~pyro_backpass.Scene`)
    and every category in ``categories`` (None: all the model's) with an instance in it.
    ``refine``: the descents' masks (their features and hits) are the colour CRF's
    (:func:`~pyro_backpass.inference.descent_features`)."""
    names = _category_names(gm, categories)
    out = []
    for scene in tqdm(list(scenes), desc="verifier: descents", disable=not progress):
        bu = _hidden_bu(gm, scene.image)
        for _, c, truth in _truths(gm, scene, names):
            result = greedy_map(gm, bu, category=c, top_k=top_k)
            assert result.modes is not None
            values, lj = mode_values(result.modes[0], list(result.assignment), device=gm.device)
            x, masks = descent_features(gm, bu, values, lj, read_levels=read_levels,
                                        refine=refine)  # fmt: skip
            iou = _best_iou(masks.cpu(), truth)
            out.append(VerifierExample(category=c, features=x.cpu().double(),
                                       hits=iou >= hit_iou, iou=iou,
                                       read_levels=tuple(read_levels), top_k=top_k,
                                       refine=refine))  # fmt: skip
    return out


@torch.no_grad()
def lower_descent_examples(
    gm: GenerativeModel,
    scenes: Iterable,
    *,
    first_stage: DescentVerifier,
    levels_below: int = 2,
    categories: Sequence[str] | None = None,
    read_levels: Sequence[str] = READ_LEVELS,
    hit_iou: float = 0.5,
    progress: bool = True,
    refine: bool = False,
) -> list[VerifierExample]:
    """A second stage's :class:`VerifierExample` of every scene and category with an instance
    in it (as :func:`descent_examples`): the ``first_stage`` verifier chooses among greedy's
    ``first_stage.top_k`` descents; its top level is kept and the completions of every joint
    (γ, δ) of the ``levels_below`` levels under it are the example's descents."""
    check_verifier(gm, first_stage)  # a first stage (levels_below 0)
    lower_levels(gm, levels_below)  # a clear error beyond the model's depth
    names = _category_names(gm, categories)
    out = []
    scenes = list(scenes)
    for n_scene, scene in enumerate(tqdm(scenes, desc="second-stage verifier: descents",
                                         disable=not progress)):  # fmt: skip
        bu = _hidden_bu(gm, scene.image)
        for name, c, truth in _truths(gm, scene, names):
            first = verified_map(gm, bu, category=c, verifier=first_stage, lower=False)
            chosen = {s: int(v[0]) for s, v in first.assignment.items()}
            below, x2, masks = lower_descent_features(gm, bu, chosen, levels_below=levels_below,
                                                      read_levels=read_levels,
                                                      refine=refine)  # fmt: skip
            same = torch.ones(len(masks), dtype=torch.bool, device=gm.device)
            for s, v in below.items():
                same &= v == chosen[s]
            if not bool(same.any()):
                raise ValueError(
                    f"scene {n_scene}, {name}: the first stage's descent is not among the "
                    "completions below its top level (greedy's completion differs between the "
                    "batched and the single pass)"
                )
            iou = _best_iou(masks.cpu(), truth)
            out.append(VerifierExample(category=c, features=x2.cpu().double(),
                                       hits=iou >= hit_iou, iou=iou,
                                       read_levels=tuple(read_levels), top_k=first_stage.top_k,
                                       levels_below=levels_below,
                                       anchor=int(same.nonzero()[0, 0]),
                                       refine=refine))  # fmt: skip
    return out


def _category_names(gm: GenerativeModel, categories: Sequence[str] | None) -> tuple[str, ...]:
    if gm.backbone is None:
        raise ValueError("fitting a descent verifier needs the model's backbone")
    names = tuple(gm.categories) if categories is None else tuple(categories)
    unknown = [c for c in names if c not in gm.categories]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; the model knows {list(gm.categories)}")
    return names


def _hidden_bu(gm: GenerativeModel, image: torch.Tensor) -> dict[str, torch.Tensor]:
    acts = gm.backbone(image[None].to(device=gm.device))
    return {k: v for k, v in acts.items() if k in gm.hidden_levels}


def _truths(gm: GenerativeModel, scene, names: Sequence[str]):
    """(name, index, visible masks) of each category in ``names`` with an instance in
    ``scene``."""
    for name in names:
        truth = [i.mask for i in scene.instances if i.category == name and i.mask.any()]
        if truth:
            yield name, gm.categories.index(name), truth


def _best_iou(masks: torch.Tensor, truth: list[torch.Tensor]) -> torch.Tensor:
    """``(k,)`` each of ``masks`` ``(k, H, W)``'s best IoU with one of ``truth``."""
    return torch.stack([mask_iou(masks, t[None].expand_as(masks)) for t in truth]).amax(0)


def listwise_loss(weight: torch.Tensor, examples: Sequence[VerifierExample], *,
                  mean: torch.Tensor, scale: torch.Tensor, l2: float) -> torch.Tensor:  # fmt: skip
    """``½ l2 |w|² − Σ_scenes log Σ_{hits} softmax(x̃ w)``, x̃ the standardised features."""
    total = 0.5 * l2 * (weight * weight).sum()
    for ex in examples:
        logp = torch.log_softmax(((ex.features - mean) / scale) @ weight, 0)
        total = total - torch.logsumexp(logp[ex.hits], 0)
    return total


def fit_descent_verifier(
    gm: GenerativeModel,
    scenes: Iterable | None = None,
    *,
    examples: Sequence[VerifierExample] | None = None,
    top_k: int = 100,
    categories: Sequence[str] | None = None,
    read_levels: Sequence[str] = READ_LEVELS,
    hit_iou: float = 0.5,
    l2: float = 10.0,
    hidden: int = 0,
    ensemble: int = 3,
    epochs: int = 10,
    seed: int = 0,
    levels_below: int = 0,
    first_stage: DescentVerifier | None = None,
    progress: bool = True,
    refine: bool | None = None,
) -> DescentVerifier:
    """A :class:`DescentVerifier` for ``gm`` from training ``scenes`` (or precomputed
    ``examples`` of :func:`descent_examples`, e.g. made in parallel); categories with no scene
    that has a hit stay unfitted (scoring them raises).

    With ``levels_below=n`` > 0 it is a second stage (``verified_map(..., lower=)``), fitted on
    :func:`lower_descent_examples` behind ``first_stage`` (required with ``scenes``; with
    ``examples``, pass the first stage they were made behind to record its fingerprint, which
    ``verified_map(lower=None)`` pairs by). With a ``first_stage``, ``top_k`` is its.

    ``refine``: the descents' masks (features and hits) are the colour CRF's
    (``descent_features(refine=True)``), and the verifier records it (``refine_masks``) so that
    ``verified_map`` scores by them too; None: False from scenes, the examples' own with
    ``examples`` (which must all agree).

    Example::

        gm = GenerativeModel.default()
        verifier = fit_descent_verifier(gm, Scenes(200, seed=split_seed("train")),
                                        categories=["airplane"])
        verified_map(gm, bu, category="airplane", verifier=verifier)
    """
    if (scenes is None) == (examples is None):
        raise ValueError("pass either scenes or examples")
    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    for name, v, lo in (("hidden", hidden, 0), ("ensemble", ensemble, 1), ("epochs", epochs, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if isinstance(levels_below, bool) or not isinstance(levels_below, int) or levels_below < 0:
        raise ValueError(f"levels_below must be an int >= 0, got {levels_below!r}")
    if levels_below:
        lower_levels(gm, levels_below)  # a clear error beyond the model's depth
    if first_stage is not None:
        if not levels_below:
            raise ValueError("first_stage is for a second stage: pass levels_below > 0 too")
        check_verifier(gm, first_stage)  # a first stage (levels_below 0)
        top_k = first_stage.top_k  # the second stage records the k it was fitted behind
    if examples is None and levels_below:
        if first_stage is None:
            raise ValueError("a second stage (levels_below > 0) from scenes needs first_stage=")
        examples = lower_descent_examples(gm, scenes, first_stage=first_stage,
                                          levels_below=levels_below, categories=categories,
                                          read_levels=read_levels, hit_iou=hit_iou,
                                          progress=progress, refine=bool(refine))  # fmt: skip
    elif examples is None:
        examples = descent_examples(gm, scenes, top_k=top_k, categories=categories,
                                    read_levels=read_levels, hit_iou=hit_iou,
                                    progress=progress, refine=bool(refine))  # fmt: skip
    if not examples:
        raise ValueError("no training examples: no scene has an instance of the categories")
    refined = {ex.refine for ex in examples}
    if len(refined) > 1:
        raise ValueError("examples mix CRF-refined masks and the readout's (descent_examples' "
                         "refine=): fit on one kind")  # fmt: skip
    if refine is not None and refined != {bool(refine)}:
        raise ValueError(f"refine={refine} but the examples were made with "
                         f"refine={refined.pop()}")  # fmt: skip
    refine_masks = refined.pop()
    n, f = len(gm.categories), examples[0].features.shape[1]
    if any(ex.features.shape[1] != f for ex in examples):
        raise ValueError("examples have different numbers of features")
    for ex in examples:
        if ex.read_levels is not None and tuple(ex.read_levels) != tuple(read_levels):
            raise ValueError(f"examples were made with read_levels {list(ex.read_levels)}, "
                             f"not {list(read_levels)}")  # fmt: skip
        if ex.top_k is not None and ex.top_k != top_k:
            raise ValueError(f"examples were made with top_k={ex.top_k}, not {top_k}")
        if (ex.levels_below or 0) != levels_below:
            raise ValueError(f"examples were made for levels_below={ex.levels_below or 0}, "
                             f"not {levels_below}")  # fmt: skip
    weight = torch.zeros(n, f, dtype=torch.float64)
    mean, scale = torch.zeros(n, f, dtype=torch.float64), torch.ones(n, f, dtype=torch.float64)
    fitted = torch.zeros(n, dtype=torch.bool)
    nets = {}  # category -> (w1 (E, F, H), b1 (E, H), w2 (E, H)) with hidden > 0
    for c in range(n):
        mine = [ex for ex in examples if ex.category == c and bool(ex.hits.any())]
        if not mine:
            continue
        # A canonical order of the scenes (by content), so that the standardisation, the
        # minibatches and hence the fit do not depend on the order the examples came in.
        mine = sorted(mine, key=_content_key)
        allx = torch.cat([ex.features for ex in mine])
        mean[c], scale[c] = allx.mean(0), allx.std(0).clamp_min(1e-6)
        fitted[c] = True
        if hidden:
            xs = [((ex.features - mean[c]) / scale[c]).float() for ex in mine]  # (k, F) each
            hits = [ex.hits for ex in mine]
            nets[c] = _fit_ensemble(xs, hits, hidden=hidden, ensemble=ensemble, epochs=epochs,
                                    seed=seed)  # fmt: skip
            continue
        w = torch.zeros(f, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")  # fmt: skip

        def closure(mine=mine, c=c, w=w, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            loss = listwise_loss(w, mine, mean=mean[c], scale=scale[c], l2=l2)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        weight[c] = w.detach()
    extra = {}
    if nets:
        e_f_h = (ensemble, f, hidden)
        extra = {"hidden_weight": torch.zeros(n, *e_f_h, dtype=torch.float64),
                 "hidden_bias": torch.zeros(n, ensemble, hidden, dtype=torch.float64),
                 "out_weight": torch.zeros(n, ensemble, hidden, dtype=torch.float64),
                 "nonlinear": torch.zeros(n, dtype=torch.bool)}  # fmt: skip
        for c, (w1, b1, w2) in nets.items():
            extra["hidden_weight"][c], extra["hidden_bias"][c] = w1, b1
            extra["out_weight"][c], extra["nonlinear"][c] = w2, True
    return DescentVerifier(categories=gm.categories, read_levels=read_levels, weight=weight,
                           mean=mean, scale=scale, fitted=fitted, top_k=top_k,
                           model_sha256=verifier_fingerprint(gm), levels_below=levels_below,
                           first_stage_sha256=None if first_stage is None
                           else first_stage.fingerprint(), refine_masks=refine_masks,
                           **extra)  # fmt: skip


def _fit_ensemble(
    xs: list[torch.Tensor], hits: list[torch.Tensor], *, hidden: int, ensemble: int,
    epochs: int, seed: int, batch: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``ensemble`` one-hidden-layer networks on standardised features ``xs`` (one ``(k, F)``
    per scene) and their ``hits``: ``(E, F, H)``, ``(E, H)``, ``(E, H)`` float64 (the output
    bias is dropped: a constant per list changes no choice)."""
    w1s, b1s, w2s = [], [], []
    for e in range(ensemble):
        with torch.random.fork_rng(devices=[]):  # the caller's random state is untouched
            net = _fit_one(xs, hits, hidden=hidden, epochs=epochs, seed=seed + e, batch=batch)
        w1s.append(net[1].weight.detach().T.double())  # (F, H)
        b1s.append(net[1].bias.detach().double())
        w2s.append(net[4].weight.detach()[0].double())  # (H,)
    return torch.stack(w1s), torch.stack(b1s), torch.stack(w2s)


def _content_key(ex: VerifierExample) -> str:
    return hashlib.sha256(ex.features.contiguous().numpy().tobytes()).hexdigest()


def _fit_one(xs: list[torch.Tensor], hits: list[torch.Tensor], *, hidden: int, epochs: int,
             seed: int, batch: int) -> torch.nn.Sequential:  # fmt: skip
    # The CPU generator only (inside fork_rng): the initialisation, dropout and scene order.
    torch.random.default_generator.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Dropout(0.2), torch.nn.Linear(xs[0].shape[1], hidden), torch.nn.ReLU(),
        torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 1),
    )  # fmt: skip
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    with torch.enable_grad():
        for _ in range(epochs):
            net.train()
            order = torch.randperm(len(xs)).tolist()
            for i in range(0, len(order), batch):
                part = order[i : i + batch]
                loss = sum(-torch.logsumexp(torch.log_softmax(net(xs[j])[:, 0], 0)[hits[j]], 0)
                           for j in part)  # fmt: skip
                opt.zero_grad()
                (loss / len(part)).backward()
                opt.step()
    return net.eval()

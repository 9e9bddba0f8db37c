"""Probes of the descent verifier (issue #10): three ways it might choose better, measured.

- ``two_layer``: a verifier that is not linear. On the same cached descents as
  ``fit_verifier.py`` (``--cache``; 500 training and 60 validation scenes a category, k = 100),
  the linear verifier (:func:`~pyro_backpass.fit_descent_verifier`, its L2 chosen on validation
  from ``--l2``, as the verifier shipped before the ensembles) beside a two-layer one
  (standardised features → 64 ReLU units → score, dropout 0.2, the same listwise loss, AdamW
  with weight decay 0.01, 10 epochs, an ensemble of ``--seeds`` networks by their summed
  log-softmax). Share of validation scenes whose
  chosen descent hits an instance of the category (IoU ≥ 0.5 / 0.3).
- ``crop``: the backbone's classifier as a witness of a zoomed view. On ``--scenes`` validation
  scenes of ``fit_verifier.py`` (category airplane), each of the 100 descents' mask's bounding
  box (15 % margin, square) is cut out, resized to the backbone's input and classified, shown
  either masked (outside the mask, the image's median) or with its context. The descent with the
  largest log P(airplane) of that view, and the shipped verifier's score plus ``a`` × that
  log-probability, beside the shipped verifier alone and the best of the 100 (the bound).
- ``lone``: what the choice among descents can buy on a lone object (no clutter). On
  ``--objects`` validation objects of each category, the mask IoU of ``greedy_map`` (the plain
  pass), of the best of its 100 completed descents by IoU (the bound of any choice), of the
  descent with the largest completed log-joint (what ``greedy_map(..., top_k=100)`` returns) and
  of the shipped verifier's choice.
- ``list_context``: two changes to the ensemble recipe shipped for airplane, one at a time and
  together, on the same cached descents as ``fit_verifier.py`` (``--cache``; ``--train``
  training scenes plus ``--objects`` lone training objects, validated on ``--validation``
  scenes and ``--validation-objects`` lone objects): *relative* appends each feature's z-score
  among the image's own k descents (the ensemble sees each descent only beside the training
  set's statistics otherwise, while its choice is among one image's descents); *soft* replaces
  the listwise loss's hits (IoU ≥ 0.5) by the target distribution ``softmax(IoU / 0.1)`` over
  the descents (partial credit for near misses; scenes without a hit then count too). Each
  variant is fitted ``--seeds`` times (ensembles of 3 networks, 64 units, from seeds 0, 10, …),
  so the spread between seeds is beside the differences; the library's own fit
  (``fit_descent_verifier(hidden=64)``) is the reference row.
- ``vote``: the chosen mask replaced by a vote among the verifier's best descents. On
  ``--scenes`` validation scenes (category airplane) and ``--objects`` lone validation
  airplanes, the mask of the shipped verifier's choice beside, for m in 3, 5, 10: the pixels
  where the softmax-weighted (by the verifier's scores) mean of the m best-scored descents'
  masks is ≥ 0.5, over all m or only those overlapping the chosen mask (IoU ≥ 0.3: the same
  object). The choice stays the verifier's; only the mask is voted.
- ``objectness``: cues from the image itself, which no feature of the verifier reads: how
  well each descent's mask follows an edge of the image (the mean colour difference across its
  boundary, the share of its boundary on the image's strongest 20 % of edges) and how its
  inside's mean colour differs from a 3-pixel ring around it. On ``--scenes`` validation scenes
  (airplane), the descent each cue alone picks, and the shipped verifier's score plus ``a`` ×
  the cue (both z-scored among the image's descents), beside the verifier alone and the bound.
  The weights a are tried on these validation scenes (optimistic): a screen for a feature
  worth fitting, not a fitted result.
- ``refine``: a second pass that attends to the chosen descent's region. On ``--scenes``
  validation scenes (airplane) and ``--objects`` lone validation airplanes, the shipped
  verifier's choice, then ``greedy_map`` (category airplane) again with the clutter outside
  that choice's mask grown by r pixels removed, in one of two ways: *paint* (the image outside
  shown as its median colour, as the verifier's region views do, then the backbone again) or
  *observe* (the same image's activations, with every element outside the grown region, pooled
  to each level's grid, unobserved); the new mask is kept inside the grown region. ``x2``: the
  same once more from the refined mask; ``top_kept``: the top level's (γ, δ) clamped to the
  chosen descent's, so only the levels below are redone. This is rung (d) of the oracle
  ladder (the object alone) approached from the pass's own choice instead of the truth.
- ``lower_choice``: what a choice *below* the top level could buy. On ``--scenes`` validation
  scenes (airplane), the shipped verifier's choice keeps its top level's (γ, δ), and every joint
  (γ, δ) of the next two levels (``conv4_1`` and ``pool3`` on the default model: 5 × 45) is
  completed greedily below them: the best of those by IoU (the bound of a second choice), the
  one with the largest log-joint (the model's own choice among them), beside the verifier's
  descent itself; and, among the completions, the shipped verifier's own score (applied to
  their features), each ``objectness`` cue alone and that score plus ``a`` × the cue
  (z-scored among the completions; a tried on these scenes: optimistic).
- ``mask_head``: a new kind of evidence, learned from the image itself: a small network
  (:func:`mask_head_net`: RGB and a descent's mask in, four stride-2 convolutions) fitted on
  ``--train`` training scenes' ``--top-k`` descents (``--workers`` processes make them) to
  predict each mask's IoU with an airplane (``--steps`` AdamW steps, binary cross-entropy to the
  IoU, flips), as Mask Scoring R-CNN's mask-IoU head does. On ``--validation`` scenes: the
  descent it scores highest, and the shipped verifier's score plus ``a`` × its (z-scored)
  prediction, beside the verifier alone and the bound.
- ``mask_head_below``: the same head fitted and used on the 225 completions below the shipped
  verifier's chosen top level (``lower_choice``'s lists: all near one place, where the head
  must judge the mask's extent); ``verifier`` is then the shipped verifier's score of the
  completions.

One thread. Writes (updates) ``benchmarks/results/verifier_probes.json``, one key a probe.

Usage: ``python benchmarks/verifier_probes.py --probe two_layer --cache DIR``;
``--probe list_context --cache DIR --categories airplane --objects 200 --validation-objects 40``;
``--probe crop --scenes 60``; ``--probe lone --objects 30``; ``--probe vote --scenes 60
--objects 20``; ``--probe objectness --scenes 60``;
``--probe refine --scenes 60 --objects 20``;
``--probe lower_choice --scenes 60``;
``--probe mask_head --train 300 --validation 60 --workers 2``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402
from fit_verifier import examples  # noqa: E402

from pyro_backpass import (  # noqa: E402
    DescentVerifier,
    RenderedObjects,
    Scenes,
    fit_descent_verifier,
    greedy_map,
    split_seed,
)
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import (  # noqa: E402
    descent_features,
    lower_completions,
    lower_descent_features,
    lower_levels,
    mode_values,
    region_views,
)
from pyro_backpass.learning import mask_iou  # noqa: E402

CATEGORIES = ("airplane", "bird", "boat", "car", "chair")


def rates(ious: list[float]) -> dict:
    return {"hit@0.5": statistics.mean(float(v >= 0.5) for v in ious),
            "hit@0.3": statistics.mean(float(v >= 0.3) for v in ious),
            "iou": statistics.mean(ious), "n": len(ious)}  # fmt: skip


def two_layer_scores(train: list, val: list, *, seeds: int, epochs: int) -> list[torch.Tensor]:
    """Validation scores ``(k,)`` per example of an ensemble of two-layer verifiers fitted on
    ``train`` (its scenes with a hit) with the listwise loss of :func:`listwise_loss`."""
    mine = [e for e in train if bool(e.hits.any())]
    x_all = torch.cat([e.features for e in mine]).float()
    mean, scale = x_all.mean(0), x_all.std(0).clamp_min(1e-6)
    xs = [(e.features.float() - mean) / scale for e in mine]
    xv = [(e.features.float() - mean) / scale for e in val]
    out = [torch.zeros(len(e.iou)) for e in val]
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = _two_layer_net(x_all.shape[1])
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        with torch.enable_grad():
            _fit(net, opt, xs, [e.hits for e in mine], epochs=epochs)
        net.eval()
        with torch.no_grad():
            for k, x in enumerate(xv):
                out[k] += torch.log_softmax(net(x)[:, 0], 0)
    return out


def _two_layer_net(features: int) -> torch.nn.Module:
    """Dropout 0.2 → 64 ReLU units → dropout 0.2 → one score (drawn from the current seed)."""
    return torch.nn.Sequential(
        torch.nn.Dropout(0.2), torch.nn.Linear(features, 64), torch.nn.ReLU(),
        torch.nn.Dropout(0.2), torch.nn.Linear(64, 1),
    )  # fmt: skip


def _fit(net, opt, xs: list, targets: list, *, epochs: int, batch: int = 16,
         soft: bool = False) -> None:  # fmt: skip
    """Minibatches of ``batch`` scenes, each scene's loss ``−log Σ_hits softmax(score)`` (the
    hits: where ``targets`` is > 0), or with ``soft`` the cross-entropy to ``targets``."""
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(xs)).tolist()
        for i in range(0, len(order), batch):
            part = order[i : i + batch]
            loss = sum(
                (-(targets[j] * torch.log_softmax(net(xs[j])[:, 0], 0)).sum() if soft
                 else -torch.logsumexp(torch.log_softmax(net(xs[j])[:, 0], 0)[targets[j] > 0], 0))
                for j in part
            )  # fmt: skip
            opt.zero_grad()
            (loss / len(part)).backward()
            opt.step()


def probe_two_layer(args, gm) -> dict:
    rows = {}
    for category in args.categories:
        common = dict(gm=gm, workers=args.workers, top_k=args.top_k, categories=[category],
                      model=None, cache=args.cache)  # fmt: skip
        train = examples("train", args.train, **common)
        val = examples("validation", args.validation, **common)
        c = gm.categories.index(category)
        linear = {}
        for l2 in args.l2:
            v = fit_descent_verifier(gm, examples=train, top_k=args.top_k, l2=l2,
                                     categories=[category])  # fmt: skip
            if not bool(v.fitted[c]):
                continue
            linear[str(l2)] = rates([float(e.iou[int(v.score(e.features, c).argmax())])
                                     for e in val])  # fmt: skip
        t = time.perf_counter()
        scores = two_layer_scores(train, val, seeds=args.seeds, epochs=args.epochs)
        rows[category] = {
            "train_examples": len(train), "validation_examples": len(val),
            "linear_by_l2": linear,
            "linear_best_l2": max(linear.values(), key=lambda r: (r["hit@0.5"], r["hit@0.3"]),
                                  default=None),
            "two_layer": rates([float(e.iou[int(s.argmax())]) for e, s in zip(val, scores,
                                                                               strict=True)]),
            "two_layer_seconds": round(time.perf_counter() - t, 1),
            "best_of_k": rates([float(e.iou.max()) for e in val]),
        }  # fmt: skip
        print(category, {k: v for k, v in rows[category].items() if k != "linear_by_l2"},
              flush=True)  # fmt: skip
    done = [r for r in rows.values() if r["linear_best_l2"] is not None]
    rows["mean_hit@0.5"] = {
        "linear_best_l2": statistics.mean(r["linear_best_l2"]["hit@0.5"] for r in done),
        "two_layer": statistics.mean(r["two_layer"]["hit@0.5"] for r in done),
    } if done else None  # fmt: skip
    return {"train_scenes": args.train, "validation_scenes": args.validation,
            "top_k": args.top_k, "seeds": args.seeds, "epochs": args.epochs,
            "categories": rows}  # fmt: skip


def zoomed_views(image: torch.Tensor, masks: torch.Tensor, *, masked: bool, size: int,
                 margin: float = 0.15) -> torch.Tensor:  # fmt: skip
    """``(k, 3, size, size)``: each mask's bounding box (``margin`` added on every side, made
    square, at least 8 pixels) of ``image`` ``(3, H, W)``, resized bilinearly; outside the image
    (and, if ``masked``, outside the mask) the image's per-channel median."""
    _, h, w = image.shape
    fill = image.flatten(1).median(1).values[:, None, None]  # (3, 1, 1)
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys) == 0:
            out.append(fill.expand(3, size, size))
            continue
        y0, y1 = int(ys.min()), int(ys.max()) + 1
        x0, x1 = int(xs.min()), int(xs.max()) + 1
        side = max(max(y1 - y0, x1 - x0) * (1 + 2 * margin), 8.0)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        theta = torch.tensor([[side / w, 0.0, 2 * cx / w - 1], [0.0, side / h, 2 * cy / h - 1]],
                             dtype=image.dtype)  # fmt: skip
        src = torch.where(m[None], image, fill) if masked else image
        grid = F.affine_grid(theta[None], [1, 3, size, size], align_corners=False)
        view = F.grid_sample((src - fill)[None], grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0] + fill  # fmt: skip
        out.append(view)
    return torch.stack(out)


def descents(gm, image: torch.Tensor, c: int, top_k: int, *, with_values: bool = False):
    """The ``top_k`` completed descents of category ``c``: features ``(k, F)``, masks (and,
    ``with_values``, every site → ``(k,)`` indices)."""
    bu = {k: v for k, v in gm.backbone(image[None]).items() if k in gm.hidden_levels}
    result = greedy_map(gm, bu, category=c, top_k=top_k)
    values, lj = mode_values(result.modes[0], list(result.assignment))
    x, masks = descent_features(gm, bu, values, lj)
    return (bu, x, masks, values) if with_values else (bu, x, masks)


def probe_crop(args, gm, verifier) -> dict:
    c = gm.categories.index("airplane")
    size = gm.backbone.image_size[0]
    scenes = Scenes(args.scenes, seed=split_seed("validation"))
    picks: dict[str, list[float]] = {}
    for i in tqdm(range(args.scenes), desc="crop probe"):
        scene = scenes[i]
        truth = [t.mask for t in scene.instances if t.category == "airplane" and t.mask.any()]
        if not truth:
            continue
        bu, x, masks = descents(gm, scene.image, c, args.top_k)
        iou = torch.stack([mask_iou(masks, t[None].expand_as(masks)) for t in truth]).amax(0)
        sv = verifier.score(x, c).float()
        image = bu["image"][0].clamp(0, 1)
        choice = {"verifier": sv, "best_of_k": iou}
        for name, masked in (("masked", True), ("context", False)):
            views = zoomed_views(image, masks, masked=masked, size=size)
            logp = torch.log_softmax(gm.backbone.logits(gm.backbone(views)), -1)[:, c].float()
            choice[f"zoomed_{name}"] = logp
            for a in (0.3, 1.0):
                choice[f"verifier+{a}*zoomed_{name}"] = sv + a * logp
        for name, s in choice.items():
            picks.setdefault(name, []).append(float(iou[int(s.argmax())]))
    return {"scenes": args.scenes, "top_k": args.top_k, "split": "validation",
            "note": "the weights a were tried on these validation scenes (optimistic)",
            "choices": {k: rates(v) for k, v in picks.items()}}  # fmt: skip


def probe_lone(args, gm, verifier) -> dict:
    rows = {}
    for category in args.categories:
        c = gm.categories.index(category)
        if not bool(verifier.fitted[c]):
            continue
        ds = RenderedObjects(category, args.objects, seed=split_seed("validation"))
        picks: dict[str, list[float]] = {}
        for i in tqdm(range(args.objects), desc=f"lone {category}", leave=False):
            image, truth = ds[i]
            bu, x, masks = descents(gm, image, c, args.top_k)
            iou = mask_iou(masks, truth[None].expand_as(masks))
            plain = greedy_map(gm, bu, category=c)
            for name, value in (
                ("greedy_map", float(mask_iou(plain.mask, truth[None])[0])),
                ("best_of_k", float(iou.max())),
                ("largest_completed_log_joint", float(iou[0])),  # modes are best first
                ("verifier", float(iou[int(verifier.score(x, c).argmax())])),
            ):
                picks.setdefault(name, []).append(value)
        rows[category] = {k: statistics.mean(v) for k, v in picks.items()}
        print(category, rows[category], flush=True)
    return {"objects": args.objects, "top_k": args.top_k, "split": "validation",
            "metric": "mean mask IoU", "categories": rows}  # fmt: skip


def airplane_inputs(scenes: int, objects: int) -> list[tuple[str, torch.Tensor, list]]:
    """``("scenes", image, truth masks)`` for each of the first ``scenes`` validation scenes
    with an airplane, then ``("objects", image, [truth])`` for ``objects`` lone validation
    airplanes."""
    out = []
    ds = Scenes(scenes, seed=split_seed("validation"))
    for i in range(scenes):
        scene = ds[i]
        truth = [t.mask for t in scene.instances if t.category == "airplane" and t.mask.any()]
        if truth:
            out.append(("scenes", scene.image, truth))
    lone = RenderedObjects("airplane", objects, seed=split_seed("validation"))
    return out + [("objects", image, [truth]) for image, truth in (lone[i] for i in range(objects))]


def by_kind(args, picks: dict[str, dict[str, list[float]]]) -> dict:
    """The record of a probe over :func:`airplane_inputs`: each choice's rates per kind."""
    return {"scenes": args.scenes, "objects": args.objects, "top_k": args.top_k,
            "split": "validation", "category": "airplane",
            "note": "the validation scenes and objects chose the shipped verifier's fit",
            "choices": {kind: {k: rates(v) for k, v in rows.items()}
                        for kind, rows in picks.items()}}  # fmt: skip


def voted_masks(masks: torch.Tensor, scores: torch.Tensor, *, m: int,
                same_object: bool) -> torch.Tensor:  # fmt: skip
    """``(H, W)`` bool: where the softmax(``scores``)-weighted mean of the ``m`` best-scored of
    ``masks`` ``(k, H, W)`` is ≥ 0.5; with ``same_object``, of those among the m whose IoU with
    the best-scored one's mask is ≥ 0.3 (it always is with itself)."""
    order = scores.argsort(descending=True, stable=True)[:m]  # ties: the first listed
    pick = masks[order]  # (m, H, W)
    if same_object:
        keep = mask_iou(pick, pick[:1].expand_as(pick)) >= 0.3
        pick, order = pick[keep], order[keep]
    w = torch.softmax(scores[order].double(), 0)  # (m',)
    return (w[:, None, None] * pick.double()).sum(0) >= 0.5


def probe_vote(args, gm, verifier) -> dict:
    c = gm.categories.index("airplane")
    inputs = airplane_inputs(args.scenes, args.objects)
    picks: dict[str, dict[str, list[float]]] = {}
    for kind, image, truth in tqdm(inputs, desc="vote probe"):
        _, x, masks = descents(gm, image, c, args.top_k)
        sv = verifier.score(x, c).float()
        votes = {"verifier": masks[int(sv.argmax())]}
        for m in (3, 5, 10):
            for same in (False, True):
                name = f"vote{m}" + ("_same_object" if same else "")
                votes[name] = voted_masks(masks, sv, m=m, same_object=same)
        for name, mask in votes.items():
            iou = max(float(mask_iou(mask[None], t[None])[0]) for t in truth)
            picks.setdefault(kind, {}).setdefault(name, []).append(iou)
    return by_kind(args, picks)


def objectness_cues(image: torch.Tensor, masks: torch.Tensor, *, ring: int = 3,
                    edge_quantile: float = 0.8) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per mask of ``masks`` ``(k, H, W)`` on ``image`` ``(3, H, W)``, ``(k,)`` each:
    ``boundary_contrast``, the mean colour distance (L2 over channels) of the 4-neighbour pixel
    pairs the mask's boundary separates; ``edge_share``, the share of those pairs whose distance
    is above the image's ``edge_quantile`` over all its pairs; ``ring_contrast``, the distance of
    the mask's mean colour from the mean colour of the pixels within ``ring`` pixels outside it.
    A mask without a boundary or ring (empty, or the whole image) gets 0 for it."""
    x = image.double()
    dh = (x[:, :, 1:] - x[:, :, :-1]).norm(dim=0)  # (H, W-1)
    dv = (x[:, 1:] - x[:, :-1]).norm(dim=0)  # (H-1, W)
    strong = torch.quantile(torch.cat([dh.flatten(), dv.flatten()]), edge_quantile)
    ch = masks[:, :, 1:] != masks[:, :, :-1]  # (k, H, W-1) pairs the boundary separates
    cv = masks[:, 1:] != masks[:, :-1]
    pairs = (ch.sum((1, 2)) + cv.sum((1, 2))).double().clamp_min(1)
    contrast = ((ch * dh).sum((1, 2)) + (cv * dv).sum((1, 2))) / pairs
    share = ((ch & (dh > strong)).sum((1, 2)) + (cv & (dv > strong)).sum((1, 2))) / pairs
    m = masks[:, None].double()  # (k, 1, H, W)
    grown = torch.nn.functional.max_pool2d(m, 2 * ring + 1, stride=1, padding=ring)
    band = grown - m  # (k, 1, H, W): the ring outside the mask
    inside = (x[None] * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1)  # (k, 3)
    outside = (x[None] * band).sum((2, 3)) / band.sum((2, 3)).clamp_min(1)
    ring_contrast = (inside - outside).norm(dim=1) * (band.sum((1, 2, 3)) > 0)
    return {"boundary_contrast": contrast, "edge_share": share, "ring_contrast": ring_contrast}


def _z(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return (v - v.mean()) / v.std().clamp_min(1e-9)


def probe_objectness(args, gm, verifier) -> dict:
    c = gm.categories.index("airplane")
    picks: dict[str, list[float]] = {}
    for _, image, truth in tqdm(airplane_inputs(args.scenes, 0), desc="objectness probe"):
        bu, x, masks = descents(gm, image, c, args.top_k)
        iou = torch.stack([mask_iou(masks, t[None].expand_as(masks)) for t in truth]).amax(0)
        sv = verifier.score(x, c)
        cues = objectness_cues(bu["image"][0].clamp(0, 1), masks)
        choice = {"verifier": sv, "best_of_k": iou}
        for name, cue in cues.items():
            choice[name] = cue
            for a in (0.25, 0.5, 1.0):
                choice[f"verifier+{a}*{name}"] = _z(sv) + a * _z(cue)
        for name, s in choice.items():
            picks.setdefault(name, []).append(float(iou[int(s.argmax())]))
    return {"scenes": args.scenes, "top_k": args.top_k, "split": "validation",
            "category": "airplane",
            "note": "the weights a were tried on these validation scenes (optimistic)",
            "choices": {k: rates(v) for k, v in picks.items()}}  # fmt: skip


def grow(mask: torch.Tensor, r: int) -> torch.Tensor:
    """``(H, W)`` bool: ``mask`` ``(H, W)`` grown by ``r`` pixels (a square neighbourhood)."""
    m = mask[None, None].double()
    return torch.nn.functional.max_pool2d(m, 2 * r + 1, stride=1, padding=r)[0, 0] > 0


def refined_mask(gm, image: torch.Tensor, bu: dict, mask: torch.Tensor, c: int, *, r: int,
                 how: str, clamp: dict | None = None) -> torch.Tensor:  # fmt: skip
    """``(H, W)`` bool: ``greedy_map``'s mask (category ``c``) with the clutter outside ``mask``
    grown by ``r`` removed (``how`` "paint": the image shown only there; "observe": elements
    outside it unobserved on every level), kept inside the grown region; ``clamp``: sites the
    pass must take (greedy_map's)."""
    region = grow(mask, r)
    if how == "paint":
        view = region_views(image.clamp(0, 1), region[None])  # (1, 3, H, W)
        acts = gm.backbone(view.to(dtype=gm.backbone.mean.dtype))
        result = greedy_map(gm, {k: v for k, v in acts.items() if k in gm.hidden_levels},
                            category=c, clamp=clamp)  # fmt: skip
    else:
        m = region[None, None].double()
        observed = {n: torch.nn.functional.adaptive_max_pool2d(m, x.shape[-2:]) > 0
                    for n, x in bu.items() if x.dim() == 4}  # fmt: skip
        result = greedy_map(gm, bu, category=c, observed=observed, clamp=clamp)
    return result.mask[0] & region


def probe_refine(args, gm, verifier) -> dict:
    c = gm.categories.index("airplane")
    inputs = airplane_inputs(args.scenes, args.objects)
    picks: dict[str, dict[str, list[float]]] = {}
    for kind, image, truth in tqdm(inputs, desc="refine probe"):
        bu, x, masks, values = descents(gm, image, c, args.top_k, with_values=True)
        best = int(verifier.score(x, c).argmax())
        chosen = masks[best]
        top = {s: int(values[s][best]) for s in gm.sites[1:3]}  # the top level's (γ, δ)
        found = {"verifier": chosen}
        for how in ("paint", "observe"):
            for r in (4, 8):
                once = refined_mask(gm, image, bu, chosen, c, r=r, how=how)
                found[f"{how}_r{r}"] = once
                found[f"{how}_r{r}_x2"] = refined_mask(gm, image, bu, once, c, r=r, how=how)
                found[f"{how}_r{r}_top_kept"] = refined_mask(gm, image, bu, chosen, c, r=r,
                                                             how=how, clamp=top)  # fmt: skip
        for name, mask in found.items():
            iou = max(float(mask_iou(mask[None], t[None])[0]) for t in truth)
            picks.setdefault(kind, {}).setdefault(name, []).append(iou)
    return by_kind(args, picks)


def probe_lower_choice(args, gm, verifier) -> dict:
    c = gm.categories.index("airplane")
    below = lower_levels(gm, 2)  # the two levels under the top
    top = gm.hidden_levels[-1]
    picks: dict[str, list[float]] = {}
    for _, image, truth in tqdm(airplane_inputs(args.scenes, 0), desc="lower-choice probe"):
        bu, x, masks, values = descents(gm, image, c, args.top_k, with_values=True)
        best = int(verifier.score(x, c).argmax())
        fixed = {s: int(values[s][best]) for s in (f"gamma_{top}", f"delta_{top}")}
        result = lower_completions(gm, bu, category=c, top=fixed, levels_below=2)
        iou = torch.stack([mask_iou(result.mask, t[None].expand_as(result.mask))
                           for t in truth]).amax(0)  # fmt: skip
        chosen = max(float(mask_iou(masks[best][None], t[None])[0]) for t in truth)
        for name, v in (("verifier", chosen), ("best_below_top", float(iou.max())),
                        ("largest_log_joint_below_top",
                         float(iou[int(result.log_joint.argmax())]))):  # fmt: skip
            picks.setdefault(name, []).append(v)
        # Image cues among the completions (all near one place, where an edge may decide):
        # the first stage's verifier on the completions' features, plus a × each cue.
        x2, _ = descent_features(gm, bu, result.assignment, result.log_joint)
        sv = verifier.score(x2, c)
        choice = {"verifier_on_completions": sv}
        for name, cue in objectness_cues(bu["image"][0].clamp(0, 1), result.mask).items():
            choice[f"{name}_below_top"] = cue
            for a in (0.3, 1.0, 3.0):
                choice[f"verifier_on_completions+{a}*{name}"] = _z(sv) + a * _z(cue)
        for name, sc in choice.items():
            picks.setdefault(name, []).append(float(iou[int(sc.argmax())]))
    return {"scenes": args.scenes, "top_k": args.top_k, "split": "validation",
            "category": "airplane", "levels_enumerated": below,
            "note": "the cue weights a were tried on these validation scenes (optimistic)",
            "choices": {k: rates(v) for k, v in picks.items()}}  # fmt: skip


def _descent_lists(job: tuple) -> list[dict]:
    """One worker (one thread): for scenes ``indices`` of ``split`` with an airplane, the image,
    its ``top_k`` descents' masks, the shipped verifier's scores and each mask's best IoU."""
    split, n, indices, top_k, below = job
    torch.set_num_threads(1)
    gm, _ = learned_model(smoke=False, path=None)
    verifier = DescentVerifier.shipped()
    c = gm.categories.index("airplane")
    scenes, out = Scenes(n, seed=split_seed(split)), []
    for i in indices:
        scene = scenes[i]
        truth = [t.mask for t in scene.instances if t.category == "airplane" and t.mask.any()]
        if not truth:
            continue
        bu, x, masks, values = descents(gm, scene.image, c, top_k, with_values=True)
        score = verifier.score(x, c)
        if below:  # the completions below the verifier's chosen top level instead
            best = int(score.argmax())
            chosen = {s: int(v[best]) for s, v in values.items()}
            _, x, masks = lower_descent_features(gm, bu, chosen, levels_below=2)
            score = verifier.score(x, c)
        iou = torch.stack([mask_iou(masks, t[None].expand_as(masks)) for t in truth]).amax(0)
        out.append({"image": scene.image, "masks": masks, "verifier": score, "iou": iou})
    return out


def mask_head_net() -> torch.nn.Module:
    """(image RGB, mask) ``(N, 4, 64, 64)`` → ``(N,)`` logit of the mask's IoU with an
    object: four stride-2 3×3 convolutions (32, 64, 64, 64 channels, ReLU), a global mean, a
    linear output."""
    layers, width = [], 4
    for out in (32, 64, 64, 64):
        layers += [torch.nn.Conv2d(width, out, 3, stride=2, padding=1), torch.nn.ReLU()]
        width = out
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(width, 1), torch.nn.Flatten(0))  # fmt: skip


def _head_input(item: dict, idx: torch.Tensor) -> torch.Tensor:
    image = item["image"][None].expand(len(idx), -1, -1, -1)
    return torch.cat([image, item["masks"][idx][:, None].float()], 1)  # (n, 4, H, W)


def fit_mask_head(train: list[dict], *, steps: int, batch: int = 16, per: int = 16,
                  seed: int = 0) -> torch.nn.Module:  # fmt: skip
    """:func:`mask_head_net` fitted by binary cross-entropy to each mask's IoU (a soft target)
    on minibatches of ``batch`` scenes × ``per`` of their descents (half drawn among the
    scene's best by IoU, so hits are seen), horizontal flips at random; AdamW, lr 1e-3."""
    torch.manual_seed(seed)
    net = mask_head_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    with torch.enable_grad():
        for _ in range(steps):
            xs, ys = [], []
            for j in torch.randint(len(train), (batch,)).tolist():
                item = train[j]
                k = len(item["iou"])
                top = item["iou"].argsort(descending=True)[: max(1, k // 10)]
                idx = torch.cat([top[torch.randint(len(top), (per // 2,))],
                                 torch.randint(k, (per - per // 2,))])  # fmt: skip
                x = _head_input(item, idx)
                if bool(torch.rand(()) < 0.5):
                    x = x.flip(-1)
                xs.append(x), ys.append(item["iou"][idx].float())
            loss = F.binary_cross_entropy_with_logits(net(torch.cat(xs)), torch.cat(ys))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def probe_mask_head(args, *, below: bool = False) -> dict:
    """A new kind of evidence for the choice: a small network that reads the image and a
    descent's mask together and predicts the mask's IoU with an object (as Mask Scoring
    R-CNN's mask-IoU head), fitted on the training scenes' descents (``below``: on the 225
    completions below the shipped verifier's chosen top level, and choosing among them)."""
    from concurrent.futures import ProcessPoolExecutor

    def lists(split: str, n: int) -> list[dict]:
        jobs = [(split, n, list(range(w, n, args.workers)), args.top_k, below)
                for w in range(args.workers)]  # fmt: skip
        if args.workers == 1:
            return _descent_lists(jobs[0])
        with ProcessPoolExecutor(args.workers) as pool:
            return [d for part in pool.map(_descent_lists, jobs) for d in part]

    t = time.perf_counter()
    train, val = lists("train", args.train), lists("validation", args.validation)
    extract_s = time.perf_counter() - t
    t = time.perf_counter()
    net = fit_mask_head(train, steps=args.steps)
    fit_s = time.perf_counter() - t
    picks: dict[str, list[float]] = {}
    with torch.no_grad():
        for item in val:
            k = len(item["iou"])
            head = torch.cat([net(_head_input(item, idx))
                              for idx in torch.arange(k).split(50)])  # fmt: skip
            choice = {"verifier": item["verifier"], "best_of_k": item["iou"], "head": head}
            for a in (0.5, 1.0, 2.0):
                choice[f"verifier+{a}*head"] = _z(item["verifier"]) + a * _z(head)
            for name, sc in choice.items():
                picks.setdefault(name, []).append(float(item["iou"][int(sc.argmax())]))
    return {"train_scenes": args.train, "validation_scenes": args.validation,
            "top_k": args.top_k, "steps": args.steps, "extract_seconds": round(extract_s, 1),
            "fit_seconds": round(fit_s, 1), "split": "validation", "category": "airplane",
            "note": "the weights a of verifier+a*head were tried on these scenes (optimistic)",
            "choices": {k: rates(v) for k, v in picks.items()}}  # fmt: skip


def relative_features(x: torch.Tensor) -> torch.Tensor:
    """``(k, 2F)``: the features ``x`` ``(k, F)`` of one image's k descents beside each one's
    z-score among those k."""
    spread = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(x[0])
    return torch.cat([x, (x - x.mean(0)) / spread], 1)


def ensemble_scores(
    train: list,
    val: dict[str, list],
    *,
    relative: bool,
    soft: bool,
    seed: int,
    epochs: int,
    members: int = 3,
) -> dict[str, list] | None:
    """Scores ``(k,)`` per example of each list in ``val``: the mean output of ``members``
    networks (standardised features → dropout 0.2 → 64 ReLU → dropout 0.2 → 1), each fitted by
    AdamW (1e-3, weight decay 0.01) on minibatches of 16 lists for ``epochs`` epochs, on the
    listwise loss of the hits or (``soft``) the cross-entropy to ``softmax(IoU / 0.1)``; None
    when no training list has a hit (and not ``soft``)."""
    mine = [e for e in train if soft or bool(e.hits.any())]
    if not mine:  # nothing to learn from (no hit anywhere, and not soft)
        return None
    mine = sorted(mine, key=lambda e: e.features.sum().item())  # an order fixed by content
    prep = relative_features if relative else (lambda x: x)
    raw = [prep(e.features.double()).float() for e in mine]
    x_all = torch.cat(raw)
    mean, scale = x_all.mean(0), x_all.std(0).clamp_min(1e-6)
    xs = [(x - mean) / scale for x in raw]
    xv = {name: [(prep(e.features.double()).float() - mean) / scale for e in ex]
          for name, ex in val.items()}  # fmt: skip
    if soft:
        targets = [torch.softmax(e.iou.float() / 0.1, 0) for e in mine]
    else:
        targets = [e.hits.float() / e.hits.float().sum() for e in mine]
    out = {name: [torch.zeros(len(e.iou)) for e in ex] for name, ex in val.items()}
    for m in range(members):
        with torch.random.fork_rng(devices=[]):  # the CPU generator only
            torch.random.default_generator.manual_seed(seed + m)
            net = _two_layer_net(x_all.shape[1])
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
            with torch.enable_grad():
                _fit(net, opt, xs, targets, epochs=epochs, soft=soft)
        net.eval()
        with torch.no_grad():
            for name, xs_val in xv.items():
                for k, x in enumerate(xs_val):
                    out[name][k] += net(x)[:, 0] / members
    return out


def probe_list_context(args, gm) -> dict:
    rows = {}
    for category in args.categories:
        common = dict(gm=gm, workers=args.workers, top_k=args.top_k, categories=[category],
                      model=None, cache=args.cache)  # fmt: skip
        train = examples("train", args.train, **common)
        train += examples("train", args.objects, objects=True, **common)
        val = {"scenes": examples("validation", args.validation, **common),
               "objects": examples("validation", args.validation_objects, objects=True,
                                   **common)}  # fmt: skip
        c = gm.categories.index(category)
        row: dict = {"train_examples": len(train),
                     "validation_examples": {k: len(v) for k, v in val.items()},
                     "best_of_k": {k: rates([float(e.iou.max()) for e in v])
                                   for k, v in val.items() if v}}  # fmt: skip
        seeds = [10 * s for s in range(args.seeds)]
        variants = {"library": None, "absolute": (False, False), "relative": (True, False),
                    "soft": (False, True), "relative+soft": (True, True)}  # fmt: skip
        for name, flags in variants.items():
            per_seed = []
            t = time.perf_counter()
            for seed in seeds:
                if flags is None:
                    v = fit_descent_verifier(gm, examples=train, top_k=args.top_k, hidden=64,
                                             categories=[category], seed=seed,
                                             epochs=args.epochs, progress=False)  # fmt: skip
                    scores = ({k: [v.score(e.features, c) for e in ex] for k, ex in val.items()}
                              if bool(v.fitted[c]) else None)  # fmt: skip
                else:
                    scores = ensemble_scores(train, val, relative=flags[0], soft=flags[1],
                                             seed=seed, epochs=args.epochs)  # fmt: skip
                if scores is None:  # no training list to fit on
                    break
                per_seed.append({k: rates([float(e.iou[int(s.argmax())])
                                           for e, s in zip(val[k], scores[k], strict=True)])
                                 for k in val if val[k]})  # fmt: skip
            if not per_seed:
                row[name] = {"fitted": False}
                continue
            row[name] = {
                "per_seed": per_seed,
                "mean": {k: {m: statistics.mean(r[k][m] for r in per_seed)
                             for m in ("hit@0.5", "hit@0.3", "iou")} for k in per_seed[0]},
                "seconds": round(time.perf_counter() - t, 1),
            }  # fmt: skip
            print(category, name, row[name]["mean"], flush=True)
        rows[category] = row
    return {"train_scenes": args.train, "train_objects": args.objects,
            "validation_scenes": args.validation,
            "validation_objects": args.validation_objects, "top_k": args.top_k,
            "seeds": args.seeds, "epochs": args.epochs, "categories": rows}  # fmt: skip


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--probe",
        choices=(
            "two_layer",
            "crop",
            "lone",
            "list_context",
            "vote",
            "objectness",
            "refine",
            "lower_choice",
            "mask_head",
            "mask_head_below",
        ),
        required=True,
    )
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--cache", type=Path, default=None, help="fit_verifier.py's cache")
    parser.add_argument("--train", type=int, default=500, help="training scenes (two_layer)")
    parser.add_argument("--validation", type=int, default=60)
    parser.add_argument("--l2", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--scenes", type=int, default=60, help="validation scenes (crop, vote, objectness, refine)"
    )
    parser.add_argument(
        "--objects",
        type=int,
        default=30,
        help="per category (lone); lone training objects (list_context); lone validation "
        "airplanes (vote, refine)",
    )
    parser.add_argument(
        "--validation-objects",
        type=int,
        default=40,
        help="lone validation objects per category (list_context)",
    )
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1500, help="mask_head's training steps")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "verifier_probes.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:  # the shipped model on a few inputs
        args.train, args.validation, args.top_k, args.seeds, args.epochs = 3, 2, 4, 1, 1
        args.steps, args.workers = 2, 1
        args.scenes, args.objects, args.categories = 1, 1, ["airplane"]
        args.validation_objects = 1
    gm, model_name = learned_model(smoke=False, path=None)
    verifier = DescentVerifier.shipped()
    if verifier is None:
        raise SystemExit("no shipped descent verifier: run benchmarks/fit_verifier.py --ship")
    start = time.perf_counter()
    row = {"two_layer": lambda: probe_two_layer(args, gm),
           "crop": lambda: probe_crop(args, gm, verifier),
           "lone": lambda: probe_lone(args, gm, verifier),
           "list_context": lambda: probe_list_context(args, gm),
           "vote": lambda: probe_vote(args, gm, verifier),
           "objectness": lambda: probe_objectness(args, gm, verifier),
           "refine": lambda: probe_refine(args, gm, verifier),
           "lower_choice": lambda: probe_lower_choice(args, gm, verifier),
           "mask_head": lambda: probe_mask_head(args),
           "mask_head_below": lambda: probe_mask_head(args, below=True),
           }[args.probe]()  # fmt: skip
    row.update(machine=machine(), threads=1, model=model_name, smoke=args.smoke,
               shipped_verifier_sha256=verifier.fingerprint(),
               seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result[args.probe] = row
    atomic_write_json(args.out, result)
    print(f"wrote {args.out} [{args.probe}]")


if __name__ == "__main__":
    main()

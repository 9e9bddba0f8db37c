"""Issue #10, element by element: can the model's top-down prediction veto clutter at all?

The oracle ladder (``diagnose.py``) says *that* clutter gets in below the top level; this script
says *where it could be stopped*. For each object of the split's scenes its own assignment is
taken from the backward pass on the object alone (plain background) and clamped on every level
in the scene, so every choice is the oracle's and only the per-element closed form is left.

1. ``element_auc``: per level, how well does each quantity separate the object's own on-elements
   (its masked activations ≥ λ, the hard-EM target) from every other element of the scene?
   ROC AUC (Mann–Whitney U from scipy, ties counted half) of φ (the top-down prediction under the
   oracle assignment in the scene), φ of the same assignment on the object alone, F̂ in the scene,
   and the scene's bottom-up activations themselves. φ can veto clutter only where its AUC is
   above the bottom-up activations'. Beside them, the share of the scene's other elements
   that F̂ turns on (≥ λ) where φ = 0 and where φ > 0 (``clutter_on_phi_zero`` /
   ``_positive``): lever 4's "σ0 small where the model predicts nothing" can act only on the
   first.
2. ``clamp_ladder``: mean visible-mask IoU in the scene with every level from the top down to L
   clamped to the alone assignment (the rest greedy), and the pass on the object alone (amodal
   mask): what the choices cost versus what the closed form costs. ``clean_state_at_L``: the
   same, but with F̂ at L set to the object's own activations (its masked activations as
   ``bu[L]`` and σ0 × 1000 at L, :func:`clean_state_model`): how far the levels below get from
   a state that has not lost the object's shape (``decoder_capacity.py``'s clean input).
3. ``readout``: the mask readout (``conv1_1`` elements ≥ the mask threshold, any channel) on
   objects alone: applied to the object's own bottom-up activations (a perfect reconstruction)
   and to F̂ of its backward pass, with the shipped global threshold and with per-channel
   thresholds fitted on train-split objects (coordinate ascent on mean IoU): is the readout or
   the reconstruction the limit?

One thread. Writes ``benchmarks/results/veto_diagnosis.json``.

Usage: ``python benchmarks/veto_diagnosis.py [--scenes 10] [--train-scenes 40] [--smoke]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import mannwhitneyu
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, hidden_bu, learned_model, machine  # noqa: E402

from pyro_backpass import GenerativeModel, Scenes, greedy_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import full_res_level  # noqa: E402
from pyro_backpass.learning import mask_iou, masked_activations  # noqa: E402

THRESHOLD_GRID = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, float("inf"))


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties half: U / (n₁ n₀) of scipy's test."""
    s, pos = score.flatten().double().numpy(), positive.flatten().bool().numpy()
    if pos.all() or not pos.any():
        return float("nan")
    return float(mannwhitneyu(s[pos], s[~pos]).statistic / (pos.sum() * (~pos).sum()))


def _label(gm: GenerativeModel, category: str) -> torch.Tensor:
    return torch.tensor([gm.categories.index(category)])


def clean_state_model(gm: GenerativeModel, level: str) -> GenerativeModel:
    """A copy of ``gm`` whose σ0 at ``level`` is × 1000: with the object's own activations
    as ``bu[level]``, the closed form then sets F̂ there to them (the on-branch's mid-point is
    the bottom-up value; elements below λ stay off), so the levels below start from the
    object's own state instead of the blunt F̂ a pass has."""
    out = copy.deepcopy(gm)
    out.steps[level].scale_td.mul_(1000.0)
    return out


@torch.no_grad()
def element_rows(gm: GenerativeModel, scenes: list) -> tuple[dict, dict]:
    """Per level AUCs of φ / φ alone / F̂ / bu, and the clamp ladder's IoUs."""
    hidden = gm.hidden_levels
    pooled = {n: {k: [] for k in ("phi", "phi_alone", "fhat", "bu", "on")} for n in hidden}
    ladder: dict[str, list[float]] = {}
    clean = {name: clean_state_model(gm, name) for name in hidden[1:]}
    for scene in tqdm(scenes, desc="elements", leave=False):
        bu = hidden_bu(gm, scene.image)
        for inst in scene.instances:
            if not inst.mask.any():
                continue
            label = _label(gm, inst.category)
            alone = greedy_map(gm, hidden_bu(gm, inst.image_alone), category=label)
            ladder.setdefault("alone_plain", []).append(
                float(mask_iou(alone.mask, inst.amodal_mask[None])[0])
            )
            a = alone.assignment
            target = masked_activations(gm.backbone, inst.image_alone[None], inst.mask[None])
            for cut in range(len(hidden) - 1, -1, -1):
                sites = [f"{s}_{n}" for n in hidden[cut:] for s in ("gamma", "delta")]
                clamp = {site: a[site] for site in sites}
                if hidden[cut] in clean:  # the same choices, the object's own state at the cut
                    r = greedy_map(clean[hidden[cut]], bu | {hidden[cut]: target[hidden[cut]]},
                                   category=label, clamp=clamp)  # fmt: skip
                    ladder.setdefault(f"clean_state_at_{hidden[cut]}", []).append(
                        float(mask_iou(r.mask, inst.mask[None])[0])
                    )
                r = greedy_map(gm, bu, category=label, clamp=clamp)
                ladder.setdefault(f"clamped_from_top_to_{hidden[cut]}", []).append(
                    float(mask_iou(r.mask, inst.mask[None])[0])
                )
            # r: every level clamped (the last cut) — the oracle's choices in the scene.
            for i, name in enumerate(hidden):
                parent = hidden[i + 1] if i + 1 < len(hidden) else None
                gamma, delta = a[f"gamma_{name}"], a[f"delta_{name}"]
                step = gm.steps[name]
                p = pooled[name]
                p["phi"].append(step.phi(r.td[parent] if parent else label, gamma, delta))
                p["phi_alone"].append(step.phi(alone.td[parent] if parent else label, gamma, delta))
                p["fhat"].append(r.td[name])
                p["bu"].append(bu[name])
                p["on"].append(target[name] >= gm.observations[name].threshold)
    auc = {}
    for name in hidden:
        p = {k: torch.cat(v) for k, v in pooled[name].items()}
        auc[name] = (
            {"on_share": float(p["on"].float().mean())}
            | {f"auc_{k}": roc_auc(p[k], p["on"]) for k in ("phi", "phi_alone", "fhat", "bu")}
            | _veto_shares(p["phi"], p["fhat"], p["on"], gm.observations[name].threshold)
        )
    return auc, {k: statistics.mean(v) for k, v in ladder.items()} | {
        "objects": len(ladder.get("alone_plain", []))
    }


def _veto_shares(phi, fhat, on, threshold) -> dict[str, float]:
    """Where does clutter get in? Shares of the scene's elements that are not the object's
    on-elements (``off``) with F̂ ≥ λ, split by whether φ predicts nothing there (φ = 0: a σ0
    that is small where φ = 0 could only act on these) or something (φ > 0)."""
    off, fhat_on, phi_zero = ~on, fhat >= threshold, phi <= 0
    n_off = max(int(off.sum()), 1)
    return {
        "phi_zero_share": float(phi_zero.float().mean()),
        "clutter_on_phi_zero": int((off & fhat_on & phi_zero).sum()) / n_off,
        "clutter_on_phi_positive": int((off & fhat_on & ~phi_zero).sum()) / n_off,
    }


def _mean_iou(pred: torch.Tensor, masks: torch.Tensor) -> float:
    inter = (pred & masks).flatten(1).sum(1).double()
    union = (pred | masks).flatten(1).sum(1).double()
    return float((inter / union.clamp_min(1)).mean())


def _readout(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``(n, H, W)``: some channel at or above its threshold. ``x``: ``(n, C, H, W)``."""
    return (x >= thresholds[None, :, None, None]).any(1)


def fit_channel_thresholds(x: torch.Tensor, masks: torch.Tensor, start: float) -> torch.Tensor:
    """Per-channel thresholds (multiples of ``start`` from :data:`THRESHOLD_GRID`, ∞ = channel
    unused) maximising mean IoU of :func:`_readout`, three coordinate-ascent sweeps."""
    t = torch.full((x.shape[1],), float(start), dtype=x.dtype)
    best = _mean_iou(_readout(x, t), masks)
    for _ in range(3):
        for c in range(x.shape[1]):
            for f in THRESHOLD_GRID:
                trial = t.clone()
                trial[c] = start * f
                v = _mean_iou(_readout(x, trial), masks)
                if v > best + 1e-9:
                    best, t = v, trial
    return t


@torch.no_grad()
def _alone_objects(gm: GenerativeModel, scenes: list) -> tuple[torch.Tensor, ...]:
    """``(bu, F̂, amodal masks)`` of every object alone, at the mask's level."""
    level = full_res_level(gm)
    bus, fhats, masks = [], [], []
    for scene in tqdm(scenes, desc="objects", leave=False):
        for inst in scene.instances:
            if not inst.amodal_mask.any():
                continue
            bu = hidden_bu(gm, inst.image_alone)
            r = greedy_map(gm, bu, category=_label(gm, inst.category))
            bus.append(bu[level][0]), fhats.append(r.td[level][0]), masks.append(inst.amodal_mask)
    return torch.stack(bus), torch.stack(fhats), torch.stack(masks)


def readout_rows(gm: GenerativeModel, train: list, scenes: list) -> dict:
    level = full_res_level(gm)
    shipped = float(gm.observations[level].mask_threshold)
    bu_tr, fhat_tr, m_tr = _alone_objects(gm, train)
    bu, fhat, m = _alone_objects(gm, scenes)
    t_bu = fit_channel_thresholds(bu_tr, m_tr, shipped)
    t_fhat = fit_channel_thresholds(fhat_tr, m_tr, shipped)
    glob = torch.full_like(t_bu, shipped)
    return {
        "level": level,
        "objects": len(m),
        "train_objects": len(m_tr),
        "bu_global_threshold": _mean_iou(_readout(bu, glob), m),
        "bu_channel_thresholds": _mean_iou(_readout(bu, t_bu), m),
        "fhat_global_threshold": _mean_iou(_readout(fhat, glob), m),
        "fhat_channel_thresholds": _mean_iou(_readout(fhat, t_fhat), m),
        "channel_thresholds_bu": [round(v / shipped, 3) for v in t_bu.tolist()],
        "channel_thresholds_fhat": [round(v / shipped, 3) for v in t_fhat.tolist()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--train-scenes", type=int, default=40)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "veto_diagnosis.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    n, n_train = (1, 2) if args.smoke else (args.scenes, args.train_scenes)
    scenes = list(Scenes(n, seed=split_seed(args.split)))
    train = list(Scenes(n_train, seed=split_seed("train")))
    start = time.perf_counter()
    auc, ladder = element_rows(gm, scenes)
    readout = readout_rows(gm, train, scenes)
    result = {"machine": machine(), "threads": 1, "model": model_name, "split": args.split,
              "scenes": n, "train_scenes": n_train, "element_auc": auc, "clamp_ladder": ladder,
              "readout": readout, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    atomic_write_json(args.out, result)
    for name, row in auc.items():
        print(name, {k: round(v, 3) for k, v in row.items()})
    print({k: round(v, 3) for k, v in ladder.items()})
    print({k: v for k, v in readout.items() if not isinstance(v, list)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

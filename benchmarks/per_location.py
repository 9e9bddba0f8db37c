"""Issue #10's lever 5: per-location mixture indices with a lateral prior, on the oracle ladder.

The paper's model chooses one γ per level. Its §4 proposes one γ per location, γ_l = {γ_l,i},
with "spatial laterals enforcing the consistency between choices at neighbouring locations",
conditioned on the parent's attributes. Here, for the levels named (``--levels``), the backward
pass chooses, for each offset δ of the level, a γ map ``(H, W)`` at the level's own resolution
that maximises (:func:`~pyro_backpass.inference.grid_map.potts_grid_map`)::

    Σ_i [ Σ_c s(f_bu[c, i], shift(φ_{γ_i}, δ)[c, i]) + log P(γ_i | γ_parent(i)) ]
        + w · Σ_{i~j} [γ_i = γ_j]

— the closed form's per-element score summed over the location's channels (eq. 13), the
model's own n-gram link to the parent's γ at the location above (``i`` for a conv step, ``i // 2``
for an unpool step), and a Potts lateral term of strength w (``--couplings``). Then δ by the best
map's total plus log P(δ), φ is each location's chosen component, and F̂ its closed form, as in
the plain pass. Levels not named keep one γ (a global γ whose parent is a map takes the map's
most frequent value as its n-gram parent). The top level is unchanged: the free pass takes the
shipped pass's top choice, so the rank of the truth among top-level hypotheses is the shipped
model's. No retraining: the K = 5 kernel sets learnt as whole-level alternatives are mixed per
location.

For each variant, on scenes of one split (category airplane), the ladder's rungs as in
``clutter_levers.py``: ``hit@0.5`` / ``hit@0.3`` / ``best_iou`` of the free pass, ``top_clamped``
(rung (b)) and ``alone_plain`` (rung (d)). ``w = inf`` on a level is one γ for it with the
n-gram link counted at every location (the per-location model's prior); the paper's one-γ pass
(the link counted once) is the level set ``none`` with ``link = 1``, checked against
``greedy_map`` (``base_matches_greedy``).

Usage: ``python benchmarks/per_location.py --split validation --levels upper --couplings 0 4 inf``
(one thread; writes ``benchmarks/results/clutter_levers/<split>_per_location.json``); the
figure alone: ``--scenes 0 --figure PATH --figure-variants none:0:1 upper:4:1``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402

from pyro_backpass import GenerativeModel, Scenes, greedy_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import (  # noqa: E402
    closed_form_with,
    object_mask,
    potts_grid_map,
)
from pyro_backpass.learning import mask_iou, own_top_assignment  # noqa: E402
from pyro_backpass.model import shift_all  # noqa: E402

UPPER = ("conv4_1", "pool3", "conv3_1")


def _parent_on_grid(parent: torch.Tensor, kind: str, size: tuple[int, int]) -> torch.Tensor:
    """The parent's γ at each location of the child's grid: ``(B, H, W)`` long. A global
    parent ``(B,)`` is broadcast; a map is repeated ×2 for an unpool step (location i // 2)."""
    h, w = size
    if parent.dim() == 1:
        return parent[:, None, None].expand(-1, h, w)
    if kind == "unpool":
        parent = parent.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return parent[:, :h, :w]


def _mode(labels: torch.Tensor) -> torch.Tensor:
    """The most frequent value of each map ``(B, H, W)`` → ``(B,)`` (ties: the lowest)."""
    return torch.stack([torch.bincount(m.reshape(-1)).argmax() for m in labels])


@torch.no_grad()
def per_location_pass(
    gm: GenerativeModel,
    bu: dict[str, torch.Tensor],
    top: dict[str, torch.Tensor],
    *,
    levels: tuple[str, ...],
    coupling: float,
    link: float = 1.0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The backward pass below a given top-level choice (``category``, ``gamma_<top>``,
    ``delta_<top>``, each ``(B,)``), with a γ map on ``levels``. Returns F̂ by level, the
    choices (``(B,)`` or ``(B, H, W)`` for γ maps) and φ by level below the top."""
    top_name = gm.hidden_levels[-1]
    values: dict[str, torch.Tensor] = dict(top)
    phi_top = gm.steps[top_name].phi(
        top["category"], top[f"gamma_{top_name}"], top[f"delta_{top_name}"]
    )  # (B, C, H, W)
    upper, _ = closed_form_with(gm.constants(top_name), bu[top_name], phi_top)
    td, phis = {top_name: upper}, {}
    for name in reversed(gm.hidden_levels[:-1]):
        step = gm.steps[name]
        consts = gm.constants(name)
        prior = gm.priors[f"gamma_{name}"]
        if len(prior.parents) != 1:
            raise SystemExit(f"gamma_{name}: per-location links need a bigram prior")
        link_lp = link * prior.log_probs()  # (K_parent, K)
        log_p_delta = gm.priors[f"delta_{name}"].log_probs()  # (D,)
        phi = shift_all(step.phi_all(upper), step.offsets)  # (B, K, D, C, H, W)
        _, s = closed_form_with(consts, bu[name][:, None, None], phi)
        s = s.sum(dim=-3)  # (B, K, D, H, W): per-location data score of each (γ, δ)
        b, k, d, h, w = s.shape
        parent = values[prior.parents[0]]
        rows = torch.arange(b)
        if name in levels:
            pgrid = _parent_on_grid(parent, step.kind, (h, w))  # (B, H, W)
            unary = s.permute(0, 2, 3, 4, 1) + link_lp[pgrid][:, None]  # (B, D, H, W, K)
            if math.isinf(coupling):  # one γ for the level (the link counted per location)
                total = unary.sum(dim=(2, 3))  # (B, D, K)
                flat = (total + log_p_delta[:, None]).permute(0, 2, 1).reshape(b, -1)
                best = flat.argmax(-1)  # (B,), K-major as greedy's flat index
                gamma_map = (best // d)[:, None, None].expand(-1, h, w)
                delta = best % d
            else:
                labels, energy = potts_grid_map(unary.reshape(b * d, h, w, k), coupling=coupling)
                delta = (energy.reshape(b, d) + log_p_delta).argmax(-1)  # (B,)
                gamma_map = labels.reshape(b, d, h, w)[rows, delta]  # (B, H, W)
            values[f"gamma_{name}"], values[f"delta_{name}"] = gamma_map, delta
            chosen = phi[rows, :, delta]  # (B, K, C, H, W)
            index = gamma_map[:, None, None].expand(-1, 1, chosen.shape[2], -1, -1)
            phi_hat = chosen.gather(1, index).squeeze(1)  # (B, C, H, W)
        else:
            if parent.dim() == 3:
                parent = _mode(parent)
            flat = (s.sum(dim=(-2, -1)) + link_lp[parent][:, :, None] + log_p_delta).reshape(b, -1)
            best = flat.argmax(-1)  # first maximum: lowest (γ, δ), as greedy_map
            values[f"gamma_{name}"], values[f"delta_{name}"] = best // d, best % d
            phi_hat = phi[rows, best // d, best % d]  # (B, C, H, W)
        upper, _ = closed_form_with(consts, bu[name], phi_hat)
        td[name], phis[name] = upper, phi_hat
    return td, values, phis


def _top_values(gm: GenerativeModel, gamma, delta, label) -> dict[str, torch.Tensor]:
    top = gm.hidden_levels[-1]
    return {"category": label, f"gamma_{top}": gamma.reshape(1), f"delta_{top}": delta.reshape(1)}


def _pass_mask(gm, bu, top_values, *, levels, coupling, link) -> torch.Tensor:
    td, _, _ = per_location_pass(gm, bu, top_values, levels=levels, coupling=coupling, link=link)
    return object_mask(gm, td, bu)  # (1, H, W)


def _iou(mask: torch.Tensor, truth: torch.Tensor) -> float:
    return float(mask_iou(mask, truth[None])[0])


@torch.no_grad()
@torch.no_grad()
def best_of_all(gm, bu, label, planes, *, levels, coupling, link, batch: int = 100) -> bool:
    """The best-of-all bound of one scene: does *some* top-level hypothesis of the category,
    completed by this pass, hit one of the airplanes at IoU ≥ 0.5?"""
    top = gm.hidden_levels[-1]
    d = gm.steps[top].num_offsets
    n = gm.steps[top].num_components * d
    best = 0.0
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        rep = {k: v.expand(len(idx), *v.shape[1:]) for k, v in bu.items()}
        values = {"category": label.expand(len(idx)), f"gamma_{top}": idx // d,
                  f"delta_{top}": idx % d}  # fmt: skip
        td, _, _ = per_location_pass(gm, rep, values, levels=levels, coupling=coupling, link=link)
        masks = object_mask(gm, td, rep)  # (n', H, W)
        for inst in planes:
            best = max(best, float(mask_iou(masks, inst.mask[None].expand_as(masks)).max()))
    return best >= 0.5


def evaluate(
    gm: GenerativeModel,
    scenes: list,
    *,
    levels: tuple[str, ...],
    coupling: float,
    link: float,
    bound: bool = False,
):
    bb = gm.backbone
    top = gm.hidden_levels[-1]
    label = torch.tensor([gm.categories.index("airplane")])
    hits5, hits3, best, clamped, alone, same_as_greedy, switched = [], [], [], [], [], [], []
    bound5 = []
    for scene in tqdm(scenes, desc=f"w={coupling} {'+'.join(levels) or 'none'}", leave=False):
        acts = bb(scene.image[None])
        bu = {n: v for n, v in acts.items() if n in gm.hidden_levels}
        planes = [i for i in scene.instances if i.category == "airplane" and i.mask.any()]
        if not planes:
            continue
        plain = greedy_map(gm, bu, category=label)
        choice = plain.assignment
        top_values = _top_values(gm, choice[f"gamma_{top}"], choice[f"delta_{top}"], label)
        td, values, _ = per_location_pass(
            gm, bu, top_values, levels=levels, coupling=coupling, link=link
        )
        mask = object_mask(gm, td, bu)
        if not levels and link == 1:
            same_as_greedy.append(bool(torch.equal(mask, plain.mask)))
        switched.append(
            statistics.mean(
                float((values[f"gamma_{n}"] != values[f"gamma_{n}"].reshape(-1).mode().values)
                      .float().mean())
                for n in levels
            ) if levels else 0.0
        )  # fmt: skip
        ious = [_iou(mask, i.mask) for i in planes]
        hits5.append(max(ious) >= 0.5), hits3.append(max(ious) >= 0.3)
        if bound:
            bound5.append(best_of_all(gm, bu, label, planes, levels=levels, coupling=coupling,
                                      link=link))  # fmt: skip
        best.append(statistics.mean(ious))
        for inst in planes:
            gamma, delta = own_top_assignment(gm, bb, inst)
            m = _pass_mask(gm, bu, _top_values(gm, gamma, delta, label), levels=levels,
                           coupling=coupling, link=link)  # fmt: skip
            clamped.append(_iou(m, inst.mask))
            alone_acts = bb(inst.image_alone[None])
            alone_bu = {n: v for n, v in alone_acts.items() if n in gm.hidden_levels}
            a = greedy_map(gm, alone_bu, category=label).assignment
            alone_top = _top_values(gm, a[f"gamma_{top}"], a[f"delta_{top}"], label)
            m = _pass_mask(gm, alone_bu, alone_top, levels=levels, coupling=coupling, link=link)
            alone.append(_iou(m, inst.amodal_mask))
    mean = statistics.mean
    return {
        "scenes": len(hits5),
        "hit@0.5": mean(hits5),
        "hit@0.3": mean(hits3),
        "best_iou": mean(best),
        "top_clamped": mean(clamped),
        "alone_plain": mean(alone),
        "share_off_mode": mean(switched),
        "base_matches_greedy": all(same_as_greedy) if same_as_greedy else None,
        "bound@0.5": mean(bound5) if bound else None,
    }


PHI_LEVELS = ("pool3", "pool1", "conv1_1")


@torch.no_grad()
def figure(gm: GenerativeModel, variants: list[tuple[str, float, float]], path: Path) -> None:
    """The issue's figure per lever (as ``clutter_figure.py``): for the same three test scenes,
    the input, φ at ``pool3``, ``pool1``, ``conv1_1``, F̂ at ``conv1_1`` and the mask of the first
    pass (category airplane), one block of rows per variant ``(level spec, w, link)``."""
    import matplotlib.pyplot as plt
    from clutter_figure import draw_row  # sets the Agg backend

    from pyro_backpass.files import atomic_write

    scenes = list(Scenes(3, seed=split_seed("test")))
    top = gm.hidden_levels[-1]
    label = torch.tensor([gm.categories.index("airplane")])
    titles = ["input"] + [f"φ {n}" for n in PHI_LEVELS] + ["F̂ conv1_1", "mask"]
    rows = len(variants) * len(scenes)
    fig, axes = plt.subplots(rows, len(titles), figsize=(1.7 * len(titles), 1.8 * rows),
                             squeeze=False)  # fmt: skip
    for vi, (spec, coupling, link) in enumerate(variants):
        for si, scene in enumerate(scenes):
            r = vi * len(scenes) + si
            acts = gm.backbone(scene.image[None])
            bu = {n: v for n, v in acts.items() if n in gm.hidden_levels}
            a = greedy_map(gm, bu, category=label).assignment
            td, _, phis = per_location_pass(
                gm, bu, _top_values(gm, a[f"gamma_{top}"], a[f"delta_{top}"], label),
                levels=_levels(gm, spec), coupling=coupling, link=link,
            )  # fmt: skip
            panels = [scene.image.permute(1, 2, 0)] + [phis[n][0].amax(0) for n in PHI_LEVELS]
            panels += [td["conv1_1"][0].amax(0), object_mask(gm, td, bu)[0].float()]
            draw_row(axes, r, panels, titles)
            axes[r, 0].set_ylabel(f"{spec} w={coupling:g}\nlink={link:g}, scene {si}", fontsize=7)
    fig.suptitle("Lever 5: first backward pass, category airplane, γ maps with a Potts prior",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    print(f"wrote {path}")


def _levels(gm: GenerativeModel, spec: str) -> tuple[str, ...]:
    if spec == "none":
        return ()
    if spec == "upper":
        return tuple(n for n in UPPER if n in gm.hidden_levels)
    if spec == "all":
        return tuple(gm.hidden_levels[:-1])
    names = tuple(spec.split("+"))
    unknown = [n for n in names if n not in gm.hidden_levels[:-1]]
    if unknown:
        raise SystemExit(f"unknown levels {unknown}; below the top the model has "
                         f"{gm.hidden_levels[:-1]}")  # fmt: skip
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--levels", nargs="+", default=["upper"],
                        help="level sets: upper, all, none, or names joined by +")  # fmt: skip
    parser.add_argument("--couplings", nargs="+", type=float, default=[0.0, 4.0, math.inf])
    parser.add_argument(
        "--bound",
        action="store_true",
        help="also the best-of-all bound (every top-level hypothesis completed)",
    )
    parser.add_argument("--links", nargs="+", type=float, default=[1.0],
                        help="multipliers of the n-gram link log P(γ | parent)")  # fmt: skip
    parser.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="also the figure of --figure-variants on three test scenes",
    )
    parser.add_argument("--figure-variants", nargs="+", default=["none:0:1", "upper:4:1"],
                        help="LEVELS:W:LINK, e.g. upper:4:1")  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    n = 2 if args.smoke else args.scenes
    scenes = list(Scenes(n, seed=split_seed(args.split)))
    out = args.out or RESULTS / "clutter_levers" / f"{args.split}_per_location.json"
    rows = {}
    for spec in args.levels if n else []:
        levels = _levels(gm, spec)
        for coupling, link in itertools.product(args.couplings if levels else [0.0], args.links):
            start = time.perf_counter()
            key = f"{spec} w={coupling:g} link={link:g}" if levels else f"none link={link:g}"
            rows[key] = evaluate(gm, scenes, levels=levels, coupling=coupling, link=link,
                                 bound=args.bound)  # fmt: skip
            rows[key]["levels"] = list(levels)
            rows[key]["coupling"] = coupling if math.isfinite(coupling) else "inf"
            rows[key]["link"] = link
            rows[key]["seconds"] = round(time.perf_counter() - start, 1)
            print(key, {k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in rows[key].items()}, flush=True)  # fmt: skip
    if args.figure is not None:
        variants = [(v.split(":")[0], float(v.split(":")[1]), float(v.split(":")[2]))
                    for v in args.figure_variants]  # fmt: skip
        figure(gm, variants, args.figure)
    result = {"machine": machine(), "threads": 1, "model": model_name, "split": args.split,
              "scenes": n, "variants": rows}  # fmt: skip
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

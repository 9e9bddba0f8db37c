"""Where do the model's samples at ``noise = 1`` lose their category (issue #10's samples
target ≥ 90 % at noise 0 and 1)? A probe, measured before anything is built into the model.

``sample_diagnosis.py`` found free samples recognised in about 0.47 of cases at ``noise = 0``
(with δ priors learned from objects) but 0.22 at ``noise = 1`` whatever the priors. Here, with
the same learned δ priors (``clutter_levers.use_offset_priors``, ``--delta-priors`` lone train
objects a category), every sample is drawn by the model's own ancestral recipe (category given,
γ from the n-gram tables, δ from the priors, ``td ~ Normal(φ, s)`` level by level), with the
noise scale ``s`` varied:

- ``noise_0`` / ``noise_1``: s = 0 / σ0 on every level (``sample(noise=0 / 1)``'s recipe);
  ``noise_<m>``: s = m · σ0 on every level for each m in ``--multipliers``
  (``sample(noise=m)``, a temperature: how small must the noise be for the samples to keep
  their category?); ``low_x<m>``: m · σ0 on the levels whose noise alone costs the most
  (``LOW``: ``image`` … ``conv2_1``), σ0 above (what a calibration of σ0 on those levels
  alone would give the samples; ``clutter_levers.py --levers s0x<m>@image+conv1_1+pool1+conv2_1``
  measures what it does to the pass);
- ``only_<level>``: σ0 on that level alone, 0 elsewhere (which level's noise costs what);
- ``split_sigma0``: the lever the issue names (lever 4, "a σ0 that is small where the model
  predicts nothing"): s = σ0 · r_on where φ > 0 and σ0 · r_off where φ = 0, r_on and r_off the
  root-mean-square residual of the model's prediction φ against the objects' own (masked)
  activations, on the elements where φ > 0 / φ = 0 respectively, divided by the RMS over all
  elements (the hard-EM estimate of σ0) — fitted on ``--fit`` lone train objects a category,
  each level's φ computed from the backward pass's F̂ of the level above with the pass's own
  (γ, δ) (what the hard-EM recipe fits σ0 on);
- ``phi_positive_only``: s = σ0 where φ > 0 and 0 where φ = 0 (r_off = 0, the lever's bound).

Also the control the noise rows need: the ``--n`` test objects themselves with i.i.d.
``Normal(0, σ0)`` noise of the image level added (can the backbone read an object through the
image level's own noise at all?), and each sampled row's image through the image level's
observation model's mean (``ThresholdedGaussian.mean``: φ where it clears λ, the background β
elsewhere; what the model says a scene would show).

Every image is classified by the model's backbone (the plain default backbone for the shipped
model, the classifier the target names); a row is the share classified as its category, mean
over categories (and per category). Writes ``benchmarks/results/sample_noise.json`` and a
figure of some rows' images, three per category (``sample_noise.png``). One thread.

Usage: ``python benchmarks/sample_noise.py [--model PATH] [--n 100] [--fit 100]
[--delta-priors 100] [--smoke]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from pyro.ops.indexing import Vindex

sys.path.insert(0, str(Path(__file__).parent))
from clutter_levers import use_offset_priors  # noqa: E402
from common import RESULTS, learned_model, machine, rendered_objects  # noqa: E402
from sample_diagnosis import figure  # noqa: E402

from pyro_backpass import GenerativeModel, greedy_map  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import object_targets  # noqa: E402

#: The levels whose σ0 noise alone takes the samples to chance (``only_<level>`` rows).
LOW: tuple[str, ...] = ("image", "conv1_1", "pool1", "conv2_1")


@torch.no_grad()
def residual_split(gm: GenerativeModel, n: int) -> dict[str, dict[str, float]]:
    """Per hidden level: RMS residual of φ against the objects' masked activations over all
    elements, where φ > 0 and where φ = 0, the share of elements with φ = 0, and the ratios
    r_on, r_off (module docstring); on ``n`` lone train objects a category."""
    images, masks, labels = rendered_objects(gm, n, "train")
    targets = object_targets(gm.backbone, images, masks)
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in gm.hidden_levels}
    for start in range(0, labels.numel(), 64):
        sl = slice(start, start + 64)
        acts = gm.backbone(images[sl])
        bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
        result = greedy_map(gm, bu, category=labels[sl])
        upper = labels[sl]
        for name in reversed(gm.hidden_levels):
            step = gm.steps[name]
            a = result.assignment
            phi = step.phi(upper, a[f"gamma_{name}"], a[f"delta_{name}"])  # (b, C, h, w)
            sq = (phi - targets[name][sl]).double().square()
            zero = phi <= 0
            sums[name] += torch.stack([sq[~zero].sum(), (~zero).sum().double(),
                                       sq[zero].sum(), zero.sum().double()])  # fmt: skip
            upper = result.td[name]
    out = {}
    for name, (s_on, n_on, s_off, n_off) in sums.items():
        rms = float(((s_on + s_off) / (n_on + n_off)).sqrt())
        on = float((s_on / n_on.clamp_min(1)).sqrt())
        off = float((s_off / n_off.clamp_min(1)).sqrt())
        out[name] = {"rms_all": rms, "rms_phi_positive": on, "rms_phi_zero": off,
                     "share_phi_zero": float(n_off / (n_on + n_off)),
                     "r_on": on / rms if rms > 0 else 1.0,
                     "r_off": off / rms if rms > 0 else 1.0}  # fmt: skip
    return out


@torch.no_grad()
def draw(
    gm: GenerativeModel, labels: torch.Tensor, scale, *, seed: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Ancestral samples as ``gm.model`` draws them (category given), with the noise of
    ``td_<level>`` set by ``scale(name, phi)``, standard deviations broadcastable to φ
    ``(B, C, h, w)``: the image level ``(B, 3, H, W)`` and the drawn sites (site → ``(B,)``)."""
    gen = torch.Generator().manual_seed(seed)
    priors = gm.resolve_priors(None)
    tables = {site: prior.table(sample=False, name=f"table_{site}")
              for site, prior in priors.items()}  # fmt: skip
    values, upper = {"category": labels}, labels
    for name in reversed(gm.hidden_levels):
        for site in (f"gamma_{name}", f"delta_{name}"):
            parents = priors[site].parents
            probs = tables[site]
            if parents:
                probs = Vindex(probs)[tuple(values[p] for p in parents) + (slice(None),)]
            else:
                probs = probs.expand(labels.numel(), -1)
            values[site] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        step = gm.steps[name]
        phi = step.phi(upper, values[f"gamma_{name}"], values[f"delta_{name}"])
        upper = phi + scale(name, phi) * torch.randn(phi.shape, generator=gen)
    return upper, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--n", type=int, default=100, help="samples (and test objects) a category")
    parser.add_argument("--fit", type=int, default=100,
                        help="lone train objects a category for r_on, r_off")  # fmt: skip
    parser.add_argument(
        "--delta-priors",
        type=int,
        default=100,
        help="lone train objects a category for the learned δ priors (0: uniform)",
    )
    parser.add_argument(
        "--multipliers",
        type=float,
        nargs="*",
        default=[0.05, 0.1, 0.25, 0.5],
        help="noise multipliers of σ0 on every level, each a row",
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_noise.json")
    args = parser.parse_args()
    if (
        min(args.n, args.fit) < 1
        or args.delta_priors < 0
        or any(not m >= 0 for m in args.multipliers)
    ):
        raise SystemExit("--n and --fit must be >= 1, --delta-priors and --multipliers >= 0")
    if args.smoke:
        args.n, args.fit, args.delta_priors = 2, 2, min(args.delta_priors, 2)
    torch.set_num_threads(1)
    start = time.perf_counter()
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    if args.delta_priors:
        use_offset_priors(gm, args.delta_priors, top=True)
    bb = gm.backbone
    cats = len(gm.categories)
    labels = torch.arange(cats).repeat_interleave(args.n)
    sigma0 = {name: float(gm.steps[name].scale_td) for name in gm.hidden_levels}
    obs = gm.observations["image"]

    def share(x: torch.Tensor, y: torch.Tensor = labels) -> list[float]:
        right = bb.predict(x.clamp(0, 1).to(bb.mean.dtype)) == y
        return [float(right[y == c].float().mean()) for c in range(cats)]

    split = residual_split(gm, args.fit)
    scales = {
        "noise_0": lambda name, phi: torch.zeros(()),
        "noise_1": lambda name, phi: torch.tensor(sigma0[name]),
        "split_sigma0": lambda name, phi: (
            sigma0[name] * torch.where(phi > 0, split[name]["r_on"], split[name]["r_off"])
        ),
        "phi_positive_only": lambda name, phi: sigma0[name] * (phi > 0).to(phi.dtype),
    }
    for m in args.multipliers:
        scales[f"noise_{m:g}"] = lambda name, phi, m=m: torch.tensor(m * sigma0[name])
        scales[f"low_x{m:g}"] = lambda name, phi, m=m: torch.tensor(
            (m if name in LOW else 1.0) * sigma0[name]
        )
    for level in gm.hidden_levels:
        scales[f"only_{level}"] = lambda name, phi, level=level: torch.tensor(
            sigma0[name] if name == level else 0.0
        )
    rows, pictures = {}, {}
    shown = ("noise_0", "noise_0_observation_mean", "noise_0.1", "low_x0.1", "only_conv1_1",
             "phi_positive_only", "noise_1")  # fmt: skip
    for row, scale in scales.items():
        image, _ = draw(gm, labels, scale)
        mean = obs.distribution(image).mean  # φ where it clears λ, β elsewhere
        rows[row] = share(image)
        rows[f"{row}_observation_mean"] = share(mean)
        for name, x in ((row, image), (f"{row}_observation_mean", mean)):
            if name in shown:
                pictures[name] = x
        print(f"{row:28s} {statistics.mean(rows[row]):.3f} "
              f"{[round(v, 2) for v in rows[row]]}", flush=True)  # fmt: skip
    images, _, test_labels = rendered_objects(gm, args.n, "test")
    gen = torch.Generator().manual_seed(1)
    rows["objects"] = share(images, test_labels)
    noisy = images + sigma0["image"] * torch.randn(images.shape, generator=gen)
    rows["objects_with_image_sigma0_noise"] = share(noisy, test_labels)
    pictures = {"objects": images, "objects_with_image_sigma0_noise": noisy,
                **{k: pictures[k] for k in shown if k in pictures}}  # fmt: skip
    figure(gm, pictures, args.n, 3, args.out.with_suffix(".png"),
           title="Samples by the noise on td (image level; columns: three per category; "
                 "first two rows: test objects)")  # fmt: skip
    result = {
        "machine": machine(),
        "threads": 1,
        "model": model_name,
        "samples_per_category": args.n,
        "fit_objects_per_category": args.fit,
        "delta_priors_from_objects_per_category": args.delta_priors,
        "multipliers": args.multipliers,
        "classifier": "the model's backbone",
        "categories": list(gm.categories),
        "sigma0": sigma0,
        "residual_split": split,
        "mean": {k: statistics.mean(v) for k, v in rows.items()},
        "per_category_share": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(args.out, result)
    for name, s in split.items():
        print(
            f"{name:8s} σ0 {sigma0[name]:.3f} rms {s['rms_all']:.3f} "
            f"on {s['rms_phi_positive']:.3f} off {s['rms_phi_zero']:.3f} "
            f"φ=0 share {s['share_phi_zero']:.2f}"
        )
    for k, v in result["mean"].items():
        print(f"{k:45s} {v:.3f}  {[round(x, 2) for x in rows[k]]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

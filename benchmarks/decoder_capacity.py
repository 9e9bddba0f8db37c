"""Issue #10, lever 4: could a sharper top-down decoder veto clutter? A capacity probe.

``veto_diagnosis.py`` found that below ``pool4`` the model's top-down prediction φ separates an
object's own on-elements from the rest of its scene *worse* than the scene's bottom-up
activations do (ROC AUC, e.g. ``pool1`` 0.63 against 0.89), and about as badly on the object
alone — so the decoder itself, not the scene, is blunt. This script asks how much sharper a
decoder of each level *can* be, given a perfect input: per step ``upper → level`` it trains
decoders from the object's clean activations at ``upper`` (its masked activations, the hard-EM
target) to its masked activations at ``level``, on objects alone from train-split scenes, by
squared error (the hard-EM loss; with K > 1 components, each object's best component), and
measures on the validation split's scenes the ROC AUC of φ (the best component for the object)
for the object's on-elements (masked activations ≥ the shipped model's λ) against every other
element of its scene — the definition of ``veto_diagnosis.py``'s table, whose ``auc_phi`` and
``auc_bu`` rows (φ of the shipped model in the scene, and the scene's bottom-up activations) are
measured here again on the same elements.

Decoders (the step's kind decides the first layer: a 3×3 convolution on a ``conv`` level, a
stride-2 4×4 transposed convolution on a ``pool`` level, as the model's :class:`TopDownStep`):

* ``paper_k1`` / ``paper_k5``: the paper's form ReLU(conv(F) + b), K = 1 / 5 components;
* ``wide_k1``: the same with a 7×7 (8×8 transposed) kernel: more context, still linear;
* ``mlp_k1`` / ``mlp_k5``: two layers (the first layer to 64 channels, ReLU, a 3×3 convolution).

If no decoder gets φ's AUC above the bottom-up activations', a sharper decoder of the level
above cannot be where the veto comes from (the information is not in the upper level); if one
does, lever 4 has room and says how much. A real pass does not see the clean upper level but
F̂ of it, so every decoder is also evaluated on that input (``_fhat_input``: F̂ of the oracle
pass in the scene, every level clamped to the assignment of the object's pass alone), and the
mixtures are also trained on F̂ of the pass on the object alone (``_fhat_trained``, the
shipped recipe's input): if those fall back to the shipped φ's AUC, the blunt upper F̂, not the
decoder's capacity, is what limits the chain. One thread. Writes
``benchmarks/results/decoder_capacity.json``.

Usage: ``python benchmarks/decoder_capacity.py [--train-scenes 80] [--scenes 10] [--smoke]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, hidden_bu, learned_model, machine  # noqa: E402
from veto_diagnosis import roc_auc  # noqa: E402

from pyro_backpass import Scenes, greedy_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import masked_activations  # noqa: E402
from pyro_backpass.model import shift_all  # noqa: E402

DECODERS = {  # name: (layers, K, kernel of a conv step)
    "paper_k1": (1, 1, 3),
    "paper_k5": (1, 5, 3),
    "wide_k1": (1, 1, 7),
    "mlp_k1": (2, 1, 3),
    "mlp_k5": (2, 5, 3),
}
HIDDEN = 64
FHAT_TRAINED = ("paper_k5", "mlp_k5")  # also trained on F̂ inputs (the pass alone's)


class Decoder(nn.Module):
    """``(B, C_in, h, w)`` → φ of every component ``(B, K, C, H, W)``, ReLU at the end."""

    def __init__(self, c_in: int, c: int, *, unpool: bool, layers: int, k: int, kernel: int):
        super().__init__()
        width = HIDDEN if layers == 2 else k * c
        if unpool:  # kernel 3 → 4×4 (the model's), 7 → 8×8: output exactly twice the input
            size = kernel + 1
            first = nn.ConvTranspose2d(c_in, width, size, stride=2, padding=(size - 2) // 2)
        else:
            first = nn.Conv2d(c_in, width, kernel, padding=kernel // 2)
        body = [first] if layers == 1 else [first, nn.ReLU(), nn.Conv2d(width, k * c, 3, padding=1)]
        self.net, self.k, self.c = nn.Sequential(*body), k, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.net(x))
        return y.reshape(y.shape[0], self.k, self.c, *y.shape[-2:])


def best_component(phi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``phi (B, K, C, H, W)``, ``target (B, C, H, W)`` → each object's best φ, and the
    per-object squared error of it (the hard-EM E-step)."""
    err = (phi - target[:, None]).square().flatten(2).sum(-1)  # (B, K)
    best = err.argmin(1)
    return phi[torch.arange(len(phi)), best], err.gather(1, best[:, None])[:, 0]


def fit(dec: Decoder, x: torch.Tensor, y: torch.Tensor, *, steps: int, seed: int) -> float:
    """Adam on the mean best-component squared error; returns the last epoch-free loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(32, len(x)),), generator=gen)
        loss = best_component(dec(x[idx]), y[idx])[1].mean() / y[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


@torch.no_grad()
def objects(gm, scenes: list, *, amodal: bool) -> list[dict]:
    """Per object: its masked activations at every hidden level (amodal mask for training,
    visible mask for evaluation, as ``veto_diagnosis.py``) and F̂ of the shipped model's pass
    on the object alone (category given); for evaluation also its scene's bottom-up
    activations and F̂ of the pass in the scene with every level clamped to the alone pass's
    assignment (``veto_diagnosis.py``'s oracle pass)."""
    out = []
    for scene in tqdm(scenes, desc="objects", leave=False):
        bu = None if amodal else hidden_bu(gm, scene.image)
        for inst in scene.instances:
            mask = inst.amodal_mask if amodal else inst.mask
            if not mask.any():
                continue
            target = masked_activations(gm.backbone, inst.image_alone[None], mask[None])
            label = torch.tensor([gm.categories.index(inst.category)])
            alone = greedy_map(gm, hidden_bu(gm, inst.image_alone), category=label)
            o = {"target": target, "fhat": alone.td, "bu": bu}
            if bu is not None:
                clamp = {k: v for k, v in alone.assignment.items() if k != "category"}
                o["fhat"] = greedy_map(gm, bu, category=label, clamp=clamp).td
            out.append(o)
    return out


@torch.no_grad()
def shipped_phi(gm, name: str, upper: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The shipped model's φ at ``name`` from the clean ``upper``: its best (γ, δ) for the
    object by squared error (every component, every offset)."""
    step = gm.steps[name]
    phi = shift_all(step.phi_all(upper), step.offsets)  # (B, K, D, C, H, W)
    return best_component(phi.flatten(1, 2), target)[0]


def run(gm, train: list, val: list, *, steps: int) -> dict:
    hidden = gm.hidden_levels
    rows = {}
    # Steps upper → name, from the top down; the image level has no on-elements to speak of.
    for i in range(len(hidden) - 2, 0, -1):
        name, upper = hidden[i], hidden[i + 1]
        lam = float(gm.observations[name].threshold)
        x = torch.cat([o["target"][upper] for o in train])
        y = torch.cat([o["target"][name] for o in train])
        xv = torch.cat([o["target"][upper] for o in val])
        yv = torch.cat([o["target"][name] for o in val])
        on = yv >= lam
        xf = torch.cat([o["fhat"][upper] for o in train])  # F̂ of the pass alone
        xvf = torch.cat([o["fhat"][upper] for o in val])  # F̂ of the oracle pass in the scene
        row = {
            "auc_bu": roc_auc(torch.cat([o["bu"][name] for o in val]), on),
            "auc_shipped_phi": roc_auc(shipped_phi(gm, name, xv, yv), on),
            "auc_shipped_phi_fhat_input": roc_auc(shipped_phi(gm, name, xvf, yv), on),
        }
        unpool = gm.steps[name].kind == "unpool"
        for j, (dname, (layers, k, kernel)) in enumerate(DECODERS.items()):
            torch.manual_seed(j)
            dec = Decoder(x.shape[1], y.shape[1], unpool=unpool, layers=layers, k=k, kernel=kernel)
            t0 = time.perf_counter()
            train_loss = fit(dec, x, y, steps=steps, seed=j)
            with torch.no_grad():
                phi, err = best_component(dec(xv), yv)
                phi_f = best_component(dec(xvf), yv)[0]
            row[f"auc_{dname}"] = roc_auc(phi, on)
            row[f"auc_{dname}_fhat_input"] = roc_auc(phi_f, on)
            row[f"val_mse_{dname}"] = float(err.mean()) / yv[0].numel()
            row[f"train_mse_{dname}"] = train_loss
            row[f"seconds_{dname}"] = round(time.perf_counter() - t0, 1)
            if dname in FHAT_TRAINED:  # trained on F̂ inputs, as the shipped recipe is
                torch.manual_seed(j)
                dec = Decoder(x.shape[1], y.shape[1], unpool=unpool, layers=layers, k=k,
                              kernel=kernel)  # fmt: skip
                fit(dec, xf, y, steps=steps, seed=j)
                with torch.no_grad():
                    row[f"auc_{dname}_fhat_trained"] = roc_auc(best_component(dec(xvf), yv)[0], on)
        rows[f"{upper}->{name}"] = row
        aucs = {k: round(v, 3) for k, v in row.items() if "auc" in k}
        print(f"{upper}->{name}", aucs, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--train-scenes", type=int, default=80)
    parser.add_argument("--scenes", type=int, default=10, help="validation scenes")
    parser.add_argument("--steps", type=int, default=600, help="Adam steps per decoder")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "decoder_capacity.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    sizes = (args.train_scenes, args.scenes, args.steps)
    n_train, n_val, steps = (2, 1, 3) if args.smoke else sizes
    t0 = time.perf_counter()
    train = objects(gm, list(Scenes(n_train, seed=split_seed("train"))), amodal=True)
    val = objects(gm, list(Scenes(n_val, seed=split_seed("validation"))), amodal=False)
    rows = run(gm, train, val, steps=steps)
    result = {
        "machine": machine(),
        "threads": 1,
        "model": model_name,
        "train_scenes": n_train,
        "train_objects": len(train),
        "scenes": n_val,
        "objects": len(val),
        "steps": steps,
        "decoders": {
            k: dict(zip(("layers", "K", "kernel"), v, strict=True)) for k, v in DECODERS.items()
        },
        "steps_auc": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_backpass.inference import LOWER_TEMPERATURE

BENCH = Path(__file__).parents[2] / "benchmarks" / "learning.py"


def _run(script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _smoke(script: Path, *args: str) -> None:
    """Run a benchmark script; it must exit 0 (its stderr's tail otherwise)."""
    run = _run(script, *args)
    assert run.returncode == 0, run.stderr[-2000:]


def _module(name: str):
    """A benchmark script imported as a module (its functions, without running main)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_benchmark_smoke(tmp_path):
    out = tmp_path / "learning.json"
    _smoke(BENCH, "--smoke", "--out", str(out))
    result = json.loads(out.read_text())["results"]
    for key in ("mask_iou_default_scale", "mask_iou_scene_scale", "category_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert (tmp_path / "learning_samples.png").stat().st_size > 0
    assert (tmp_path / "learning_reconstructions.png").stat().st_size > 0
    table = _run(BENCH, "--table", "--out", str(out), timeout=60)
    assert "mask IoU" in table.stdout


def test_diagnose_benchmark_smoke(tmp_path):
    out = tmp_path / "diagnose.json"
    script = BENCH.parent / "diagnose.py"
    _smoke(script, "--smoke", "--out", str(out))
    ladder = json.loads(out.read_text())["mask_iou"]
    assert ladder["objects"] > 0
    for key in ("free", "top_clamped", "alone_on_scene_background", "alone_plain"):
        assert 0.0 <= ladder[key] <= 1.0


@pytest.mark.slow  # ~26 s: two retraining levers of the smoke model
def test_learning_levers_smoke(tmp_path):
    script = BENCH.parent / "learning_levers.py"
    _smoke(script, "--smoke", "--out", str(tmp_path))
    result = json.loads((tmp_path / "iterations_6.json").read_text())
    assert 0.0 <= result["validation_mask_iou"] <= 1.0
    table = _run(script, "--table", "--out", str(tmp_path), timeout=60)
    assert "iterations_6" in table.stdout


def test_greedy_vs_exact_learned_smoke(tmp_path):
    out = tmp_path / "gvel.json"
    script = BENCH.parent / "greedy_vs_exact_learned.py"
    _smoke(script, "--smoke", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    for r in rows.values():
        assert 0.0 <= r["agreement"] <= 1.0
        assert r["logjoint_gap_min"] >= -1e-3 * max(
            1.0, abs(r["logjoint_gap_max"])
        )  # exact ≥ greedy


def _levers_smoke(tmp_path, levers: list[str], *, bound: bool = True) -> None:
    out = tmp_path / "levers.json"
    script = BENCH.parent / "clutter_levers.py"
    flags = ["--bound", "--category-unknown"] if bound else []
    _smoke(script, "--smoke", *flags, "--out", str(out), "--levers", *levers)
    rows = json.loads(out.read_text())["levers"]
    assert set(rows) == set(levers)
    for r in rows.values():
        for key in ("hit@0.5", "hit@0.3", "best_iou", "top_clamped", "alone_plain"):
            assert 0.0 <= r[key] <= 1.0
        assert 1 <= r["true_rank_median"] <= r["top_hypotheses"]
        if not bound:
            continue
        assert 0.0 <= r["bound@0.5"] <= 1.0
        assert r["hit@0.5"] <= r["bound@0.5"]  # the pass is one of the hypotheses bounded
        unknown = r["category_unknown"]
        for key in ("hit@0.5", "hit@0.3", "chose_airplane", "best_iou"):
            assert 0.0 <= unknown[key] <= 1.0
        assert unknown["hit@0.5"] <= unknown["hit@0.3"]


def test_clutter_levers_smoke(tmp_path):
    _levers_smoke(tmp_path, ["base", "bgfit,s0x0.5@upper,lamx1.5@all,s2x2@all", "cam3"])


@pytest.mark.slow  # ~35 s: the fitted levers; the default run covers the script above
def test_clutter_levers_fitted_levers_smoke(tmp_path):
    _levers_smoke(tmp_path, ["footprint", "topk2", "rank1", "onoff1", "dprior2", "dpriortop2"])
    # The level-by-level levers: no bound or category-unknown rows (those are greedy_map's).
    _levers_smoke(tmp_path, ["footprintall", "sharp0.1", "clutter2x0.5"], bound=False)
    script = BENCH.parent / "clutter_levers.py"
    for bad in ("sharp1.5", "sharpx", "clutter0", "clutter3x-1", "dprior0", "dpriortop0"):
        run = _run(script, "--smoke", "--levers", bad)
        assert run.returncode != 0 and f"lever {bad!r}" in run.stderr, bad
    run = _run(script, "--smoke", "--levers", "footprint,verified")
    assert run.returncode != 0 and "only a dprior lever may precede" in run.stderr
    run = _run(script, "--smoke", "--bound", "--levers", "sharp0.1")
    assert run.returncode != 0 and "not measured for" in run.stderr


def test_clamped_samples_smoke(tmp_path):
    out = tmp_path / "clamped.png"
    script = BENCH.parent / "clamped_samples.py"
    _smoke(script, "--smoke", "--n", "3", "--out", str(out))
    assert out.stat().st_size > 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    for row in rows.values():
        # Every clamped site is the same in every sample of its row.
        assert set(row["clamped"]) <= set(row["equal_in_all_samples"])


@torch.no_grad()
def test_level_descent_without_options_is_greedy_map():
    """The levers' level-by-level pass with neither option is ``greedy_map``'s (the oracle):
    the same assignment on every site and the same mask."""
    from pyro_backpass import GenerativeModel, Scenes, greedy_map
    from pyro_backpass.data import split_seed

    gm = GenerativeModel.default()
    module = _module("clutter_levers")
    for scene in Scenes(2, seed=split_seed("validation")):
        acts = gm.backbone(scene.image[None])
        bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
        plain = greedy_map(gm, bu, category=0)
        values, mask = module.level_descent(gm, bu, 0)
        assert {s: int(v) for s, v in values.items()} == {
            s: int(v) for s, v in plain.assignment.items()
        }
        assert torch.equal(mask, plain.mask)


@torch.no_grad()
def test_level_descent_sharpen_matches_brute_force():
    """With ``sharpen`` the first level below the top chooses the (γ, δ) whose φ, cut below
    f × its peak by hand here, scores best in the library's closed form (``closed_form_with``)
    plus the prior terms, given F̂ of the top level from ``top_down_pass``."""
    from pyro_backpass import GenerativeModel, Scenes
    from pyro_backpass.inference import closed_form_with, top_down_pass

    gm = GenerativeModel.default()
    module = _module("clutter_levers")
    scene = next(iter(Scenes(1, seed=7)))
    acts = gm.backbone(scene.image[None])
    bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
    values, _ = module.level_descent(gm, bu, 0, top=(5, 12), sharpen=0.3)
    top, name = gm.hidden_levels[-1], gm.hidden_levels[-2]
    upper = top_down_pass(gm, values, bu, {})[0][top]
    step, best, best_score = gm.steps[name], None, -float("inf")
    for g in range(step.num_components):
        for d in range(step.num_offsets):
            phi = step.phi(upper, torch.tensor([g]), torch.tensor([d]))
            phi = phi * (phi >= 0.3 * phi.max())
            _, score = closed_form_with(gm.constants(name), bu[name], phi)
            gp = gm.priors[f"gamma_{name}"]
            prior = gp.log_probs()[tuple(int(values[p]) for p in gp.parents) + (g,)]
            total = float(score.sum() + prior + gm.priors[f"delta_{name}"].log_probs()[d])
            if total > best_score:
                best, best_score = (g, d), total
    assert best == (int(values[f"gamma_{name}"]), int(values[f"delta_{name}"]))


@torch.no_grad()
def test_three_branch_without_clutter_is_the_closed_form():
    """With a vanishing clutter weight the three-branch closed form is the library's two-branch
    one (``closed_form_with``, the oracle): the same F̂ and scores; with a clutter branch that
    fits the bottom-up values exactly and a fair weight, elements far from φ leave "on"."""
    from pyro_backpass import GenerativeModel
    from pyro_backpass.inference import closed_form_with

    gm = GenerativeModel.default()
    module = _module("clutter_levers")
    c = gm.constants("pool3")
    gen = torch.Generator().manual_seed(0)
    channels = gm.steps["pool3"].out.channels
    bu = torch.rand(2, channels, 8, 8, generator=gen) * 3
    phi = torch.rand(2, channels, 8, 8, generator=gen) * 3
    mu, sigma = torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1)
    f3, s3 = module.three_branch(c, bu, phi, mu, sigma, -200.0)
    f2, s2 = closed_form_with(c, bu, phi)
    torch.testing.assert_close(f3, f2)
    torch.testing.assert_close(s3, s2)
    # φ = 0 and a clutter branch centred on every bottom-up value: every element is clutter,
    # F̂ is 0 (off), and its score is log π + log N(f_bu; μ, σ_c) + log N(0; 0, σ0), by hand.
    log_pi, narrow = -0.7, sigma * 1e-3
    f, score = module.three_branch(c, bu, torch.zeros_like(bu), bu, narrow, log_pi)
    assert torch.equal(f, torch.zeros_like(f))
    sigma0 = (0.5 / torch.as_tensor(c.half_prec_td, dtype=bu.dtype)).sqrt()
    by_hand = (log_pi + torch.distributions.Normal(bu, narrow).log_prob(bu)
               + torch.distributions.Normal(0.0, sigma0).log_prob(torch.zeros(())))  # fmt: skip
    torch.testing.assert_close(score, by_hand)


@torch.no_grad()
def test_footprint_descent_matches_brute_force():
    """Each level's choice of the ``footprintall`` lever is the best, over every (γ, δ) of the
    level with the levels above fixed, of (data score − background + prior) / footprint, each
    alternative scored by the library's ``top_down_pass`` of a full assignment."""
    from pyro_backpass import GenerativeModel, Scenes
    from pyro_backpass.inference import background_log_likelihood, top_down_pass

    gm = GenerativeModel.default()
    module = _module("clutter_levers")
    scene = next(iter(Scenes(1, seed=5)))
    acts = gm.backbone(scene.image[None])
    bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
    values, mask = module.level_descent(gm, bu, 0, top=(3, 12), footprint=True)
    assert mask.shape == (1, *scene.image.shape[-2:])
    names = list(reversed(gm.hidden_levels))
    assert (int(values[f"gamma_{names[0]}"]), int(values[f"delta_{names[0]}"])) == (3, 12)
    for depth, name in enumerate(names[1:4], start=1):  # three levels: ~135 full passes
        step = gm.steps[name]
        best, best_score = None, -float("inf")
        for g in range(step.num_components):
            for d in range(step.num_offsets):
                alt = dict(values)
                alt[f"gamma_{name}"], alt[f"delta_{name}"] = torch.tensor([g]), torch.tensor([d])
                td, scores = top_down_pass(gm, alt, bu, {})
                above = td[names[depth - 1]]
                phi = step.phi(above, alt[f"gamma_{name}"], alt[f"delta_{name}"])
                gp = gm.priors[f"gamma_{name}"]
                prior = gp.log_probs()[tuple(int(alt[p]) for p in gp.parents) + (g,)]
                prior = prior + gm.priors[f"delta_{name}"].log_probs()[d]
                llr = scores[depth] - background_log_likelihood(gm, {name: bu[name]})
                score = float((llr + prior) / max(1, int((phi > 0).sum())))
                if score > best_score:
                    best, best_score = (g, d), score
        assert best == (int(values[f"gamma_{name}"]), int(values[f"delta_{name}"])), name


def test_sample_diagnosis_smoke(tmp_path):
    out = tmp_path / "samples.json"
    _smoke(
        BENCH.parent / "sample_diagnosis.py", "--smoke", "--delta-priors", "2", "--out", str(out)
    )
    result = json.loads(out.read_text())
    assert result["delta_priors_from_objects_per_category"] == 2
    assert all(0.0 < p <= 1.0 for p in result["delta_prior_peaks"].values())
    assert "delta_pool4" in result["delta_prior_peaks"]
    assert out.with_suffix(".png").stat().st_size > 0
    for rung, shares in result["per_category_share"].items():
        assert len(shares) == len(result["categories"]), rung
        assert all(0.0 <= v <= 1.0 for v in shares), rung
    assert result["mean"]["objects"] >= 0.5  # the backbone knows its own test objects


def test_sample_noise_smoke(tmp_path):
    out = tmp_path / "noise.json"
    _smoke(BENCH.parent / "sample_noise.py", "--smoke", "--multipliers", "0.1", "--out", str(out))
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    rows = result["per_category_share"]
    expected = {"noise_0", "noise_1", "split_sigma0", "phi_positive_only", "noise_0.1",
                "low_x0.1", *(f"only_{n}" for n in result["sigma0"])}  # fmt: skip
    assert expected | {f"{r}_observation_mean" for r in expected} | {
        "objects", "objects_with_image_sigma0_noise"} == set(rows)  # fmt: skip
    for row, shares in rows.items():
        assert len(shares) == len(result["categories"]), row
        assert all(0.0 <= v <= 1.0 for v in shares), row
    for level, s in result["residual_split"].items():
        assert 0.0 <= s["share_phi_zero"] <= 1.0, level
        # the overall mean square is the two regions' mean squares weighted by their shares
        mixed = s["share_phi_zero"] * s["rms_phi_zero"] ** 2 + (
            1 - s["share_phi_zero"]) * s["rms_phi_positive"] ** 2  # fmt: skip
        assert mixed == pytest.approx(s["rms_all"] ** 2, rel=1e-6), level


def test_sample_noise_draws_are_the_model_trace():
    """Without noise, ``draw``'s image is the model's own trace (``sample(noise=0)`` under
    ``poutine.condition``) with every site clamped to the drawn ones; its top-level γ follow
    the model's n-gram table of the category (a 5-σ bound per component on 300 draws)."""
    from pyro_backpass import GenerativeModel, sample

    gm = GenerativeModel.default()
    module = _module("sample_noise")
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    image, values = module.draw(gm, labels, lambda name, phi: torch.zeros(()), seed=5)
    clamp = {s: v for s, v in values.items() if s != "category"}
    traced = sample(gm, 6, category=labels, clamp=clamp, noise=0.0).td["image"]
    torch.testing.assert_close(image, traced)
    top = gm.hidden_levels[-1]
    n = 300
    _, many = module.draw(gm, torch.zeros(n, dtype=torch.long), lambda name, phi: torch.zeros(()),
                          seed=6)  # fmt: skip
    table = gm.priors[f"gamma_{top}"].log_probs().exp()[0].double()  # (K,) for category 0
    freq = torch.bincount(many[f"gamma_{top}"], minlength=table.numel()).double() / n
    assert ((freq - table).abs() <= 5 * (table * (1 - table) / n).sqrt() + 1e-3).all()


def test_the_dpriortop_lever_sets_the_library_priors_on_every_level_with_offsets():
    """``use_offset_priors(top=True)`` puts ``fit_offset_priors``' priors (tested against
    per-object passes in tests/learning) on every level with more than one offset, the top's
    included; without ``top`` the top keeps the uniform prior."""
    from pyro_backpass import GenerativeModel, fit_offset_priors

    levers, common = _module("clutter_levers"), _module("common")
    gm, lower = GenerativeModel.default(), GenerativeModel.default()
    levers.use_offset_priors(gm, 1, top=True)
    levers.use_offset_priors(lower, 1)
    images, _, labels = common.rendered_objects(GenerativeModel.default(), 1, "train")
    expected = fit_offset_priors(GenerativeModel.default(), images, labels)
    top = gm.hidden_levels[-1]
    assert f"delta_{top}" in expected
    for site, prior in expected.items():
        torch.testing.assert_close(gm.priors[site].log_probs().exp(), prior.probs)
        if site != f"delta_{top}":
            torch.testing.assert_close(lower.priors[site].log_probs().exp(), prior.probs)
    uniform = lower.priors[f"delta_{top}"].log_probs().exp()
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / uniform.numel()))


def test_sample_diagnosis_mean_path_is_the_traced_mean_path():
    """The ladder's mean path equals the image level of the model's own trace with every site
    clamped to the same assignment and ``noise=0`` (Pyro's ``poutine.condition``)."""
    from pyro_backpass import GenerativeModel, sample

    gm = GenerativeModel.default()
    module = _module("sample_diagnosis")
    drawn = sample(gm, 4, category=[0, 1, 2, 3], seed=3, noise=0.0)
    labels = drawn.assignment["category"]
    clamp = {s: v for s, v in drawn.assignment.items() if s != "category"}
    traced = sample(gm, 4, category=labels, clamp=clamp, seed=4, noise=0.0).td["image"]
    torch.testing.assert_close(module.mean_path(gm, labels, drawn.assignment), traced)
    # started lower, from the trace's own activations of a middle level: the same image
    mid = sample(gm, 4, category=labels, clamp=clamp, seed=4, noise=0.0).td["pool2"]
    torch.testing.assert_close(module.mean_path_from(gm, "pool2", mid, drawn.assignment), traced)


@pytest.mark.slow  # ~40 s; its functions are exercised by the sample ladder above
def test_path_decoders_smoke(tmp_path):
    out = tmp_path / "path.json"
    _smoke(BENCH.parent / "path_decoders.py", "--smoke", "--mix", "1", "--scene-weights", "1",
           "--refit", "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"shipped", "shipped_refit", "path_mix1", "path_mix1_refit", "scene_w1",
                         "scene_w1_refit"}  # fmt: skip
    assert result["scene_objects"] >= 1 and set(result["refit_sigma0_calibration"]) == {
        "shipped", "path_mix1", "scene_w1"}  # fmt: skip
    for row in rows.values():
        assert row["path_loss"] >= 0 and row["fhat_input_loss"] >= 0
        assert row["scene_fhat_input_loss"] >= 0
        assert 0.0 <= row["single_object_mask_iou"] <= 1.0


def test_scene_training_data_is_each_object_own_pass_clamped_in_its_scene():
    """Each scene object's entry, recomputed alone from the library (its pass on the object
    alone, then the pass on its scene with every site clamped to that assignment, and the
    masked activations of the object alone), equals the batched data."""
    from pyro_backpass import GenerativeModel, Scenes, greedy_map
    from pyro_backpass.data import split_seed
    from pyro_backpass.learning import masked_activations

    gm = GenerativeModel.default()
    module = _module("path_decoders")
    data = module.scene_training_data(gm, 1, chunk=2)
    scene = Scenes(1, seed=split_seed("train"))[0]
    objects = [i for i in scene.instances if i.category in gm.categories and i.mask.any()]
    assert data["labels"].numel() == len(objects) >= 2
    keep = lambda acts: {k: v for k, v in acts.items() if k in gm.hidden_levels}  # noqa: E731
    for j, inst in enumerate(objects):
        label = gm.categories.index(inst.category)
        own = greedy_map(gm, keep(gm.backbone(inst.image_alone[None])), category=label)
        clamp = {k: v for k, v in own.assignment.items() if k != "category"}
        in_scene = greedy_map(gm, keep(gm.backbone(scene.image[None])), category=label,
                              clamp=clamp)  # fmt: skip
        target = masked_activations(gm.backbone, inst.image_alone[None], inst.amodal_mask[None])
        assert int(data["labels"][j]) == label
        for site, value in clamp.items():
            assert (
                int(data["assignment"][site][j])
                == int(value[0])
                == int(in_scene.assignment[site][0])
            )
        for level in gm.hidden_levels:
            # batched convolutions round differently: 1e-5 of the activations' scale (~4)
            close = {"rtol": 1e-5, "atol": 1e-4}
            torch.testing.assert_close(data["fhat"][level][j], in_scene.td[level][0], **close)
            torch.testing.assert_close(data["targets"][level][j], target[level][0], **close)


def test_the_scene_fine_tune_lowers_the_scene_loss():
    from pyro_backpass import GenerativeModel

    gm = GenerativeModel.default()
    module = _module("path_decoders")
    data, scene = module.training_data(gm, 1), module.scene_training_data(gm, 1)
    idx = torch.arange(scene["labels"].numel())
    with torch.no_grad():
        before = float(module.losses(gm, scene, idx)[1])
    tuned = module.fine_tune(gm, data, mix=0.0, path_weight=0.0, scene=scene, scene_weight=1.0,
                             epochs=3, batch=10)  # fmt: skip
    with torch.no_grad():
        after = float(module.losses(tuned, scene, idx)[1])
    assert after < before


def test_path_decoders_fine_tune_lowers_the_path_loss():
    """One epoch of the fine-tune on a few objects lowers the loss it minimises, and the
    shipped model is left untouched (the fine-tune works on a copy)."""
    from pyro_backpass import GenerativeModel

    gm = GenerativeModel.default()
    module = _module("path_decoders")
    data = module.training_data(gm, 2)
    idx = torch.arange(data["labels"].numel())
    with torch.no_grad():
        before = float(module.losses(gm, data, idx)[0])
    kernels = gm.steps["conv1_1"].weight.detach().clone()
    tuned = module.fine_tune(gm, data, mix=0.0, epochs=3, batch=10)
    with torch.no_grad():
        after = float(module.losses(tuned, data, idx)[0])
    assert after < before
    assert torch.equal(gm.steps["conv1_1"].weight, kernels)


@pytest.mark.slow  # ~30 s: fits a tiny verifier on the smoke model
def test_verifier_cues_smoke(tmp_path):
    out = tmp_path / "cues.json"
    _smoke(BENCH.parent / "verifier_cues.py", "--smoke", "--name", "smoke", "--scenes",
           "2", "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    choices = result["choices"]
    for value in choices["correlation_with_iou"].values():
        assert value != value or -1.0 <= value <= 1.0  # NaN: no list varies
    assert all(0.0 <= v <= 1.0 for v in choices["verifier_choice_mask"].values())
    for name, row in choices.items():
        if name not in ("cross_validated", "correlation_with_iou", "verifier_choice_mask",
                        "verifier_halves"):  # fmt: skip
            # No choice among the descents beats the best of them.
            assert row["hit@0.5"] <= choices["bound"]["hit@0.5"], name
            assert row["hit@0.3"] <= choices["bound"]["hit@0.3"], name


def test_verifier_cues_choices_pick_the_top_scored_descent():
    """Hit rates from hand-made lists: each choice takes its score's argmax."""
    module = _module("verifier_cues")
    t = torch.tensor
    lists = [
        {"verifier": t([2.0, 1.0, 0.0]), "class_map": t([0.0, 0.0, 5.0]),
         "log_joint": t([0.0, 9.0, 0.0]), "iou": t([0.6, 0.1, 0.35]),
         "precision": t([0.9, 0.2, 0.5]), "recall": t([0.6, 0.1, 0.4])},
        {"verifier": t([0.0, 1.0, 0.0]), "class_map": t([3.0, 0.0, 0.0]),
         "log_joint": t([0.0, 0.0, 9.0]), "iou": t([0.2, 0.7, 0.0]),
         "precision": t([0.3, 0.7, 0.0]), "recall": t([0.3, 0.9, 0.0])},
    ]  # fmt: skip
    rows = module.choices(lists, [0.1, 10.0], cues=("class_map",))
    assert rows["bound"] == {"hit@0.5": 1.0, "hit@0.3": 1.0}
    assert rows["verifier_choice_mask"] == pytest.approx({"precision": 0.8, "recall": 0.75})
    assert rows["verifier"] == {"hit@0.5": 1.0, "hit@0.3": 1.0}
    assert rows["log_joint"] == {"hit@0.5": 0.0, "hit@0.3": 0.0}
    assert rows["class_map"] == {"hit@0.5": 0.0, "hit@0.3": 0.5}
    assert rows["verifier + 10·class_map"] == rows["class_map"]
    assert rows["verifier + 0.1·class_map"] == rows["verifier"]
    # Each half alone: the verifier (a = 0) already hits; ties keep the first candidate, 0.
    assert [f["a"] for f in rows["cross_validated"]["class_map"]] == [0.0, 0.0]
    assert rows["verifier_halves"] == [{"hit@0.5": 1.0, "hit@0.3": 1.0}] * 2
    # The mean over the two lists of numpy's Pearson correlation.
    expected = np.mean([np.corrcoef([0, 0, 5], [0.6, 0.1, 0.35])[0, 1],
                        np.corrcoef([3, 0, 0], [0.2, 0.7, 0.0])[0, 1]])  # fmt: skip
    assert rows["correlation_with_iou"]["class_map"] == pytest.approx(expected)


def test_clutter_figure_smoke(tmp_path):
    out = tmp_path / "figure.png"
    script = BENCH.parent / "clutter_figure.py"
    _smoke(
        script, "--smoke", "--scenes", "1", "--out", str(out), "--levers", "base", "s0x0.5@upper"
    )
    assert out.stat().st_size > 0


def test_veto_diagnosis_smoke(tmp_path):
    out = tmp_path / "veto.json"
    script = BENCH.parent / "veto_diagnosis.py"
    _smoke(script, "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    for row in result["element_auc"].values():
        assert 0.0 <= row["on_share"] <= 1.0
        for key in ("auc_phi", "auc_phi_alone", "auc_fhat", "auc_bu"):
            assert row[key] != row[key] or 0.0 <= row[key] <= 1.0  # NaN only without positives
        assert 0.0 <= row["clutter_on_phi_zero"] + row["clutter_on_phi_positive"] <= 1.0
        assert 0.0 <= row["phi_zero_share"] <= 1.0
    assert result["clamp_ladder"]["objects"] > 0
    clean = [k for k in result["clamp_ladder"] if k.startswith("clean_state_at_")]
    assert len(clean) == len(result["element_auc"]) - 1  # every level but the image
    assert all(0.0 <= result["clamp_ladder"][k] <= 1.0 for k in clean)
    for key in ("bu_global_threshold", "bu_channel_thresholds", "fhat_global_threshold"):
        assert 0.0 <= result["readout"][key] <= 1.0
    assert len(result["readout"]["channel_thresholds_bu"]) > 0  # one per channel of the level


def test_roc_auc_matches_brute_force():
    """The benchmark's AUC (scipy's U) equals the pairwise count, ties half."""
    import torch

    veto = _module("veto_diagnosis")
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    pos = torch.rand(40, generator=g) < 0.3
    p, n = score[pos], score[~pos]
    brute = ((p[:, None] > n[None]).double() + 0.5 * (p[:, None] == n[None]).double()).mean()
    assert abs(veto.roc_auc(score, pos) - float(brute)) < 1e-12


@pytest.mark.slow  # a subprocess that loads the shipped model: ~5-12 s
def test_top_level_time_smoke(tmp_path):
    out = tmp_path / "time.json"
    script = BENCH.parent / "top_level_time.py"
    _smoke(script, "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["models"]["GenerativeModel.default()"]["top_hypotheses"] == 500
    assert len(result["seconds_per_image"]) == 2 and min(result["seconds_per_image"].values()) > 0


@pytest.mark.slow  # ~30 s: the smoke model is trained, and rerank completes k descents per scene
def test_clutter_levers_choice_levers_smoke(tmp_path):
    out = tmp_path / "levers.json"
    _smoke(BENCH.parent / "clutter_levers.py", "--smoke", "--out", str(out), "--levers", "stat2",
           "rerank2x1", "verify2")  # fmt: skip
    rows = json.loads(out.read_text())["levers"]
    assert set(rows) == {"stat2", "rerank2x1", "verify2"}
    for r in rows.values():
        assert 0.0 <= r["hit@0.5"] <= r["hit@0.3"] <= 1.0 and 0.0 <= r["best_iou"] <= 1.0


def test_decoder_capacity_decoders_have_the_model_steps_shapes_and_best_component_is_brute():
    """The probe's decoders map a level's input to the shape the model's own step produces
    (conv: same size; unpool: twice), and the best component is the brute-force argmin."""
    import torch

    from pyro_backpass import GenerativeModel

    dcap = _module("decoder_capacity")
    gm = GenerativeModel.default()
    for name in ("conv4_1", "pool3", "conv1_1"):
        step = gm.steps[name]
        x = torch.rand(2, *step.upper.shape)
        for layers, k, kernel in dcap.DECODERS.values():
            unpool = step.kind == "unpool"
            dec = dcap.Decoder(step.upper.channels, step.out.channels, unpool=unpool,
                               layers=layers, k=k, kernel=kernel)  # fmt: skip
            assert dec(x).shape == (2, k, *step.out.shape)
        assert step.phi_all(x).shape == (2, step.num_components, *step.out.shape)
    g = torch.Generator().manual_seed(0)
    phi, target = torch.rand(4, 3, 2, 5, 5, generator=g), torch.rand(4, 2, 5, 5, generator=g)
    best, err = dcap.best_component(phi, target)
    for i in range(4):
        errs = [float(((phi[i, j] - target[i]) ** 2).sum()) for j in range(3)]
        j = min(range(3), key=errs.__getitem__)
        assert torch.equal(best[i], phi[i, j]) and abs(float(err[i]) - errs[j]) < 1e-4


def test_decoder_capacity_runs_on_the_shipped_model(tmp_path):
    from importlib import resources

    dcap = _module("decoder_capacity")
    out = tmp_path / "dcap.json"
    ref = resources.files("pyro_backpass").joinpath("weights", "generative_model.safetensors")
    with resources.as_file(ref) as path:
        dcap.main(["--model", str(path), "--train-scenes", "1", "--scenes", "1", "--steps", "2",
                   "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["objects"] > 0 and len(result["steps_auc"]) == 7
    for row in result["steps_auc"].values():
        for key, value in row.items():
            if key.startswith("auc_"):
                assert value != value or 0.0 <= value <= 1.0  # NaN only without positives


@pytest.mark.slow
def test_mask_readout_smoke(tmp_path):
    out = tmp_path / "mask_readout.json"
    _smoke(BENCH.parent / "mask_readout.py", "--smoke", "--compare", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["readout"]["levels"] and result["readout"]["hidden"] == 2  # the smoke preset's
    assert len(result["validation_compare"]) == 4
    for row in result["validation_compare"].values():
        assert 0 <= row["validation_iou"] <= 1 and 0 <= row["validation_scene_iou"] <= 1
    for scale in ("test_default_scale", "test_scene_scale"):
        assert 0 <= result[scale]["readout"] <= 1 and 0 <= result[scale]["rule"] <= 1
    _smoke(BENCH.parent / "mask_readout.py", "--smoke", "--compare", "--variants",
           "net16_image_scenes", "--out", str(out))  # fmt: skip
    (row,) = json.loads(out.read_text())["validation_compare"].values()
    assert row["levels"][0] == "image" and 0 <= row["validation_scene_iou"] <= 1
    model = tmp_path / "input.safetensors"
    _smoke(BENCH.parent / "mask_readout.py", "--smoke", "--refit", "--readout-input", "--save",
           str(model), "--out", str(out))  # fmt: skip
    assert json.loads(out.read_text())["readout"]["reads_input"] is True
    from pyro_backpass import GenerativeModel

    assert GenerativeModel.load(model).mask_readout.reads_input


def test_per_location_pass_without_map_levels_is_greedy_map():
    """Lever 5's pass with no γ map (and the n-gram link once) is the plain backward pass:
    the same choices on every level and the same mask as ``greedy_map`` (the oracle)."""
    from pyro_backpass import GenerativeModel, Scenes, greedy_map
    from pyro_backpass.data import split_seed

    pl = _module("per_location")
    gm = GenerativeModel.default()
    scene = next(iter(Scenes(1, seed=split_seed("validation"))))
    acts = gm.backbone(scene.image[None])
    bu = {n: v for n, v in acts.items() if n in gm.hidden_levels}
    label = torch.tensor([gm.categories.index("airplane")])
    plain = greedy_map(gm, bu, category=label)
    top = gm.hidden_levels[-1]
    top_values = {s: plain.assignment[s] for s in ("category", f"gamma_{top}", f"delta_{top}")}
    td, values, _ = pl.per_location_pass(gm, bu, top_values, levels=(), coupling=0.0)
    for site, value in plain.assignment.items():
        assert torch.equal(values[site], value), site
    from pyro_backpass.inference import object_mask

    assert torch.equal(object_mask(gm, td, bu), plain.mask)
    # With γ maps on two levels: one label per location of each level's own grid.
    _, maps, _ = pl.per_location_pass(gm, bu, top_values, levels=("pool3", "conv3_1"), coupling=2.0)
    for name in ("pool3", "conv3_1"):
        assert maps[f"gamma_{name}"].shape == (1, *gm.steps[name].out.shape[1:])
        assert int(maps[f"gamma_{name}"].max()) < gm.steps[name].num_components


@pytest.mark.slow  # the pass itself is covered by the test above in the default run
def test_per_location_benchmark_runs(tmp_path):
    pl = _module("per_location")
    out = tmp_path / "pl.json"
    result = pl.main(["--scenes", "1", "--levels", "none", "pool3", "--couplings", "0", "inf",
                      "--out", str(out), "--figure", str(tmp_path / "pl.png")])  # fmt: skip
    assert (tmp_path / "pl.png").stat().st_size > 0
    rows = json.loads(out.read_text())["variants"]
    assert (
        set(rows)
        == {"none link=1", "pool3 w=0 link=1", "pool3 w=inf link=1"}
        == set(result["variants"])
    )
    assert rows["none link=1"]["base_matches_greedy"] is True
    for r in rows.values():
        for key in ("hit@0.5", "hit@0.3", "best_iou", "top_clamped", "alone_plain"):
            assert 0.0 <= r[key] <= 1.0


def test_fit_verifier_smoke(tmp_path):
    """The shipped model on three train scenes and two lone train objects, two validation
    scenes and one lone validation object, k = 4: every L2 is fitted and scored on each, the
    choice is one of them, and nothing is shipped."""
    out = tmp_path / "fit_verifier.json"
    _smoke(BENCH.parent / "fit_verifier.py", "--smoke", "--out", str(out), "--l2", "1", "10",
           "--objects", "2", "--validation-objects", "1", "--hidden", "4", "--ensemble", "2",
           "--epochs", "1")  # fmt: skip
    result = json.loads(out.read_text())
    assert result["shipped"] is False and result["top_k"] == 4
    assert set(result["l2"]) == {"1.0", "10.0"} and result["chosen_l2"]["airplane"] in (1.0, 10.0)
    assert result["train_examples"] == 3 and result["validation_examples"] == 2
    assert result["train_objects"] == 2 and result["validation_objects"] == 1
    assert set(result["hidden"]) == {"hidden=4"}
    assert result["chosen"]["airplane"] in ("1.0", "10.0", "hidden=4")
    for row in [*result["l2"].values(), *result["hidden"].values()]:
        for split in ("train", "validation", "validation_objects"):
            r = row["airplane"][split]
            assert r["examples"] > 0
            if r.get("fitted", True):
                assert 0.0 <= r["verified"]["hit@0.5"] <= r["verified"]["hit@0.3"] <= 1.0


def test_fit_verifier_scores_a_saved_verifier_as_its_fit_did(tmp_path):
    """``--score FILE`` with ``--scenes 0 --objects 0`` (no fit) reads a verifier written by
    ``--save`` and scores it on the same validation scenes and objects: the numbers of the
    chosen fit's own row."""
    fitted, scored, weights = tmp_path / "fit.json", tmp_path / "scored.json", tmp_path / "v.st"
    _smoke(BENCH.parent / "fit_verifier.py", "--smoke", "--out", str(fitted), "--l2", "1",
           "--objects", "1", "--validation-objects", "1", "--save", str(weights))  # fmt: skip
    _smoke(BENCH.parent / "fit_verifier.py", "--smoke", "--out", str(scored), "--scenes", "0",
           "--objects", "0", "--validation-objects", "1", "--score", str(weights))  # fmt: skip
    fit, score = json.loads(fitted.read_text()), json.loads(scored.read_text())
    row = fit["l2"]["1.0"]["airplane"]
    mine = score["scored"][str(weights)]["airplane"]
    assert mine["validation"] == row["validation"]
    assert mine["validation_objects"] == row["validation_objects"]


@pytest.mark.slow  # ~15 s: one object per scale, a 100-descent verified pass each
def test_verified_objects_smoke(tmp_path):
    out = tmp_path / "verified_objects.json"
    _smoke(BENCH.parent / "verified_objects.py", "--smoke", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"default_scale", "scene_scale"}
    for per_category in rows.values():
        for r in per_category.values():
            assert 0.0 <= r["mask_iou_greedy"] <= 1.0 and 0.0 <= r["mask_iou_verified"] <= 1.0


def test_verifier_probes_smoke(tmp_path):
    """The crop probe on one validation scene (k = 4) runs and scores every choice."""
    out = tmp_path / "probes.json"
    _smoke(BENCH.parent / "verifier_probes.py", "--probe", "crop", "--smoke", "--out", str(out))
    choices = json.loads(out.read_text())["crop"]["choices"]
    assert {"verifier", "best_of_k", "zoomed_masked", "zoomed_context"} <= set(choices)


def test_zoomed_views_cut_the_box_and_fill_outside_the_mask():
    """A red 8×8 box on grey, a blue patch beside it: with a 50 % margin the box fills the
    view's middle half; outside the mask the masked view shows the grey median, the context
    view the blue patch (constructed answers, not the probe's own output)."""
    zoomed_views = _module("verifier_probes").zoomed_views
    image = torch.full((3, 32, 32), 0.5)
    image[:, 12:20, 12:20] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # the box
    image[:, 12:20, 21:24] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # beside it
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 12:20, 12:20] = True
    masked, context = (zoomed_views(image, mask, masked=m, size=16, margin=0.5)[0]
                       for m in (True, False))  # fmt: skip
    red = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    assert torch.allclose(masked[:, 5:11, 5:11], red.expand(3, 6, 6))  # the box, at 1:1
    assert torch.allclose(context[:, 5:11, 5:11], red.expand(3, 6, 6))
    assert torch.allclose(masked[:, 6:10, 13:15], torch.full((3, 4, 2), 0.5))  # grey median
    assert torch.allclose(context[:, 6:10, 13:15],
                          torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 4, 2))  # fmt: skip
    assert torch.allclose(masked[:, :2], torch.full((3, 2, 16), 0.5))  # beyond the box: grey


def test_relative_features_are_z_scores_within_the_list():
    """The second half is each column's z-score among the k rows (numpy's mean and sample
    standard deviation); a constant column gives 0, not NaN."""
    relative_features = _module("verifier_probes").relative_features
    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, -1.0], [8.0, 5.0, 0.5]], dtype=torch.float64)
    out = relative_features(x)
    a = x.numpy()
    z = (a - a.mean(0)) / np.where(a.std(0, ddof=1) > 0, a.std(0, ddof=1), 1.0)
    assert out.shape == (3, 6)
    assert torch.equal(out[:, :3], x)
    np.testing.assert_allclose(out[:, 3:].numpy(), z, atol=1e-12)


def test_voted_masks_weigh_the_best_scored_and_keep_one_object():
    """Three masks of equal score: rows 0-3, rows 0-1 and rows 6-7. Over all three each has
    weight 1/3, so only rows 0-1 (2/3) pass 0.5; kept to the best-scored one's object (rows 6-7
    do not overlap it), rows 0-3 each have ≥ 1/2 (worked by hand)."""
    voted_masks = _module("verifier_probes").voted_masks
    masks = torch.zeros(3, 8, 4, dtype=torch.bool)
    masks[0, 0:4], masks[1, 0:2], masks[2, 6:8] = True, True, True
    scores = torch.tensor([0.0, 0.0, 0.0])
    rows = torch.arange(8)[:, None].expand(8, 4)
    assert torch.equal(voted_masks(masks, scores, m=3, same_object=False), rows < 2)
    assert torch.equal(voted_masks(masks, scores, m=3, same_object=True), rows < 4)
    # m = 1 of three: the first listed of the tied (a stable order), rows 0-3
    assert torch.equal(voted_masks(masks, scores, m=1, same_object=False), rows < 4)
    # a much higher score on the third: it alone decides
    scores = torch.tensor([0.0, 0.0, 10.0])
    assert torch.equal(voted_masks(masks, scores, m=3, same_object=False), rows >= 6)
    # m = 2 keeps the two best (masks 2 and 0): 2 weighs just over half, so only its rows pass
    scores = torch.tensor([1.0, -5.0, 1.0 + 1e-3])
    assert torch.equal(voted_masks(masks, scores, m=2, same_object=False), rows >= 6)


def test_grow_is_a_square_neighbourhood():
    """One pixel grown by 1 is its 3×3 neighbourhood, cut at the border."""
    grow = _module("verifier_probes").grow
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[0, 2] = True
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[0:2, 1:4] = True
    assert torch.equal(grow(mask, 1), want)


def test_objectness_cues_on_a_red_square():
    """A red 4×4 square on grey (colour distance √0.75 across its edge): its own mask has every
    boundary pair on the edge; a mask shifted 2 columns right has 4 of its 12 pairs there
    (worked by hand); an empty mask gets zeros."""
    cues_of = _module("verifier_probes").objectness_cues
    image = torch.full((3, 8, 8), 0.5)
    image[:, 2:6, 2:6] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 2:6, 4:8] = True
    cues = cues_of(image, masks)
    d = 0.75**0.5
    assert torch.allclose(cues["boundary_contrast"], torch.tensor([d, 4 * d / 12, 0.0]).double())
    assert torch.allclose(cues["edge_share"], torch.tensor([1.0, 4 / 12, 0.0]).double())
    assert abs(float(cues["ring_contrast"][0]) - d) < 1e-9
    assert float(cues["ring_contrast"][2]) == 0.0
    whole = cues_of(image, torch.ones(1, 8, 8, dtype=torch.bool))  # no boundary, no ring
    assert float(whole["boundary_contrast"][0]) == 0.0 and float(whole["ring_contrast"][0]) == 0


@pytest.mark.slow  # ~30 s: two train scenes, one validation scene, lone objects
def test_fit_lower_verifier_smoke(tmp_path):
    """The second stage behind the shipped first stage, one level below the top: every
    candidate and variant fitted and scored on each split, nothing read from a cache or
    shipped."""
    out = tmp_path / "lower.json"
    _smoke(BENCH.parent / "fit_lower_verifier.py", "--smoke", "--out", str(out), "--l2", "1",
           "--hidden", "4", "--objects", "1", "--validation-objects", "1")  # fmt: skip
    result = json.loads(out.read_text())
    assert result["shipped"] is False and result["levels_below"] == ["conv4_1"]
    assert result["completions"] == 5 and result["first_stage_top_k"] == 100
    assert set(result["candidates"]) == {"1.0", "hidden=4"}
    assert result["chosen"] in ("1.0", "hidden=4")
    assert result["examples"] == {"train": 2, "train_objects": 1, "validation": 1,
                                  "validation_objects": 1}  # fmt: skip
    assert result["cached"] == [] and isinstance(result["beats_first_stage"], bool)
    for row in [*result["candidates"].values(), *result["variants"].values()]:
        assert row["validation"]["n"] == 1 and row["validation_objects"]["n"] == 1


@pytest.mark.slow  # ~2 min: nine probes (fits, votes, cues, refined passes) on a few inputs
def test_verifier_probes_two_layer_and_lone_smoke(tmp_path):
    out = tmp_path / "probes.json"
    probes = ("two_layer", "lone", "list_context", "vote", "objectness", "refine", "lower_choice",
              "mask_head", "mask_head_below")  # fmt: skip
    for probe in probes:
        _smoke(BENCH.parent / "verifier_probes.py", "--probe", probe, "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result) == set(probes)
    lower = result["lower_choice"]["choices"]
    # the chosen descent is one of the enumerated completions below its top level
    assert lower["best_below_top"]["iou"] >= lower["verifier"]["iou"] - 1e-6
    assert {"verifier_on_completions", "edge_share_below_top"} <= set(lower)
    head = result["mask_head"]["choices"]
    assert {"verifier", "best_of_k", "head", "verifier+1.0*head"} <= set(head)
    assert len({row["n"] for row in head.values()}) == 1  # every choice on the same scenes
    assert set(result["mask_head_below"]["choices"]) == set(head)
    assert {"paint_r8_x2", "observe_r4"} <= set(result["refine"]["choices"]["objects"])
    assert {"edge_share", "verifier+1.0*ring_contrast"} <= set(result["objectness"]["choices"])
    assert {"verifier", "vote3", "vote10_same_object"} <= set(result["vote"]["choices"]["scenes"])
    context = result["list_context"]["categories"]["airplane"]
    assert {"library", "absolute", "relative", "soft", "relative+soft"} <= set(context)
    assert "per_seed" in context["soft"]  # soft targets need no hit to fit
    lone = result["lone"]["categories"]["airplane"]
    assert set(lone) == {"greedy_map", "best_of_k", "largest_completed_log_joint", "verifier"}
    assert 0.0 <= result["two_layer"]["categories"]["airplane"]["two_layer"]["hit@0.5"] <= 1.0


@pytest.mark.slow  # ~15 s: five scenes' descents at k = 4
def test_fit_verifier_extends_a_smaller_cache(tmp_path):
    """A cache of the first 2 scenes, extended to 3, holds the same descents as 3 computed
    without a cache (scene i does not depend on n); the files sit under the model's
    fingerprint, so another model's descents are never read."""
    from pyro_backpass import GenerativeModel
    from pyro_backpass.inference import verifier_fingerprint

    fit_verifier = _module("fit_verifier")
    gm = GenerativeModel.default()
    kw = dict(gm=gm, workers=1, top_k=4, categories=["airplane"], model=None)
    fit_verifier.examples("validation", 2, cache=tmp_path, **kw)
    extended = fit_verifier.examples("validation", 3, cache=tmp_path, **kw)
    fresh = fit_verifier.examples("validation", 3, cache=None, **kw)
    assert [p.name for p in tmp_path.iterdir()] == [verifier_fingerprint(gm)[:16]]
    assert sorted(p.name for p in (tmp_path / verifier_fingerprint(gm)[:16]).iterdir()) == [
        "validation_airplane_n2_k4.pt",
        "validation_airplane_n3_k4.pt",
    ]
    assert len(extended) == len(fresh) == 3
    for a, b in zip(extended, fresh, strict=True):
        assert torch.allclose(a.features, b.features) and torch.equal(a.hits, b.hits)


@pytest.mark.slow  # ~30 s: a smoke training, then its last stage again
def test_refit_is_train_models_last_stage(tmp_path):
    """The smoke training's hard-EM checkpoint, given the final model's per-channel background
    (fitted before the last stage), refitted by ``refit`` with the preset's multipliers, equals
    the model ``train_model`` wrote: the same σ0, mask threshold and mask readout."""
    from pyro_backpass import GenerativeModel
    from pyro_backpass.learning import PRESETS, train_model

    module = _module("path_decoders")
    config = PRESETS["smoke"]
    final = train_model(config, out_dir=tmp_path, progress=False)
    gm = GenerativeModel.load(tmp_path / "hard_em.safetensors")
    for level, obs in gm.observations.items():
        ref = final.observations[level]
        obs.background, obs.scale_off = ref.background.clone(), ref.scale_off.clone()
    gm.observations["conv1_1"].mask_threshold.fill_(123.0)  # must be tuned again
    module.refit(gm, config=config, multipliers=config.calibration_multipliers)
    for level in gm.hidden_levels:
        torch.testing.assert_close(gm.steps[level].scale_td, final.steps[level].scale_td)
        torch.testing.assert_close(gm.observations[level].mask_threshold,
                                   final.observations[level].mask_threshold)  # fmt: skip
    assert final.mask_readout is not None
    for a, b in zip(gm.mask_readout.state_dict().values(),
                    final.mask_readout.state_dict().values(), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


def test_dprior_then_verified_passes_the_learned_priors_per_call():
    from pyro_backpass import GenerativeModel

    levers = _module("clutter_levers")
    gm = GenerativeModel.default()
    top = gm.hidden_levels[-1]
    uniform = gm.priors[f"delta_{top}"].log_probs().exp().clone()
    model, choice = levers.apply_lever(gm, "dpriortop1,verified2")
    assert model is gm and choice[:2] == ("verified", True)
    assert torch.equal(gm.priors[f"delta_{top}"].log_probs().exp(), uniform)  # untouched
    priors = choice[2]
    assert f"delta_{top}" in priors and "delta_pool3" in priors
    assert not torch.allclose(priors[f"delta_{top}"].log_probs().exp(), uniform)


def test_readout_inputs_smoke(tmp_path):
    out = tmp_path / "readout_inputs.json"
    _smoke(BENCH.parent / "readout_inputs.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"fhat", "fhat_phi3", "fhat_phi5", "fhat_bu",
                                       "fhat_phi5_bu", "bu_only"}  # fmt: skip
    for row in result["variants"].values():
        assert 0 <= row["objects"] <= 1 and 0 <= row["scene_objects_top_clamped"] <= 1


def test_readout_inputs_phi_is_the_top_down_prediction_the_pass_combined():
    """Where an element is unobserved, the closed form's F̂ is φ (the top-down prediction
    alone), so with every level unobserved the benchmark's φ must equal the pass's F̂."""
    from pyro_backpass import GenerativeModel, greedy_map, sample

    ri = _module("readout_inputs")
    gm = GenerativeModel.random([3, "M", 4, "M"], num_components=2, num_categories=2,
                                image_size=8, seed=0)  # fmt: skip
    s = sample(gm, 3, observe=True, seed=1)
    observed = {n: torch.zeros(1, 1, *v.shape[2:], dtype=torch.bool) for n, v in s.bu.items()}
    r = greedy_map(gm, s.bu, observed=observed)
    maps = ri._maps(gm, r, s.bu)
    for name in ("conv1_1", "pool1"):
        torch.testing.assert_close(maps[f"phi_{name}"], r.td[name])
        assert torch.equal(maps[f"bu_{name}"], s.bu[name])


def test_refocus_smoke(tmp_path):
    out = tmp_path / "refocus.json"
    _smoke(BENCH.parent / "refocus.py", "--smoke", "--radii", "0", "4", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"none", "0", "4"}
    for row in result["rows"].values():
        for key in ("top_clamped", "oracle_view", "alone"):
            assert 0.0 <= row[key] <= 1.0
        assert 0.0 <= row["greedy"]["hit@0.5"] <= row["greedy"]["hit@0.3"] <= 1.0
    errors = result["top_clamped_errors"]
    assert 0.0 <= errors["precision"] <= 1.0 and 0.0 <= errors["recall"] <= 1.0
    # without refocus the view is the whole scene: the oracle row is the top-clamped pass
    assert result["rows"]["none"]["oracle_view"] == result["rows"]["none"]["top_clamped"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_refocus_dilation_and_top_pixels_match_brute_force():
    """``dilate`` is scipy's binary dilation by a square; ``top_pixels`` keeps the n largest
    values (a full sort)."""
    from scipy import ndimage

    module = _module("refocus")
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 20, 17, generator=gen) > 0.93
    for radius in (0, 1, 3):
        expected = np.stack([ndimage.binary_dilation(m.numpy(),
                                                     structure=np.ones((2 * radius + 1,) * 2))
                             for m in masks])  # fmt: skip
        assert (module.dilate(masks, radius).numpy() == expected).all(), radius
    logits = torch.randn(1, 9, 11, generator=gen)
    kept = module.top_pixels(logits, 17)
    threshold = logits.flatten().sort(descending=True).values[16]
    assert int(kept.sum()) == 17 and bool((kept == (logits >= threshold)).all())


def test_refocus_on_a_region_covering_the_image_is_the_clamped_pass():
    """A region that covers the whole image shows the scene unchanged: the refocused pass is
    ``greedy_map`` on the scene with the first pass's category and top level clamped — here
    the first pass itself (greedy's descent below a top level does not depend on the clamp)."""
    from pyro_backpass import GenerativeModel, make_scene

    module = _module("refocus")
    gm = GenerativeModel.default()
    scene = make_scene(seed=3)
    bu = module.hidden_bu(gm, scene.image)
    first = module.greedy_map(gm, bu, category="airplane")
    again = module.refocus(gm, scene.image, first, radius=64, rounds=2)
    for site, value in first.assignment.items():
        torch.testing.assert_close(again.assignment[site], value, msg=site)
    torch.testing.assert_close(again.mask, first.mask)
    # a region of the mask alone changes the input below the top, never the clamped top
    near = module.refocus(gm, scene.image, first, radius=0)
    top = gm.hidden_levels[-1]
    for site in ("category", f"gamma_{top}", f"delta_{top}"):
        assert int(near.assignment[site]) == int(first.assignment[site]), site
    with pytest.raises(ValueError, match="radius"):
        module.refocus(gm, scene.image, first, radius=-1)


@pytest.mark.parametrize(
    "colour", [pytest.param(True, marks=pytest.mark.slow), False], ids=["colour_model", "crf"]
)
def test_mask_crf_smoke(tmp_path, colour):
    """The default run: the CRF rows; ``make test-all`` adds the colour model's rows."""
    out = tmp_path / "crf.json"
    extra = ["--colour-model"] if colour else []
    _smoke(BENCH.parent / "mask_crf.py", "--smoke", *extra, "--out", str(out))
    result = json.loads(out.read_text())
    colour_models = {n for n in result["rows"] if n.startswith("colour_model_")}
    assert len(colour_models) == (3 if colour else 0)
    assert set(result["rows"]) - colour_models == {"none", result["best_by_top_clamped"]}
    for row in result["rows"].values():
        assert 0.0 <= row["top_clamped"] <= 1.0 and 0.0 <= row["alone"] <= 1.0
        assert 0.0 <= row["greedy"]["hit@0.5"] <= row["greedy"]["hit@0.3"] <= 1.0
    assert out.with_suffix(".png").stat().st_size > 0


def test_colour_log_ratio_against_numpy_histograms():
    module = _module("mask_crf")
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(3, 6, 6, generator=gen)
    q = torch.rand(1, 6, 6, generator=gen)
    got = module.colour_log_ratio(q, image, local=0, bins=4)
    colours = image.permute(1, 2, 0).reshape(-1, 3).numpy()
    edges = [np.linspace(0, 1, 5)] * 3
    fg = np.histogramdd(colours, bins=edges, weights=q.flatten().numpy())[0] + 1
    bg = np.histogramdd(colours, bins=edges, weights=1 - q.flatten().numpy())[0] + 1
    ratio = np.log(fg / fg.sum()) - np.log(bg / bg.sum())
    cell = np.minimum((colours * 4).astype(int), 3)
    want = ratio[cell[:, 0], cell[:, 1], cell[:, 2]].reshape(1, 6, 6)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_verified_consensus_smoke(tmp_path):
    """Validation chooses the rule; test re-measures it end to end through ``verified_map`` and
    ``refine_mask``, which must agree with the benchmark's own choice on the same descents."""
    script = BENCH.parent / "verified_consensus.py"
    _smoke(script, "--smoke", "--out", str(tmp_path / "verified_consensus_validation.json"))
    val = json.loads((tmp_path / "verified_consensus_validation.json").read_text())
    assert set(val["chosen"]) == {"shipped"}
    _smoke(script, "--smoke", "--split", "test",
           "--out", str(tmp_path / "verified_consensus_test.json"))  # fmt: skip
    test = json.loads((tmp_path / "verified_consensus_test.json").read_text())
    rule = (
        "argmax" if val["chosen"]["shipped"] is None else f"consensus_{val['chosen']['shipped']:g}"
    )
    assert len(test["rows"]) == 7 and test["rows"]["shipped_argmax"]
    for key in ("hit@0.5", "hit@0.3", "iou"):
        assert test["end_to_end"][f"shipped_{rule}"][key] == pytest.approx(
            test["rows"][f"shipped_{rule}"][key], abs=1e-6
        )
        assert test["rows"][f"shipped_{rule}"][key] <= test["best_of_k"][key] + 1e-9


def test_verified_consensus_timing(tmp_path):
    """``verified_consensus.py --time``'s function, in process (its command line runs above)."""
    _module("verified_consensus").timing(1, tmp_path / "time.json", top_k=4)
    timed = json.loads((tmp_path / "time.json").read_text())
    assert timed["median_seconds"]["shipped"] > 0


def _expected_iou(mask: set, voters: list[set], weights: list[float]) -> float:
    """Σ_i w_i · IoU(mask, voter_i) over pixel sets (two empty sets: IoU 1)."""
    return sum(w * (len(mask & v) / len(mask | v) if mask | v else 1.0)
               for v, w in zip(voters, weights, strict=True))  # fmt: skip


def test_mbr_mask_against_brute_force_over_pixel_sets():
    mbr_mask = _module("lower_consensus").mbr_mask
    pixels = [(y, x) for y in range(3) for x in range(3)]
    every = [{p for j, p in enumerate(pixels) if bits >> j & 1} for bits in range(2**9)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        masks = torch.rand(4, 3, 3, generator=gen) > 0.5
        weights = torch.softmax(torch.randn(4, generator=gen, dtype=torch.float64), 0)
        voters = [{p for p in pixels if masks[i][p]} for i in range(4)]
        w = weights.tolist()
        marginal = {p: sum(wi for v, wi in zip(voters, w, strict=True) if p in v) for p in pixels}
        levels = {m for m in marginal.values() if m > 0}
        searched = voters + [{p for p in pixels if marginal[p] >= lv - 1e-12} for lv in levels]
        got = {p for p in pixels if mbr_mask(masks, weights)[p]}
        value = _expected_iou(got, voters, w)
        assert value == pytest.approx(max(_expected_iou(c, voters, w) for c in searched))
        assert value >= max(_expected_iou(v, voters, w) for v in voters) - 1e-12  # the medoid
        assert value <= max(_expected_iou(c, voters, w) for c in every) + 1e-12  # the optimum
    # Three masks, each a shared core of three pixels and one pixel of its own, equal weights:
    # the core (the marginal's top level, no voter's mask) has expected IoU 3/4 against each
    # voter's (1 + 2 · 3/5) / 3 = 0.733, so it is chosen.
    core = torch.zeros(3, 3, dtype=torch.bool)
    core[0] = True
    masks = core.repeat(3, 1, 1)
    for i in range(3):
        masks[i, 2, i] = True
    assert torch.equal(mbr_mask(masks, torch.full((3,), 1 / 3, dtype=torch.float64)), core)


def test_lower_consensus_smoke(tmp_path):
    out = tmp_path / "lower.json"
    _smoke(BENCH.parent / "lower_consensus.py", "--smoke", "--verifier", "--out", str(out))
    rows = json.loads(out.read_text())["mean_iou"]
    assert {"greedy", "log_joint", "best", "consensus_inf", "verifier_argmax"} <= set(rows)
    for name, value in rows.items():  # no choice among the completions beats their best
        # (a mask aggregated from the vote is no completion's: it only lies in [0, 1])
        top = 1.0 if name.startswith("aggregate_") else rows["best"] + 1e-9
        assert 0.0 <= value <= top, name
    rules = [f"aggregate_{r}_{p}nonempty" for r in ("marginal", "mbr") for p in ("", "uniform_")]
    assert set(rules) <= set(rows)
    merged = tmp_path / "merged.json"  # one run is its own merge
    _smoke(BENCH.parent / "lower_consensus.py", "--merge", str(out), "--out", str(merged))
    assert json.loads(merged.read_text())["mean_iou"] == pytest.approx(rows)
    # The library's consensus_below end to end, on the same scene and level, must reproduce
    # the consensus that lower_consensus.py computes from its parts (and greedy's own row).
    out2 = tmp_path / "below.json"
    _smoke(BENCH.parent / "consensus_below.py", "--smoke", "--split", "validation",
           "--out", str(out2))  # fmt: skip
    below = json.loads(out2.read_text())
    assert below["airplanes"] == json.loads(out.read_text())["airplanes"] > 0
    assert below["skip_empty"]
    assert below["top_clamped_consensus"]["iou"] == pytest.approx(
        rows["consensus_inf_nonempty"], abs=1e-6)  # fmt: skip
    assert below["top_clamped"]["iou"] == pytest.approx(rows["greedy"], abs=1e-6)
    assert out2.with_suffix(".png").is_file()
    for name in ("free", "free_consensus"):
        assert 0.0 <= below[name]["iou"] <= 1.0


@pytest.mark.slow
def test_consensus_below_weighted_smoke(tmp_path):
    """``consensus_below.py --weighted``: lower_consensus.py's row at the library's temperature
    (the unweighted run is in the default suite)."""
    out = tmp_path / "lower.json"
    _smoke(BENCH.parent / "lower_consensus.py", "--smoke", "--verifier", "--out", str(out))
    rows = json.loads(out.read_text())["mean_iou"]
    # Weighted by the refined verifier: lower_consensus.py's row at the library's temperature.
    out3 = tmp_path / "weighted.json"
    _smoke(BENCH.parent / "consensus_below.py", "--smoke", "--split", "validation", "--weighted",
           "--out", str(out3))  # fmt: skip
    weighted = json.loads(out3.read_text())
    assert weighted["weighted"]
    assert weighted["top_clamped_consensus"]["iou"] == pytest.approx(
        rows[f"verifier_consensus_{LOWER_TEMPERATURE:g}_nonempty"], abs=1e-6)  # fmt: skip

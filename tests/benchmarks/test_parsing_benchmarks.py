"""benchmarks/parse_threshold.py and parse_beam.py --smoke: run in seconds, write their results
(and ship nothing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_parse_threshold_smoke(tmp_path):
    shipped = tmp_path / "shipped.json"
    out = _load("parse_threshold").main(["--smoke", "--out", str(tmp_path / "t.json"),
                                         "--figure", str(tmp_path / "roc.png"),
                                         "--package-file", str(shipped)])  # fmt: skip
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["smoke"] is True and result["split"] == "validation"
    assert set(result["settings"]) == {"subtract/profile", "subtract/off", "unobserve/profile",
                                       "unobserve/off"}  # fmt: skip
    assert result["chosen"] == out["chosen"] and not shipped.exists()
    for row in result["settings"].values():
        assert {"llr", "fitted", "criterion", "cross_validated"} <= set(row)
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    # Refit on the steps it wrote, without parsing: the same steps, the same scores.
    again = _load("parse_threshold").main(["--smoke", "--out", str(tmp_path / "u.json"),
                                           "--figure", str(tmp_path / "roc2.png"),
                                           "--steps-from", str(tmp_path / "t.json"),
                                           "--features", "llr", "step"])  # fmt: skip
    for key, row in again["settings"].items():
        assert row["parsed"] == result["settings"][key]["parsed"]
        assert set(row["criterion"]["weights"]) <= {"llr", "step"}
        assert row["llr"]["pooled"]["steps"] == result["settings"][key]["llr"]["pooled"]["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("choice", [[], ["--choose", "--refine"]])
def test_parse_threshold_verified_smoke(tmp_path, choice):
    shipped = tmp_path / "shipped.json"
    _load("parse_threshold").main(["--smoke", "--verifier-top-k", "4", "--out",
                                   str(tmp_path / "t.json"), "--figure", str(tmp_path / "r.png"),
                                   "--package-file", str(shipped), *choice])  # fmt: skip
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["verifier_top_k"] == 4 and not shipped.exists()
    assert result["choose"] == result["refine_masks"] == bool(choice)
    assert (result["head_choice_sha256"] is not None) == bool(choice)
    assert list(result["settings"]) == ["unobserve/profile"]  # the plain parse's shipped setting
    steps = result["settings"]["unobserve/profile"]["llr"]["pooled"]["steps"]
    assert [len(s["labels"]) for s in steps] == [2, 2]  # smoke: 2 steps, one scene a regime


@pytest.mark.parametrize("args", [["--choose"], ["--refine"], ["--verifier-top-k", "4",
                                                                 "--refine"],
                                  ["--verifier-top-k", "4", "--heads-per-category", "2"],
                                  ["--verifier-top-k", "4", "--choose",
                                   "--heads-per-category", "0"],
                                  ["--verifier-top-k", "4", "--choose",
                                   "--refined-heads"]])  # fmt: skip
def test_parse_threshold_refuses_a_choice_without_a_verifier_and_crf_without_a_choice(args):
    with pytest.raises(SystemExit):
        _load("parse_threshold").main(["--smoke", *args])


def test_step_diagnosis_on_hand_built_masks():
    """Four steps on two true instances, each kind by construction: A found, A again, a
    third of B, clutter."""
    from types import SimpleNamespace

    import torch

    def box(r0, r1, c0, c1):
        m = torch.zeros(20, 20, dtype=torch.bool)
        m[r0:r1, c0:c1] = True
        return m

    a, b = box(0, 6, 0, 6), box(10, 16, 10, 16)
    truth = [SimpleNamespace(mask=m, amodal_mask=m, category=c)
             for m, c in ((a, "airplane"), (b, "car"))]  # fmt: skip
    scene = SimpleNamespace(instances=truth)
    steps = [(a, "airplane"), (box(0, 6, 0, 5), "airplane"), (box(10, 16, 10, 12), "airplane"),
             (box(18, 20, 0, 2), "car")]  # fmt: skip
    parse = SimpleNamespace(instances=[SimpleNamespace(mask=m, amodal_mask=m, category=c)
                                       for m, c in steps])  # fmt: skip
    module = _load("parse_threshold")
    labels = module.label_steps(parse, scene)
    assert labels == [True, False, False, False]
    got = module.step_diagnosis(parse, scene, labels)
    assert [d["kind"] for d in got] == ["new", "again", "part", "clutter"]
    assert [d["best_iou"] for d in got] == [1.0, round(30 / 36, 4), round(12 / 36, 4), 0.0]
    assert [d["category_right"] for d in got] == [True, True, False, False]


def test_head_labels_on_hand_built_masks():
    """Two steps over two true instances: step 1's heads are A (hit), a third of B (no); step 1
    takes A; step 2's heads are A again (no: found) and B (hit)."""
    from types import SimpleNamespace

    import torch

    def box(r0, r1, c0, c1):
        m = torch.zeros(20, 20, dtype=torch.bool)
        m[r0:r1, c0:c1] = True
        return m

    a, b = box(0, 6, 0, 6), box(10, 16, 10, 16)
    scene = SimpleNamespace(instances=[SimpleNamespace(mask=m, amodal_mask=m) for m in (a, b)])

    def head(m, category):
        return {"category": category, "llr": 1.0, "visible": float(m.sum()),
                "amodal": float(m.sum()), "class_log_probs": {}, "score": 0.0,
                "mask": m, "amodal_mask": m}  # fmt: skip

    steps = [
        SimpleNamespace(mask=a, amodal_mask=a, heads=[head(a, "airplane"),
                                                      head(box(10, 16, 10, 12), "car")]),
        SimpleNamespace(mask=b, amodal_mask=b, heads=[head(a, "airplane"), head(b, "car")]),
    ]  # fmt: skip
    got = _load("parse_threshold").head_labels(SimpleNamespace(instances=steps), scene)
    assert [[h["hit"] for h in step] for step in got] == [[True, False], [False, True]]
    assert [[h["best_iou"] for h in step] for step in got] == [[1.0, round(12 / 36, 4)],
                                                               [0.0, 1.0]]  # fmt: skip
    assert all("mask" not in h and "amodal_mask" not in h for step in got for h in step)
    plain = SimpleNamespace(instances=[SimpleNamespace(mask=a, amodal_mask=a, heads=None)])
    assert _load("parse_threshold").head_labels(plain, scene) is None


def test_fit_threshold_keeps_the_steps_before_the_first_low_score():
    fit = _load("parse_threshold").fit_threshold(
        [([9.0, 8.0, 1.0], [True, True, False], 2), ([7.0, 0.5], [True, False], 1)]
    )
    assert 1.0 <= fit["threshold"] < 7.0 and fit["f1"] == 1.0 and fit["count_accuracy"] == 1.0


def test_parse_beam_smoke(tmp_path):
    _load("parse_beam").main(["--smoke", "--out", str(tmp_path / "b.json")])
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["beams"]) == {"1", "2"}
    for row in result["beams"].values():
        assert set(row) == {"cluttered", "plain"}
        assert all(0 <= r["recall_iou50"] <= 1 for r in row.values())

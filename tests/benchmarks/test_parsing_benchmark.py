import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pyro_backpass import GenerativeModel

BENCH = Path(__file__).parents[2] / "benchmarks" / "parsing.py"


@pytest.mark.slow  # ~30-70 s: three parses of each scene, the Captum maps and their tuning
def test_parsing_benchmark_smoke(tmp_path):
    pytest.importorskip("captum")
    out = tmp_path / "parsing.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    for method in ("guided_backprop", "deconvolution", "guided_gradcam"):
        entry = result[method]
        for key in ("recall_iou50", "mean_matched_iou", "mask_ap", "count_accuracy",
                    "foreground_ari", "class_sensitivity"):  # fmt: skip
            assert 0.0 <= entry[key] <= 1.0, (method, key)
        assert entry["setting"]["threshold"] > 0
    ours = result["ours"]
    assert 0.0 <= ours["class_sensitivity"] <= 1.0
    if "not_run" not in ours:  # parse_scene present: the full set of metrics, and the sanity run
        assert 0.0 <= ours["recall_iou50"] <= 1.0 and 0.0 <= ours["mask_ap"] <= 1.0
        assert "recall_iou50" in result["sanity_check"]["ours_randomised"]
    beam = subprocess.run([sys.executable, str(BENCH), "--smoke", "--beam-row", "2", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert beam.returncode == 0, beam.stderr[-2000:]
    row = json.loads(out.read_text())["ours_beam2"]
    assert row["beam"] == 2 and 0.0 <= row["recall_iou50"] <= 1.0
    table = subprocess.run([sys.executable, str(BENCH), "--table", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "recall_iou50" in table.stdout and "ours_beam2" in table.stdout


def _added_row(tmp_path, *args: str) -> dict:
    """Run ``parsing.py --smoke <args>`` adding a row to an empty results file; the file."""
    out = tmp_path / "parsing.json"
    out.write_text("{}")
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(out.read_text())


def test_refined_row_is_added(tmp_path):
    """``--beam-row 1 --refine``: the parse with CRF-refined masks, as row ``ours_beam1_crf``."""
    row = _added_row(tmp_path, "--beam-row", "1", "--refine")["ours_beam1_crf"]
    assert row["beam"] == 1 and row["scenes"] == 2 and 0.0 <= row["recall_iou50"] <= 1.0


def load_benchmark():
    """The script as module ``parsing_benchmark``, registered in ``sys.modules`` so that its
    functions pickle by name (``run_ours(..., workers=2)`` sends one to its processes)."""
    spec = importlib.util.spec_from_file_location("parsing_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parsing_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def test_ours_path_with_a_stand_in_parse(tmp_path):
    """The benchmark's path for ``parse_scene``, driven by a stand-in built from the truth
    that misses each scene's last object and adds its clutter as a spurious instance: the
    metrics, the diagnosis and the figure see exactly those failures."""
    bench = load_benchmark()
    gm = GenerativeModel.default()
    scenes = bench.parse_scenes("test", 2)

    def stand_in(image):
        scene = next(s for s in scenes if torch.equal(s.image, image))
        found = [SimpleNamespace(category=i.category, mask=i.mask, amodal_mask=i.amodal_mask,
                                 score=1.0, reconstruction=i.image_alone, modes=[])
                 for i in scene.instances[:-1]]  # fmt: skip
        found.append(SimpleNamespace(category="car", mask=scene.clutter_mask, amodal_mask=None,
                                     score=0.1, reconstruction=image, modes=[]))  # fmt: skip
        return SimpleNamespace(instances=found, stop_reason="stand-in")

    ev, records = bench.run_ours(gm, scenes, stand_in)
    n_true = sum(len(s.instances) for s in scenes)
    summary = ev.summary()
    forked, _ = bench.run_ours(gm, scenes, stand_in, workers=2)  # two processes: the same
    assert forked.summary() == summary
    assert summary["recall_iou50"] == pytest.approx((n_true - 2) / n_true)
    assert summary["precision_iou50"] == pytest.approx((n_true - 2) / n_true)
    assert summary["count_accuracy"] == 1.0  # one missed, one spurious: the count is right
    diagnoses = [bench.diagnose(gm, scenes[r["scene"]], r) for r in records]
    for d, scene in zip(diagnoses, scenes, strict=True):
        assert [m["category"] for m in d["missed"]] == [scene.instances[-1].category]
        assert set(d["missed"][0]["rungs"]) == {"free", "top_clamped", "alone_plain"}
        assert len(d["spurious"]) == 1 and d["spurious"][0]["diagnosis"]
    path = tmp_path / "failures.png"
    bench.failure_figure(scenes, records, diagnoses, path)
    assert path.stat().st_size > 0


@pytest.mark.slow  # ~15 s: two validation scenes parsed with a verifier read from a file
def test_verified_row_on_validation_with_a_verifier_file(tmp_path):
    """A row on the validation split, with a verifier file, goes to a new results file under
    the given name and records the split, the scenes and that file's fingerprint; a test-split
    row still needs the benchmark's file first."""
    from pyro_backpass import DescentVerifier

    verifier = DescentVerifier.shipped()
    if verifier is None:
        pytest.skip("no shipped descent verifier")
    path = verifier.save(tmp_path / "verifier.safetensors")
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--verified-row", "4",
                          "--plain-criterion", "--row-split", "validation", "--verifier",
                          str(path), "--row-name", "mine", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(out.read_text())["mine"]
    assert row["split"] == "validation" and row["scenes"] == 2
    assert row["verifier_sha256"] == DescentVerifier.load(path).fingerprint()
    assert row["stop_criterion_fitted_on"] == "plain"
    missing = subprocess.run([sys.executable, str(BENCH), "--smoke", "--verified-row", "4",
                              "--out", str(tmp_path / "none.json")],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert missing.returncode != 0 and "run the benchmark first" in missing.stderr


def test_choice_row_is_added(tmp_path):
    """``--verified-row K --choose``: the verified parse whose heads the shipped HeadChoice
    chooses, as row ``ours_verified<K>_choice``, naming the choice it used."""
    from pyro_backpass import HeadChoice

    row = _added_row(tmp_path, "--verified-row", "4", "--choose")["ours_verified4_choice"]
    # without the CRF there are no refined masks to read: the shipped weights on the readout's
    assert row["head_choice"] == dataclasses.replace(HeadChoice.shipped(),
                                                     refined_heads=False).to_dict()  # fmt: skip
    assert row["scenes"] == 2 and 0.0 <= row["recall_iou50"] <= 1.0

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks" / "parsing.py"


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
    table = subprocess.run([sys.executable, str(BENCH), "--table", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "recall_iou50" in table.stdout

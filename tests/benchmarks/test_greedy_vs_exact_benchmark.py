"""Every benchmark script has a --smoke mode that runs here in seconds."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks"


def run_script(name, *args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(BENCH / name), run_name="__main__")


def test_greedy_vs_exact_smoke(tmp_path, monkeypatch):
    out = tmp_path / "gve.json"
    run_script("greedy_vs_exact.py", "--smoke", "--out", str(out), monkeypatch=monkeypatch)
    result = json.loads(out.read_text())
    row = result["settings"][0]
    assert {"levels", "K", "noise", "trials", "agreement", "logjoint_gap_median",
            "logjoint_gap_max", "time_greedy_s", "time_exact_s", "speedup"} <= set(row)  # fmt: skip
    assert row["logjoint_gap_median"] >= -1e-3 and 0 <= row["agreement"] <= 1
    assert "CPUs" in result["machine"]


def test_backward_pass_smoke(tmp_path, monkeypatch):
    out = tmp_path / "bp.json"
    run_script("backward_pass.py", "--smoke", "--device", "cpu", "--out", str(out),
               monkeypatch=monkeypatch)  # fmt: skip
    result = json.loads(out.read_text())
    assert {"base", "threads2", "category_given", "top_k15"} <= set(result["settings"])
    assert all(r["ratio"] > 0 for r in result["settings"].values())
    assert result["k_top_growth"]["time_ratio"] > 0
    for row in result["batches"].values():
        assert row["call_peak_rss_mb"] >= row["rss_before_call_mb"] > 0
    assert "CPUs" in result["machine"]
    assert {"no_huge_pages", "fresh_process"} <= set(result["settings"])
    assert result["settings"]["no_huge_pages"]["huge_pages_requested"] is False
    assert result["settings"]["fresh_process"]["page_faults_per_call"] >= 0


def test_backward_pass_shipped_only_smoke(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bp_shipped.json"
    run_script("backward_pass.py", "--smoke", "--shipped-only", "--device", "cpu", "--out",
               str(out), monkeypatch=monkeypatch)  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["settings"]) == {"base", "shipped_model"}
    assert all(r["ratio"] > 0 and r["greedy_s"] > 0 for r in result["settings"].values())
    run_script("backward_pass.py", "--shipped-only", "--table", "--out", str(out),
               monkeypatch=monkeypatch)  # fmt: skip
    assert "shipped model" in capsys.readouterr().out


def test_bool_kernels_smoke(tmp_path, monkeypatch):
    out = tmp_path / "bk.json"
    run_script("bool_kernels.py", "--smoke", "--out", str(out), monkeypatch=monkeypatch)
    result = json.loads(out.read_text())
    assert result["float_selection_equals_bool_selection"] is True
    assert result["ratio_to_float_multiply"]["float multiply a * b"] == 1.0


def test_reliability_smoke(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    run_script("reliability.py", "--smoke", "--out", str(out), monkeypatch=monkeypatch)
    result = json.loads(out.read_text())
    assert result["inputs_tried"] > 3
    assert result["counts"]["silent_wrong_or_unclear"] == 0, result["wrong"]


def test_top_k_memory_smoke(tmp_path, monkeypatch):
    out = tmp_path / "m.json"
    run_script("top_k_memory.py", "--smoke", "--out", str(out), monkeypatch=monkeypatch)
    rows = json.loads(out.read_text())["rows"]
    assert [r["top_k"] for r in rows] == [1, 10]
    assert all(r["call_peak_bytes"] >= 0 and r["seconds"] > 0 for r in rows), rows

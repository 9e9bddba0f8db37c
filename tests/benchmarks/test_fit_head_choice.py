"""benchmarks/fit_head_choice.py: the smoke collection, and the fit on hand-built record files
where the classifier's reading tells the hit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pyro_backpass import HeadChoice

CATS = ("airplane", "bird", "boat")


def _file(path: Path, n: int, seed: int, **overrides) -> Path:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        own = rng.normal(-3.0, 1.0, size=len(CATS))
        heads = [{"category": c, "llr": float(rng.normal(-5000, 500)),
                  "visible": float(rng.integers(20, 300)), "amodal": 300.0,
                  "class_log_probs": dict.fromkeys(CATS, -9.0) | {c: float(own[j])},
                  "best_iou": 0.0, "hit": bool(j == own.argmax())}
                 for j, c in enumerate(CATS)]  # fmt: skip
        records.append({"scene": i, "heads": heads})
    record = {"model": "m", "model_sha256": "a" * 64, "verifier_sha256": "b" * 64,
              "top_k": 100, "categories": list(CATS), "split": "validation",
              "records": records} | overrides  # fmt: skip
    path.write_text(json.dumps(record))
    return path


def test_fit_ships_a_choice_that_picks_the_hit(tmp_path, load_benchmark):
    files = [_file(tmp_path / "a.json", 12, 0), _file(tmp_path / "b.json", 12, 1)]
    package = tmp_path / "head_choice.json"
    bench = load_benchmark("fit_head_choice")
    result = bench.main(["--records-from", *map(str, files), "--ship", "--package-file",
                         str(package), "--out", str(tmp_path / "fit.json")])  # fmt: skip
    assert result["scenes"] == 24 and result["l2"] in result["l2_grid"]
    assert result["hit"]["fitted_choice_leave_one_out"] >= 0.8
    assert result["hit"]["max_class_log_prob"] == 1.0 == result["hit"]["any_head"]
    shipped = json.loads(package.read_text())
    choice = HeadChoice.from_dict(shipped["head_choice"])
    assert choice.categories == CATS and choice.model_sha256 == "a" * 64
    assert json.loads((tmp_path / "fit.json").read_text())["head_choice"] == shipped["head_choice"]
    other = _file(tmp_path / "c.json", 3, 2, verifier_sha256="c" * 64)
    with pytest.raises(SystemExit, match="differ in verifier_sha256"):
        bench.main(["--records-from", str(files[0]), str(other), "--out",
                    str(tmp_path / "x.json")])  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_smoke_collection(tmp_path, load_benchmark):
    out = tmp_path / "records.json"
    load_benchmark("fit_head_choice").main(["--smoke", "--top-k", "4", "--records-out", str(out)])
    result = json.loads(out.read_text())
    assert result["scenes"] == 1 and len(result["categories"]) == 2
    heads = result["records"][0]["heads"]
    assert [h["category"] for h in heads] == result["categories"]
    for h in heads:
        assert 0 < h["visible"] <= h["amodal"] and 0.0 <= h["best_iou"] <= 1.0
        assert max(h["class_log_probs"].values()) <= 0.0


def _steps_file(path: Path, n: int, seed: int, **overrides) -> Path:
    """parse_threshold.py --choose's output, hand-built: each step's hit is the head nothing
    claimed yet (visible = amodal); the others are mostly claimed, with larger amodal masks."""
    rng = np.random.default_rng(seed)
    parsed = []
    for _ in range(n):
        steps = []
        for _ in range(3):
            fresh = int(rng.integers(len(CATS)))
            heads = []
            for j, c in enumerate(CATS):
                amodal = float(rng.integers(100, 200) if j == fresh else rng.integers(200, 400))
                visible = amodal if j == fresh else float(round(amodal * rng.uniform(0.1, 0.5)))
                heads.append({"category": c, "llr": float(rng.normal(-5000, 500)),
                              "visible": visible, "amodal": amodal, "score": 0.0,
                              "class_log_probs": {k: float(rng.normal(-3, 1)) for k in CATS},
                              "best_iou": 0.9 if j == fresh else 0.0,
                              "hit": j == fresh})  # fmt: skip
            steps.append(heads)
        parsed.append({"features": [], "labels": [], "objects": 2, "heads": steps})
    record = {"model_sha256": "a" * 64, "verifier_sha256": "b" * 64, "verifier_top_k": 100,
              "head_choice_sha256": "c" * 64, "refine_masks": True, "choose": True,
              "split": "validation", "smoke": False,
              "settings": {"subtract/profile": {"parsed": parsed}}} | overrides  # fmt: skip
    path.write_text(json.dumps(record))
    return path


def test_steps_fit_weighs_the_visible_fraction(tmp_path, load_benchmark):
    steps = _steps_file(tmp_path / "steps.json", 12, 0)
    package = tmp_path / "head_choice.json"
    bench = load_benchmark("fit_head_choice")
    result = bench.main(["--steps-from", str(steps), "--extra", "visible fraction", "--ship",
                         "--package-file", str(package), "--folds", "4",
                         "--out", str(tmp_path / "f.json")])  # fmt: skip
    hit = result["hit"]
    assert result["scenes"] == 12 and hit["any_head"]["all"] == 1.0
    assert hit["any_head"]["steps"] == 36 and hit["any_head"]["later_steps"] == 24
    # as parsed, the first head (hand-built: a random category) misses where it is not the
    # fresh one, and those misses have best IoU 0 (nothing of an object)
    n_missed = sum(not g[0]["hit"] for s in json.loads(steps.read_text())["settings"][
        "subtract/profile"]["parsed"] for g in s["heads"])  # fmt: skip
    assert result["misses"] == {"steps": n_missed, "part_0.3_0.5": 0, "fragment_0.1_0.3": 0,
                                "nothing_below_0.1": n_missed}  # fmt: skip
    assert hit["fitted_choice_held_out"]["all"] >= 0.9
    assert hit["fitted_choice_held_out"]["all"] >= hit["without_extra_held_out"]["all"]
    choice = HeadChoice.from_dict(json.loads(package.read_text())["head_choice"])
    assert choice.extra == ("visible fraction",) and choice.weights[-1] > 0
    assert choice.per_category == 1  # as many heads a category as the parses offered
    wide = _steps_file(tmp_path / "wide.json", 4, 2, heads_per_category=3, refined_heads=True)
    bench.main(["--steps-from", str(wide), "--ship", "--package-file", str(package),
                "--folds", "2", "--out", str(tmp_path / "w.json")])  # fmt: skip
    wide_choice = HeadChoice.from_dict(json.loads(package.read_text())["head_choice"])
    assert wide_choice.per_category == 3 and wide_choice.refined_heads
    with pytest.raises(SystemExit, match="--keep-shipped needs a shipped choice"):
        bench.main(["--steps-from", str(steps), "--extra", "visible fraction", "--keep-shipped",
                    "--folds", "2", "--out", str(tmp_path / "k.json")])  # fmt: skip
    plain = _steps_file(tmp_path / "plain.json", 2, 1, choose=False)
    with pytest.raises(SystemExit, match="no choice parse"):
        bench.main(["--steps-from", str(plain), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):  # argparse: --extra needs --steps-from
        bench.main(["--records-from", str(plain), "--extra", "visible fraction"])

"""benchmarks/parse_first_step.py: its summary of hand-built records whose answers are known,
its AUC against scipy's Mann–Whitney U, and its smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from pyro_backpass.parsing import fit_head_choice

CATS = ("airplane", "bird", "boat", "car", "chair")


def _head(category: str, stat: float, hit: bool, clp: float | None = None) -> dict:
    return {"category": category, "stat": stat, "llr": 0.0, "visible": 1, "amodal": 1,
            "best_iou": 0.9 if hit else 0.1, "hit": hit, "hit_airplane": hit and category ==
            "airplane", "category_right": hit,
            "class_log_probs": dict.fromkeys(CATS, -stat if clp is None else clp)}  # fmt: skip


def _record(stats: dict[str, float], hits: set[str], free: str, clp: str = "") -> dict:
    """``clp``: the one head the classifier reads as its category (log-prob 1; else −stat)."""
    rows = {f"shipped_{c}": _head(c, stats[c], c in hits, 1.0 if c == clp else None)
            for c in CATS}  # fmt: skip
    rows["shipped_free"] = _head(free, stats[free], free in hits)
    return {
        "rows": rows,
        "seconds": dict.fromkeys(rows, 1.0),
        "free_top_k_categories": {"airplane": 3, "bird": 1},
    }


def test_summary_of_known_records(load_benchmark):
    base = dict(zip(CATS, (0.0, 0.0, 0.0, 0.0, 0.0), strict=True))
    records = [
        # the airplane head hits and has the largest statistic; the free step took it
        _record(base | {"airplane": 3.0}, {"airplane"}, "airplane"),
        # no head hits
        _record(base | {"car": 2.0}, set(), "car"),
        # the car head hits, the bird's statistic is larger (2nd by statistic); free took bird
        _record(base | {"bird": 2.0, "car": 1.0}, {"car"}, "bird", clp="car"),
        # the chair head hits with the largest statistic, the free step took boat (its top-k)
        _record(base | {"chair": 4.0, "boat": 1.0}, {"chair"}, "boat"),
    ]
    got = load_benchmark("parse_first_step").summarise(records, CATS)
    choices = got["choices"]
    assert choices["oracle_any_head"] == 0.75
    assert choices["max_stat_over_heads"]["hit"] == 0.5  # records 0 and 3
    assert choices["max_stat_over_heads"]["chose"] == {"airplane": 1, "car": 1, "bird": 1,
                                                       "chair": 1}  # fmt: skip
    # by the classifier: bird, airplane, car (the one hit), airplane (ties go to the first)
    assert choices["max_class_log_prob_over_heads"]["hit"] == 0.25
    assert choices["free_missed_a_hitting_head"] == 0.5  # records 2 and 3
    assert choices["rank_by_stat_of_the_best_hitting_head_when_missed"] == {1: 1, 2: 1}
    assert got["rows"]["shipped_free"]["hit"] == 0.25
    assert got["rows"]["shipped_free"]["chose"] == {"airplane": 1, "car": 1, "bird": 1, "boat": 1}
    assert choices["free_top_k_share"]["bird"] == 4 / 16
    assert choices["free_top_k_share"]["airplane"] == 12 / 16


def test_auc_is_mann_whitney(load_benchmark):
    rng = np.random.default_rng(0)
    stats = np.round(rng.normal(size=40), 1)  # ties on purpose
    hits = rng.random(40) < 0.4
    want = mannwhitneyu(stats[hits], stats[~hits]).statistic / (hits.sum() * (~hits).sum())
    got = load_benchmark("parse_first_step").auc(
        list(zip(stats.tolist(), hits.tolist(), strict=True))
    )
    assert got == pytest.approx(want)
    assert load_benchmark("parse_first_step").auc([(1.0, True)]) is None


@pytest.mark.usefixtures("one_thread")
def test_smoke(tmp_path, load_benchmark):
    out = tmp_path / "first.json"
    summary = load_benchmark("parse_first_step").main(
        ["--smoke", "--top-k", "4", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["scenes"] == 1 and result["top_k"] == 4
    assert set(result["rows"]) == {"shipped_free", "shipped_airplane"} == set(summary["rows"])
    assert result["rows"]["shipped_airplane"]["chose"] == {"airplane": 1}
    for row in result["rows"].values():
        assert 0.0 <= row["hit"] <= 1.0 and 0.0 <= row["best_iou"] <= 1.0
    assert sum(result["records"][0]["free_top_k_categories"].values()) == 4


def _random_records(n: int, seed: int) -> list[dict]:
    """Scenes where exactly one head hits and the classifier reads it as its category with the
    largest log-probability; statistics random (so the statistic's choice is chance)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        winner = CATS[rng.integers(len(CATS))]
        stats = dict(zip(CATS, rng.normal(size=len(CATS)).tolist(), strict=True))
        record = _record(stats, {winner}, winner)
        for c in CATS:
            clp = -3.0 + rng.normal() + (2.5 if c == winner else 0.0)
            record["rows"][f"shipped_{c}"]["class_log_probs"] = dict.fromkeys(CATS, -20.0) | {
                c: clp
            }
        out.append(record)
    return out


def test_fitted_choice_learns_the_feature_that_tells_the_hit(tmp_path, load_benchmark):
    module = load_benchmark("parse_first_step")
    train, test = _random_records(60, 0), _random_records(60, 1)
    choice = fit_head_choice([module.heads_of(r, CATS) for r in train], categories=CATS, l2=0.1)
    got = module.fitted_choice(test, CATS, choice)
    by_stat = module.summarise(test, CATS)["choices"]["max_stat_over_heads"]["hit"]
    assert got["hit"] >= 0.9 > 0.5 > by_stat
    # the command line: fitted on one file, scored on another, written where asked
    for name, records in (("val", train), ("test", test)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"records": records,
                                                           "split": name}))  # fmt: skip
    files = {k: str(tmp_path / f"{k}.json") for k in ("val", "test", "out")}
    summary = module.main(["--records-from", files["test"], "--fit-choice-on", files["val"],
                           "--out", files["out"]])  # fmt: skip
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["choices"]["fitted_choice"]["hit"] == got["hit"]
    fitted = summary["choices"]["fitted_choice"]["fit"]["weights"]
    assert fitted == pytest.approx(list(choice.weights))

"""bench.quality_history on tiny logs: every learner and ablation row, goals, table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from bench import quality_history
from learners.ranker import RankerConfig, TorchRanker
from logs.synthetic import SyntheticConfig, generate


def test_quality_history_reports_peers_constant_and_ablation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a small ranker keeps the test fast; the wiring (features attached, rows) is the same
    made: list[bool | None] = []

    def small(history: bool = False, seed: int = 0, fallback: bool | None = None) -> TorchRanker:
        made.append(fallback)
        cfg = RankerConfig(model="logreg")
        if fallback is not None:
            cfg = dataclasses.replace(cfg, fallback_mixture=fallback)
        return TorchRanker(cfg, seed=seed, online=False)

    monkeypatch.setattr(quality_history, "_ranker", small)
    cfg = SyntheticConfig(n_impressions=600, n_users=50, n_items=60, history=True, seed=1)
    logs = {"history_synthetic": generate(cfg), "obd": generate(SyntheticConfig(400))}
    report = quality_history.main(
        quick=True, results_dir=tmp_path, logs=logs, seeds=2, ab_fallback=True
    )

    written = json.loads((tmp_path / "quality_history_quick.json").read_text())
    assert written["command"] == "python -m bench.quality_history --quick --seeds 2 --ab-fallback"
    learners = written["datasets"]["history_synthetic"]["learners"]
    ours = quality_history.DEFAULT_WITH_HISTORY
    seed1 = f"{ours}/seed1"
    served = f"{ours}{quality_history.WITH_OFFSET}"
    variants = [f"{ours}{v}" for v in quality_history.VARIANTS]
    expected = {*quality_history.PEERS, "constant", *quality_history.ABLATION, seed1}
    assert set(learners) == expected | {f"{v}{tag}" for v in variants for tag in ("", "/seed1")}
    # the default row is the shipped default (None: RankerConfig()), the A/B row without the
    # mixture; per log: two ablation rows and two seeds of the default, two seeds without it
    assert made.count(None) == 2 * (2 + 2) and made.count(False) == 2 * 2
    assert RankerConfig().fallback_mixture is True
    for q in learners.values():
        assert 0.0 <= q["auc"] <= 1.0 and q["normalized_entropy"] > 0
        assert q["ne_over_oracle"] > 0.9  # nobody beats the truth by much on 600 rows
    # the constant model has no ranking power and learns the click rate
    const = learners["constant"]
    assert abs(const["auc"] - 0.5) < 0.1
    goal = written["datasets"]["history_synthetic"]["goal"]
    assert goal["ranker"] == "dcnv2_counters_sequence"
    assert goal["best_peer"] in quality_history.GOAL_PEERS
    # a second model seed is a different model, judged on its own
    assert learners[seed1]["normalized_entropy"] != pytest.approx(
        learners[quality_history.DEFAULT_WITH_HISTORY]["normalized_entropy"], rel=1e-9
    )
    assert set(goal["seeds"]) == {quality_history.DEFAULT_WITH_HISTORY, seed1}
    per_seed = [j["ne_met"] and j["calibration_met"] for j in goal["seeds"].values()]
    assert goal["met_all_seeds"] == all(per_seed)
    # a truth-known log is also judged against sum true_p, with its label noise reported
    for row, j in goal["seeds"].items():
        assert j["calibration_vs_truth"] == learners[row]["ratio_vs_true_p"]
        assert j["calibration_vs_truth_met"] == (abs(j["calibration_vs_truth"] - 1) <= 0.02)
    per_seed_truth = [j["ne_met"] and j["calibration_vs_truth_met"] for j in goal["seeds"].values()]
    assert goal["met_all_seeds_vs_truth"] == all(per_seed_truth)
    df = logs["history_synthetic"]
    noise = written["datasets"]["history_synthetic"]["label_noise"]
    q = df["true_p"].to_numpy()
    assert noise["clicks_over_true_p"] == pytest.approx(df["click"].sum() / q.sum())
    assert noise["relative_se_of_clicks"] == pytest.approx((q * (1 - q)).sum() ** 0.5 / q.sum())
    assert 0.05 < noise["relative_se_of_clicks"] < 1.0  # a few dozen clicks on 600 rows
    # the served rows are the same runs through the offset: same ranking power, other
    # probabilities, judged on their own
    for tag in ("", "/seed1"):
        raw_q = learners[f"{quality_history.DEFAULT_WITH_HISTORY}{tag}"]
        served_q = learners[f"{served}{tag}"]
        assert "offset_mean_abs" not in raw_q
        assert served_q["n"] == raw_q["n"] and served_q["offset_mean_abs"] >= 0.0
        assert served_q["auc"] == pytest.approx(raw_q["auc"], abs=0.02)
    goals = written["datasets"]["history_synthetic"]["goal_variants"]
    assert set(goals) == set(quality_history.VARIANTS)
    for v, g in goals.items():
        assert g["ranker"] == f"{ours}{v}"
        assert set(g["seeds"]) == {f"{ours}{v}", f"{ours}{v}/seed1"}
        assert g["calibration_ratio"] == learners[f"{ours}{v}"]["calibration_ratio"]
    assert set(written["datasets"]["obd"]["goal_variants"]) == set(quality_history.VARIANTS)
    obd_goal = written["datasets"]["obd"]["goal"]
    assert set(obd_goal) == {"ranker", "ranker_ne", "constant_ne", "met", "met_all_seeds"}
    assert "relative_se_of_clicks" in written["datasets"]["obd"]["label_noise"]
    text = quality_history.table(report)
    assert "| history_synthetic | dcnv2_counters |" in text
    # the ranker rows say how many fields had no slot (the logreg above has 8 slots)
    assert learners["dcnv2_no_history"]["dropped_fields"] == 0
    assert learners["dcnv2_counters"]["dropped_fields"] > 0


def test_history_rows_give_every_hist_field_a_slot() -> None:
    """The bench's history rows must see every historical feature: with the encoder's
    default 8 numeric slots the ranker kept the first 8 ``hist_*`` names and ignored the
    rest (the bug this guards against)."""
    cfg = SyntheticConfig(n_impressions=400, n_users=30, n_items=40, history=True, seed=2)
    ex = quality_history.with_history(generate(cfg), {})
    hist = {k for row in ex.rows for k, v in row.items() if k.startswith("hist_")}
    assert len(hist) > 8
    with_slots = quality_history._ranker(history=True)
    with_slots.encoder.encode(ex.rows)
    assert with_slots.encoder.n_dropped_fields == 0
    assert set(with_slots.encoder.num_fields) >= {
        k for k in hist if isinstance(ex.rows[-1].get(k), float)
    }
    plain = quality_history._ranker()
    plain.encoder.encode(ex.rows)
    assert plain.encoder.n_dropped_fields > 0  # what the bench measured before


def test_label_noise_without_truth_is_the_binomial_se_of_the_clicks() -> None:
    import pandas as pd

    df = pd.DataFrame({"click": [1] * 25 + [0] * 75})
    noise = quality_history.label_noise(df)
    assert noise == {"relative_se_of_clicks": pytest.approx((0.75 / 25) ** 0.5)}
    assert quality_history.label_noise(pd.DataFrame({"click": [0, 0]})) == {
        "relative_se_of_clicks": float("inf")
    }


def test_default_logs_add_one_history_world_per_data_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality_history, "_movielens", lambda quick: None)
    monkeypatch.setattr(quality_history, "OBD_CANDIDATES", ())
    monkeypatch.setattr(quality_history, "QUICK_SYNTHETIC", 300)
    notes: list[str] = []
    logs = quality_history.default_logs(True, 3, notes)
    assert list(logs) == [
        "history_synthetic",
        "history_synthetic_world1",
        "history_synthetic_world2",
    ]
    assert all(len(df) == 300 for df in logs.values())
    # other data seeds: other worlds, not the same log again
    first, second = logs["history_synthetic"], logs["history_synthetic_world1"]
    assert not np.allclose(first["true_p"].to_numpy(), second["true_p"].to_numpy())
    assert any("movielens skipped" in n for n in notes) and any("OBD skipped" in n for n in notes)
    with pytest.raises(ValueError, match="worlds must be >= 1"):
        quality_history.main(quick=True, logs={}, worlds=0)

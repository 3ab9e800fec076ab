"""logs.offline.history_ablation: the demo's with/without-history rows."""

from __future__ import annotations

from logs.offline import history_ablation
from logs.synthetic import SyntheticConfig, generate
from stream.demo import _rows
from stream.settings import Settings


def test_history_helps_on_a_world_where_it_matters() -> None:
    df = generate(SyntheticConfig(n_impressions=60_000, seed=3, history=True, drift_at=None))
    ab = history_ablation(df, Settings().ranker, seed=0, progress=False)
    assert set(ab) == {"with", "without"}
    for q in ab.values():
        assert q["n"] == 60_000 and q["seconds"] > 0
    # the history world's clicks depend on fatigue and recent taste: the features must help
    # (60k: at 20k the ranker has not learnt to use them yet, NE 0.992 both ways)
    assert ab["with"]["normalized_entropy"] < ab["without"]["normalized_entropy"] - 0.004
    assert ab["with"]["auc"] > ab["without"]["auc"] + 0.01


def test_the_demo_table_shows_both_rows() -> None:
    q = {"auc": 0.6, "log_loss": 0.2, "normalized_entropy": 0.98, "ece": 0.01,
         "all": {"calibration_ratio": 1.0}}  # fmt: skip
    report = {"quality": q, "impressions": 1, "clicks": 0, "labeled": 1,
              "scored_distinct_impressions": 1, "drift_alarms": 0,
              "first_alarm_after_drift_impressions": None, "recalibrations": 0,
              "recalibrations_rejected": 0, "index_refreshes": 0, "index_items": 0,
              "hard_negative_pool_users": 0, "dead_letters": 0, "replay_seconds": 1.0,
              "pipeline_seconds": 1.0, "events_per_s": 1.0, "impressions_per_s": 1.0}  # fmt: skip
    assert not any("history" in name for name, _ in _rows(report))
    report["history_ablation"] = {
        "with": {"normalized_entropy": 0.95, "auc": 0.66},
        "without": {"normalized_entropy": 0.97, "auc": 0.61},
    }
    rows = dict(_rows(report))
    assert rows["NE with history (in process, cold, prequential)"] == 0.95
    assert rows["NE without history (in process, cold, prequential)"] == 0.97

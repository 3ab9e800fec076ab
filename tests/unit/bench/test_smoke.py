"""Smoke test of the benchmark harness: it runs and writes a sane report (no timing limits)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import delayed_feedback, run, trainer


def test_trainer_quick_writes_positive_dcnv2_throughput(tmp_path: Path) -> None:
    report = trainer.main(quick=True, results_dir=tmp_path, n=4_096)

    written = json.loads((tmp_path / "trainer_quick.json").read_text())
    dcnv2 = [r for r in written["results"] if r["model"] == "dcnv2"]
    assert dcnv2 and all(r["examples_per_s"] > 0 for r in dcnv2)
    assert written["machine"]["device"] == report["machine"]["device"]
    assert written["command"] == "python -m bench.trainer --quick"


def test_render_writes_a_table_per_results_file(tmp_path: Path) -> None:
    trainer.main(quick=True, results_dir=tmp_path, n=4_096)

    readme = run.render(quick=True, results_dir=tmp_path).read_text()

    assert "## trainer" in readme and "| dcnv2 |" in readme
    assert "## quality" not in readme
    png = tmp_path / "trainer_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "![trainer](trainer_quick.png)" in readme


def test_delayed_feedback_quick_reports_every_arm_and_renders_its_table(tmp_path: Path) -> None:
    report = delayed_feedback.main(quick=True, results_dir=tmp_path, n=3_000)

    written = json.loads((tmp_path / "delayed_feedback_quick.json").read_text())
    assert written["command"] == "python -m bench.delayed_feedback --quick"
    arms = {(r["log"], r["arm"]) for r in written["results"]}
    assert len(arms) == len(written["results"]) == 7  # quick: one log, no reference arm
    for r in written["results"]:
        assert 0 < r["tail"]["ratio_vs_true_p"] < 10
        assert r["label_latency_s"] >= 0
    assert [c["log"] for c in report["claim"]["results"]] == list(delayed_feedback.QUICK_CTRS)
    readme = run.render(quick=True, results_dir=tmp_path).read_text()
    assert "## delayed_feedback" in readme and "| fake_negative, fnw |" in readme


def test_index_quick_reports_every_kind_serving_and_retrieval(tmp_path: Path) -> None:
    from bench import index

    report = index.main(quick=True, results_dir=tmp_path)

    written = json.loads((tmp_path / "index_quick.json").read_text())
    assert written["command"] == "python -m bench.index --quick"
    kinds = {(r["n"], r["kind"]) for r in written["index"]["results"]}
    assert kinds == {(n, k) for n in index.QUICK_SIZES for k in index.KINDS}
    assert all(r["kind"] != "flat" or r["recall_at_10"] == 1.0 for r in written["index"]["results"])
    assert written["recommend"]["p50_ms"] > 0 and written["recommend"]["requests_per_s"] > 0
    models = written["retrieval"]["synthetic"]["models"]
    assert models["two_tower"]["recall_at_10"] > models["random"]["recall_at_10"]
    # the generator's own propensities are the ceiling: above popularity on this log
    assert models["oracle"]["recall_at_10"] > models["popularity"]["recall_at_10"]
    assert models["oracle"]["recall_at_10"] >= models["segment_oracle"]["recall_at_10"]
    assert report["recommend"]["retrieval_model"] == "two_tower"
    readme = run.render(quick=True, results_dir=tmp_path).read_text()
    assert "## index" in readme and "| 20,000 | hnsw |" in readme
    assert (tmp_path / "index_quick.png").exists() and "![index](index_quick.png)" in readme


def test_quality_reports_the_default_ranker_goals_against_the_peers(tmp_path: Path) -> None:
    from bench import quality

    names = ("dcnv2", "river_ftrl", "vw_ui")
    report = quality.main(
        quick=True,
        results_dir=tmp_path,
        n=3_000,
        learners=names,
        obd_csv=tmp_path / "absent.csv",  # a fresh clone has no ../shared/data
        cache=tmp_path / "cache",
    )

    syn = report["datasets"]["synthetic"]
    assert set(syn["learners"]) == {*names, "dcnv2_warm"}
    assert len(list((tmp_path / "cache").glob("synthetic-3000-*.pkl"))) == 1
    g = report["goal"]["synthetic/all rows"]
    assert g["ranker"] == "dcnv2" and g["best_peer"] in ("river_ftrl", "vw_ui")
    assert g["met"] == (g["ne_ratio"] <= 0.98)
    assert g["calibration_met"] == (abs(g["calibration_ratio"] - 1) <= 0.02)
    assert any("OBD skipped" in note for note in report["notes"])
    readme = run.render(quick=True, results_dir=tmp_path).read_text()
    assert "## quality" in readme and "| synthetic | vw_ui | all |" in readme


def test_calibration_quick_measures_every_learner_and_renders(tmp_path: Path) -> None:
    from bench import calibration, calibration_summary

    report = calibration.main(quick=True, results_dir=tmp_path)

    written = json.loads((tmp_path / "calibration_quick.json").read_text())
    assert written["command"] == "python -m bench.calibration --quick"
    assert set(written["learners"]) == set(calibration_summary.LEARNERS)
    recal = written["learners"][calibration_summary.RECAL]["abrupt"]
    assert recal["seeds"] == 1 and len(recal["recovery_10"]) == 1
    assert recal["detection_delay"][0] is not None  # the x1.6 jump is detected
    assert written["goal"]["fastest_peer"] in calibration_summary.PEERS
    assert report["machine"]["workers"] >= 1
    readme = run.render(quick=True, results_dir=tmp_path).read_text()
    assert "## calibration" in readme and f"| {calibration_summary.RECAL} |" in readme
    assert "Goal: streamrec (recalibrated) back within" in readme
    traj = written["runs"][0]["learners"][calibration_summary.RECAL]["trajectory"]
    assert len(traj["row"]) == len(traj["ratio"]) > 10 and traj["row"] == sorted(traj["row"])
    assert any(r is not None and 0.5 < r < 2 for r in traj["ratio"])
    assert "![calibration](calibration_quick.png)" in readme


def test_joiner_in_process_labels_equal_the_offline_join_under_interleaving(
    tmp_path: Path,
) -> None:
    from bench import joiner
    from logs.io import read_log_frame
    from logs.synthetic import SyntheticConfig, write_synthetic
    from stream.join import JoinConfig

    path = tmp_path / "log.csv"
    write_synthetic(
        SyntheticConfig(n_impressions=3_000, seed=5, drift_at=None, click_delay_mean_s=600.0),
        path,
    )
    df = read_log_frame(path)
    row = joiner.run_in_process(df, "small", JoinConfig(window_s=600.0))

    assert row["labels_identical_to_offline_join"], row
    assert row["labelled"] == 3_000 and row["mismatched"] == 0
    # clicks after the window exist in this log and stayed negatives
    assert ((df["click"] == 1) & (df["click_ts"] - df["ts"] > 600.0)).any()
    assert row["service_impressions_per_s"] > 0 and row["state_peak_entries"] > 0

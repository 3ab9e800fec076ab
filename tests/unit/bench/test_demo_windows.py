from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import demo_windows


def _run(tmp_path: Path, scale: float, truth: bool, n: int = 20_000) -> Path:
    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.02, 0.2, n)
    y = (rng.random(n) < true_p).astype(float)
    ts = rng.permutation(n).astype(float)  # arrival order differs from event time
    arrays = {"ts": ts, "y": y, "p": true_p * scale, "p_raw": true_p}
    # the demo writes true_p as nan when the log has no truth
    arrays["true_p"] = true_p if truth else np.full(n, np.nan)
    run = tmp_path / f"run{scale}{truth}"
    run.mkdir()
    np.savez(run / "scored.npz", **arrays)
    return run


def test_windows_of_a_calibrated_run_sit_at_the_noise_floor(tmp_path: Path) -> None:
    run = _run(tmp_path, 1.0, truth=True)
    report = demo_windows.main([run], "t", window=2_000, results_dir=tmp_path)
    written = json.loads((tmp_path / "demo_windows_t.json").read_text())
    assert written["runs"] == json.loads(json.dumps(report["runs"]))
    r = report["runs"][str(run)]
    assert r["impressions"] == 20_000 and r["window"] == 2_000
    raw = r["raw"]
    assert raw["vs_labels"]["windows"] == 10
    # the labels were drawn from p itself: the windows stray by about the noise floor
    floor = raw["noise_floor"]
    assert 0.01 < floor < 0.05
    assert 0.4 * floor < raw["vs_labels"]["mean_abs_log_ratio"] < 2.5 * floor
    assert raw["vs_truth"]["mean_abs_log_ratio"] == pytest.approx(0.0, abs=1e-12)


def test_a_biased_served_score_shows_beyond_the_floor(tmp_path: Path) -> None:
    run = _run(tmp_path, 1.3, truth=False)
    r = demo_windows.main([run], "b", window=2_000, results_dir=tmp_path)["runs"][str(run)]
    served = r["served"]
    assert "vs_truth" not in served  # no truth in the log (nan true_p)
    assert served["ratio_all"] == pytest.approx(1.3, rel=0.05)
    assert served["vs_labels"]["mean_abs_log_ratio"] > 5 * served["noise_floor"]
    assert served["vs_labels"]["share_beyond_15pct"] > 0.5
    assert math.isnan(demo_windows.noise_floor(np.full(10, 0.1), size=100))


def test_a_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="scored.npz not found"):
        demo_windows.main([tmp_path / "nope"], "x", results_dir=tmp_path)
    with pytest.raises(SystemExit):
        demo_windows.cli([str(tmp_path), "--name", "x", "--window", "0"])

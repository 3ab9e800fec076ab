"""The truth-known pipeline harness (bench.pipeline_sim, bench.calibration_worlds)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from bench import calibration_worlds as cw
from bench.pipeline_sim import World, make_world, simulate
from learners.ranker import RankerConfig
from stream.settings import Settings


def test_fresh_labels_reach_the_trainer_at_click_time_and_the_monitor_sees_final_labels() -> None:
    w = World(rate_per_min=600.0, n=600, seed=1, delay_mean_s=10.0, max_delay_s=29.0)
    df, drift = make_world(w)
    assert drift is None and (df["click_ts"].dropna() - df["ts"][df["click"] == 1]).max() < 30
    s = cw.policy_settings("off")
    s = s.replace(
        join=dataclasses.replace(s.join, window_s=30.0),
        ranker=dataclasses.replace(s.ranker, model="logreg", loss="fnw"),
        retrieval="ranker",  # no two-tower model to train: a faster test
    )
    assert s.join.delayed_feedback == "fake_negative"
    res = simulate(df, s, step_s=5.0)
    end = float(df["ts"].iloc[-1])
    clicks = int((df["click_ts"] <= end).sum())  # the clicks sent before the log ended
    # every impression once as a fake negative, every click once more as its positive
    assert res.examples_trained == len(df) + clicks
    # event seconds from a click to its positive's emission: at most a step (5 s + a gap)
    assert res.click_latency_s.size == clicks and res.click_latency_s.max() <= 10.0
    assert res.click_update_wall_s.size == clicks and (res.click_update_wall_s > 0).all()
    # the monitor judged each impression whose window closed (all but the last 30 s,
    # about 300 impressions) once, on its final label
    closed = int((df["ts"] < end - 30.0).sum())
    assert closed - 100 <= res.monitor["monitored"] <= closed
    assert res.monitor["recalibrations"] == 0
    # the joiner's event-time marks reached the monitor for every input partition, as the
    # worker's joiner sends them on labeled: they, not the impressions' times, closed windows
    assert res.monitor["marks"] == s.partitions


def test_summary_bars_and_table_on_made_up_runs() -> None:
    def run(policy: str, served: float, raw: float, seed: int) -> dict:
        block = {"mean_abs_log_ratio": served, "max_abs_log_ratio": served * 2}
        rblock = {"mean_abs_log_ratio": raw, "max_abs_log_ratio": raw * 2}
        return {"policy": policy, "scenario": "no_drift", "rate_per_min": 100.0, "seed": seed,
                "served": block, "raw": rblock, "alarms_per_million": 0.0,
                "monitor": {"alarms": 0, "recalibrations": 1, "rollbacks": 0,
                            "monitored": 9}}  # fmt: skip

    runs = [run("off", 0.1, 0.1, s) for s in range(3)] + [
        run("track", 0.2, 0.1, s) for s in range(3)
    ]
    summary = cw.summarize(runs)
    b = cw.bars(summary)
    assert b["off"]["served_le_raw_every_world"] and not b["track"]["served_le_raw_every_world"]
    assert b["track"]["worst_served_window"] == 0.4
    text = cw.table({"summary": summary, "bars": b})
    assert "| no_drift | 100 | track | 0.200 / 0.400 | 0.100 / 0.200 | - / - | 0 | 1 / 0 |" in text
    assert math.isnan(cw._median([math.nan])) and cw._median([1, None]) is None


def test_policy_settings_are_the_worker_defaults_but_window_warmup_and_policy() -> None:
    s = cw.policy_settings("guarded")
    d = Settings()
    assert s.monitor.recalibration == "guarded" and s.join.window_s == cw.WINDOW_S
    assert s.ranker == d.ranker and s.join.delayed_feedback == d.join.delayed_feedback
    assert isinstance(s.ranker, RankerConfig)
    assert np.isclose(cw.prime_rows(100.0), 500) and cw.prime_rows(30_000.0) == 30_000


def test_startup_scheme_settings_and_comparison_table() -> None:
    s = cw.policy_settings("off", cw.scheme_settings("startup", 42.0))
    assert s.join.startup_compensation and s.join.startup_delay_prior_s == 42.0
    assert s.join.delayed_feedback == "fake_negative" and s.ranker.loss == "fnw"
    assert not cw.scheme_settings("default").join.startup_compensation

    def run(scheme: str, err: float, seed: int) -> dict:
        raw = {"ratio_last_half": 1 - err, "mean_abs_log_ratio": err, "max_abs_log_ratio": 2 * err,
               "recovery_10pct": 100 * seed, "ne_last_half": 1.0}  # fmt: skip
        return {"scenario": "abrupt", "rate_per_min": 100.0, "label_scheme": scheme, "raw": raw}

    runs = [run("default", 0.4, s) for s in (1, 2, 3)] + [run("startup", 0.1, s) for s in (1, 2)]
    rows = cw.scheme_comparison(runs, cw.STARTUP_SCHEMES)
    assert rows[0]["default_seeds"] == 3 and rows[0]["startup_recovery_10pct"] == 150.0
    text = cw.scheme_table(rows, cw.STARTUP_SCHEMES)
    assert "| abrupt | 100 | 0.600 / 0.900 | 0.400 / 0.100 | 0.800 / 0.200 | 200 / 150 |" in text


def test_recovery_arms_comparison_and_table() -> None:
    assert cw.scheme_settings("startup+offset", 42.0).join.startup_compensation

    def run(arm: str, served: float, raw: float, rec: int | None) -> dict:
        return {
            "scenario": "abrupt",
            "rate_per_min": 3000.0,
            "label_scheme": arm,
            "served": {"mean_abs_log_ratio": served, "max_abs_log_ratio": 2 * served,
                       "share_beyond_5pct": 0.5, "recovery_10pct": rec,
                       "recovery_10pct_1k": rec, "post_recovery_share_beyond_5pct_1k": 0.0},
            "raw": {"mean_abs_log_ratio": raw},
        }  # fmt: skip

    runs = [run("startup", 0.3, 0.3, None), run("startup+offset", 0.1, 0.3, 4000),
            run("startup+offset", 0.4, 0.3, 6000)]  # fmt: skip
    rows = {r["arm"]: r for r in cw.recovery_comparison(runs)}
    assert rows["startup"]["recovery_10pct"] is None  # never in one seed stays visible
    off = rows["startup+offset"]
    assert off["seeds"] == 2 and off["recovery_10pct"] == 5000.0
    assert off["mean_abs_log_ratio"] == 0.25 and not off["served_le_raw_all_seeds"]
    text = cw.recovery_table(list(rows.values()))
    assert "| abrupt | 3000 | startup | 0.300 / 0.600 | 0.300 | 0.500 | never / never" in text
    assert "| 5000 / 5000 | 0.000 | False |" in text


def small_settings() -> Settings:
    """Policy off, a 30 s window, a logreg ranker on FNW and no two-tower model: fast."""
    s = cw.policy_settings("off")
    return s.replace(
        join=dataclasses.replace(s.join, window_s=30.0),
        ranker=dataclasses.replace(s.ranker, model="logreg", loss="fnw"),
        retrieval="ranker",
    )


def test_simulate_serves_through_the_offset_and_feeds_it_every_click() -> None:
    from monitoring.offset import LogitOffset, OffsetConfig

    w = World(rate_per_min=600.0, n=600, seed=1, delay_mean_s=10.0, max_delay_s=29.0)
    df, _ = make_world(w)
    s = small_settings()
    off = LogitOffset(OffsetConfig(enabled=True, half_life=200, horizon=1_000, delay_mean_s=10.0))
    res = simulate(df, s, step_s=5.0, offset=off)
    assert off.n_seen == len(df)
    clicks_in = int((df["click_ts"] <= float(df["ts"].iloc[-1])).sum())
    assert int(off._c.sum()) == clicks_in  # every click sent by the end, once
    # the served score is the raw (identity calibrator) moved by the offset of its step
    moved = np.abs(np.log(res.p_serve / res.p_serve_raw))
    assert moved.max() > 0 and moved.max() <= off.config.max_abs_offset + 1e-9


def test_the_worker_offset_arm_serves_what_the_monitor_publishes() -> None:
    from monitoring.offset import OffsetConfig

    w = World(rate_per_min=600.0, n=3_000, seed=2, scenario="abrupt", delay_mean_s=10.0,
              max_delay_s=29.0)  # fmt: skip
    df, _ = make_world(w)
    s = small_settings().replace(
        offset=OffsetConfig(
            enabled=True, half_life=200, horizon=1_000, delay_mean_s=10.0, refresh_every=100
        )
    )
    res = simulate(df, s, step_s=5.0)

    # the trainer serves the monitor's published calibrator: identity shifted by the
    # offset once it is published (half_life impressions in), raw before
    def logit(p: np.ndarray) -> np.ndarray:
        return np.log(p / (1 - p))

    shift = logit(res.p_serve) - logit(res.p_serve_raw)
    assert np.allclose(shift[:200], 0.0)
    assert np.abs(shift).max() > 0.01
    assert np.abs(shift).max() <= s.offset.max_abs_offset + 1e-6


def test_unknown_arms_are_a_clear_error() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown arms"):
        cw.main(True, recovery_arms=True, arms=("startup", "bogus"))


def test_recovery_report_has_its_comparison_with_or_without_arms(
    tmp_path,
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    class InProcess:  # the plan's runs made up, in this process
        def __init__(self, max_workers: int) -> None:
            pass

        def __enter__(self) -> InProcess:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def map(self, fn, jobs):  # type: ignore[no-untyped-def]
            return map(fn, jobs)

    def fake(args):  # type: ignore[no-untyped-def]
        policy, w, _, scheme = args
        block = {"mean_abs_log_ratio": 0.1, "max_abs_log_ratio": 0.2}
        return {"policy": policy, "scenario": w.scenario, "rate_per_min": w.rate_per_min,
                "seed": w.seed, "label_scheme": scheme, "served": block, "raw": block,
                "alarms_per_million": 0.0,
                "monitor": {"alarms": 0, "recalibrations": 0, "rollbacks": 0,
                            "monitored": 1}}  # fmt: skip

    monkeypatch.setattr(cw, "ProcessPoolExecutor", InProcess)
    monkeypatch.setattr(cw, "_job", fake)
    for arms in (None, ("startup", "startup+offset_worker")):
        report = cw.main(True, results_dir=tmp_path, recovery_arms=True, arms=arms)
        assert {r["arm"] for r in report["recovery"]} == set(arms or cw.RECOVERY_SCHEMES)
        assert ("--arms" in report["command"]) == (arms is not None)
    # any half-life of the worker's offset is an arm; other unknown arms are refused
    report = cw.main(True, results_dir=tmp_path, recovery_arms=True,
                     arms=("startup", "startup+offset_worker_hl2500"))  # fmt: skip
    assert {r["arm"] for r in report["recovery"]} == {"startup", "startup+offset_worker_hl2500"}
    for bad in ("startup+offset_worker_hl0", "startup+offset_worker_hlx", "nope"):
        with pytest.raises(ValueError, match="unknown arms"):
            cw.main(True, results_dir=tmp_path, recovery_arms=True, arms=(bad,))
    # the plan's size, seeds and rates can be replaced, and the command says so
    seen: list[tuple[int, float, int]] = []

    def fake_seen(args):  # type: ignore[no-untyped-def]
        seen.append((args[1].n, args[1].rate_per_min, args[1].seed))
        return fake(args)

    monkeypatch.setattr(cw, "_job", fake_seen)
    over = {"n": 1234, "seeds": (0, 1), "rates": (3000.0,)}
    report = cw.main(True, results_dir=tmp_path, recovery_arms=True,
                     arms=("startup",), plan_overrides=over)  # fmt: skip
    assert {(n, r) for n, r, _ in seen} == {(1234, 3000.0)} and {s for *_, s in seen} == {0, 1}
    assert report["command"].endswith("--impressions 1234 --seeds 2 --rates 3000")
    seen.clear()  # later seeds only (--seeds 5 --seed-from 3)
    over = {"n": 1234, "seeds": (3, 4), "rates": (3000.0,)}
    report = cw.main(True, results_dir=tmp_path, recovery_arms=True,
                     arms=("startup",), plan_overrides=over)  # fmt: skip
    assert {s for *_, s in seen} == {3, 4}
    assert report["command"].endswith("--seeds 5 --seed-from 3 --rates 3000")
    with pytest.raises(ValueError, match="unknown plan keys"):
        cw.main(True, results_dir=tmp_path, recovery_arms=True, plan_overrides={"x": 1})

"""The fast logit offset in the worker's monitor (issue 17): fed from the scored stream,
published inside the served calibrator, taken out again by a monitor that adopts it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learners.calibration import calibrator_from_dict
from logs.batches import ScoredBatch
from monitoring.metrics import StreamrecMetrics
from monitoring.offset import OffsetConfig
from stream.control import CalibratorUpdate, decode_control, encode_control
from stream.services import MonitorService
from stream.settings import MonitorConfig, Settings, load_settings

RATE = 20  # impressions per event second
DELAY_S = 60.0  # mean click delay


def fake_negative_stream(
    rng: np.random.Generator, seconds: int, scale: float, t0: float, k0: int
) -> list[ScoredBatch]:
    """One scored batch per event second as the default (fake-negative) join sends them:
    each impression once with label 0 at its own time, and again with label 1 when its
    click arrives (delay ~ Exponential(DELAY_S)). Scores ``p`` ~ U(0.02, 0.06); clicks
    happen with probability ``scale * p``."""
    clicks: dict[int, list[tuple[str, float, float]]] = {}
    out = []
    for s in range(seconds):
        t = t0 + s
        p = rng.uniform(0.02, 0.06, RATE)
        ids = [f"i{k0 + s * RATE + i}" for i in range(RATE)]
        rows = [(iid, t, float(q), 0) for iid, q in zip(ids, p, strict=True)]
        for iid, q in zip(ids, p, strict=True):
            if rng.random() < scale * q:
                at = int(t + rng.exponential(DELAY_S))
                clicks.setdefault(at, []).append((iid, t, float(q)))
        rows += [(iid, ts, q, 1) for iid, ts, q in clicks.pop(int(t), [])]
        n = len(rows)
        out.append(
            ScoredBatch(
                0,
                0,
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[3] for r in rows],
                [r[2] for r in rows],
                [r[2] for r in rows],
                ["1"] * n,
                [None] * n,
            )  # fmt: skip
        )
    return out


def monitor(**offset: object) -> MonitorService:
    """A monitor whose offset uses the known delay model (``estimate_delay`` off: these
    tests are about the wiring; with the default the delays are learned first, see
    ``test_the_monitor_learns_the_click_delays_when_its_prior_is_wrong``)."""
    cfg = {"enabled": True, "delay_mean_s": DELAY_S, "estimate_delay": False, **offset}
    settings = Settings(
        monitor=MonitorConfig(warmup=10**9),  # no drift test acts: the offset alone
        offset=OffsetConfig(**cfg),  # type: ignore[arg-type]
    )
    return MonitorService(settings, StreamrecMetrics())


def offsets(records: list) -> list[CalibratorUpdate]:
    return [r for r in records if isinstance(r, CalibratorUpdate)]


def test_off_by_default_and_records_carry_no_offset() -> None:
    svc = MonitorService(Settings(), StreamrecMetrics())
    assert svc.offset is None
    assert Settings().offset.half_life == 5_000  # when enabled (1,500 until 2026-12-06)
    rng = np.random.default_rng(0)
    out = [r for b in fake_negative_stream(rng, 200, 2.0, 1.7e9, 0) for r in svc.observe(b)]
    assert offsets(out) == []
    rec = svc._calibrator_message(svc.calibrator, 1.0, "test")
    assert "offset" not in rec.to_dict()


def test_a_calibrated_stream_publishes_no_real_offset() -> None:
    svc = monitor()
    rng = np.random.default_rng(1)
    out = [r for b in fake_negative_stream(rng, 2_000, 1.0, 1.7e9, 0) for r in svc.observe(b)]
    published = [r.offset for r in offsets(out)]
    assert all(abs(o) < 0.15 for o in published if o is not None), published


def test_a_x1_6_jump_is_served_through_the_offset_and_decoded_back_by_a_new_monitor() -> None:
    svc = monitor()
    rng = np.random.default_rng(2)
    lead = fake_negative_stream(rng, 500, 1.0, 1.7e9, 0)
    for b in lead:
        svc.observe(b)
    jump = fake_negative_stream(rng, 1_500, 1.6, 1.7e9 + 500, 500 * RATE)
    records = offsets([r for b in jump for r in svc.observe(b)])
    assert records, "no offset published after a x1.6 jump"
    last = records[-1]
    assert last.reason == "offset" and last.offset == svc.served_offset
    assert abs(last.offset - math.log(1.6)) < 0.2, last.offset
    # the served calibrator is the base (identity here) shifted by the offset
    served = calibrator_from_dict(last.params)
    z = math.log(0.04 / 0.96) + last.offset
    assert served.transform(np.array([0.04]))[0] == pytest.approx(1 / (1 + math.exp(-z)))
    svc.publish()
    sample = svc.metrics.registry.get_sample_value("streamrec_served_offset")
    assert sample == pytest.approx(last.offset)
    # through the control topic's encoding, into a restarted monitor: the base comes back
    decoded = decode_control(encode_control(last))
    assert isinstance(decoded, CalibratorUpdate) and decoded.offset == last.offset
    fresh = monitor()
    fresh.apply_control(decoded)
    assert fresh.calibrator_version == last.version
    assert fresh.calibrator.transform(np.array([0.04]))[0] == pytest.approx(0.04)
    assert fresh.served_offset == last.offset
    again = fresh._calibrator_message(fresh.calibrator, 1.0, "refit")
    assert again.params == last.params and again.version == last.version + 1


def test_a_redelivered_batch_does_not_count_twice() -> None:
    svc = monitor(refresh_every=10**9)  # never refreshes: only the counts are read
    rng = np.random.default_rng(3)
    stream = fake_negative_stream(rng, 300, 1.0, 1.7e9, 0)
    for b in stream:
        svc.observe(b)
    assert svc.offset is not None
    n_seen, clicks = svc.offset.n_seen, svc.offset.state_dict()["c"]
    for b in stream[-50:]:
        svc.observe(b)
    assert svc.offset.n_seen == n_seen == 300 * RATE
    assert svc.offset.state_dict()["c"] == clicks


def test_settings_section_and_checks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.toml"
    path.write_text("[offset]\nenabled = true\nhalf_life = 800\nhorizon = 4000\n")
    s = load_settings(path, env={})
    assert s.offset.enabled and s.offset.half_life == 800
    with pytest.raises(ValueError, match="logit-affine"):
        Settings(monitor=MonitorConfig(calibrator="isotonic"), offset=OffsetConfig(enabled=True))
    # the worker caps the delay model at the attribution window
    svc = monitor()
    assert svc.offset is not None
    assert svc.offset.config.max_delay_s == svc.settings.join.window_s


def test_with_fake_negatives_a_positive_of_an_unknown_impression_is_not_an_impression() -> None:
    # e.g. the positive of an impression seen before a restart: counting it as a new
    # clicked impression would inflate the clicks against the predictions
    svc = monitor(refresh_every=10**9)
    batch = ScoredBatch(0, 0, ["old", "n1", "n2", "n2"], [1.0, 5.0, 5.0, 5.0], [1, 0, 0, 1],
                        [0.05] * 4, [0.05] * 4, ["1"] * 4, [None] * 4)  # fmt: skip
    svc.observe(batch)
    assert svc.offset is not None
    assert not svc.offset.remembers("old") and svc.offset.n_seen == 2
    # n2's fake negative and its positive in one batch: remembered, then clicked
    assert svc.offset.state_dict()["c"] == [0.0, 1.0]


def test_the_monitor_learns_the_click_delays_when_its_prior_is_wrong() -> None:
    """The prior says clicks come after 5 s, they come after ~60 s. The monitor feeds each
    positive's delay (its batch's event time minus its impression's) to the offset, which
    learns the delays once a join window of impressions is complete and then leaves the
    calibrated stream alone; with the prior alone it pulls the score down."""
    from stream.join import JoinConfig

    def run(estimate: bool) -> MonitorService:
        cfg = OffsetConfig(
            enabled=True, delay_mean_s=5.0, estimate_delay=estimate, min_delay_clicks=100,
            half_life=1_500, horizon=12_000,
        )  # fmt: skip
        settings = Settings(
            monitor=MonitorConfig(warmup=10**9), join=JoinConfig(window_s=300.0), offset=cfg
        )
        svc = MonitorService(settings, StreamrecMetrics())
        for b in fake_negative_stream(np.random.default_rng(7), 1_000, 1.0, 1.7e9, 0):
            svc.observe(b)
        return svc

    learned, fixed = run(True), run(False)
    assert learned.offset is not None and fixed.offset is not None
    assert learned.offset.delays is not None and fixed.offset.delays is None
    assert learned.offset.delay_source == "estimated" and fixed.offset.delay_source == "prior"
    f = learned.offset.delays.cdf(learned._offset_now)
    assert f is not None
    # Exponential(60 s) within a 300 s window: F(60 s) = 0.636
    assert learned.offset.delays.at(f, [60.0])[0] == pytest.approx(0.636, abs=0.08)
    assert abs(learned.served_offset) < 0.1
    assert fixed.served_offset < -0.2
    # the gauge says how many clicks the learned delays rest on (0 with the fixed prior)
    for svc, positive in ((learned, True), (fixed, False)):
        svc.publish()
        got = svc.metrics.registry.get_sample_value("streamrec_offset_delay_clicks")
        assert (got is not None and got >= 100) if positive else got == 0.0

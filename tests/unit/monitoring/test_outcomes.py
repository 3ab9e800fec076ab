"""Final labels for the monitor from a fake-negative stream (monitoring.outcomes)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from logs.batches import ScoredBatch
from monitoring.metrics import StreamrecMetrics
from monitoring.outcomes import FinalOutcomes
from stream.join import JoinConfig
from stream.services import MonitorService
from stream.settings import Settings


def test_each_impression_is_judged_once_on_its_final_label() -> None:
    fo = FinalOutcomes(window_s=10.0)
    fo.add(["a", "b", "c"], ts=[0.0, 1.0, 2.0], label=[0, 0, 0], columns={"p": [0.1, 0.2, 0.3]})
    fo.add(["a"], ts=[0.0], label=[1], columns={"p": [0.9]})  # a's click, scored later
    fo.add(["b"], ts=[1.0], label=[0], columns={"p": [0.5]})  # a redelivered fake negative
    assert fo.resolve() == {}  # no window closed yet
    fo.add(["d"], ts=[20.0], label=[0], columns={"p": [0.4]})
    out = fo.resolve()
    assert out["label"].tolist() == [1.0, 0.0, 0.0]
    assert out["p"].tolist() == [0.1, 0.2, 0.3]  # the first (impression-time) scores
    assert fo.duplicates == 1 and fo.pending == 1
    fo.add(["c"], ts=[2.0], label=[1], columns={"p": [0.9]})  # after c was resolved
    assert fo.late_positives == 1
    assert fo.resolve(flush=True)["label"].tolist() == [0.0]


def test_rejects_negative_window() -> None:
    with pytest.raises(ValueError):
        FinalOutcomes(window_s=-1.0)


def _batch(ids: list[str], ts: list[float], label: list[int], p: float) -> ScoredBatch:
    n = len(ids)
    return ScoredBatch(1, 0, ids, ts, label, [p] * n, [p] * n, ["1"] * n, [None] * n)


def test_monitor_does_not_count_fake_negatives() -> None:
    """Fake-negative stream at a true CTR of 0.1: the monitor's label rate is 0.1 (final
    labels), not 0.1 / 1.1 (the stream's) and not lower (clicks still on their way)."""
    rng = np.random.default_rng(0)
    assert Settings().join.delayed_feedback == "fake_negative"  # the worker's default
    join = JoinConfig(window_s=2000.0, lateness_s=0.0, delayed_feedback="fake_negative")
    settings = Settings(join=join)
    assert settings.ranker.loss == "fnw"
    mon = MonitorService(settings, StreamrecMetrics(registry=CollectorRegistry()))
    n, b = 20_000, 500
    clicked = rng.random(n) < 0.1
    for start in range(0, n, b):  # one impression a second
        ids = [f"i{k}" for k in range(start, start + b)]
        mon.observe(_batch(ids, [float(k) for k in range(start, start + b)], [0] * b, 0.1))
        # the clicks of the previous batch's impressions arrive now (inside the window)
        back = [k for k in range(max(0, start - b), start) if clicked[k]]
        mon.observe(_batch([f"i{k}" for k in back], [float(k) for k in back], [1] * len(back), 0.1))
    assert mon.n_seen > 0.8 * n
    assert mon.outcomes is not None and mon.outcomes.late_positives == 0
    rate = mon.served.lifetime().actual_ctr
    assert rate == pytest.approx(clicked[: mon.n_seen].mean(), abs=1e-9)


def test_a_batch_spanning_more_than_a_window_is_resolved_record_by_record() -> None:
    fo = FinalOutcomes(window_s=10.0)
    fo.add(["a", "b", "c"], ts=[0.0, 15.0, 30.0], label=[0, 0, 0], columns={"p": [1.0, 2.0, 3.0]})
    fo.add(["b"], ts=[15.0], label=[1], columns={"p": [9.0]})
    out = fo.resolve()  # clock 30: a (0) and b (15) are due, c is not
    assert out["p"].tolist() == [1.0, 2.0] and out["label"].tolist() == [0.0, 1.0]
    assert fo.pending == 1


def test_monitor_judges_final_labels_on_the_dfm_stream() -> None:
    """DFM stream at a true CTR of 0.1, delays ~Exp(60 s), T = 30 s: the records' label
    rate is 0.1 (1 - e^-0.5) ~ 0.04; the monitor's, on final labels, is the clicks' 0.1
    (each impression once: its click-time positive or its unclicked record, made 1 by a
    weight-0 late click)."""
    rng = np.random.default_rng(1)
    join = JoinConfig(window_s=600.0, lateness_s=0.0, delayed_feedback="dfm", dfm_observe_s=30.0)
    settings = Settings(join=join)
    assert settings.ranker.loss == "dfm"  # "bce" on the DFM stream is read as DFM
    mon = MonitorService(settings, StreamrecMetrics(registry=CollectorRegistry()))
    assert mon.outcomes is not None and mon.outcomes.positives_first
    n = 20_000
    ts = np.arange(n, dtype=np.float64)  # one impression a second
    clicked = rng.random(n) < 0.1
    delay = rng.exponential(60.0, n)
    events = []  # (event time, impression, label) in the order the joiner sends them
    for k in range(n):
        if clicked[k] and delay[k] <= 30.0:
            events.append((ts[k] + delay[k], k, 1))
        else:
            events.append((ts[k] + 30.0, k, 0))
            if clicked[k] and delay[k] <= 600.0:
                events.append((ts[k] + delay[k], k, 1))  # the weight-0 late click
    events.sort()
    for start in range(0, len(events), 500):
        part = events[start : start + 500]
        mon.observe(_batch([f"i{k}" for _, k, _ in part], [ts[k] for _, k, _ in part],
                           [lab for _, _, lab in part], 0.1))  # fmt: skip
    assert mon.n_seen > 0.8 * n and mon.outcomes.late_positives == 0
    final = clicked & (delay <= 600.0)
    assert mon.served.lifetime().actual_ctr == pytest.approx(final[: mon.n_seen].mean(), abs=1e-9)
    first_records = sum(1 for k in range(n) if clicked[k] and delay[k] <= 30.0)
    assert first_records < 0.6 * final.sum()  # most clicks came after T: the records alone are low

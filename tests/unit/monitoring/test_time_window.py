"""Event-time windows, fixed-bin reliability and snapshots from running sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitoring.calibration import (
    DEFAULT_RELIABILITY_EDGES,
    binned_sums,
    compute_reliability,
    compute_snapshot,
    log_loss,
    normalized_entropy,
    reliability_bins,
)
from monitoring.windows import CalibrationWindow, TimeCalibrationWindow

EDGES = [0.0, 0.02, 0.05, 0.1, 1.0]


def naive_fixed_bins(
    p: list[float], y: list[float], edges: list[float]
) -> list[tuple[float, float, float]]:
    """(count, sum p, sum y) per bin by a loop; below the first edge -> bin 0, at or above
    the last -> the last bin."""
    k = len(edges) - 1
    out = [[0.0, 0.0, 0.0] for _ in range(k)]
    for pi, yi in zip(p, y, strict=True):
        b = 0
        for j in range(k):
            if pi >= edges[j]:
                b = j
        out[b][0] += 1
        out[b][1] += pi
        out[b][2] += yi
    return [tuple(row) for row in out]  # type: ignore[misc]  # rows of three


def stream(rng: np.random.Generator, n: int, t0: float = 0.0, rate: float = 10.0):
    p = rng.uniform(0.0, 0.2, n)
    y = (rng.random(n) < p).astype(float)
    ts = t0 + np.arange(n) / rate
    return p, y, ts


# --- fixed bins --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 1)), min_size=1, max_size=60))
def test_binned_sums_match_a_naive_loop(rows: list[tuple[float, int]]) -> None:
    p = [r[0] for r in rows]
    y = [float(r[1]) for r in rows]
    got = np.stack(binned_sums(p, y, edges=EDGES), axis=1)
    assert np.allclose(got, naive_fixed_bins(p, y, EDGES))
    assert got[:, 0].sum() == len(p)  # every example lands in a bin


def test_reliability_bins_with_edges_skip_empty_bins_and_agree_with_the_sums() -> None:
    p = [0.01, 0.03, 0.04, 0.5]
    y = [0, 1, 0, 1]
    assert reliability_bins(p, y, edges=EDGES) == [
        (0.01, 0.0, 1),
        (pytest.approx(0.035), 0.5, 2),
        (0.5, 1.0, 1),
    ]
    rel = compute_reliability(*binned_sums(p, y, edges=EDGES), edges=EDGES)
    assert rel.count.tolist() == [1.0, 2.0, 0.0, 1.0]
    assert math.isnan(rel.mean_p[2])
    naive_ece = (1 * 0.01 + 2 * abs(0.035 - 0.5) + 1 * 0.5) / 4
    assert rel.ece == pytest.approx(naive_ece)


@pytest.mark.parametrize("edges", [[0.5], [0.0, 0.2, 0.1], [-0.1, 1.0], [0.0, 1.5]])
def test_bad_edges_are_rejected(edges: list[float]) -> None:
    with pytest.raises(ValueError, match="edges"):
        binned_sums([0.1], [0], edges=edges)


def test_count_window_reliability_is_equal_mass_over_the_window_only() -> None:
    cw = CalibrationWindow(size=100)
    cw.update(predictions=np.full(50, 0.9), labels=np.ones(50))  # evicted below
    rng = np.random.default_rng(0)
    p = rng.uniform(0.0, 0.1, 100)
    y = (rng.random(100) < p).astype(float)
    cw.update(predictions=p, labels=y)
    rel = cw.reliability(n_bins=4)
    assert rel.count.tolist() == [25.0] * 4
    assert np.all(np.diff(rel.mean_p) > 0)
    naive = reliability_bins(p, y, n_bins=4)
    assert np.allclose(rel.mean_p, [b[0] for b in naive])
    assert np.allclose(rel.mean_y, [b[1] for b in naive])
    fixed = cw.reliability(edges=EDGES)
    assert fixed.count.sum() == 100 and fixed.edges is not None


def test_an_empty_count_window_has_empty_bins() -> None:
    rel = CalibrationWindow(size=10).reliability(n_bins=3)
    assert rel.count.tolist() == [0.0, 0.0, 0.0] and math.isnan(rel.ece)


# --- snapshots from sums -----------------------------------------------------------------


def test_compute_snapshot_equals_the_count_window_lifetime_and_naive_formulas() -> None:
    rng = np.random.default_rng(1)
    p, y, _ = stream(rng, 3_000)
    cw = CalibrationWindow(size=10)
    cw.update(predictions=p, labels=y)
    snap = compute_snapshot(
        p.size,
        float(p.size),
        float(p.sum()),
        float(y.sum()),
        float(np.dot(p, 1 - p)),
        log_loss(p, y) * p.size,
    )
    life = cw.lifetime()
    for field in ("n", "positives", "mean_p", "actual_ctr", "ratio", "ne", "log_loss", "z"):
        assert getattr(snap, field) == pytest.approx(getattr(life, field)), field
    assert math.isnan(snap.ece) and math.isnan(snap.auc)
    assert snap.ne == pytest.approx(normalized_entropy(p, y))
    assert compute_snapshot(0, 0, 0, 0, 0, 0).n == 0


# --- event-time window -------------------------------------------------------------------


def test_time_window_equals_a_count_window_over_the_same_examples() -> None:
    rng = np.random.default_rng(2)
    p, y, ts = stream(rng, 6_000, t0=6_000.0, rate=10.0)  # 600 s, buckets of 60 s
    tw = TimeCalibrationWindow(span_s=300.0, bucket_s=60.0, edges=EDGES)
    for s in range(0, p.size, 512):
        tw.update(predictions=p[s : s + 512], labels=y[s : s + 512], ts=ts[s : s + 512])
    newest = math.floor(ts.max() / 60.0)
    inside = np.floor(ts / 60.0) > newest - 5  # the newest five buckets
    ref = CalibrationWindow(size=int(inside.sum()))
    ref.update(predictions=p[inside], labels=y[inside])
    got, want = tw.window(), ref.window()
    assert got.n == want.n == int(inside.sum())
    for field in ("positives", "mean_p", "actual_ctr", "ratio", "ne", "log_loss", "z"):
        assert getattr(got, field) == pytest.approx(getattr(want, field)), field
    assert math.isnan(got.auc)
    rel = tw.reliability()
    assert np.allclose(
        np.stack([rel.count, rel.count * rel.mean_p, rel.count * rel.mean_y], axis=1),
        naive_fixed_bins(p[inside].tolist(), y[inside].tolist(), EDGES),
        equal_nan=True,
    )
    assert got.ece == pytest.approx(rel.ece)
    assert tw.lifetime().n == p.size and tw.watermark == ts.max()


def test_out_of_order_events_go_to_their_bucket_and_too_old_ones_only_to_lifetime() -> None:
    tw = TimeCalibrationWindow(span_s=120.0, bucket_s=60.0)
    tw.update(predictions=[0.1], labels=[1], ts=[1_000.0])  # bucket 16
    tw.update(predictions=[0.1, 0.2], labels=[0, 0], ts=[1_130.0, 1_010.0])  # 18 and 16
    assert tw.window().n == 1  # bucket 16 left the two-bucket window when 18 arrived
    tw.update(predictions=[0.3], labels=[1], ts=[1_090.0])  # bucket 18 is newest: 17 is in
    assert tw.window().n == 2
    tw.update(predictions=[0.4], labels=[1], ts=[500.0])  # far too old
    assert tw.n_late == 2  # the 1_010 s example (its bucket had expired) and this one
    assert tw.window().n == 2 and tw.lifetime().n == 5


def test_a_quiet_gap_longer_than_the_window_empties_it() -> None:
    tw = TimeCalibrationWindow(span_s=60.0, bucket_s=10.0)
    tw.update(predictions=[0.1, 0.2], labels=[1, 0], ts=[0.0, 5.0])
    tw.update(predictions=[0.3], labels=[0], ts=[1_000.0])
    assert tw.window().n == 1 and tw.window().mean_p == pytest.approx(0.3)
    # a reused slot is reset, not added to
    tw.update(predictions=[0.5], labels=[1], ts=[1_000.0 + 60.0 * 100])
    assert tw.window().n == 1


def test_empty_time_window_and_rejected_batches() -> None:
    tw = TimeCalibrationWindow()
    assert tw.window().n == 0 and math.isnan(tw.window().ratio)
    assert tw.reliability().count.sum() == 0
    assert tw.reliability().edges is not None
    assert len(tw.reliability().count) == len(DEFAULT_RELIABILITY_EDGES) - 1
    with pytest.raises(ValueError, match="ts"):
        tw.update(predictions=[0.1], labels=[1], ts=[0.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        tw.update(predictions=[0.1], labels=[1], ts=[math.nan])
    with pytest.raises(ValueError, match="lie in"):
        tw.update(predictions=[1.5], labels=[1], ts=[0.0])
    assert tw.lifetime().n == 0
    with pytest.raises(ValueError, match="bucket_s"):
        TimeCalibrationWindow(span_s=10.0, bucket_s=20.0)

"""The monitor's drift test and calibrator kind are settings."""

from __future__ import annotations

import numpy as np
import pytest

from monitoring.metrics import StreamrecMetrics
from stream.events import ScoredBatch
from stream.services import MonitorService
from stream.settings import MonitorConfig, Settings


def batches(rng: np.random.Generator, n: int, true_scale: float) -> list[ScoredBatch]:
    out = []
    for k in range(n):
        p = rng.uniform(0.02, 0.06, 1024)
        y = (rng.random(1024) < p * true_scale).astype(int)
        ids = [f"{k}-{i}" for i in range(1024)]
        out.append(
            ScoredBatch(
                0,
                0,
                ids,
                [1.7e9 + k] * 1024,
                y.tolist(),
                p.tolist(),
                p.tolist(),
                ["1"] * 1024,
                [None] * 1024,
            )  # fmt: skip
        )
    return out


def run(detector: str, calibrator: str, recal_window: int) -> tuple[MonitorService, list]:
    settings = Settings(
        monitor=MonitorConfig(
            warmup=0, detector=detector, calibrator=calibrator, recal_window=recal_window
        )
    )
    svc = MonitorService(settings, StreamrecMetrics())
    rng = np.random.default_rng(4)
    for b in batches(rng, 20, 1.0):
        svc.observe(b)
    messages = [m for b in batches(rng, 40, 1.6) for m in svc.observe(b)]
    return svc, [m for m in messages if m["kind"] == "calibrator"]


@pytest.mark.parametrize("calibrator", ["shift", "platt"])
@pytest.mark.parametrize("detector", ["window_z", "cusum", "page_hinkley", "adwin"])
def test_each_detector_triggers_a_recalibration_after_an_abrupt_ctr_jump(
    detector: str, calibrator: str
) -> None:
    svc, cal = run(detector, calibrator, 2_500)
    assert all(m["params"]["kind"] == calibrator for m in cal)
    assert cal, f"{detector}: no accepted recalibration after a x1.6 jump"
    assert svc.calibrator.transform(np.array([0.04]))[0] > 0.05


@pytest.mark.parametrize("calibrator", ["isotonic", "histogram"])
def test_nonparametric_calibrators_are_fitted_published_and_applied(calibrator: str) -> None:
    # they need a larger fit window than Platt's 2 parameters
    svc, cal = run("window_z", calibrator, 10_000)
    assert cal and all(m["params"]["kind"] == calibrator for m in cal)
    assert svc.calibrator.transform(np.array([0.04]))[0] > 0.042


def test_unknown_detector_or_calibrator_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="monitor.detector"):
        MonitorConfig(detector="nope")
    with pytest.raises(ValueError, match="monitor.calibrator"):
        MonitorConfig(calibrator="nope")

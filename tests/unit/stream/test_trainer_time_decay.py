"""TrainerService with ``TrainerConfig.time_decay_half_life_s``: older examples weigh less."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig, TorchRanker
from learners.weighting import time_decay_weights
from logs.events import Impression, LabeledExample, example_row
from monitoring.metrics import StreamrecMetrics
from stream.join import JoinConfig  # the window scheme: final labels
from stream.services import TrainerService
from stream.settings import Settings, TrainerConfig

RANKER = RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=2**10))
N = 32


def _examples() -> list[LabeledExample]:
    # Impressions spread over 320 s, labelled out of order (old ones arrive late).
    out = []
    for k in range(N):
        ts = 1_700_000_000.0 + 10.0 * ((k * 7) % N)
        imp = Impression(f"imp-{k}", ts, f"u{k % 5}", f"i{k % 7}", position=1 + k % 3)
        out.append(LabeledExample(imp, int(k % 4 == 0), ts + 30.0, weight=1.0 + (k % 2)))
    return out


@pytest.mark.parametrize("half_life", [None, 60.0])
def test_step_learns_with_the_example_weights_times_the_time_decay(
    half_life: float | None,
) -> None:
    settings = Settings(
        join=JoinConfig(),
        ranker=RANKER,
        trainer=TrainerConfig(batch_size=N, time_decay_half_life_s=half_life),
    )
    svc = TrainerService(settings, StreamrecMetrics())
    batch = _examples()
    svc.add(batch)
    assert svc.step() is not None

    rows = [example_row(e.impression) for e in batch]
    y = np.array([e.label for e in batch], dtype=np.float64)
    w = np.array([e.weight for e in batch])
    if half_life is not None:
        ts = np.array([e.impression.ts for e in batch])
        w = w * time_decay_weights(ts, ts.max(), half_life)
        assert w.min() < 0.05 * w.max()  # the decay really bites in this batch
    reference = TorchRanker(RANKER, seed=settings.trainer.seed, online=True)
    reference.learn_many(rows, y, w)
    np.testing.assert_array_equal(
        svc.ranker.predict_proba_many(rows), reference.predict_proba_many(rows)
    )


@pytest.mark.parametrize("bad", [0.0, -5.0, math.nan, math.inf])
def test_non_positive_half_life_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="time_decay_half_life_s"):
        TrainerConfig(time_decay_half_life_s=bad)

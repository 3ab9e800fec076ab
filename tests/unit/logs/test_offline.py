"""Offline pretraining and prequential evaluation (no Kafka)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig, TorchRanker
from logs.offline import evaluate, log_examples, pretrain, quality
from logs.synthetic import SyntheticConfig, generate, write_synthetic
from monitoring.offset import LogitOffset, OffsetConfig
from stream.cli import main

SMALL = RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=2**12))


@pytest.fixture(scope="module")
def examples():
    return log_examples(generate(SyntheticConfig(n_impressions=3000, seed=3)))


def test_log_examples_never_expose_true_p_or_propensity(examples) -> None:
    assert len(examples) == 3000
    assert all("true_p" not in r and "propensity" not in r for r in examples.rows)
    assert {"user_id", "item_id", "position"} <= set(examples.rows[0])
    assert examples.true_p is not None and np.all((examples.true_p >= 0) & (examples.true_p <= 1))


def test_pretrain_writes_a_checkpoint_that_warm_starts_at_the_online_rate(
    examples, tmp_path: Path
) -> None:
    out = tmp_path / "r.pt"
    report = pretrain(examples, out, config=SMALL, batch_size=256, progress=False)
    assert report["examples"] == 3000 and out.exists()
    assert report["lr"] == SMALL.base_lr
    warm = TorchRanker.load(out, online=True)
    assert warm.lr == pytest.approx(SMALL.base_lr * SMALL.online_lr_scale)
    assert all(g["lr"] == pytest.approx(warm.lr) for g in warm.optimizer.param_groups)
    # it learned something: better log loss than a cold model on the same data
    cold = TorchRanker(SMALL, seed=0).predict_proba_many(examples.rows)
    warm_p = warm.predict_proba_many(examples.rows)
    from monitoring.calibration import log_loss

    assert log_loss(warm_p, examples.y) < log_loss(cold, examples.y)


@pytest.mark.parametrize(
    ("ramp_from", "sizes"),
    [(None, [500] * 6), (32, [32, 64, 128, 256, 500, 500, 500, 500, 500, 20])],
)
def test_evaluate_is_test_then_train(examples, ramp_from: int | None, sizes: list[int]) -> None:
    a, b = TorchRanker(SMALL, seed=1), TorchRanker(SMALL, seed=1)
    report = evaluate(examples, a, batch_size=500, progress=False, ramp_from=ramp_from)
    expected = []
    i = 0
    for size in sizes:  # the first batches grow from ramp_from rows up to batch_size
        rows, y = examples.rows[i : i + size], examples.y[i : i + size]
        expected.append(b.predict_proba_many(rows))
        b.learn_many(rows, y)
        i += size
    assert i == len(examples)
    np.testing.assert_allclose(report["scores"], np.concatenate(expected), rtol=1e-6)
    assert report["all"]["n"] == 3000
    assert "ratio_vs_true_p" in report["all"]


class HalfTheRate:
    """Predicts half the click rate of the labels learned so far: calibration ratio ~0.5."""

    def __init__(self) -> None:
        self.clicks, self.n = 1.0, 20.0

    def predict_proba_many(self, rows: list[dict[str, object]]) -> np.ndarray:
        return np.full(len(rows), 0.5 * self.clicks / self.n)

    def learn_many(self, rows: list[dict[str, object]], y: np.ndarray) -> None:
        self.clicks += float(np.sum(y))
        self.n += len(y)


def test_evaluate_serves_through_the_offset(examples) -> None:
    cfg = OffsetConfig(enabled=True, half_life=300, horizon=1200)
    report = evaluate(examples, HalfTheRate(), batch_size=100, progress=False, offset=cfg)
    plain = evaluate(examples, HalfTheRate(), batch_size=100, progress=False)
    # the raw block is the run without the offset; the served one is corrected
    np.testing.assert_allclose(report["raw_scores"], plain["scores"])
    assert report["raw"] == plain["all"]
    assert report["raw"]["calibration_ratio"] < 0.6
    # most of the gap closed (the first batches are served before any click is known)
    assert abs(report["all"]["calibration_ratio"] - 1.0) < 0.25
    assert report["offset"]["final"] == pytest.approx(np.log(2.0), abs=0.2)
    # served = the offset as it stood before each batch (it learns a batch once scored);
    # labels are final, so no delay model whatever the settings say
    off = LogitOffset(dataclasses.replace(cfg, delay_mean_s=None))
    start = 0
    for size in [32, 64, *[100] * 29, 4]:
        s = slice(start, start + size)
        np.testing.assert_allclose(report["scores"][s], off.transform(plain["scores"][s]))
        ids = [str(i) for i in range(s.start, s.stop)]
        off.observe_impressions(ids, examples.ts[s], plain["scores"][s])
        off.observe_clicks([ids[j] for j in np.flatnonzero(examples.y[s])])
        off.refresh(float(examples.ts[s].max()))
        start += size
    assert start == len(examples)


def test_evaluate_offset_leaves_a_calibrated_learner_alone(examples) -> None:
    """With the truth as the score there is nothing to correct: the shrunk offset stays
    within the noise and the served ratio as close to 1 as the raw one."""

    class Truth:
        def __init__(self) -> None:
            self.i = 0

        def predict_proba_many(self, rows: list[dict[str, object]]) -> np.ndarray:
            assert examples.true_p is not None
            p = examples.true_p[self.i : self.i + len(rows)]
            self.i += len(rows)
            return p

        def learn_many(self, rows: list[dict[str, object]], y: np.ndarray) -> None:
            pass

    report = evaluate(examples, Truth(), batch_size=100, progress=False,
                      offset=OffsetConfig(enabled=True))  # fmt: skip
    assert report["offset"]["mean_abs"] < 0.05
    assert abs(report["all"]["calibration_ratio"] - report["raw"]["calibration_ratio"]) < 0.03


def test_quality_matches_definitions() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.4])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    q = quality(p, y)
    assert q["auc"] == 1.0
    assert q["calibration_ratio"] == pytest.approx(1.0 / 2.0)


def test_cli_pretrain_then_evaluate(tmp_path: Path) -> None:
    log = tmp_path / "log.csv.gz"
    write_synthetic(SyntheticConfig(n_impressions=2000, seed=5), log)
    runner = CliRunner()
    r = runner.invoke(main, ["pretrain", str(log), "--out", str(tmp_path / "m.pt"),
                             "--model", "logreg", "--limit", "1000"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "eval.json"
    r = runner.invoke(main, ["evaluate", str(log), "--warm-start", str(tmp_path / "m.pt"),
                             "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["examples"] == 2000 and "before_drift" in report and "after_drift" in report
    assert "raw" not in report  # the offset is off by default, as in the worker
    r = runner.invoke(main, ["evaluate", str(log), "--model", "logreg", "--offset",
                             "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert "served through the logit offset" in r.output and "raw ranker: NE" in r.output
    assert report["raw"]["n"] == 2000 and "final" in report["offset"]
    assert "raw_scores" not in report
    r = runner.invoke(main, ["evaluate", str(log), "--model", "no-such-model"])
    assert r.exit_code != 0 and "unknown model" in r.output


def test_pretrain_with_a_half_life_follows_the_recent_history(examples, tmp_path: Path) -> None:
    # Old history clicks on everything, recent history rarely: with a short half-life the
    # pretrained model's CTR is the recent one.
    recent = examples.ts >= np.median(examples.ts)
    y = np.where(recent, (np.arange(len(examples)) % 20 == 0).astype(np.float64), 1.0)
    log = dataclasses.replace(examples, y=y)
    span = float(examples.ts.max() - examples.ts.min())
    means = {}
    for half_life in (None, span / 20):
        out = tmp_path / f"{half_life}.pt"
        report = pretrain(log, out, config=SMALL, batch_size=256, progress=False,
                          half_life_s=half_life, epochs=3)  # fmt: skip
        assert report["half_life_s"] == half_life
        means[half_life] = TorchRanker.load(out).predict_proba_many(log.rows).mean()
    assert means[None] > 0.3  # the old clicks dominate without decay
    assert means[span / 20] < 0.15


def test_pretrain_rejects_a_non_positive_half_life(examples, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        pretrain(examples, tmp_path / "m.pt", config=SMALL, progress=False, half_life_s=0.0)


def test_a_logs_own_history_columns_give_way_to_the_stages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With historical features on, a log's own ``hist_*`` columns are dropped (the stage
    computes those names; a warning counts them); off, they stay features like any other."""
    from features.config import FeatureConfig

    df = generate(SyntheticConfig(n_impressions=400, seed=4))
    df["hist_user_since_clk"] = 0.5  # e.g. a log exported with another system's history
    df["hist_seq"] = "i1"
    with caplog.at_level("WARNING", logger="logs.offline"):
        on = log_examples(df, FeatureConfig())
    assert "dropped 800 hist_* values" in caplog.text
    first = on.rows[0]  # the log's first impression: no history at all yet
    assert "hist_seq" not in first and "hist_user_since_clk" not in first
    assert first["hist_user_imp_1h"] == 0.0  # the stage's own values are there
    off = log_examples(df)
    assert off.rows[0]["hist_user_since_clk"] == 0.5 and off.rows[0]["hist_seq"] == "i1"

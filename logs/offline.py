"""In-process (no Kafka) training and evaluation over a canonical log.

* :func:`pretrain` trains a ranker offline at its base learning rate and writes a
  checkpoint; a worker warm-starts from it (``trainer.warm_start``) and continues online at
  ``base_lr * online_lr_scale``. With ``half_life_s`` older history weighs less
  (:func:`learners.weighting.time_decay_weights`, relative to the newest example).
* :func:`evaluate` runs the same learner prequentially (test-then-train, as the streaming
  trainer does) and reports AUC, log loss, normalised entropy, calibration ratio, ECE,
  examples per second and, when the log carries ``true_p``, the gap to the truth. With
  ``offset`` it scores as a worker with ``[offset] enabled`` serves: the ranker's score
  through :class:`monitoring.offset.LogitOffset`, and reports the raw ranker beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.config import FeatureConfig
from features.replay import attach_log
from features.stage import FeatureStage
from learners.ranker import RankerConfig, TorchRanker
from learners.ranker_config import MULTITASK_MODELS
from learners.weighting import time_decay_weights
from logs.events import without_history
from logs.io import frame_to_rows, read_log_frame
from monitoring.calibration import (
    auc,
    calibration_ratio,
    expected_calibration_error,
    log_loss,
    normalized_entropy,
)
from monitoring.offset import LogitOffset, OffsetConfig

log = logging.getLogger(__name__)


@dataclass
class LogExamples:
    """A log as learner inputs: flat feature rows and aligned arrays (length N)."""

    rows: list[dict[str, object]]
    y: np.ndarray  # (N,) float64 0/1
    ts: np.ndarray  # (N,) float64 epoch s
    true_p: np.ndarray | None  # (N,) float64 or None
    #: (N,) float64 seconds from impression to click (NaN where not clicked or unknown), or
    #: None; a DFM ranker pretrains its delay head on them (:func:`pretrain`)
    delay: np.ndarray | None = None
    #: (N,) float64 0/1, the second label "clicked and converted" (CTCVR, ESMM's
    #: entire-space label) of a log with a ``conversion`` column, else None
    y2: np.ndarray | None = None
    #: (N,) float64 its truth ``true_p * true_cvr`` (synthetic logs), else None
    true_p2: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def slice(self, start: int, stop: int | None = None) -> LogExamples:
        s = slice(start, stop)

        def part(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[s]

        return LogExamples(self.rows[s], self.y[s], self.ts[s], part(self.true_p),
                           part(self.delay), part(self.y2), part(self.true_p2))  # fmt: skip


def log_examples(df: pd.DataFrame, features: FeatureConfig | None = None) -> LogExamples:
    """Rows as the trainer sees them: ids, position and features; never true_p/propensity.

    ``features``: attach the historical features of :class:`features.stage.FeatureStage`
    (``hist_*``, ``hist_seq``, ``hist_seq_age``), computed point-in-time by replaying the log
    in event-time order (impressions at ``ts``, clicks at ``click_ts``; a click without a
    ``click_ts`` counts from its impression's ``ts``) through the same stage the worker
    runs; the log's own ``hist_*`` columns, if any, are dropped (the stage owns those
    names, :func:`logs.events.without_history`; a warning says how many). None: no
    historical features.
    """
    rows: list[dict[str, object]] = []
    log_rows = frame_to_rows(df)
    dropped = 0
    for r in log_rows:
        row: dict[str, object]
        if features is None:
            row = dict(r.features)
        else:
            row, n = without_history(r.features)
            dropped += n
        row["user_id"] = r.user_id
        row["item_id"] = r.item_id
        if r.position is not None:
            row["position"] = r.position
        rows.append(row)
    if features is not None:
        hist = attach_log(
            FeatureStage(features),
            ts=[r.ts for r in log_rows],
            impression_id=[r.impression_id for r in log_rows],
            user_id=[r.user_id for r in log_rows],
            item_id=[r.item_id for r in log_rows],
            position=[r.position for r in log_rows],
            attrs=[r.features for r in log_rows],
            click_ts=[
                (r.click_ts if r.click_ts is not None else r.ts) if r.click else None
                for r in log_rows
            ],
        )
        for row, f in zip(rows, hist, strict=True):
            row.update(f)
        if dropped:
            log.warning(
                "dropped %d hist_* values the log brought itself: with historical features "
                "on, the feature stage computes them",
                dropped,
            )
    y = df["click"].to_numpy(dtype=np.float64)
    ts = df["ts"].to_numpy(dtype=np.float64)
    tp = df["true_p"].to_numpy(dtype=np.float64) if "true_p" in df else None
    delay = None
    if "click_ts" in df:
        with np.errstate(invalid="ignore"):
            d = df["click_ts"].to_numpy(dtype=np.float64) - ts
        delay = np.where((y == 1) & (d >= 0), d, np.nan)
    y2 = tp2 = None
    if "conversion" in df:
        y2 = df["conversion"].to_numpy(dtype=np.float64)
        if tp is not None and "true_cvr" in df:
            tp2 = tp * df["true_cvr"].to_numpy(dtype=np.float64)
    return LogExamples(rows, y, ts, tp, delay, y2, tp2)


#: elapsed seconds given to an unclicked example of a log (final labels): "never clicked"
#: (the DFM loss's hazard is clamped long before: its term is BCE's -log(1 - p))
FINAL_ELAPSED_S = 1e9


def final_elapsed(examples: LogExamples) -> np.ndarray | None:
    """Elapsed seconds for a DFM ranker on a log's final labels: each click's delay, and
    :data:`FINAL_ELAPSED_S` for the unclicked; None (labels only: BCE, the delay head
    untrained) when some click's delay is unknown."""
    if examples.delay is None:
        return None
    clicked = examples.y == 1
    if not np.all(np.isfinite(examples.delay[clicked])):
        return None
    return np.where(clicked, np.nan_to_num(examples.delay, nan=0.0), FINAL_ELAPSED_S)


RAMP_FROM = 32  # rows of evaluate's first batch (see evaluate)


#: numeric slots the ranker gets when the historical features are on (the stage emits
#: about 40 ``hist_*`` numerics; EncoderConfig's default of 8 would keep the first 8 only)
HIST_NUM_FIELDS = 64


def with_hist_slots(config: RankerConfig) -> RankerConfig:
    """``config`` with at least :data:`HIST_NUM_FIELDS` numeric encoder slots."""
    if config.encoder.max_num_fields >= HIST_NUM_FIELDS:
        return config
    enc = dataclasses.replace(config.encoder, max_num_fields=HIST_NUM_FIELDS)
    return dataclasses.replace(config, encoder=enc)


def for_final_labels(config: RankerConfig) -> RankerConfig:
    """FNW is the loss of a fake-negative stream; a log's labels are final, and plain BCE
    learns the CTR from them (a worker warm-started from it continues with "fnw"). FNC,
    the output link of BCE on that stream, is off for the same reason."""
    if config.loss == "fnw":
        config = dataclasses.replace(config, loss="bce")
    return dataclasses.replace(config, fnc=False) if config.fnc else config


def _batches(n: int, batch_size: int, ramp_from: int | None = None) -> Sequence[slice]:
    """Consecutive slices of ``batch_size`` rows; with ``ramp_from``, the first ones are
    ``ramp_from``, twice that, ... rows until ``batch_size`` is reached."""
    out = []
    i, size = 0, batch_size if ramp_from is None else min(ramp_from, batch_size)
    while i < n:
        out.append(slice(i, min(i + size, n)))
        i += size
        size = min(2 * size, batch_size)
    return out


def pretrain(
    examples: LogExamples,
    out: str | Path,
    *,
    config: RankerConfig | None = None,
    epochs: int = 1,
    batch_size: int = 1024,
    seed: int = 0,
    progress: bool = True,
    half_life_s: float | None = None,
) -> dict[str, Any]:
    """Train offline at the base learning rate (shuffled each epoch) and save a checkpoint.

    ``half_life_s`` (seconds, or None for equal weights): each example is weighted by
    ``0.5 ** (age / half_life_s)``, its age counted back from the newest ``ts`` in
    ``examples``, so that older history weighs less.

    Returns a summary (examples, epochs, seconds, final training log loss on the data).

    A DFM ranker (``config.loss == "dfm"``) with the clicks' delays (``examples.delay``)
    starts its delay head at their mean and trains it on them (:func:`final_elapsed`).
    """
    from tqdm import tqdm

    if len(examples) == 0:
        raise ValueError("pretrain needs at least one example")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    weights = (
        None
        if half_life_s is None
        else time_decay_weights(examples.ts, float(examples.ts.max()), half_life_s)
    )
    # No bias warm-up: pretraining is not scored, and re-centring the bias on the first
    # steps of a short offline run (50 steps) left the online model's level drifting
    # afterwards (bench.calibration, no drift: within +-5% 40% of the time, 72% without).
    config = for_final_labels(dataclasses.replace(config or RankerConfig(), bias_warmup=0.0))
    ranker = TorchRanker(config, seed=seed, online=False)
    # a DFM ranker also learns the click delays of the log (its delay head)
    elapsed = final_elapsed(examples) if config.loss == "dfm" else None
    if elapsed is not None and examples.y.any():  # the head starts at the log's mean delay
        ranker.start_delay_at(max(float(elapsed[examples.y == 1].mean()), 1e-3))
    rng = np.random.default_rng(seed)
    n = len(examples)
    t0 = time.perf_counter()
    bar = tqdm(total=n * epochs, unit="ex", desc="pretrain", disable=not progress)
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in _batches(n, batch_size):
            idx = order[s]
            w = None if weights is None else weights[idx]
            e = None if elapsed is None else elapsed[idx]
            ranker.learn_many([examples.rows[i] for i in idx], examples.y[idx], w, elapsed=e)
            bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0
    ranker.save(out)
    p = np.concatenate([ranker.predict_proba_many(examples.rows[s]) for s in _batches(n, 8192)])
    return {
        "checkpoint": str(out),
        "examples": n,
        "epochs": epochs,
        "seconds": seconds,
        "examples_per_s": n * epochs / seconds,
        "train_log_loss": log_loss(p, examples.y),
        "train_calibration_ratio": calibration_ratio(p, examples.y),
        "lr": ranker.lr,
        "half_life_s": half_life_s,
    }


def quality(p: np.ndarray, y: np.ndarray, true_p: np.ndarray | None = None) -> dict[str, float]:
    """The standard quality block: AUC, log loss, NE, calibration ratio, ECE (+ truth)."""
    out = {
        "n": float(len(y)),
        "ctr": float(y.mean()) if len(y) else math.nan,
        "mean_p": float(p.mean()) if len(p) else math.nan,
        "auc": auc(p, y),
        "log_loss": log_loss(p, y),
        "normalized_entropy": normalized_entropy(p, y),
        "calibration_ratio": calibration_ratio(p, y),
        "ece": expected_calibration_error(p, y),
    }
    if true_p is not None and len(true_p):
        out["ratio_vs_true_p"] = float(p.sum() / true_p.sum())
        out["mae_vs_true_p"] = float(np.abs(p - true_p).mean())
        out["oracle_normalized_entropy"] = normalized_entropy(true_p, y)
    return out


def learns_task1(learner: Any) -> bool:
    """Whether ``learner`` is a multi-task ranker (MMoE, two tasks or more) that learns the
    second label ``y2`` and scores it (:meth:`TorchRanker.predict_tasks_many`)."""
    cfg = getattr(learner, "config", None)
    return (
        isinstance(cfg, RankerConfig)
        and cfg.model in MULTITASK_MODELS
        and cfg.num_tasks >= 2
        and hasattr(learner, "predict_tasks_many")
    )


def evaluate(
    examples: LogExamples,
    learner: Any,
    *,
    batch_size: int = 1024,
    drift_ts: float | None = None,
    progress: bool = True,
    ramp_from: int | None = RAMP_FROM,
    offset: OffsetConfig | None = None,
) -> dict[str, Any]:
    """Prequential run: each batch is scored, then learned from. ``learner`` is any object
    with ``score_and_learn(X, y)`` (or ``predict_proba_many`` + ``learn_many``).

    The first batches grow from ``ramp_from`` rows (doubling up to ``batch_size``; None:
    every batch is ``batch_size``), as a worker's time-flushed micro-batches do while
    traffic starts: a cold learner's first batch is scored before any label, and at 1,024
    rows that one batch alone can dominate the calibration ratio of a low-CTR log.

    A multi-task ranker (:func:`learns_task1`) on a log with a second label
    (``examples.y2``) learns both, and its task-1 scores (P(y2), scored before the batch
    is learnt) are judged in the report's ``task1`` block (against ``true_p2`` when known).

    ``offset``: the scores are served through a :class:`LogitOffset` of these settings,
    as a worker with ``[offset] enabled`` serves them; after each batch is scored, the
    offset learns the batch's raw scores and labels and is re-estimated at the batch's
    newest event time (a prequential batch's labels are final when it is learned, so the
    delay model is off: ``delay_mean_s=None``). The report's ``all`` (and the drift
    blocks) are then the served scores, and ``raw`` the ranker's own (``raw_scores``);
    ``offset`` holds the offset's final value and its mean absolute value over batches.
    """
    from tqdm import tqdm

    n = len(examples)
    scores = np.empty(n, dtype=np.float64)
    y2 = examples.y2 if learns_task1(learner) else None
    scores2 = np.empty(n, dtype=np.float64)
    off = None
    if offset is not None:
        raw = np.empty(n, dtype=np.float64)
        off = LogitOffset(dataclasses.replace(offset, delay_mean_s=None, max_delay_s=None))
        abs_sum, n_batches = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="ex", desc="evaluate", disable=not progress)
    for s in _batches(n, batch_size, ramp_from):
        rows, y = examples.rows[s], examples.y[s]
        if y2 is not None:  # task 1 is scored before either task learns
            scores2[s] = learner.predict_tasks_many(rows)["task1"]
            scores[s] = learner.score_and_learn(rows, y, y2=y2[s])
        elif hasattr(learner, "score_and_learn"):
            scores[s] = learner.score_and_learn(rows, y)
        else:
            scores[s] = learner.predict_proba_many(rows)
            learner.learn_many(rows, y)
        if off is not None:
            raw[s] = scores[s]
            scores[s] = off.transform(raw[s])
            ids = [str(i) for i in range(s.start, s.stop)]
            off.observe_impressions(ids, examples.ts[s], raw[s])
            off.observe_clicks([ids[j] for j in np.flatnonzero(y)])
            abs_sum += abs(off.offset)
            n_batches += 1
            off.refresh(float(examples.ts[s].max()))
        bar.update(len(rows))
    bar.close()
    seconds = time.perf_counter() - t0
    report: dict[str, Any] = {
        "examples": n,
        "seconds": seconds,
        "examples_per_s": n / seconds if seconds > 0 else math.nan,
        "all": quality(scores, examples.y, examples.true_p),
    }
    if y2 is not None:
        report["task1"] = quality(scores2, y2, examples.true_p2)
    if off is not None:
        report["raw"] = quality(raw, examples.y, examples.true_p)
        report["offset"] = {"final": off.offset, "mean_abs": abs_sum / max(n_batches, 1)}
    if drift_ts is not None:
        before = examples.ts < drift_ts
        for name, mask in (("before_drift", before), ("after_drift", ~before)):
            tp = None if examples.true_p is None else examples.true_p[mask]
            report[name] = quality(scores[mask], examples.y[mask], tp)
    report["scores"] = scores
    if off is not None:
        report["raw_scores"] = raw
    return report


def history_ablation(
    df: pd.DataFrame,
    config: RankerConfig,
    *,
    seed: int = 0,
    features: FeatureConfig | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """What history is worth on this log: the same ranker (``config``, ``seed``, cold, in
    process, prequential) once with the historical features of ``features`` (default
    :class:`FeatureConfig`) and once without. Returns ``{"with": quality, "without":
    quality}`` (:func:`quality` blocks, with ``seconds``)."""
    config = for_final_labels(config)
    out: dict[str, dict[str, float]] = {}
    for name, fcfg in (("with", features or FeatureConfig()), ("without", None)):
        t0 = time.perf_counter()
        ex = log_examples(df, fcfg)
        rcfg = config if fcfg is None else with_hist_slots(config)
        report = evaluate(ex, TorchRanker(rcfg, seed=seed, online=False), progress=progress)
        out[name] = dict(report["all"], seconds=time.perf_counter() - t0)
    return out


#: the feature stage's settings ``load_examples`` (evaluate, pretrain) uses by default
DEFAULT_FEATURES = FeatureConfig()


def load_examples(
    path: str | Path, limit: int | None = None, features: FeatureConfig | None = DEFAULT_FEATURES
) -> LogExamples:
    """A log file as learner inputs, with historical features unless ``features`` is None."""
    df = read_log_frame(path)
    if limit is not None:
        df = df.iloc[:limit]
    return log_examples(df, features)

"""The worker's pipeline in process, on a truth-known log: joiner -> trainer -> monitor.

No broker: the same objects the Faust agents drive (:class:`stream.join.OnlineJoiner`,
:class:`stream.services.TrainerService`, :class:`stream.services.MonitorService`) are fed in
event-time order, so a labelling scheme or a monitor policy can be swept in seconds.

**World** (:func:`make_world`): :func:`logs.synthetic.generate` with ``drift_at=None`` at
``rate_per_min / 60`` impressions per second of event time; the bench then multiplies every
``true_p`` of the online part by ``m(row)`` (``abrupt``: 1 before ``drift_at``, then
``multiplier``; ``gradual``: a linear ramp from 1 to ``multiplier`` over ``ramp`` of the
log from ``drift_at``; ``no_drift``: 1), clipped to 0.99, and redraws the clicks of the
online part, ``click ~ Bernoulli(true_p)``, ``delay ~ Exponential(delay_mean_s)`` capped
just inside the 30-minute window (every click counts; the final label is the log's click).

**Loop** (:func:`simulate`): impressions are taken in steps of at most ``step_s`` seconds
of event time and at most ``max_step`` impressions. Each step:

1. *serve*: the step's impressions are scored by the current ranker (through FNC when
   ``trainer.fnc``) and the current calibrator, as ``/recommend`` would serve them at
   their impression time (``p_serve``, ``p_serve_raw``);
2. *join*: the step's impressions and the clicks up to the step's last event time go to
   the joiner in event-time order, then a watermark on both inputs at that time (the
   replayer sends them); every example it emits is stamped with that time (its emission
   event time, for the label latency);
3. *train + monitor*: the trainer takes everything emitted (micro-batches of at most
   ``trainer.batch_size``), scores then learns; each scored batch goes to the monitor and
   every control message the monitor returns is applied to the trainer at once. The
   joiner's event-time mark (:func:`stream.services.join.joiner_mark`) goes with the
   step's labels, as the worker's joiner sends it on ``labeled``, and reaches the monitor
   after them (also in a step with no label).

Only ``p_serve`` is judged against the truth: the progressive scores the monitor sees are
taken when an example reaches the trainer, up to a window later.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry

from learners.ranker import TorchRanker
from logs.batches import ScoredBatch
from logs.events import Click, LabeledExample, example_row
from logs.io import log_impressions
from logs.synthetic import SyntheticConfig, generate
from monitoring.metrics import StreamrecMetrics
from monitoring.offset import LogitOffset
from stream.join import OnlineJoiner
from stream.services import MonitorService, TrainerService
from stream.services.join import joiner_mark
from stream.settings import Settings

__all__ = ["World", "SimResult", "make_world", "simulate", "window_stats"]

MAX_DELAY_S = 1499.0  # clicks stay inside the default 30-minute attribution window
SCENARIOS = ("abrupt", "gradual", "no_drift")


@dataclass(frozen=True)
class World:
    """A truth-known log: ``n`` online impressions at ``rate_per_min`` (event time)."""

    rate_per_min: float
    n: int = 150_000
    scenario: str = "no_drift"
    seed: int = 0
    delay_mean_s: float = 120.0
    drift_at: float = 0.5
    multiplier: float = 1.6
    ramp: float = 0.25
    base_ctr: float = 0.04
    #: clicks come at most this many seconds after their impression (inside the window)
    max_delay_s: float = MAX_DELAY_S

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}")

    @property
    def name(self) -> str:
        return f"{self.scenario} {self.rate_per_min:g}/min seed {self.seed}"


def make_world(w: World) -> tuple[pd.DataFrame, int | None]:
    """The log (``n`` rows) and the row of the drift (None without one)."""
    cfg = SyntheticConfig(
        n_impressions=w.n,
        impressions_per_s=w.rate_per_min / 60.0,
        drift_at=None,
        seed=w.seed,
        base_ctr=w.base_ctr,
    )
    df = generate(cfg)
    rows = np.arange(w.n)
    start = int(w.drift_at * w.n)
    if w.scenario == "abrupt":
        mult = np.where(rows >= start, w.multiplier, 1.0)
    elif w.scenario == "gradual":
        ramp = max(1, int(w.ramp * w.n))
        mult = 1.0 + (w.multiplier - 1.0) * np.clip((rows - start) / ramp, 0.0, 1.0)
    else:
        mult = np.ones(w.n)
    rng = np.random.default_rng([w.seed, 17])
    true_p = np.minimum(df["true_p"].to_numpy() * mult, 0.99)
    click = (rng.random(w.n) < true_p).astype(np.int64)
    delay = np.minimum(rng.exponential(w.delay_mean_s, size=w.n), w.max_delay_s)
    ts = df["ts"].to_numpy()
    df = df.assign(true_p=true_p, click=click, click_ts=np.where(click == 1, ts + delay, np.nan))
    return df, (None if w.scenario == "no_drift" else start)


@dataclass
class SimResult:
    """Per impression (log order): served and raw scores at impression time, the truth."""

    p_serve: np.ndarray
    p_serve_raw: np.ndarray
    true_p: np.ndarray
    y: np.ndarray
    #: event seconds from each click to the emission of its positive (clicks emitted only)
    click_latency_s: np.ndarray
    #: wall seconds from the joiner's emission of each positive to the end of the trainer
    #: step that learnt from it (the in-process part of click -> model update)
    click_update_wall_s: np.ndarray
    #: rows (log order) the monitor had resolved when each alarm / accepted refit happened
    alarm_rows: list[int]
    refit_rows: list[int]
    rollback_rows: list[int]
    examples_trained: int
    seconds: float
    monitor: dict[str, Any] = field(default_factory=dict)


def sim_settings(settings: Settings) -> Settings:
    """``settings`` as the simulation needs them: no wall-clock idle timeout (event time
    only), no checkpoints, one torch thread's worth of work on the loop."""
    return settings.replace(
        join=dataclasses.replace(settings.join, idle_timeout_s=None),
        trainer=dataclasses.replace(settings.trainer, checkpoint_dir=None),
    )


def simulate(
    df: pd.DataFrame,
    settings: Settings,
    *,
    seed: int = 0,
    step_s: float = 10.0,
    max_step: int = 1024,
    ranker: TorchRanker | None = None,
    offset: LogitOffset | None = None,
) -> SimResult:
    """Run the pipeline over ``df`` (see the module doc); ``ranker`` (e.g. warm-started)
    or a fresh one from ``settings.ranker`` seeded ``seed``; ``offset``: serve through a
    :class:`monitoring.offset.LogitOffset` after the calibrator (fed each impression's
    pre-offset served score and each click at its click time)."""
    settings = sim_settings(settings)
    metrics = StreamrecMetrics(registry=CollectorRegistry())
    if ranker is None:
        ranker = TorchRanker(settings.ranker, seed=seed, online=True)
    trainer = TrainerService(settings, metrics, ranker)
    monitor = MonitorService(settings, metrics)
    joiner = OnlineJoiner(settings.join, clock=lambda: 0.0)
    imps = log_impressions(df)
    n = len(imps)
    ts = df["ts"].to_numpy(dtype=np.float64)
    click_ts = df["click_ts"].to_numpy(dtype=np.float64)
    clicked = np.flatnonzero(np.isfinite(click_ts))
    clicked = clicked[np.argsort(click_ts[clicked], kind="stable")]
    row_of = {imp.impression_id: i for i, imp in enumerate(imps)}
    p_serve = np.empty(n)
    p_serve_raw = np.empty(n)
    latency: list[float] = []
    update_wall: list[float] = []
    alarm_rows: list[int] = []
    refit_rows: list[int] = []
    rollback_rows: list[int] = []

    def observe(batch: ScoredBatch, row: int) -> None:
        """The monitor judges ``batch``; its control messages go to the trainer at once;
        an alarm, an accepted refit or a rollback is noted at impression ``row``."""
        n_alarms, n_acc = monitor.n_alarms, monitor.n_recalibrations
        n_rb = getattr(monitor, "n_rollbacks", 0)
        for msg in monitor.observe(batch):
            trainer.apply_control(msg)
        if monitor.n_alarms > n_alarms:
            alarm_rows.append(row)
        if monitor.n_recalibrations > n_acc:
            refit_rows.append(row)
        if getattr(monitor, "n_rollbacks", 0) > n_rb:
            rollback_rows.append(row)

    ci = 0  # next click (in click-time order)
    i = 0
    trained = 0
    t0 = time.perf_counter()
    while i < n:
        j = i + 1
        while j < n and j - i < max_step and ts[j] - ts[i] <= step_s:
            j += 1
        t_end = float(ts[j - 1])
        step_imps = imps[i:j]
        # through FNC when settings.trainer.fnc: the ranker's output link (RankerConfig.fnc)
        raw = ranker.predict_proba_many([example_row(m) for m in step_imps])
        p_serve_raw[i:j] = raw
        p_serve[i:j] = trainer.calibrator.transform(raw)
        if offset is not None:
            offset.refresh(float(ts[i]))
            offset.observe_impressions([m.impression_id for m in step_imps], ts[i:j], p_serve[i:j])
            p_serve[i:j] = offset.transform(p_serve[i:j])
        # the step's events in event-time order (clicks of this step's impressions too)
        events: list[tuple[float, int, Any]] = [(float(ts[k]), 0, imps[k]) for k in range(i, j)]
        while ci < clicked.size and click_ts[clicked[ci]] <= t_end:
            k = int(clicked[ci])
            events.append((float(click_ts[k]), 1, Click(imps[k].impression_id, click_ts[k])))
            ci += 1
        events.sort(key=lambda e: (e[0], e[1]))
        if offset is not None:
            offset.observe_clicks([ev.impression_id for _, kind, ev in events if kind == 1])
        out: list[LabeledExample] = []
        for _, kind, ev in events:
            out.extend(joiner.on_impression(ev) if kind == 0 else joiner.on_click(ev))
        out.extend(joiner.on_watermark(t_end, "impressions"))
        out.extend(joiner.on_watermark(t_end, "clicks"))
        for e in out:
            if e.label and e.weight > 0:  # not a dfm late click (scored, never trained on)
                latency.append(t_end - e.label_ts)
        i = j
        t_emit = time.perf_counter()
        labels = np.fromiter((e.label for e in out), dtype=np.int64, count=len(out))
        bs = settings.trainer.batch_size
        n_batch = 0
        # the joiner's event-time mark goes with the step's labels, as the worker's joiner
        # sends it in a labeled record's header (also with no label: the monitor then
        # closes the attribution windows the impressions' own times never pass); this one
        # joiner stands for every input partition
        mark = joiner_mark(joiner)
        trainer.add(out, marks=dict.fromkeys(range(settings.partitions), mark))
        trained += len(out)
        while trainer.buffer:
            batch = trainer.step()
            if batch is None:
                break
            done = labels[n_batch * bs : (n_batch + 1) * bs].sum()
            update_wall.extend([time.perf_counter() - t_emit] * int(done))
            n_batch += 1
            observe(batch, i)
        marks_only = trainer.marks_batch()  # marks with no example left to follow
        if marks_only is not None:
            observe(marks_only, i)
    del row_of
    return SimResult(
        p_serve=p_serve,
        p_serve_raw=p_serve_raw,
        true_p=df["true_p"].to_numpy(dtype=np.float64),
        y=df["click"].to_numpy(dtype=np.float64),
        click_latency_s=np.asarray(latency),
        click_update_wall_s=np.asarray(update_wall),
        alarm_rows=alarm_rows,
        refit_rows=refit_rows,
        rollback_rows=rollback_rows,
        examples_trained=trained,
        seconds=time.perf_counter() - t0,
        monitor={
            "alarms": monitor.n_alarms,
            "recalibrations": monitor.n_recalibrations,
            "rejected": monitor.n_rejected,
            "rollbacks": getattr(monitor, "n_rollbacks", 0),
            "monitored": monitor.n_seen,
            # the final labels' clock followed the joiner's marks, as in the worker
            "marks": len(monitor.marks),
        },
    )


def window_stats(
    p: np.ndarray, true_p: np.ndarray, start: int = 0, size: int = 5_000
) -> dict[str, float]:
    """Non-overlapping ``size``-impression windows from row ``start``: mean and max of
    ``|log(Σp / Σtrue_p)|`` and the share of windows beyond ±5% / ±15%."""
    k = (p.size - start) // size
    if k < 1:
        return {"windows": 0}
    sp = p[start : start + k * size].reshape(k, size).sum(axis=1)
    st = true_p[start : start + k * size].reshape(k, size).sum(axis=1)
    dev = np.abs(np.log(sp / st))
    return {
        "windows": int(k),
        "mean_abs_log_ratio": float(dev.mean()),
        "max_abs_log_ratio": float(dev.max()),
        "share_beyond_5pct": float(np.mean(np.abs(sp / st - 1) > 0.05)),
        "share_beyond_15pct": float(np.mean(np.abs(sp / st - 1) > 0.15)),
    }

"""Trainer room: micro-batches of labelled examples, the ranker step and the catalogue."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.faiss_index import IndexSnapshot
from learners.calibration import (
    Calibrator,
    PlattCalibrator,
    VersionedCalibrator,
)
from learners.negatives import HardNegativeSource
from learners.ranker import TorchRanker
from learners.retrieval_fusion import FusedRetrieval
from learners.training import atomic_torch_save
from learners.two_tower import TwoTowerModel
from learners.util import atomic_write
from learners.weighting import time_decay_weights
from logs.batches import ScoredBatch
from logs.events import TASK1_KINDS, LabeledExample, example_row
from modelstore.snapshot import Snapshot, state_copy, take_snapshot, write_snapshot
from modelstore.store import DirectoryStore, Manifest, StoreError, WriterLock
from monitoring.metrics import StreamrecMetrics
from stream.control import CalibratorUpdate, ControlRecord, ModelAnnouncement
from stream.services.catalogue import Catalogue
from stream.services.dedup import SeenKeys
from stream.services.join import segment_of
from stream.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TakenBatch:
    """A micro-batch :meth:`TrainerService.take` removed from the buffer."""

    examples: list[LabeledExample]
    emitted_at: list[float | None]  # wall time the joiner sent each, parallel


@dataclass(frozen=True)
class CheckpointJob:
    """A checkpoint taken by :meth:`TrainerService.checkpoint_snapshot`, not written yet."""

    path: Path  # ranker-vNNNNNNNN.pt in ``trainer.checkpoint_dir``
    state: dict[str, Any]  # the ranker's state, copied (tensors on CPU)


@dataclass(frozen=True)
class PublishJob:
    """A model set taken by :meth:`TrainerService.publish_snapshot`, not written yet."""

    snapshot: Snapshot
    key: tuple[object, ...]  # what changed-since-last-publish compares
    snapshot_s: float  # wall seconds of the copy


@dataclass(frozen=True)
class StepResult:
    """What :meth:`TrainerService.compute` gives back: scores taken before learning."""

    p_raw: np.ndarray  # (N,) float64, the ranker's
    p: np.ndarray  # (N,) float64, calibrated
    seconds: float  # wall seconds of the score-and-learn
    skipped_nonfinite: bool  # the update was skipped (non-finite loss or gradient)
    #: (N,) float64, the ranker's P(clicked and converted) with a second label, else None
    p2: np.ndarray | None = None
    #: the indices of the click records (all but the second label's own records,
    #: ``TASK1_KINDS``); None: every example is one
    click_rows: list[int] | None = None


class TrainerService:
    """Micro-batches labelled examples, scores each batch, then learns from it.

    The scores are taken *before* the update (progressive validation) and are what the
    calibration monitor sees. The served score is the calibrator applied to the raw one.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: StreamrecMetrics,
        ranker: TorchRanker | None = None,
        hard_negatives: HardNegativeSource | None = None,
    ) -> None:
        """``hard_negatives``: the two-tower's curriculum source (the indexer's pools),
        given to it at construction and again when it is resumed from the model store."""
        self.settings = settings
        self._hard_negatives = hard_negatives
        self.metrics = metrics
        cfg = settings.trainer
        if ranker is not None:
            self._check_fnc(ranker)
        #: the models, built on first use (:attr:`ranker`, :attr:`two_tower`): a joiner or
        #: a serving replica (its models come from the store) never builds them, ~90 MB of
        #: parameters and a second of start-up with the defaults
        self._ranker: TorchRanker | None = ranker
        self._two_tower: TwoTowerModel | None = None
        self._two_tower_built = False
        self._fusion: FusedRetrieval | None = None
        #: the index serving retrieves from now (the worker's indexer's), for the fusion's
        #: online pick (:meth:`_retrieve_now`); None: the pick observes nothing
        self.serving_index: Callable[[], IndexSnapshot | None] | None = None
        if settings.role in ("trainer", "all"):  # a bad warm start fails here, at start-up
            self.ranker, self.two_tower  # noqa: B018
        #: the served calibrator and its version, one pair replaced whole (serving threads
        #: read it while control records replace it on the event loop)
        self.served_calibrator = VersionedCalibrator(PlattCalibrator(), 0)
        self.model_version = 0
        self.buffer: list[LabeledExample] = []
        self.emitted_at: list[float | None] = []  # parallel to buffer
        # the joiner's event-time marks (logs.batches.encode_marks), each with the count of
        # examples buffered before it: it leaves with the first scored batch that has
        # taken all of them (n_taken counts the examples taken or dropped)
        self._marks: deque[tuple[int, dict[int, float]]] = deque()
        self.n_buffered = 0
        self.n_taken = 0
        self.buffer_since: float | None = None
        self.catalogue = Catalogue(settings.indexer.max_items, settings.indexer.max_users)
        self.applied = SeenKeys(cfg.dedup_horizon)
        self.checkpoints: list[Path] = []
        self.n_examples = 0
        self.n_corrections = 0
        self._last_checkpoint = time.monotonic()
        #: the copies of the last written checkpoint and store version: nothing reads them
        #: any more, the next snapshot of the kind overwrites them (no fresh allocation)
        self._spare_checkpoint: dict[str, Any] | None = None
        self._spare_publish: Snapshot | None = None
        #: the model store this worker publishes to (trainer/all roles with a store)
        self.store: DirectoryStore | None = (
            DirectoryStore(settings.model_store, keep=settings.store.keep)
            if settings.model_store and settings.role in ("trainer", "all")
            else None
        )
        self.published: Manifest | None = None
        self._published_key: tuple[object, ...] = ()
        self._last_publish = time.monotonic()
        #: one trainer per store: held while this service lives (raises StoreError
        #: "writer_locked" when another trainer holds it); :meth:`close` releases it
        self.writer_lock: WriterLock | None = (
            None if self.store is None else self.store.lock_writer()
        )
        if self.store is not None:  # a restart continues from the store, not the warm start
            self._resume_from_store(self.store)
        metrics.model_version.set(0)
        metrics.calibrator_version.set(0)

    @property
    def ranker(self) -> TorchRanker:
        """The online ranker: warm-started from ``trainer.warm_start`` or fresh, on first
        use (the online loss follows the labelling scheme, e.g. "fnw" on fake negatives,
        whatever loss a checkpoint was pretrained with)."""
        if self._ranker is None:
            cfg, r = self.settings.trainer, self.settings.ranker
            self._ranker = (
                TorchRanker.load(
                    cfg.warm_start, device=r.device, online=True, loss=r.loss, fnc=r.fnc
                )
                if cfg.warm_start
                else TorchRanker(r, seed=cfg.seed, online=True)
            )
            self._check_fnc(self._ranker)
        return self._ranker

    @ranker.setter
    def ranker(self, ranker: TorchRanker) -> None:
        self._ranker = ranker

    def _check_fnc(self, ranker: TorchRanker) -> None:
        """FNC is the ranker's output link: it must match ``trainer.fnc``."""
        if ranker.config.fnc != self.settings.trainer.fnc:
            raise ValueError(
                f"trainer.fnc={self.settings.trainer.fnc} but the ranker was built with "
                f"fnc={ranker.config.fnc}: build it from settings.ranker"
            )

    @property
    def two_tower(self) -> TwoTowerModel | None:
        """The retrieval model (``settings.retrieval == "two_tower"``), trained on the
        positives of every micro-batch after the ranker, built on first use; None: serving
        retrieves with the ranker's own user and item embeddings."""
        if not self._two_tower_built:
            self._two_tower_built = True
            if self.settings.retrieval == "two_tower":
                self._two_tower = TwoTowerModel(self.settings.two_tower,
                                                seed=self.settings.trainer.seed,
                                                hard_negatives=self._hard_negatives)  # fmt: skip
        return self._two_tower

    @two_tower.setter
    def two_tower(self, model: TwoTowerModel | None) -> None:
        self._two_tower, self._two_tower_built = model, True

    @property
    def fusion(self) -> FusedRetrieval | None:
        """The served candidate fusion (``settings.fusion``), learnt from every
        micro-batch's clicks after the models, built with the ranker; None when
        ``fusion.enabled`` is false or this worker does not train."""
        if self._fusion is None and self.settings.fusion.enabled and self._ranker is not None:
            tau = self.settings.two_tower.temperature  # the prior in its cosine units
            self._fusion = FusedRetrieval(self.settings.fusion, temperature=tau)
        return self._fusion

    def _retrieve_now(
        self, queries: list[Mapping[str, object]]
    ) -> tuple[list[list[str]], np.ndarray] | None:
        """Each row's ``serving.candidates`` best items of the serving index by the
        retrieval model, and their cosines (None without an index that fits it), for the
        fusion's online pick."""
        index = None if self.serving_index is None else self.serving_index()
        if index is None or not len(index):
            return None
        if self.two_tower is not None:
            vec = self.two_tower.user_vectors(queries)
        else:
            vec = self.ranker.user_vectors([str(r["user_id"]) for r in queries])
        vec = np.asarray(vec, dtype=np.float32)
        if vec.ndim != 2 or vec.shape[1] != index.dim or not np.isfinite(vec).all():
            return None  # the index is being rebuilt for another model: nothing to compare
        scores, ids = index.search(vec, self.settings.serving.candidates)
        return [[str(i) for i in row if i is not None] for row in ids], scores

    @property
    def second_label_on(self) -> bool:
        """The second label trains the ranker: ``join.conversion_window_s`` is set and the
        ranker has a task 1 (``ranker.model`` "mmoe" or "ple", ``num_tasks >= 2``)."""
        return self.settings.join.conversion_window_s is not None and self.ranker.has_task1

    @property
    def models_built(self) -> bool:
        """Whether the ranker exists yet (a joiner or a replica never builds it)."""
        return self._ranker is not None

    def add(
        self,
        examples: list[LabeledExample],
        emitted_at: float | None = None,
        marks: dict[int, float] | None = None,
    ) -> int:
        """Buffer examples; ``emitted_at``: wall time (epoch s) the joiner sent them, for the
        label-to-update freshness histogram; ``marks``: the record's event-time marks
        (input partition -> mark, :func:`logs.batches.encode_marks`), passed on to the
        monitor in the ``scored`` batch that follows the last of these examples (or alone,
        :meth:`marks_batch`). Returns how many examples were buffered.

        Idempotent within a horizon: an example whose (impression_id, label) this trainer
        already applied (a redelivery after a crash or a rebalance, delivery being
        at-least-once) is dropped and counted in ``streamrec_duplicate_examples_total``.
        A correction (label 1 after a label 0) and a fake negative's positive are not
        duplicates.
        """
        fresh = self.applied.filter(examples)
        if len(fresh) < len(examples):
            self.metrics.duplicate_examples.labels(stage="trainer").inc(len(examples) - len(fresh))
        examples = fresh
        if examples and self.buffer_since is None:
            self.buffer_since = time.monotonic()
        self.buffer.extend(examples)
        self.emitted_at.extend([emitted_at] * len(examples))
        self.n_buffered += len(examples)
        if marks:
            self._marks.append((self.n_buffered, marks))
        return len(examples)

    def drop_buffer(self) -> int:
        """Discard the buffered examples (after a failed step); returns how many."""
        n = len(self.buffer)
        self.n_taken += n  # gone: the marks after them may leave
        self.buffer.clear()
        self.emitted_at.clear()
        self.buffer_since = None
        return n

    def batch_size_now(self) -> int:
        """Rows of the next micro-batch: ``trainer.batch_size``, or while the ranker has
        made fewer steps than the ramp needs, ``ramp_from * 2 ** steps`` (a warm-started or
        resumed ranker has steps already)."""
        cfg = self.settings.trainer
        steps = self.ranker.n_updates
        if not cfg.ramp_from or steps >= 30:
            return cfg.batch_size
        return min(cfg.batch_size, cfg.ramp_from << steps)

    def due(self, now: float | None = None) -> bool:
        if len(self.buffer) >= self.batch_size_now():
            return True
        now = time.monotonic() if now is None else now
        return (
            bool(self.buffer)
            and (now - (self.buffer_since or now)) >= self.settings.trainer.flush_s
        )

    def step(self) -> ScoredBatch | None:
        """Score then learn one micro-batch from the buffer; None if the buffer is empty.

        The same as :meth:`take`, :meth:`compute` and :meth:`finish` in a row; a worker
        runs :meth:`compute` on a thread, the other two on its event loop.
        """
        taken = self.take()
        return None if taken is None else self.finish(taken, self.compute(taken))

    def take(self) -> TakenBatch | None:
        """Remove the next micro-batch (up to :meth:`batch_size_now` examples) from the
        buffer; None if it is empty."""
        bs = self.batch_size_now()
        batch, self.buffer = self.buffer[:bs], self.buffer[bs:]
        emitted, self.emitted_at = self.emitted_at[:bs], self.emitted_at[bs:]
        self.n_taken += len(batch)
        self.buffer_since = time.monotonic() if self.buffer else None
        return TakenBatch(batch, emitted) if batch else None

    def compute(self, taken: TakenBatch) -> StepResult:
        """Score then learn ``taken`` with the ranker (and the two-tower model on its
        clicks): the models' state only, so it may run off the event loop (one call at a
        time). Returns the raw and calibrated scores (N,) float64 and the step's seconds.

        With ``loss="dfm"`` each example's ``label_ts - ts`` (its click delay, or the time
        it was observed unclicked) goes to the ranker as ``elapsed``. Weight-0 examples
        (a DFM ``late_click``) are scored for the monitor and not learnt from.

        The second label (:meth:`second_label_on`): each example's ``label2`` (NaN where
        None) trains the ranker's task 1 with weight 1 (times the time decay), the records
        of the second label alone (``conversion``, ``no_conversion``: click weight 0)
        included; the two-tower model and the fusion never see those records (their
        label 1 is a click already counted)."""
        batch = taken.examples
        rows = [example_row(e.impression) for e in batch]
        n = len(batch)
        y = np.fromiter((e.label for e in batch), dtype=np.float64, count=n)
        w = np.fromiter((e.weight for e in batch), dtype=np.float64, count=n)
        decay = None
        if (half_life := self.settings.trainer.time_decay_half_life_s) is not None:
            ts = np.fromiter((e.impression.ts for e in batch), dtype=np.float64, count=n)
            decay = time_decay_weights(ts, float(ts.max()), half_life)
            w *= decay
        y2 = w2 = None
        learn = w > 0
        if self.second_label_on:
            y2 = np.fromiter((np.nan if e.label2 is None else e.label2 for e in batch),
                             dtype=np.float64, count=n)  # fmt: skip
            w2 = np.isfinite(y2).astype(np.float64)
            if decay is not None:
                w2 *= decay
            learn |= w2 > 0
        elapsed = None
        if self.ranker.config.loss == "dfm":  # click delay, or time observed unclicked (s)
            elapsed = np.fromiter(
                (max(0.0, e.label_ts - e.impression.ts) for e in batch),
                dtype=np.float64,
                count=len(batch),
            )
        skipped_before = self.ranker.n_skipped_nonfinite
        t0 = time.perf_counter()
        # with trainer.fnc the ranker's FNC output link (RankerConfig.fnc) already maps the
        # p / (1 + p) it learnt from fake negatives back to p: not corrected again here
        ranker = self.ranker
        p2 = None
        if learn.all():
            p_raw = ranker.score_and_learn(rows, y, w, y2=y2, elapsed=elapsed, w2=w2)
            p2 = ranker.last_task1 if y2 is not None else None
        else:  # weight-0 rows (a DFM late click) are scored, never stepped on (Adam's
            # momentum would move the model on a batch of them alone)
            p_raw = np.empty(n, dtype=np.float64)
            idle, keep = np.flatnonzero(~learn), np.flatnonzero(learn)
            idle_rows = [rows[k] for k in idle]
            p_raw[idle] = ranker.predict_proba_many(idle_rows)
            if y2 is not None:
                p2 = np.empty(n, dtype=np.float64)
                p2[idle] = ranker.predict_tasks_many(idle_rows)["task1"]
            if keep.size:
                p_raw[keep] = ranker.score_and_learn(
                    [rows[k] for k in keep], y[keep], w[keep],
                    y2=None if y2 is None else y2[keep],
                    elapsed=None if elapsed is None else elapsed[keep],
                    w2=None if w2 is None else w2[keep],
                )  # fmt: skip
                if p2 is not None and ranker.last_task1 is not None:
                    p2[keep] = ranker.last_task1
        click_rows = None
        if any(e.kind in TASK1_KINDS for e in batch):  # whatever this ranker learns
            click_rows = [k for k, e in enumerate(batch) if e.kind not in TASK1_KINDS]
            rows, y = [rows[k] for k in click_rows], y[click_rows]
        if self.fusion is not None:  # its clicks scored against today's retrieval, first
            self.fusion.observe_batch(rows, y, self._retrieve_now)
        if self.two_tower is not None:  # every batch: its shown items join the catalogue of
            self.two_tower.learn_many(rows, y)  # uniform negatives; only clicks take a step
        if self.fusion is not None:  # co-visits and decayed clicks of the batch's clicks
            self.fusion.learn_many(rows, y)
        seconds = time.perf_counter() - t0
        p = self.calibrator.transform(p_raw)
        skipped = self.ranker.n_skipped_nonfinite > skipped_before
        return StepResult(np.asarray(p_raw, dtype=np.float64), np.asarray(p, np.float64),
                          seconds, skipped, p2, click_rows)  # fmt: skip

    def finish(self, taken: TakenBatch, result: StepResult) -> ScoredBatch:
        """Metrics, catalogue and counters after :meth:`compute`; the ``scored`` batch."""
        batch, emitted = taken.examples, taken.emitted_at
        m = self.metrics
        tt = self.two_tower
        if tt is not None:
            if tt.mean_hard_score is not None:
                m.retrieval_negative_cosine.labels(kind="hard").set(tt.mean_hard_score)
            if tt.mean_random_score is not None:
                m.retrieval_negative_cosine.labels(kind="random").set(tt.mean_random_score)
            m.retrieval_hard_share.set(tt.hard_share)
        fusion = self._fusion
        if fusion is not None:
            st = fusion.setting
            for source, w in zip(("model", "covisit", "popularity"), st["weights"], strict=True):
                m.fusion_weight.labels(source=source).set(w)
            m.fusion_beta.set(st["beta"])
            m.fusion_adapted.set(1.0 if st["adapted"] else 0.0)
            m.fusion_observed_clicks.set(st["observed"])
            m.fusion_covisit_entries.set(fusion.covisit.entries)
            m.fusion_uncounted_clicks.labels(reason="repeat").set(fusion.repeats)
            m.fusion_uncounted_clicks.labels(reason="throttled").set(fusion.throttled)
            pairs = fusion.covisit.pairs
            m.fusion_repeated_pairs.set(0 if pairs is None else pairs.repeated)
        m.train_step_seconds.observe(result.seconds)
        now = time.time()
        for sent in emitted:
            if sent is not None:
                m.update_freshness_seconds.observe(max(0.0, now - sent))
        p_raw, p, p2 = result.p_raw, result.p, result.p2
        label2_ids: list[str] = []
        label2: list[int] = []
        if p2 is not None:  # clicked impressions' second labels, for the monitor
            known = [e for e in batch if e.label and e.label2 is not None]
            label2_ids = [e.impression.impression_id for e in known]
            label2 = [int(e.label2 or 0) for e in known]
        clicks = result.click_rows
        if clicks is not None:  # the second label's own records are no rows of the monitor
            batch = [batch[k] for k in clicks]
            p_raw, p = p_raw[clicks], p[clicks]
            p2 = None if p2 is None else p2[clicks]
        for e in batch:
            m.label_delay_seconds.observe(max(0.0, e.label_ts - e.impression.ts))
        if result.skipped_nonfinite:
            m.nonfinite_batches.inc()
        else:
            m.train_batches.inc()
            if self.ranker.last_loss is not None:
                m.train_loss.set(self.ranker.last_loss)
        self.model_version = self.ranker.n_updates
        m.model_version.set(self.model_version)
        for e in batch:
            imp = e.impression
            self.catalogue.add(imp.user_id, imp.item_id, bool(e.label))
            if e.kind == "correction":
                self.n_corrections += 1
        self.n_examples += len(taken.examples)
        m.scored.inc(len(batch))
        return ScoredBatch(
            model_version=self.model_version,
            calibrator_version=self.calibrator_version,
            impression_ids=[e.impression.impression_id for e in batch],
            ts=[e.impression.ts for e in batch],
            label=[int(e.label) for e in batch],
            p_raw=[float(x) for x in p_raw],
            p=[float(x) for x in p],
            segment=[segment_of(e.impression.position) for e in batch],
            true_p=[e.impression.true_p for e in batch],
            marks=self._ready_marks(),
            p2=[] if p2 is None else [float(x) for x in p2],
            label2_ids=label2_ids,
            label2=label2,
        )

    def _ready_marks(self) -> dict[int, float]:
        """The marks every example before which was taken: the newest per partition."""
        out: dict[int, float] = {}
        q = self._marks
        while q and q[0][0] <= self.n_taken:
            for p, w in q.popleft()[1].items():
                if w > out.get(p, -math.inf):
                    out[p] = w
        return out

    def marks_batch(self) -> ScoredBatch | None:
        """An empty ``scored`` batch carrying the marks every example before which has
        left in an earlier batch (e.g. a record of marks alone, with nothing buffered);
        None when there are none. Call it after the due micro-batches were sent."""
        marks = self._ready_marks()
        if not marks:
            return None
        return ScoredBatch(self.model_version, self.calibrator_version, [], [], [], [], [], [],
                           [], marks)  # fmt: skip

    def apply_control(self, record: ControlRecord) -> None:
        """Apply a ``control`` record: a calibrator from the monitor. A ``model``
        announcement is not loaded here: a ``serve`` worker loads it from the model store
        (:class:`modelstore.snapshot.ModelReplica`, path confined to the store and checked
        against the manifest's digest); nothing loads a file a record points at."""
        if not isinstance(record, CalibratorUpdate):
            return
        newer = self.served_calibrator.newer(record.version, record.params)
        if newer is not None:
            self.served_calibrator = newer
            self.metrics.calibrator_version.set(newer.version)
            log.info("calibrator v%d applied: %s", newer.version, newer.calibrator)

    def close(self) -> None:
        """Release the model store's writer lock (the process exiting releases it too)."""
        if self.writer_lock is not None:
            self.writer_lock.release()

    def checkpoint_due(self, force: bool = False) -> bool:
        """True when a checkpoint should be taken now: a ``checkpoint_dir`` is set and
        ``checkpoint_every_s`` passed since the last one (or ``force``)."""
        cfg = self.settings.trainer
        if not cfg.checkpoint_dir:
            return False
        return force or time.monotonic() - self._last_checkpoint >= cfg.checkpoint_every_s

    def checkpoint_snapshot(self) -> CheckpointJob | None:
        """The ranker's state copied now (:func:`modelstore.snapshot.state_copy`, tensors
        to CPU) with the path it goes to: the cheap part, taken while no training step
        runs. Restarts the ``checkpoint_every_s`` clock. None without a checkpoint_dir."""
        if not self.settings.trainer.checkpoint_dir:
            return None
        self._last_checkpoint = time.monotonic()
        d = Path(self.settings.trainer.checkpoint_dir)
        path = d / f"ranker-v{self.model_version:08d}.pt"
        spare, self._spare_checkpoint = self._spare_checkpoint, None
        return CheckpointJob(path, state_copy(self.ranker.state(), spare))

    def write_checkpoint(self, job: CheckpointJob) -> Path | None:
        """Write a :meth:`checkpoint_snapshot` (atomically: a temp file, fsync, rename),
        point ``LATEST`` at it and prune to ``keep_checkpoints``. It touches no live
        model: it may run on a writer thread while training goes on (one at a time).
        Returns the path, or None when the write failed (logged and counted). With
        ``trainer.reuse_snapshot_buffers``, ``job``'s buffers are then recycled by the next
        :meth:`checkpoint_snapshot`."""
        try:
            return self._write_checkpoint(job)
        finally:
            if self.settings.trainer.reuse_snapshot_buffers:
                self._spare_checkpoint = job.state

    def _write_checkpoint(self, job: CheckpointJob) -> Path | None:
        path = job.path
        d = path.parent
        try:
            d.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(job.state, path)  # a temp file, fsync, rename (removed on error)
            # a unique temp name (O_EXCL): a planted symlink is never followed
            atomic_write(d / "LATEST", lambda f: f.write(path.name), binary=False, fsync=False)
        except OSError as exc:
            # e.g. ENOSPC: the previous checkpoint and LATEST stay as they were; training
            # goes on (a raise here would drop the micro-batch) and the next one is tried
            log.error("checkpoint %s not written (%s); the previous one is kept", path,
                      exc.strerror or exc)  # fmt: skip
            self.metrics.store_failures.labels(reason="checkpoint").inc()
            return None
        checkpoints = list(self.checkpoints)
        if path not in checkpoints:
            checkpoints.append(path)
        # retention by count: the newest ``keep_checkpoints`` files of this naming stay
        keep = self.settings.trainer.keep_checkpoints
        old = sorted(p for p in d.glob("ranker-v*.pt") if p.is_file() and not p.is_symlink())
        for stale in old[:-keep] if len(old) > keep else []:
            stale.unlink(missing_ok=True)
        self.checkpoints = [p for p in checkpoints if p.exists()]
        return path

    def maybe_checkpoint(self, force: bool = False) -> Path | None:
        """:meth:`checkpoint_snapshot` then :meth:`write_checkpoint` in a row, when due
        (blocking: the worker takes the snapshot under its lock and writes on a thread)."""
        if not self.checkpoint_due(force):
            return None
        job = self.checkpoint_snapshot()
        return None if job is None else self.write_checkpoint(job)

    def _resume_from_store(self, store: DirectoryStore) -> None:
        """A restarted trainer continues from the newest good version of its store (ranker,
        two-tower, calibrator), ahead of ``trainer.warm_start`` (which only seeds an empty
        store); a version that fails its checksums is skipped."""
        from modelstore.snapshot import load_snapshot

        for version in reversed(store.versions()):
            try:
                loaded = load_snapshot(
                    store, version, device=self.settings.ranker.device, optimizer=True,
                    hard_negatives=self._hard_negatives, fnc=self.settings.trainer.fnc,
                )  # fmt: skip
            except StoreError as exc:
                log.warning("model store: cannot resume from version %d: %s", version, exc)
                continue
            self.ranker = loaded.ranker
            if self.two_tower is not None and loaded.two_tower is not None:
                self.two_tower = loaded.two_tower
            if loaded.fusion is not None and self.settings.fusion.enabled:
                self._fusion = FusedRetrieval.from_state_dict(
                    loaded.fusion.state_dict(), self.settings.fusion
                )
            self.served_calibrator = VersionedCalibrator(
                loaded.calibrator, loaded.calibrator_version
            )
            self.model_version = self.ranker.n_updates
            self.metrics.model_version.set(self.model_version)
            self.metrics.calibrator_version.set(self.calibrator_version)
            log.info("resumed from model store version %d (model %d)", version,
                     self.model_version)  # fmt: skip
            return

    def _published_state(self, index: IndexSnapshot | None) -> tuple[object, ...]:
        tt = self.two_tower
        return (self.ranker.n_updates, None if tt is None else tt.n_updates,
                None if index is None else index.version, self.calibrator_version)  # fmt: skip

    def publish_due(self, index: IndexSnapshot | None = None, force: bool = False) -> bool:
        """True when a snapshot should go to the model store now: ``store.publish_every_s``
        passed (or ``force``) and a model, ``index`` or the calibrator changed since the
        last one (an idle trainer writes nothing)."""
        if self.store is None or self.n_examples == 0:
            return False
        if self.published is not None and self._published_key == self._published_state(index):
            return False
        every = self.settings.store.publish_every_s
        return force or time.monotonic() - self._last_publish >= every

    def publish_snapshot(self, index: IndexSnapshot | None) -> PublishJob | None:
        """Copy ranker, two-tower, calibrator, the candidate fusion's counts (and take
        ``index``, never changed once built) for the model store: the cheap part, taken
        while no training step runs. Restarts the ``publish_every_s`` clock. None without
        a store."""
        if self.store is None:
            return None
        self._last_publish = time.monotonic()
        t0 = time.perf_counter()
        spare, self._spare_publish = self._spare_publish, None
        snap = take_snapshot(self.ranker, self.two_tower, index, self.calibrator,
                             self.calibrator_version, reuse=spare, fusion=self.fusion)  # fmt: skip
        return PublishJob(snap, self._published_state(index), time.perf_counter() - t0)

    def write_publish(self, job: PublishJob) -> Manifest | None:
        """Write a :meth:`publish_snapshot` as a store version (files, checksums, manifest,
        fsync, rename, pruning to ``store.keep``). It touches no live model: it may run
        on a writer thread while training goes on (one at a time). None when the write
        failed (logged and counted; the next one is tried on schedule). With
        ``trainer.reuse_snapshot_buffers``, ``job``'s buffers are then recycled by the next
        :meth:`publish_snapshot`."""
        if self.store is None:
            return None
        t0 = time.perf_counter()
        try:
            m = write_snapshot(self.store, job.snapshot)
        except (OSError, ValueError) as exc:
            log.error("model store: publishing failed: %s", exc)
            self.metrics.store_failures.labels(reason="publish").inc()
            return None
        finally:
            if self.settings.trainer.reuse_snapshot_buffers:
                self._spare_publish = job.snapshot
        self.published, self._published_key = m, job.key
        mt = self.metrics
        mt.store_publish_seconds.observe(job.snapshot_s + time.perf_counter() - t0)
        mt.store_version.set(m.version)
        mt.store_bytes.set(m.total_bytes)
        return m

    def publish(self, index: IndexSnapshot | None) -> Manifest | None:
        """:meth:`publish_snapshot` then :meth:`write_publish` in a row (blocking: run it
        where no training step can run meanwhile; the worker takes the snapshot under its
        lock and writes on a thread). None without a store or when the write failed."""
        job = self.publish_snapshot(index)
        return None if job is None else self.write_publish(job)

    def store_announcement(self, m: Manifest) -> ModelAnnouncement:
        """The ``control`` record of a published version: store version, its directory,
        the manifest's SHA-256 (replicas accept nothing else) and the model versions."""
        return ModelAnnouncement(m.version, path=str(m.path.resolve()), digest=m.digest,
                                 model_version=m.meta.get("model_version"),
                                 index_version=m.meta.get("index_version"),
                                 created_at=m.created_at)  # fmt: skip

    @property
    def calibrator(self) -> Calibrator:
        """The served calibrator (of :attr:`served_calibrator`)."""
        return self.served_calibrator.calibrator

    @calibrator.setter
    def calibrator(self, calibrator: Calibrator) -> None:
        self.served_calibrator = VersionedCalibrator(calibrator, self.calibrator_version)

    @property
    def calibrator_version(self) -> int:
        return self.served_calibrator.version

    def serving_calibrator(self) -> tuple[Calibrator, int]:
        """What /recommend applies to the ranker's scores, with its version, from one read
        of the pair (the scores are FNC-corrected by the ranker itself when ``trainer.fnc``
        is on: ``RankerConfig.fnc``)."""
        served = self.served_calibrator
        return served.calibrator, served.version

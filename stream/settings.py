"""One settings object composed of the libraries' frozen configs.

Sources, later wins: defaults, a TOML file (sections ``[join]``, ``[ranker]``, ``[trainer]``,
``[drift]``, ``[drift_wander]``, ``[monitor]``, ``[index]``, ``[indexer]`` and top-level
keys), environment variables ``STREAMREC_<KEY>`` for the top-level keys (e.g.
``STREAMREC_BROKER``), and explicit keyword overrides.

>>> s = Settings(broker="127.0.0.1:9092")
>>> s.faust_broker
'kafka://127.0.0.1:9092'
>>> s.trainer.batch_size, s.ranker.online_lr_scale
(1024, 0.2)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index.faiss_index import IndexConfig
from learners.calibration import OffsetCalibrator, new_calibrator
from learners.delayed_feedback import check_loss_for_scheme
from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from learners.ranker_config import MULTITASK_MODELS
from learners.recalibration import TrackingConfig
from learners.retrieval_fusion import FusionConfig
from learners.two_tower import TwoTowerConfig
from modelstore.store import StoreConfig
from monitoring.drift import DriftConfig
from monitoring.drift_wander import WanderConfig
from monitoring.offset import OffsetConfig
from serving.recommender import ServingConfig
from stream.join import JoinConfig


@dataclass(frozen=True)
class TrainerConfig:
    """Online trainer: micro-batch ``batch_size`` examples, or fewer after ``flush_s``.

    ``checkpoint_dir``: where versioned checkpoints go (None: none written);
    ``checkpoint_every_s``: wall seconds between checkpoints; ``warm_start``: a checkpoint
    to start from (e.g. from ``streamrec pretrain``).
    """

    batch_size: int = 1024
    flush_s: float = 0.5
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every_s: float = 60.0
    warm_start: str | None = None
    #: the newest (impression_id, label) keys remembered to drop redelivered examples
    #: (as 64-bit hashes, ~8 bytes a key: :class:`stream.services.SeenKeys`)
    dedup_horizon: int = 1_000_000
    #: fake-negative calibration (Ktena et al. 2019): with ``join.delayed_feedback =
    #: "fake_negative"`` and BCE, served scores are mapped b -> b / (1 - b) by the ranker's
    #: FNC output link (``Settings`` sets ``ranker.fnc`` from it)
    fnc: bool = False
    #: torch intra-op threads in the worker process (0: torch's default). One thread: the
    #: worker's event loop already keeps a core busy, and two threads on 2 cores made a
    #: training step 10x slower (bench/e2e.py)
    torch_threads: int = 1
    #: seconds; when set, each example is weighted 0.5 ** (age / half-life), its age counted
    #: back from the newest impression ts of its micro-batch (learners.weighting)
    time_decay_half_life_s: float | None = None
    #: run each micro-batch's score-and-learn on a thread off the worker's event loop (the
    #: loop keeps joining, acking and serving meanwhile; torch releases the GIL in its
    #: kernels). False: on the loop, which then stalls for the whole step
    offload: bool = True
    #: checkpoints kept in ``checkpoint_dir`` (the oldest are deleted after each write)
    keep_checkpoints: int = 5
    #: keep the copy of the last written checkpoint and store version and overwrite it
    #: with the next copy: a copy then takes ~1/3 of the time (e.g. 10 against 33 ms for a
    #: 56 MB checkpoint, under the trainer lock), at the cost of holding both copies
    #: resident (~56 + ~160 MB with the default models; +200 MB of RSS in bench.soak)
    reuse_snapshot_buffers: bool = False
    #: a ranker that has not learned yet takes micro-batches of this many rows, then twice
    #: that after each step, up to ``batch_size`` (0: off), as ``streamrec evaluate``'s
    #: ``--ramp-from``: a cold model scores ~1k examples at its prior before its first
    #: update otherwise (on the 0.4%-CTR OBD sample through the demo: half of all Sum p)
    ramp_from: int = 32

    def __post_init__(self) -> None:
        h = self.time_decay_half_life_s
        if h is not None and not 0 < h < float("inf"):  # NaN fails too
            raise ValueError("trainer.time_decay_half_life_s must be > 0 (or unset)")
        if self.dedup_horizon < 1:
            raise ValueError("trainer.dedup_horizon must be >= 1")
        if self.batch_size < 1:
            raise ValueError("trainer.batch_size must be >= 1")
        if self.ramp_from < 0:
            raise ValueError("trainer.ramp_from must be >= 0 (0: off)")
        if self.flush_s <= 0:
            raise ValueError("trainer.flush_s must be > 0")
        if self.keep_checkpoints < 1:
            raise ValueError("trainer.keep_checkpoints must be >= 1")


#: values of ``MonitorConfig.recalibration``
RECALIBRATION_POLICIES = ("track", "continuous", "alarm", "guarded", "off")


@dataclass(frozen=True)
class MonitorConfig:
    """Calibration monitor: ``window`` examples for the gauges; a recalibration fits on the
    newest ``recal_window`` examples, holding out the newest ``holdout_fraction``. No
    recalibration happens in the first ``warmup`` examples (a cold model is still moving)."""

    window: int = 20_000
    warmup: int = 50_000
    recal_window: int = 2_500
    holdout_fraction: float = 0.25
    max_segments: int = 16
    #: drift test: "wander_z" (configured by [drift_wander]: a window z-test over blocks of
    #: expected clicks whose variance adds the learning model's own wander, estimated from
    #: the stream), "window_z" (configured by [drift]: click noise only), "cusum",
    #: "page_hinkley", "adwin", "river_page_hinkley" (their library defaults). Default
    #: "wander_z": on the worker services' own monitored streams (bench/results/
    #: drift_worlds.json) it raised 0 false alarms where window_z raised 24-36 per million
    #: at 30,000 impressions a minute (two runs), and found the same abrupt x1.6 drift as fast
    detector: str = "wander_z"
    #: calibrator refitted on an alarm: "shift" (logit shift, 1 parameter: stable on the
    #: small post-alarm window), "platt", "isotonic" or "histogram"
    calibrator: str = "shift"
    #: recalibration policy (learners.recalibration.TrackingRecalibrator): "track" (an alarm
    #: restarts the label window at recal_window and arms refits every refit_every examples,
    #: each validated on the newest slice, while the served base rate is kept on target as
    #: the model itself adapts; disarms after settle_refits refits within
    #: identity_tolerance of identity), "continuous" (the same, armed from the end of the
    #: warm-up, never disarms), "alarm" (one validated refit per alarm, then fixed),
    #: "guarded" (learners.guarded: a refit proposed on an alarm is accepted only if it
    #: beats the served calibrator on the next recal_window FINAL labels by more than
    #: guard_z standard errors; rolled back to identity when it loses to the raw ranker
    #: by as much) or "off" (alarms are counted, the served score is the raw one)
    #: default "off": in bench/results/calibration_worlds.json (3 seeds) "track" made the
    #: served calibration worse than the raw ranker's (no drift, 3,000/min: 0.214 vs 0.088
    #: mean |log(Σp/Σtrue_p)|); "guarded" was never worse in the median but was in one
    #: seed (0.202 vs 0.092: a refit judged on final labels that lag the attribution
    #: window, while the ranker, on fresh labels, had moved on). Off is the safe choice
    recalibration: str = "off"
    refit_every: int = 1_024
    recal_max_window: int = 50_000
    level_trend: float = 0.5
    identity_tolerance: float = 0.02
    settle_refits: int = 20
    guard_z: float = 2.0
    #: event-time window of the gauges (window label e.g. "1h"), in time_bucket_s buckets
    time_window_s: float = 3600.0
    time_bucket_s: float = 60.0
    #: equal-mass reliability bins exported for the count window (fixed bins for the time
    #: window: monitoring.calibration.DEFAULT_RELIABILITY_EDGES)
    reliability_bins: int = 10
    #: impressions waiting for their final label (fresh labels) at most: beyond it the
    #: oldest are judged early, on the clicks known then (streamrec_monitor_forced_total),
    #: so a joiner stalled for long (its partition holds the windows) cannot grow the
    #: monitor without bound; 2M = about 66 minutes at 30,000 impressions a minute
    max_pending: int = 2_000_000

    def __post_init__(self) -> None:
        from learners.calibration import CALIBRATOR_KINDS
        from monitoring.drift import DETECTOR_NAMES

        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError("monitor.holdout_fraction must be in (0, 1)")
        if self.detector not in DETECTOR_NAMES:
            raise ValueError(f"monitor.detector must be one of {DETECTOR_NAMES}")
        if self.calibrator not in CALIBRATOR_KINDS:
            raise ValueError(f"monitor.calibrator must be one of {CALIBRATOR_KINDS}")
        if self.recalibration not in RECALIBRATION_POLICIES:
            raise ValueError(f"monitor.recalibration must be one of {RECALIBRATION_POLICIES}")
        if self.refit_every < 1 or self.recal_max_window < self.recal_window:
            raise ValueError("monitor: need refit_every >= 1, recal_max_window >= recal_window")
        if not 0.0 < self.time_bucket_s <= self.time_window_s:
            raise ValueError("monitor: need 0 < time_bucket_s <= time_window_s")
        if self.max_pending < 1:
            raise ValueError("monitor.max_pending must be >= 1")
        if self.reliability_bins < 1:
            raise ValueError("monitor.reliability_bins must be >= 1")
        self.tracking()  # its own checks, with the monitor's names in the message

    def tracking(self) -> TrackingConfig:
        """The tracking policy's settings (``recalibration`` "track" or "continuous"),
        the one place they are drawn from this config.

        The monitor keeps them flat, under ``[monitor]``, rather than as a nested
        ``[monitor.tracking]`` table: ``calibrator``, ``recal_window`` and
        ``holdout_fraction`` also drive the "alarm" and "guarded" policies, so nesting
        would give each of these knobs two homes (or make one policy read the other's).

        >>> MonitorConfig(recalibration="continuous").tracking().settle_refits
        0
        """
        try:
            return TrackingConfig(
                kind=self.calibrator,
                recal_window=self.recal_window,
                max_window=self.recal_max_window,
                refit_every=self.refit_every,
                holdout_fraction=self.holdout_fraction,
                trend=self.level_trend,
                identity_tolerance=self.identity_tolerance,
                # continuous: armed from the warm-up on and never disarmed
                settle_refits=0 if self.recalibration == "continuous" else self.settle_refits,
            )
        except ValueError as exc:
            raise ValueError(f"monitor (tracking recalibration): {exc}") from None


@dataclass(frozen=True)
class IndexerConfig:
    """Refresh the FAISS index and hard-negative pools every ``refresh_s`` wall seconds,
    and after every ``refresh_updates`` updates of the retrieval model (0: time only)."""

    refresh_s: float = 5.0
    refresh_updates: int = 0
    max_items: int = 1_000_000
    max_users: int = 5_000
    pool_per_user: int = 20


ROLES = ("all", "joiner", "trainer", "serve")

#: A worker gives a new feature name from the stream an encoder slot only once this many
#: training rows carried it (``EncoderConfig.admit_after``; the library default admits at
#: once): a handful of junk names cannot take the slots of the real features. A settings
#: file may set ``[ranker.encoder] admit_after``.
WORKER_ADMIT_AFTER = 20
#: The worker's ranker has room for the feature stage's ``hist_*`` numerics (about 45 of
#: them; ``EncoderConfig.max_num_fields`` defaults to 8 for plain logs).
WORKER_NUM_FIELDS = 64


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs. ``broker``: ``host:port[,host:port]`` (``kafka://`` ok)."""

    broker: str = "127.0.0.1:9092"
    app_id: str = "streamrec"
    partitions: int = 4
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    data_dir: str = "runs/worker"
    #: what this worker runs: "all" (every agent, one process: the default), "joiner"
    #: (impressions and clicks -> labeled: the joiner, its state table, the labels'
    #: flusher) or "trainer" (labeled -> scored -> control: trainer, monitor, indexer,
    #: /recommend and /score). A "trainer" worker is its own consumer group
    #: (``<app_id>-trainer``), so a backlog of inputs never delays the labels it trains
    #: on; run "joiner" workers with it, never "all" ones (they would train too).
    role: str = "all"
    #: the model store (a shared directory): a "trainer"/"all" worker publishes versioned
    #: snapshots to it every ``store.publish_every_s``; a "serve" worker (no training:
    #: /recommend, /score, /version) loads the newest one and swaps on each announcement
    #: or poll. "" = no store (a "serve" worker needs one)
    model_store: str = ""
    rebalance_timeout_s: float = 3.0
    session_timeout_s: float = 6.0
    #: the longest the worker's consumer lets the broker hold a fetch, seconds (Faust's
    #: own value is 1.5). Apache Kafka answers as soon as a record arrives; the embedded
    #: broker holds the fetch, so every hop paid up to this wait (stream.transport)
    fetch_max_wait_s: float = 0.1
    replay_watermark_every: int = 2000
    #: the joiner's durable state table: "rocksdb" (local RocksDB under data_dir, restored
    #: from the changelog only past its own offsets: production) or "memory" (restored from
    #: the whole changelog on every start)
    table_store: str = "rocksdb"
    #: memory bounds of each RocksDB partition database of the join state (Faust's own
    #: defaults are 64 MB x 3 memtables and a 2 GiB block cache per partition, and the
    #: memtables and the write-ahead log grow until the first flush): memtables of
    #: ``rocksdb_write_buffer_mb`` (2 of them) and a block cache of
    #: ``rocksdb_block_cache_mb`` (+1/4 compressed). Per partition: at most
    #: 2 x write buffer + 1.25 x block cache of RAM, and a write-ahead log of about 2 x
    #: write buffer on disk.
    rocksdb_write_buffer_mb: int = 16
    rocksdb_block_cache_mb: int = 32
    #: seconds between periodic ``malloc_trim(0)`` calls (stream.memdiag; the writer thread
    #: also trims after each checkpoint and store version); 0 = only those
    memory_trim_s: float = 0.0
    #: glibc's mmap threshold for the worker process, KiB (``stream.heap.set_mmap_threshold``):
    #: blocks this large or larger are mapped on their own and returned to the OS when
    #: freed, so the model copies of checkpoints and store versions do not stay in a
    #: thread's arena; 0 = glibc's own moving threshold. ``MALLOC_MMAP_THRESHOLD_`` in the
    #: environment wins over it
    malloc_mmap_threshold_kb: int = 1024
    #: Python's garbage collector in the worker (``stream.collector``): the young
    #: generation's threshold, net container allocations between two collections (0:
    #: Python's default, 700), and whether the objects made at start (models, libraries)
    #: are frozen out of every later collection. Measured with ``bench.collector`` and
    #: ``bench.e2e``: see README, "Known gaps", Throughput
    gc_gen0_threshold: int = 10_000
    gc_freeze: bool = True
    #: raise the worker's CPU niceness by this much at start (``os.nice``, 0-19; 0: leave
    #: it): a trainer that shares its cores with serving replicas gives them the CPU first
    #: and trains with what is left (``streamrec stack up --serve M`` starts its trainer at
    #: ``StackConfig.trainer_nice``; see README "Roles"). Every thread the worker starts
    #: inherits it
    nice: int = 0
    #: Faust's processing guarantee: "at_least_once" (default; what the embedded broker
    #: supports, with idempotent trainer and monitor) or "exactly_once" (Kafka
    #: transactions: for Apache Kafka only, untested here since Tansu fails transactions)
    processing_guarantee: str = "at_least_once"
    #: the worker's web server (GET /recommend, POST /score); 0 = a free port picked at
    #: start and printed (several workers on one host), the compose stack uses 6066
    web_host: str = "127.0.0.1"
    web_port: int = 0
    #: Faust's check that a RocksDB table's persisted changelog offset is not beyond the
    #: changelog's end. Tansu (the embedded broker) reports the end of a partition as the
    #: base offset of its last record batch + 1 in ListOffsets, which trips the check on a
    #: restart. None (default): the worker asks the cluster and turns the check off only when
    #: it is Tansu (cluster id ``tansu_cluster``); True/False force it.
    recovery_consistency_check: bool | None = None
    #: the largest Kafka record of the deployment, bytes: the producer's max_request_size,
    #: the floor of every consumer's fetch size and the topics' max.message.bytes (compose:
    #: KAFKA_MESSAGE_MAX_BYTES and STREAMREC_MAX_MESSAGE_BYTES). Every batch a stage
    #: produces (labels, scores, dead letters) is split under it (stream.limits)
    max_message_bytes: int = 1_000_000
    #: an input event (or watermark) whose ts is more than this many seconds ahead of the
    #: worker's wall clock is dead-lettered (``future_ts``) instead of moving the watermark
    #: into the future; replayed logs carry past times. ``inf`` turns the check off
    max_future_skew_s: float = 300.0
    #: the joiner attaches historical features (features.stage.FeatureStage, one per input
    #: partition, state persisted with the join state) to every impression when it arrives
    features: bool = True
    #: the feature stages' memory budget for the whole worker, bytes: each input
    #: partition's stage gets ``feature_max_bytes / partitions`` (FeatureConfig.max_bytes;
    #: past it a stage sheds its oldest state, counted). 512 MiB by default
    feature_max_bytes: int = 512 * 2**20
    #: a worker that serves without joining ("serve" and "trainer" roles) keeps its own
    #: copy of the feature stages (stream.services.follower.FeatureFollower: impressions
    #: and clicks of every partition, read outside any consumer group), so /recommend and
    #: /score rows carry the hist_* values the joiners compute; off: they are scored
    #: without history (training/serving skew). Only with ``features``
    feature_follow: bool = True
    #: where that copy starts reading: "earliest" (the retained topics: the joiners'
    #: stages rebuilt) or "latest" (only new events: history starts empty)
    feature_follow_from: str = "earliest"
    #: how every Kafka client of the worker (Faust, the control listener, topic creation,
    #: replay) authenticates: "PLAINTEXT" (none: the default, and compose's default) or
    #: "SASL_PLAINTEXT" / "SASL_SSL" with ``kafka_sasl_mechanism`` ("PLAIN",
    #: "SCRAM-SHA-256", "SCRAM-SHA-512") and a user name and password (from the
    #: environment: STREAMREC_KAFKA_SASL_USERNAME / _PASSWORD; see
    #: docker-compose.sasl.yml). The password is never printed (repr, logs, errors).
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    #: fresh labels by default: every impression reaches the trainer as a fake negative
    #: once the clicks input reaches its event time (join.align_fake_negatives) and again
    #: as a positive when its click arrives (seconds, not the 30-minute window), trained
    #: with the FNW loss (Ktena et al. 2019), which keeps the CTR unbiased;
    #: the monitor judges final labels (monitoring.outcomes). bench/fresh_labels.py
    #: measured it against positives at window close, click-time positives and BCE + FNC.
    #: (``ranker.loss = "bce"``, the default, is read as FNW on the fake-negative stream
    #: unless ``trainer.fnc``: see __post_init__)
    join: JoinConfig = field(
        default_factory=lambda: JoinConfig(
            delayed_feedback="fake_negative", align_fake_negatives=True
        )
    )
    ranker: RankerConfig = field(
        default_factory=lambda: RankerConfig(
            encoder=EncoderConfig(admit_after=WORKER_ADMIT_AFTER, max_num_fields=WORKER_NUM_FIELDS)
        )
    )
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # 4 sigma over the newest 2,500 examples: the online model itself absorbs a CTR jump
    # within ~5k impressions, so a slower test would never fire; the warm-up
    # (MonitorConfig) keeps a cold, fast-moving model quiet.
    drift: DriftConfig = field(
        default_factory=lambda: DriftConfig(threshold_z=4.0, window=2_500, cooldown=2_500)
    )
    #: the "wander_z" drift test (monitor.detector, the default)
    drift_wander: WanderConfig = field(default_factory=WanderConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    #: the fast logit offset after the calibrator (issue 17; monitoring.offset): off by
    #: default (README "Recovery after a drift"; needs a logit-affine monitor.calibrator).
    #: In the worker its delay model's cap (``max_delay_s``) is the attribution window
    #: (join.window_s) unless set here.
    offset: OffsetConfig = field(default_factory=OffsetConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    indexer: IndexerConfig = field(default_factory=IndexerConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    #: the retrieval model behind the index and /recommend: "two_tower" (trained online on
    #: the labelled positives with hard negatives from the pools) or "ranker" (the
    #: ranker's own user and item embeddings)
    retrieval: str = "two_tower"
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    #: /recommend's candidates: the retrieval model's fused with co-visitation over the
    #: user's behaviour sequence and recent popularity (learners.retrieval_fusion),
    #: learnt by the trainer from the labelled clicks
    fusion: FusionConfig = field(default_factory=FusionConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.table_store not in ("rocksdb", "memory"):
            raise ValueError(f"table_store must be 'rocksdb' or 'memory', got {self.table_store!r}")
        if (
            self.join.delayed_feedback == "fake_negative"
            and self.ranker.loss == "bce"
            and not self.trainer.fnc
        ):
            # plain log loss on a fake-negative stream is FNW (the same loss on final
            # labels): what "bce" means for the default scheme, so that switching the
            # scheme alone (join.delayed_feedback) gives a calibrated model either way
            object.__setattr__(self, "ranker", dataclasses.replace(self.ranker, loss="fnw"))
        if self.join.delayed_feedback == "dfm" and self.ranker.loss == "bce":
            # likewise: on the DFM stream, log loss with the delay model is the DFM loss
            object.__setattr__(self, "ranker", dataclasses.replace(self.ranker, loss="dfm"))
        # a delayed-feedback scheme needs its matching loss (clear error at start-up)
        check_loss_for_scheme(self.join.delayed_feedback, self.ranker.loss, fnc=self.trainer.fnc)
        if self.join.conversion_window_s is not None and not self.serving.second_label:
            object.__setattr__(  # /score serves what the ranker learns: pCTCVR too
                self, "serving", dataclasses.replace(self.serving, second_label=True)
            )
        if self.join.conversion_window_s is not None and not (
            self.ranker.model in MULTITASK_MODELS and self.ranker.num_tasks >= 2
        ):
            raise ValueError(
                "join.conversion_window_s (the second label) needs a ranker with a second "
                f"task: ranker.model 'mmoe' or 'ple' with num_tasks >= 2, got "
                f"model={self.ranker.model!r}"
            )
        if self.ranker.fnc != self.trainer.fnc:  # FNC is the ranker's output link
            object.__setattr__(
                self, "ranker", dataclasses.replace(self.ranker, fnc=self.trainer.fnc)
            )
        if self.processing_guarantee not in ("at_least_once", "exactly_once"):
            raise ValueError(
                "processing_guarantee must be 'at_least_once' or 'exactly_once', got "
                f"{self.processing_guarantee!r}"
            )
        if self.retrieval not in ("two_tower", "ranker"):
            raise ValueError(f"retrieval must be 'two_tower' or 'ranker', got {self.retrieval!r}")
        if self.partitions < 1:
            raise ValueError("partitions must be >= 1")
        if self.offset.enabled:
            if not isinstance(new_calibrator(self.monitor.calibrator), OffsetCalibrator):
                raise ValueError(
                    "offset.enabled needs a logit-affine calibrator (monitor.calibrator "
                    f"'platt' or 'shift'), got {self.monitor.calibrator!r}"
                )
        if self.feature_max_bytes < self.partitions * 2**20:
            raise ValueError("feature_max_bytes must be at least 1 MiB per partition")
        if self.feature_follow_from not in ("earliest", "latest"):
            raise ValueError(
                "feature_follow_from must be 'earliest' or 'latest', got "
                f"{self.feature_follow_from!r}"
            )
        if self.rocksdb_write_buffer_mb < 1 or self.rocksdb_block_cache_mb < 1:
            raise ValueError("rocksdb_write_buffer_mb and rocksdb_block_cache_mb must be >= 1")
        if not self.memory_trim_s >= 0:  # NaN fails too
            raise ValueError("memory_trim_s must be >= 0 (0: no malloc_trim)")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in [0, 19], got {self.nice}")
        if not 0 <= self.malloc_mmap_threshold_kb <= 32 * 1024:
            raise ValueError("malloc_mmap_threshold_kb must be in [0, 32768] (0: glibc's own)")
        if self.gc_gen0_threshold < 0:
            raise ValueError("gc_gen0_threshold must be >= 0 (0: Python's default)")
        if self.max_message_bytes < 64 * 1024:
            raise ValueError("max_message_bytes must be >= 65536 (an event is up to 64 KiB)")
        if not 0 < self.fetch_max_wait_s <= 30:  # NaN fails too
            raise ValueError("fetch_max_wait_s must be in (0, 30] seconds")
        if not self.max_future_skew_s >= 0:  # NaN fails too
            raise ValueError("max_future_skew_s must be >= 0 (inf: no check)")
        if self.kafka_security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ValueError(
                f"kafka_security_protocol must be one of "
                f"{KAFKA_SECURITY_PROTOCOLS}, got {self.kafka_security_protocol!r}"
            )
        if self.kafka_security_protocol.startswith("SASL"):
            if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
                raise ValueError(
                    f"kafka_sasl_mechanism must be one of "
                    f"{KAFKA_SASL_MECHANISMS}, got {self.kafka_sasl_mechanism!r}"
                )
            if not (self.kafka_sasl_username and self.kafka_sasl_password):
                raise ValueError(
                    f"kafka_security_protocol {self.kafka_security_protocol} needs "
                    "kafka_sasl_username and kafka_sasl_password "
                    "(STREAMREC_KAFKA_SASL_USERNAME / _PASSWORD)"
                )
        if self.role == "serve" and not self.model_store:
            raise ValueError("role 'serve' needs a model store (model_store / --model-store)")

    @property
    def bootstrap(self) -> str:
        return self.broker.split("://", 1)[1] if "://" in self.broker else self.broker

    @property
    def faust_broker(self) -> str:
        return ";".join(f"kafka://{h}" for h in self.bootstrap.split(","))

    @property
    def final_watermark_gap_s(self) -> float:
        """Seconds past a replayed log's last event for its final watermark: every
        attribution window (``join.window_s``) and, after it, every conversion window
        (``join.conversion_window_s``) closes, lateness included, so the monitor judges
        each impression's second label too."""
        j = self.join
        return j.window_s + (j.conversion_window_s or 0.0) + j.lateness_s + 1

    def kafka_client_options(self) -> dict[str, Any]:
        """Security keyword arguments for a kafka-python or aiokafka client ({} for
        PLAINTEXT): ``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``,
        ``sasl_plain_password``."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return {}
        opts: dict[str, Any] = {"security_protocol": self.kafka_security_protocol,
                                "sasl_mechanism": self.kafka_sasl_mechanism,
                                "sasl_plain_username": self.kafka_sasl_username,
                                "sasl_plain_password": self.kafka_sasl_password}  # fmt: skip
        if self.kafka_security_protocol == "SASL_SSL":
            import ssl

            opts["ssl_context"] = ssl.create_default_context()
        return opts

    def faust_credentials(self) -> Any:
        """Faust's ``broker_credentials`` (None for PLAINTEXT)."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return None
        import ssl

        import faust
        from faust.types.auth import SASLMechanism

        return faust.SASLCredentials(
            username=self.kafka_sasl_username,
            password=self.kafka_sasl_password,
            mechanism=SASLMechanism(self.kafka_sasl_mechanism),
            ssl_context=(
                ssl.create_default_context() if self.kafka_security_protocol == "SASL_SSL" else None
            ),
        )

    def rocksdb_options(self) -> dict[str, Any]:
        """Faust's RocksDB store options of the join-state table (a fresh dict: Faust pops
        keys from it)."""
        mb = 1024 * 1024
        return {"write_buffer_size": self.rocksdb_write_buffer_mb * mb,
                "max_write_buffer_number": 2,
                "block_cache_size": self.rocksdb_block_cache_mb * mb,
                "block_cache_compressed_size": self.rocksdb_block_cache_mb * mb // 4}  # fmt: skip

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type] = {
    "join": JoinConfig,
    "ranker": RankerConfig,
    "trainer": TrainerConfig,
    "drift": DriftConfig,
    "drift_wander": WanderConfig,
    "monitor": MonitorConfig,
    "offset": OffsetConfig,
    "index": IndexConfig,
    "indexer": IndexerConfig,
    "serving": ServingConfig,
    "two_tower": TwoTowerConfig,
    "fusion": FusionConfig,
    "store": StoreConfig,
}
_TOP = {f.name: f.type for f in dataclasses.fields(Settings) if f.name not in _SECTIONS}


def _coerce_var(var: str, value: str, default: object, annotation: object = "") -> object:
    """:func:`_coerce` with an error that names the environment variable."""
    try:
        return _coerce(value, default, annotation)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise SettingsError(f"{var} must be {kind}, got {value!r}") from None


def _coerce(value: str, default: object, annotation: object = "") -> object:
    if default is None and "bool" in str(annotation):  # bool | None: "auto" or "" is None
        if value.strip().lower() in ("", "auto", "none"):
            return None
        return value.lower() in ("1", "true", "yes", "on")
    if default is None and "float" in str(annotation):  # float | None: "" or "none" is None
        return None if value.strip().lower() in ("", "none") else float(value)
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _checked(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` with each one checked against the type of its field's default: a bool
    for a bool, an integer for an int, a number for a float (made a float), a string for a
    str, an array for a tuple. A wrong one is a ``SettingsError`` naming the key and the
    value, not a ``TypeError`` from deep inside the config. Fields without such a default
    (None, nested configs) are left to the config's own checks."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        f = fields.get(key)
        default = dataclasses.MISSING if f is None else f.default
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, float) or (
            isinstance(default, int) and "float" in str(f.type if f else "")
        ):
            ok, want = number, "a number"
            if ok:
                out[key] = float(value)
        elif isinstance(default, int):
            ok, want = number and isinstance(value, int), "an integer"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        elif isinstance(default, tuple):
            ok, want = isinstance(value, (list, tuple)), "an array"
        else:
            continue
        if not ok:
            raise SettingsError(f"{where}{key} must be {want}, got {value!r}")
    return out


def _section(cls: type, values: Mapping[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown keys in [{name}]: {sorted(unknown)}; known: {sorted(known)}")
    values = _checked(cls, values, f"[{name}] ")
    if cls is JoinConfig:  # the worker's labelling scheme (fresh labels) unless the file sets one
        values = {"delayed_feedback": "fake_negative", "align_fake_negatives": True, **values}
    if cls is RankerConfig:  # the worker's admission threshold unless the file sets one
        values["encoder"] = {
            "admit_after": WORKER_ADMIT_AFTER,
            "max_num_fields": WORKER_NUM_FIELDS,
            **values.get("encoder", {}),
        }
    if cls is RankerConfig and "encoder" in values:
        values["encoder"] = _section(EncoderConfig, values["encoder"], f"{name}.encoder")
    for key in ("user_encoder", "item_encoder"):  # [two_tower.user_encoder] etc.
        if cls is TwoTowerConfig and key in values:
            values[key] = _section(EncoderConfig, values[key], f"{name}.{key}")
    for key in ("hidden", "categorical_keys"):  # TOML arrays -> the configs' tuples
        if key in values:
            values[key] = tuple(values[key])
    try:
        return cls(**values)
    except SettingsError:
        raise
    except (ValueError, TypeError) as exc:  # name the section the bad value is in
        raise SettingsError(f"[{name}]: {exc}") from exc


class SettingsError(ValueError):
    """Settings that cannot be built: a TOML file that does not parse, an unknown key, a
    value of the wrong type or out of range. The message names the file (or the
    environment) and the reason; the CLI prints it as an error, without a traceback."""


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from a TOML file, ``STREAMREC_*`` variables and overrides.
    Raises :class:`SettingsError` (a ``ValueError``) when they do not make valid
    settings."""
    try:
        return _load_settings(path, env, **overrides)
    except (ValueError, TypeError, OSError) as exc:
        where = f"settings {path}" if path is not None else "settings"
        raise SettingsError(f"bad {where}: {exc}") from exc


def _load_settings(
    path: str | Path | None, env: Mapping[str, str] | None, **overrides: Any
) -> Settings:
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    unknown = set(data) - set(_TOP) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"unknown settings keys in {path}: {sorted(unknown)}")
    kwargs: dict[str, Any] = _checked(Settings, {k: v for k, v in data.items() if k in _TOP}, "")
    defaults = Settings()
    for key in _TOP:
        var = f"STREAMREC_{key.upper()}"
        if var in env:
            kwargs[key] = _coerce_var(var, env[var], getattr(defaults, key), _TOP[key])
    for name, cls in _SECTIONS.items():
        # STREAMREC_<SECTION>__<KEY> sets a scalar key of a section (the file's wins)
        section = dict(data.get(name, {}))
        for fld in dataclasses.fields(cls):
            var = f"STREAMREC_{name.upper()}__{fld.name.upper()}"
            default = fld.default
            optional_float = default is None and "float" in str(fld.type)
            if (
                var in env
                and fld.name not in section
                and (isinstance(default, (str, int, float)) or optional_float)
            ):
                section[fld.name] = _coerce_var(var, env[var], default, fld.type)
        if name in data or section:
            kwargs[name] = _section(cls, section, name)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**kwargs)

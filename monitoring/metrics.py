"""Prometheus metrics of streamrec, on a registry owned by (or passed to) each object.

Nothing here touches prometheus_client's global ``REGISTRY``, so several workers, tests or
monitors can live in one process.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from monitoring.calibration import CalibrationSnapshot, Reliability

__all__ = ["StreamrecMetrics", "serve_metrics"]

_WS = ("window", "segment")
_WB = ("window", "bin")


class StreamrecMetrics:
    """Every streamrec metric, as attributes named without the ``streamrec_`` prefix and the
    ``_total`` suffix (``metrics.calibration_ratio``, ``metrics.dead_letters``, ...).

    Window gauges are labelled ``window`` (e.g. ``"20k"``, ``"lifetime"``) and ``segment``
    (keep its cardinality bounded: a handful of segments plus ``"all"``).

    Args:
        registry: where the metrics are registered; a fresh ``CollectorRegistry`` if None.

    >>> from monitoring.windows import CalibrationWindow
    >>> m = StreamrecMetrics()
    >>> m.impressions.inc(3)
    >>> cw = CalibrationWindow(size=100)
    >>> cw.update(predictions=[0.2, 0.4], labels=[0, 1])
    >>> m.publish_snapshot(cw.window(), window="100")
    >>> m.registry.get_sample_value("streamrec_impressions_total")
    3.0
    >>> m.registry.get_sample_value(
    ...     "streamrec_calibration_ratio", {"window": "100", "segment": "all"})
    0.6000000000000001
    >>> "streamrec_drift_alarms_total" in m.metric_names()
    True
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"streamrec_{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            # prometheus_client appends _total to the exported sample name.
            return Counter(f"streamrec_{name}", doc, labels, registry=r)

        # Calibration per window and segment.
        self.predicted_ctr = gauge("predicted_ctr", "Mean predicted CTR, in [0, 1].", _WS)
        self.actual_ctr = gauge("actual_ctr", "Observed click-through rate, in [0, 1].", _WS)
        self.calibration_ratio = gauge(
            "calibration_ratio", "Predicted over actual clicks, sum(p)/sum(y); 1 is ideal.", _WS
        )
        self.expected_calibration_error = gauge(
            "expected_calibration_error",
            "Expected calibration error over equal-mass bins, in [0, 1].",
            _WS,
        )
        self.normalized_entropy = gauge(
            "normalized_entropy", "Log loss over base-rate entropy; below 1 beats the prior.", _WS
        )
        self.auc = gauge("auc", "ROC AUC of predictions against clicks, in [0, 1].", _WS)
        self.log_loss = gauge("log_loss", "Mean binary cross-entropy in nats.", _WS)
        self.drift_z = gauge(
            "drift_z",
            "Calibration drift statistic (sum y - sum p)/sqrt(sum p(1-p)) over the drift window.",
            ("segment",),
        )
        # Versions and sizes.
        self.model_version = gauge("model_version", "Version of the ranker serving predictions.")
        self.calibrator_version = gauge("calibrator_version", "Version of the active calibrator.")
        self.index_version = gauge("index_version", "Version of the serving FAISS index.")
        self.index_items = gauge("index_items", "Items in the serving FAISS index.")
        self.hard_negative_pool_users = gauge(
            "hard_negative_pool_users", "Users with a hard-negative pool."
        )
        self.pending_impressions = gauge(
            "pending_impressions", "Impressions waiting in the join window for a click."
        )
        self.join_state_bytes = gauge(
            "join_state_bytes",
            "Estimated bytes of the joiner's in-memory state on this worker, by kind: pending"
            " impressions, done (labelled ones remembered for duplicates and corrections),"
            " orphans (clicks waiting for their impression); each bounded by [join] max_*_bytes.",
            ("kind",),
        )
        self.feature_state_bytes = gauge(
            "feature_state_bytes",
            "Estimated bytes of the historical-feature stages on this worker (bounded by"
            " feature_max_bytes).",
        )
        self.feature_state_shed = gauge(
            "feature_state_shed",
            "State the feature stages on this worker shed so far, by kind: keys (idle past"
            " the TTL: expired; over the budget: evicted), impressions, sequences, and the"
            " item_* attributes given no user x attribute key (skipped_attributes).",
            ("kind",),
        )
        self.feature_follower_staleness_seconds = gauge(
            "feature_follower_staleness_seconds",
            "Seconds between now and the newest event time the feature follower (serve and"
            " trainer roles: their copy of the joiners' feature stages) applied; grows on"
            " an idle stream too (read it with feature_follower_lag_records).",
        )
        self.feature_follower_lag_records = gauge(
            "feature_follower_lag_records",
            "Records of impressions/clicks the feature follower has not read yet, by topic"
            " and partition (from the last fetch's high watermark).",
            ("topic", "partition"),
        )
        self.feature_follower_state_bytes = gauge(
            "feature_follower_state_bytes",
            "Estimated bytes of the feature follower's stages (bounded by feature_max_bytes).",
        )
        self.feature_follower_events = counter(
            "feature_follower_events", "Impressions and clicks the feature follower applied."
        )
        self.feature_follower_skipped = counter(
            "feature_follower_skipped",
            "Input records or enveloped events the feature follower skipped, by reason"
            " (they do not decode, or are too far in the future).",
            ("reason",),
        )
        self.malloc_bytes = gauge(
            "malloc_bytes",
            "glibc's C heap of this worker process (mallinfo2, every 60 s), by kind: in_use,"
            " free (kept in its arenas, not returned to the system), arenas (taken from the"
            " system), mmapped (large blocks, each its own mapping). Python's small objects"
            " (pymalloc) are not in it. Absent without glibc >= 2.33.",
            ("kind",),
        )
        self.rocksdb_memory_bytes = gauge(
            "rocksdb_memory_bytes",
            "Native memory of the join-state RocksDB databases on this worker, by kind:"
            " memtables, block_cache (data blocks; with index and filter blocks when they"
            " are charged to it), table_readers (index and filter blocks held outside the"
            " cache).",
            ("kind",),
        )
        self.orphan_clicks_waiting = gauge(
            "orphan_clicks_waiting",
            "Clicks waiting for their impression (bounded by [join] max_orphans).",
        )
        self.join_state_entries = gauge(
            "join_state_entries",
            "Entries of the joiner's durable state table (pending impressions, orphan clicks,"
            " watermarks) on this worker.",
        )
        self.duplicate_examples = counter(
            "duplicate_examples",
            "Labelled examples dropped because this stage already applied them"
            " (at-least-once redelivery).",
            ("stage",),
        )
        self.train_loss = gauge("train_loss", "Training loss of the latest micro-batch.")
        self.event_time_watermark_seconds = gauge(
            "event_time_watermark_seconds", "Event-time watermark of the joiner, epoch seconds."
        )
        # Counters.
        self.impressions = counter("impressions", "Impressions received.")
        self.clicks = counter("clicks", "Clicks received.")
        self.labeled = counter("labeled", "Labelled examples emitted by the joiner.", ("label",))
        for label in ("positive", "negative"):
            self.labeled.labels(label=label)  # export zeros before the first example
        self.duplicate_impressions = counter(
            "duplicate_impressions", "Impressions dropped as duplicates of a seen impression_id."
        )
        self.duplicate_clicks = counter(
            "duplicate_clicks", "Clicks counted once and dropped as duplicates."
        )
        self.late_clicks = counter(
            "late_clicks", "Clicks arriving after their negative was emitted (corrections)."
        )
        # the second label (join.conversion_window_s; issue 17 item 4)
        self.conversion_events = counter(
            "conversion_events", "Conversion events received (on the clicks topic)."
        )
        self.conversions = counter(
            "conversions",
            "Conversion events by what the joiner did with them: attached (to a clicked "
            "impression, within its conversion window), late (after that window, or a "
            "duplicate), orphan (no click came within join.orphan_grace_s), ignored (no "
            "conversion window set). Waiting ones are not counted yet.",
            ("outcome",),
        )
        for outcome in ("attached", "late", "orphan", "ignored"):
            self.conversions.labels(outcome=outcome)
        self.second_labels = counter(
            "second_labels",
            "Second labels (clicked and converted) sent by the joiner in their own records: "
            "1 at a conversion, 0 when a clicked impression's conversion window closed.",
            ("label",),
        )
        for label in ("0", "1"):
            self.second_labels.labels(label=label)
        self.dead_letters = counter(
            "dead_letters", "Events sent to the dead-letter topic, by reason.", ("reason",)
        )
        # Hostile or broken input: what a stage survived instead of exiting.
        self.stage_errors = counter(
            "stage_errors",
            "Unexpected exceptions a stage caught while handling one record or timer tick"
            " (the record was dead-lettered or skipped and acknowledged; the stage went on),"
            " by stage.",
            ("stage",),
        )
        self.control_rejected = counter(
            "control_rejected",
            "control records rejected by validation and skipped (never applied), by reason.",
            ("reason",),
        )
        self.history_fields_dropped = counter(
            "history_fields_dropped",
            "hist_* features an input brought itself, dropped: with historical features on"
            " the feature stage computes them (impressions: where=stream; request"
            " contexts: where=serving).",
            ("where",),
        )
        self.fields_rejected = counter(
            "fields_rejected",
            "Feature fields given no encoder slot: unknown at inference (where=serving), or"
            " not admitted from the stream (where=stream: below the admission count, or the"
            " candidate cap full).",
            ("where",),
        )
        self.worker_starts = gauge(
            "worker_starts",
            "Starts of a worker on its data directory (persisted across restarts).",
        )
        self.unclean_restarts = gauge(
            "unclean_restarts",
            "Starts on a data directory whose previous run did not shut down cleanly"
            " (crashed or killed), persisted across restarts: a crash loop makes it climb.",
        )
        self.scored = counter("scored", "Progressive predictions scored before training.")
        self.second_label_predicted = counter(
            "second_label_predicted",
            "Sum of the ranker's P(clicked and converted) over the impressions the monitor "
            "judged on their final second label (a two-task ranker; each impression once, "
            "its first record's score, once join.window_s + conversion_window_s closed).",
        )
        self.second_label_judged = counter(
            "second_label_judged", "Impressions judged on their final second label."
        )
        self.second_label_outcomes = counter(
            "second_label_outcomes",
            "Conversions among the impressions judged on their final second label.",
        )
        self.second_label_ratio = gauge(
            "second_label_ratio",
            "Lifetime predicted over actual conversions of the impressions judged on their "
            "final second label (1 = calibrated).",
        )
        self.second_label_window_ratio = gauge(
            "second_label_window_ratio",
            "Predicted over actual conversions of the newest monitor.window impressions "
            "judged on their final second label (1 = calibrated).",
        )
        self.monitored = counter(
            "monitored", "Examples the calibration monitor has judged: with fresh labels one "
            "per impression, on its final label once its attribution window closed (so below "
            "scored_total, which counts each click's row too); else one per scored row."
        )  # fmt: skip
        self.monitor_pending_impressions = gauge(
            "monitor_pending_impressions",
            "Impressions the calibration monitor holds until their final label (fresh labels:"
            " until the lowest partition mark passes their attribution window).",
        )
        self.monitor_mark_seconds = gauge(
            "monitor_mark_seconds",
            "Each input partition's newest event-time mark at the monitor, epoch seconds; the"
            " lowest closes the windows, so one that stands still while the others move is a"
            " stalled joiner holding the monitor (a quiet partition's joiner moves it).",
            ("partition",),
        )
        self.monitor_forced = counter(
            "monitor_forced", "Impressions the calibration monitor judged before their "
            "attribution window closed, on the clicks known then, because it held "
            "monitor.max_pending of them (a joiner stalled for long holds the windows)."
        )  # fmt: skip
        self.monitor_late_positives = counter(
            "monitor_late_positives", "Clicks that reached the monitor after their impression "
            "was judged unclicked (counted, not applied: the stream lagged past the lateness)."
        )  # fmt: skip
        self.train_batches = counter("train_batches", "Training micro-batches applied.")
        self.nonfinite_batches = counter(
            "nonfinite_batches", "Training micro-batches skipped for a non-finite loss."
        )
        self.drift_alarms = counter("drift_alarms", "Calibration drift alarms raised.")
        self.recalibrations = counter("recalibrations", "Calibrator refits accepted.")
        self.recalibrations_rejected = counter(
            "recalibrations_rejected", "Calibrator refits rejected (no held-out improvement)."
        )
        self.recalibration_rollbacks = counter(
            "recalibration_rollbacks",
            "Calibrators rolled back to the raw ranker (served log loss worse than raw).",
        )
        self.calibrator_updates = counter(
            "calibrator_updates",
            "Calibrator versions published: accepted refits and level updates while tracking.",
        )
        self.calibrator_offset = gauge(
            "calibrator_offset",
            "Logit offset the tracking calibrator adds to bring the served base rate to its "
            "target (0 when not tracking).",
        )
        self.served_offset = gauge(
            "served_offset",
            "Logit offset (nats) of the fast offset after the calibrator (offset.enabled, "
            "issue 17) inside the published calibrator; 0 when off.",
        )
        self.offset_delay_clicks = gauge(
            "offset_delay_clicks",
            "Complete clicks the fast offset's learned click-delay CDF rests on "
            "(offset.estimate_delay); 0 while it has too few and reads only impressions "
            "whose window has closed, or when the offset is off.",
        )
        self.calibration_target_ctr = gauge(
            "calibration_target_ctr",
            "Base rate the tracking calibrator aims at (accepted window click rate), in [0, 1];"
            " NaN when not tracking.",
        )
        self.segment_drift_alarms = counter(
            "segment_drift_alarms",
            "Calibration drift alarms of a single segment's detector (no recalibration).",
            ("segment",),
        )
        # Reliability diagram of a window: one series per bin, ascending in prediction.
        self.reliability_predicted_ctr = gauge(
            "reliability_predicted_ctr",
            "Mean served prediction of the reliability bin, in [0, 1]; NaN for an empty bin.",
            _WB,
        )
        self.reliability_actual_ctr = gauge(
            "reliability_actual_ctr",
            "Observed click-through rate of the reliability bin, in [0, 1]; NaN when empty.",
            _WB,
        )
        self.reliability_impressions = gauge(
            "reliability_impressions", "Impressions in the reliability bin.", _WB
        )
        self.index_refreshes = counter("index_refreshes", "FAISS index rebuilds swapped in.")
        self.index_rejected = counter(
            "index_rejected",
            "FAISS index rebuilds that failed verification (size, norms, recall@K against"
            " exact search); the previous index kept serving.",
        )
        self.hard_negative_pool_items = gauge(
            "hard_negative_pool_items", "Item ids held in all hard-negative pools."
        )
        self.hard_negative_pool_age_seconds = gauge(
            "hard_negative_pool_age_seconds", "Seconds since the hard-negative pools were rebuilt."
        )
        self.retrieval_negative_cosine = gauge(
            "retrieval_negative_cosine",
            "Mean user-item cosine of the two-tower model's hard and random negatives (hard"
            " far above random hints at false negatives in the pools).",
            ("kind",),
        )
        self.retrieval_hard_share = gauge(
            "retrieval_hard_share", "Share of hard negatives in the two-tower curriculum now."
        )
        self.fusion_weight = gauge(
            "fusion_weight",
            "Weight of each candidate source (model, covisit, popularity) in the served "
            "reciprocal rank fusion now.",
            ("source",),
        )
        self.fusion_beta = gauge(
            "fusion_beta", "Weight of log q (the popularity prior) on the model's candidates now."
        )
        self.fusion_adapted = gauge(
            "fusion_adapted", "1 when the fusion serves an online pick, 0 the configured setting."
        )
        self.fusion_observed_clicks = gauge(
            "fusion_observed_clicks",
            "Clicks the fusion's online pick has scored against the serving index.",
        )
        self.fusion_covisit_entries = gauge(
            "fusion_covisit_entries", "Co-visited item pairs the fusion keeps (~52 bytes each)."
        )
        self.fusion_uncounted_clicks = gauge(
            "fusion_uncounted_clicks",
            "Clicks the fusion did not count, by reason: repeat (the item already in the "
            "user's own recent clicks: neither popularity nor co-visits) or throttled "
            "(popularity only: the user past fusion.max_user_share of the recent clicks; "
            "fractions of clicks add up).",
            ("reason",),
        )
        self.fusion_repeated_pairs = gauge(
            "fusion_repeated_pairs",
            "Co-visits of an item pair a user had already made, not counted again "
            "(fusion.covisit_pair_memory).",
        )
        # The raw (uncalibrated) ranker scores, next to the served ones above.
        self.raw_predicted_ctr = gauge(
            "raw_predicted_ctr", "Mean raw (uncalibrated) ranker prediction, in [0, 1].", _WS
        )
        self.raw_calibration_ratio = gauge(
            "raw_calibration_ratio", "sum(p_raw)/sum(y) of the uncalibrated ranker scores.", _WS
        )
        # Latencies and delays, base unit seconds.
        self.label_delay_seconds = Histogram(
            "streamrec_label_delay_seconds",
            "Event time from an impression to its label (click time or window close), seconds.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 2700, 3600, 7200),
            registry=r,
        )
        self.update_freshness_seconds = Histogram(
            "streamrec_update_freshness_seconds",
            "Wall time from the joiner emitting a label to the ranker learning from it, seconds.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "streamrec_gc_pause_seconds",
            "Wall time of each of Python's garbage collections in this worker, seconds, by"
            " generation (0 young, 2 full): every thread of the process waits meanwhile.",
            ("generation",),
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.train_step_seconds = Histogram(
            "streamrec_train_step_seconds",
            "Wall time to score and learn one micro-batch, seconds.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.serving_seconds = Histogram(
            "streamrec_serving_seconds",
            "Wall time to answer a /recommend or /score request (retrieve, rank, calibrate),"
            " seconds.",
            ("endpoint",),
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.serving_errors = counter(
            "serving_errors",
            "Requests to /recommend or /score answered with an error, by HTTP status.",
            ("endpoint", "status"),
        )
        # The model store (modelstore/): what a trainer published, what a replica serves.
        self.store_version = gauge(
            "store_version",
            "Model-store version this worker published last (trainer) or serves (serve).",
        )
        self.store_bytes = gauge("store_bytes", "Bytes of the newest published store version.")
        self.store_failures = counter(
            "store_failures",
            "Model-store versions or announcements rejected (old version kept serving), or"
            " failed publishes (reason=publish) and checkpoints (reason=checkpoint, e.g. a"
            " full disk: the previous one is kept), by reason.",
            ("reason",),
        )
        self.store_writes_skipped = counter(
            "store_writes_skipped",
            "Checkpoints (kind=checkpoint) or model-store versions (kind=publish) that fell"
            " due while the previous one was still being written in the background: taken"
            " once that write ends, with the newest models (one count per busy write).",
            ("kind",),
        )
        self.store_loads = counter("store_loads", "Model-store versions loaded and swapped in.")
        self.store_publish_seconds = Histogram(
            "streamrec_store_publish_seconds",
            "Wall time to write one model-store version (models, index, manifest), seconds.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.store_propagation_seconds = Histogram(
            "streamrec_store_propagation_seconds",
            "Wall time from a version's manifest being written to this replica serving it,"
            " seconds.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )

    def publish_snapshot(
        self, snapshot: CalibrationSnapshot, *, window: str, segment: str = "all"
    ) -> None:
        """Set the 7 window gauges for ``(window, segment)`` from ``snapshot``.

        Undefined (``nan``) statistics are exported as NaN rather than skipped, so a stale
        value never lingers on a dashboard and alerts comparing against it do not fire.
        """
        values = {
            self.predicted_ctr: snapshot.mean_p,
            self.actual_ctr: snapshot.actual_ctr,
            self.calibration_ratio: snapshot.ratio,
            self.expected_calibration_error: snapshot.ece,
            self.normalized_entropy: snapshot.ne,
            self.auc: snapshot.auc,
            self.log_loss: snapshot.log_loss,
        }
        for gauge, value in values.items():
            gauge.labels(window=window, segment=segment).set(float(value))

    def publish_raw_snapshot(
        self, snapshot: CalibrationSnapshot, *, window: str, segment: str = "all"
    ) -> None:
        """Set the raw-score gauges (``raw_predicted_ctr``, ``raw_calibration_ratio``)."""
        self.raw_predicted_ctr.labels(window=window, segment=segment).set(float(snapshot.mean_p))
        self.raw_calibration_ratio.labels(window=window, segment=segment).set(float(snapshot.ratio))

    def publish_reliability(self, reliability: Reliability, *, window: str) -> None:
        """Set the reliability gauges of ``window``, one series per bin.

        Bins are labelled ``bin="01"``, ``"02"``, ... in ascending prediction order (zero
        padded so that they sort); an empty bin exports NaN means and a count of 0.
        """
        width = max(2, len(str(len(reliability.count))))
        rows = zip(reliability.mean_p, reliability.mean_y, reliability.count, strict=True)
        for k, (mean_p, mean_y, count) in enumerate(rows, start=1):
            labels = {"window": window, "bin": f"{k:0{width}d}"}
            self.reliability_predicted_ctr.labels(**labels).set(float(mean_p))
            self.reliability_actual_ctr.labels(**labels).set(float(mean_y))
            self.reliability_impressions.labels(**labels).set(float(count))

    def metric_names(self) -> set[str]:
        """Sample names as queried in PromQL: gauges by name, counters with ``_total``.

        Histograms give their ``_bucket``, ``_sum`` and ``_count`` series. Includes labelled
        metrics that have no series yet; excludes ``_created`` samples.
        """
        names: set[str] = set()
        for family in self.registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
            else:
                names.add(family.name)
        return names


def serve_metrics(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> tuple[WSGIServer, int]:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` binds a free port; the bound one is returned. Stop with ``server.shutdown()``
    (then ``server.server_close()`` to release the socket).
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_address[1])

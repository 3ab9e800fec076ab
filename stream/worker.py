"""Run one streamrec worker process: topics, metrics endpoint, the Faust app."""

from __future__ import annotations

import logging
import os
import sys

from modelstore.store import StoreError
from monitoring.metrics import StreamrecMetrics, serve_metrics
from stream.app import create_app, create_worker_topics, group_id
from stream.broker import free_port, is_tansu
from stream.collector import PauseRecorder, configure_collector
from stream.heap import configure_mmap_threshold
from stream.memdiag import HeapGauges, MallocTrimmer, census_from_env, tracemalloc_from_env
from stream.runs import note_exit, note_start
from stream.settings import Settings

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.001  # sys.setswitchinterval when serving runs on threads


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    """Create the topics if missing, serve ``/metrics``, and run the Faust worker until
    SIGINT/SIGTERM."""
    import faust

    # first, before the models and their copies are allocated (see stream.heap)
    configure_mmap_threshold(settings.malloc_mmap_threshold_kb)
    if settings.nice:  # before any thread starts: Linux threads inherit their creator's
        os.nice(settings.nice)
    if settings.web_port == 0:
        settings = settings.replace(web_port=free_port(settings.web_host))
    created = create_worker_topics(settings, check=True)
    if settings.recovery_consistency_check is None:
        # Tansu's ListOffsets trips Faust's check on a restart (see Settings); Kafka keeps it
        tansu = is_tansu(settings.bootstrap, settings.kafka_client_options())
        settings = settings.replace(recovery_consistency_check=not tansu)
        if tansu:
            log.info("Tansu broker: Faust's recovery consistency check is off")
    if created:
        log.info("created topics %s", created)
    if settings.trainer.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.trainer.torch_threads)
    if settings.serving.threads > 0:
        # The serving threads and the event loop share the GIL: a thread waiting for it
        # waits up to the switch interval (5 ms by default), which would add that much to
        # requests and to the agents alike.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    metrics = StreamrecMetrics()
    starts, unclean = note_start(settings.data_dir)  # a crash loop shows in unclean_restarts
    metrics.worker_starts.set(starts)
    metrics.unclean_restarts.set(unclean)
    if unclean:
        log.warning("data dir %s: %d start(s) after a run that did not end cleanly",
                    settings.data_dir, unclean)  # fmt: skip
    server, port = serve_metrics(
        metrics.registry, host=settings.metrics_host, port=settings.metrics_port
    )
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    print(f"streamrec worker: metrics on http://{settings.metrics_host}:{port}/metrics", flush=True)
    if settings.role != "joiner":  # a joiner-only worker has no model to serve
        web = f"http://{settings.web_host}:{settings.web_port}"
        log.info("serving on %s/recommend and %s/score", web, web)
        print(f"streamrec worker: recommendations on {web}/recommend?user_id=...&k=10",
              flush=True)  # fmt: skip
    log.info("role %s, consumer group %s", settings.role, group_id(settings))
    try:
        app = create_app(settings, metrics)
    except StoreError as exc:  # e.g. writer_locked: a refusal, not a crash
        note_exit(settings.data_dir, True)
        server.shutdown()
        raise SystemExit(f"streamrec worker: {exc}") from None

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode's signal types are narrow
    async def _checkpoint(sender: object, **kwargs: object) -> None:
        # background writes under way finish first; then the newest models are written
        # (a restarted trainer resumes from the store)
        trainer_agents = app.trainer_agents  # type: ignore[attr-defined]
        path, manifest = await trainer_agents.final_writes()
        if path:
            log.info("final checkpoint %s", path)
        if manifest is not None:
            log.info("final model-store version %d", manifest.version)

    # after the app, its models and libraries are made: they are frozen out of every
    # later collection (stream.collector)
    configure_collector(settings.gc_gen0_threshold, settings.gc_freeze)
    pauses = PauseRecorder(metrics.gc_pause_seconds)
    pauses.install()
    tracer = tracemalloc_from_env()  # STREAMREC_TRACEMALLOC=<dir>: a diagnostic, off by default
    counter = census_from_env()  # STREAMREC_CENSUS=<dir>: likewise
    trimmer = MallocTrimmer(settings.memory_trim_s) if settings.memory_trim_s > 0 else None
    if trimmer is not None:
        trimmer.start()
    heap_gauges = HeapGauges(metrics.malloc_bytes)  # the C heap, to tell a leak from holes
    heap_gauges.start()
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    clean = False
    try:
        worker.execute_from_commandline()
        clean = True
    except SystemExit as exc:
        clean = exc.code in (0, None)
        raise
    finally:
        note_exit(settings.data_dir, clean)
        app.serving_gate.close()  # type: ignore[attr-defined]
        if app.request_batcher is not None:  # type: ignore[attr-defined]
            app.request_batcher.close()  # type: ignore[attr-defined]
        if app.train_thread is not None:  # type: ignore[attr-defined]
            app.train_thread.shutdown(wait=True)  # type: ignore[attr-defined]
        # a background write under way finishes (its files are atomic either way)
        app.trainer_agents.writer.shutdown(wait=True)  # type: ignore[attr-defined]
        server.shutdown()
        pauses.remove()
        for thread in (tracer, counter, trimmer, heap_gauges):
            if thread is not None:
                thread.stop()

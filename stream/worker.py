"""Run one streamrec worker process: topics, metrics endpoint, the Faust app."""

from __future__ import annotations

import logging

from monitoring.metrics import StreamrecMetrics, serve_metrics
from stream.app import create_app, topic_plan
from stream.broker import create_topics
from stream.settings import Settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    """Create the topics if missing, serve ``/metrics``, and run the Faust worker until
    SIGINT/SIGTERM."""
    import faust

    created = create_topics(settings.bootstrap, topic_plan(settings))
    if created:
        log.info("created topics %s", created)
    metrics = StreamrecMetrics()
    server, port = serve_metrics(
        metrics.registry, host=settings.metrics_host, port=settings.metrics_port
    )
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    print(f"streamrec worker: metrics on http://{settings.metrics_host}:{port}/metrics", flush=True)
    app = create_app(settings, metrics)
    rt = app.streamrec  # type: ignore[attr-defined]

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode's signal types are narrow
    async def _checkpoint(sender: object, **kwargs: object) -> None:
        path = rt.trainer.maybe_checkpoint(force=True)
        if path:
            log.info("final checkpoint %s", path)

    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        server.shutdown()

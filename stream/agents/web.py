"""The worker's web pages (on Faust's web server): ``/recommend``, ``/score``,
``/version``, ``/health``; hardened (:mod:`stream.httpd`), gated
(:class:`stream.gate.ServingGate`) and, for ``/recommend``, batched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust

from serving.batching import RequestBatcher
from serving.recommender import Recommender, ServingError
from stream.agents.replica import ReplicaAgents
from stream.agents.runtime import Runtime
from stream.gate import ServingGate
from stream.httpd import harden, read_json_body

__all__ = ["install_web", "served_versions"]


def served_versions(rt: Runtime, replica: ReplicaAgents | None) -> dict[str, Any]:
    """The model versions this worker answers from (``/version``)."""
    settings = rt.settings
    if replica is not None:
        rep = replica.replica
        cur = rep.current
        return {
            "role": settings.role,
            "store_version": rep.version,
            "model_version": None if cur is None else cur.ranker.n_updates,
            "index_version": (0 if cur is None or cur.index is None else cur.index.version),
            "calibrator_version": None if cur is None else cur.calibrator_version,
            "digest": None if cur is None else cur.manifest.digest,
            "loaded_at": None if cur is None else cur.loaded_at,
            "load_failures": dict(rep.failures),
            "last_error": rep.last_error,
        }
    published = rt.trainer.published
    return {
        "role": settings.role,
        "store_version": 0 if published is None else published.version,
        "model_version": rt.trainer.model_version,
        "index_version": rt.indexer.version,
        "calibrator_version": rt.trainer.calibrator_version,
        "digest": None if published is None else published.digest,
    }


def install_web(
    app: faust.App,
    rt: Runtime,
    recommender: Recommender,
    replica: ReplicaAgents | None,
    *,
    web: bool,
) -> None:
    """Register the pages; ``web``: this worker runs a web server (hardened, batched).
    Sets ``app.serving_gate`` and ``app.request_batcher`` (closed by the worker)."""
    settings, metrics = rt.settings, rt.metrics
    if web:
        # header/body timeouts, a connection cap, no 500 with details (stream.httpd)
        harden(
            app.web,
            settings.serving,
            on_refused=metrics.serving_errors.labels(endpoint="connection", status="503").inc,
            on_error=metrics.serving_errors.labels(endpoint="any", status="500").inc,
        )
    gate = ServingGate(settings.serving.threads, settings.serving.max_inflight)
    app.serving_gate = gate  # type: ignore[attr-defined]
    # concurrent /recommend requests answered together (bench.serving_batching)
    batcher = (
        RequestBatcher(recommender, settings.serving.batch, settings.serving.batch_wait_ms / 1e3)
        if settings.serving.batch > 1 and web
        else None
    )
    app.request_batcher = batcher  # type: ignore[attr-defined]

    async def answer(
        view: faust.web.View, endpoint: str, fn: Callable[..., dict[str, Any]], *args: Any
    ) -> faust.web.Response:
        """``fn(*args)`` through the serving gate as JSON (``/recommend`` through the
        batcher when there is one); a :class:`ServingError` becomes its status with
        ``error``; both counted in the serving metrics."""
        try:
            if batcher is not None and endpoint == "recommend":
                out = await gate.run_batched(batcher, *args)
            else:
                out = await gate.run(fn, *args)
        except ServingError as exc:
            metrics.serving_errors.labels(endpoint=endpoint, status=str(exc.status)).inc()
            return view.error(exc.status, exc.message)
        metrics.serving_seconds.labels(endpoint=endpoint).observe(out["timing_ms"]["total"] / 1e3)
        return view.json(out)

    @app.page("/recommend")
    class RecommendView(faust.web.View):
        """``GET /recommend?user_id=U&k=K[&ctx_<name>=value ...]``: top-k by calibrated
        pCTR (see :meth:`serving.recommender.Recommender.recommend`); 4xx/503 with ``error``."""

        async def get(self, request: faust.web.Request) -> faust.web.Response:
            q = request.query
            try:
                k = int(q.get("k", "10"))
            except ValueError:
                return self.error(400, f"k must be an integer, got {q.get('k')!r}")
            ctx = {name: value for name, value in q.items() if name not in ("user_id", "k")}
            return await answer(self, "recommend", recommender.recommend,
                                q.get("user_id", ""), k, ctx or None)  # fmt: skip

    @app.page("/score")
    class ScoreView(faust.web.View):
        """``POST /score`` with ``{"user_id": U, "item_ids": [...], "context": {...}}``:
        calibrated pCTR of the given candidates, in order."""

        async def post(self, request: faust.web.Request) -> faust.web.Response:
            try:  # bounded in time and size; any parse error is a 400, never a 500
                body = await read_json_body(request, settings.serving)
            except ServingError as exc:
                metrics.serving_errors.labels(endpoint="score", status=str(exc.status)).inc()
                return self.error(exc.status, exc.message)
            if not isinstance(body, dict):
                return self.error(400, "the body must be a JSON object")
            items: Any = body.get("item_ids")  # validated by Recommender.score
            return await answer(self, "score", recommender.score,
                                body.get("user_id", ""), items, body.get("context"))  # fmt: skip

    @app.page("/version")
    class VersionView(faust.web.View):
        """``GET /version``: the model versions this worker answers from."""

        async def get(self, request: faust.web.Request) -> faust.web.Response:
            return self.json(served_versions(rt, replica))

    @app.page("/health")
    class HealthView(faust.web.View):
        """``GET /health``: 200 once this worker has a model to answer from, else 503."""

        async def get(self, request: faust.web.Request) -> faust.web.Response:
            v = served_versions(rt, replica)
            ok = v["store_version"] > 0 if replica is not None else v["index_version"] > 0
            return self.json({"ok": ok, **v}, status=200 if ok else 503)

"""A ``serve`` worker: the newest model-store version (:class:`modelstore.snapshot.
ModelReplica`), loaded at start (catch-up from the store, not from ``control`` history),
on each announcement and every ``store.poll_s`` seconds, and swapped atomically."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import faust
import numpy as np

from features.stage import FeatureStage
from index.faiss_index import IndexHolder, IndexSnapshot
from learners.calibration import Calibrator
from modelstore.snapshot import LoadedModels, ModelReplica
from modelstore.store import DirectoryStore
from serving.recommender import Recommender, ServingError
from stream.agents.outputs import Outputs
from stream.agents.runtime import Runtime
from stream.control import ModelAnnouncement

__all__ = ["ReplicaAgents"]

log = logging.getLogger(__name__)


class ReplicaAgents:
    """The store refresher task, the ``control`` drain a serve worker subscribes with,
    the failure counts, and the recommender over the replica's current version."""

    def __init__(self, app: faust.App, rt: Runtime, out: Outputs) -> None:
        self.app, self.rt, self.out = app, rt, out
        settings = rt.settings
        self.replica = ModelReplica(
            DirectoryStore(settings.model_store, keep=settings.store.keep),
            device=settings.ranker.device,
            fnc=settings.trainer.fnc,
        )
        self.refresh_soon = asyncio.Event()
        self._reported: dict[str, int] = {}

    def install(self) -> None:
        async def store_refresher() -> None:
            await self.refresh_forever()

        async def control_drain(stream: faust.StreamT[bytes]) -> None:
            """A serve worker's only subscription (Faust needs one): ``control`` in the
            group ``<app_id>-serve``, ignored here; the listener task reads it outside any
            group."""
            async for _ in stream:
                pass

        self.app.task(store_refresher)
        self.app.agent(self.out.control, name="serve-control")(control_drain)

    def announce(self, msg: ModelAnnouncement, *, refused: bool) -> None:
        """A ``model`` record from ``control``: refresh soon unless it was refused; new
        load failures counted either way."""
        before = self.replica.n_failures
        if self.replica.announce(msg.to_dict()) is not None and not refused:
            self.refresh_soon.set()
        self.count_failures(before)

    def count_failures(self, before: int) -> None:
        """Add the replica's failures since ``before`` to ``store_failures``."""
        replica = self.replica
        if replica.n_failures == before:
            return
        failures = dict(replica.failures)  # a copy: a load thread may add to it
        for reason, n in failures.items():
            new = n - self._reported.get(reason, 0)
            if new > 0:
                self.rt.metrics.store_failures.labels(reason=reason).inc(new)
                self._reported[reason] = n

    async def refresh_forever(self) -> None:
        replica, settings = self.replica, self.rt.settings
        loop = asyncio.get_running_loop()
        while True:
            before = replica.n_failures
            try:
                loaded = await loop.run_in_executor(None, replica.refresh)
            except Exception:  # e.g. the store's directory unreadable: keep serving
                log.exception("model store refresh failed; serving version %d", replica.version)
                loaded = None
            self.count_failures(before)
            if loaded is not None:
                m = self.rt.metrics
                m.store_loads.inc()
                m.store_version.set(loaded.version)
                m.store_propagation_seconds.observe(replica.propagation_s[-1])
                m.model_version.set(loaded.ranker.n_updates)
                if loaded.index is not None:
                    m.index_version.set(loaded.index.version)
                    m.index_items.set(len(loaded.index))
            try:
                await asyncio.wait_for(self.refresh_soon.wait(), timeout=settings.store.poll_s)
            except TimeoutError:
                pass
            self.refresh_soon.clear()

    def models(self) -> LoadedModels:
        cur = self.replica.current
        if cur is None:
            raise ServingError(503, "no model yet: the model store has no usable version")
        return cur

    def calibrator(self) -> tuple[Calibrator, int]:
        """The newest of the snapshot's calibrator and one announced on control since."""
        cur = self.models()
        cal, version = cur.calibrator, cur.calibrator_version
        announced = self.rt.trainer.served_calibrator  # one read: calibrator and version agree
        if announced.version > version:
            cal, version = announced.calibrator, announced.version
        return cal, version  # the snapshot's ranker applies FNC itself (RankerConfig.fnc)

    def user_vectors(self, rows: list[dict[str, object]]) -> np.ndarray:
        """(U, D) vectors of the user rows (:meth:`serving.recommender.Recommender.user_rows`)
        from the snapshot's two-tower model, else the ranker's user embeddings (by id)."""
        cur = self.models()
        if cur.two_tower is None:
            return cur.ranker.user_vectors([str(r["user_id"]) for r in rows])
        return cur.two_tower.user_vectors(rows)

    def recommender(
        self,
        history: Callable[[str], FeatureStage | None] | None = None,
        on_history_dropped: Callable[[int], None] | None = None,
    ) -> Recommender:
        """Retrieve → rank → calibrate over the replica's current version; ``history``:
        the user's feature stage (the worker's :class:`stream.services.FeatureFollower`),
        None: rows without historical features; ``on_history_dropped``: see
        :class:`~serving.recommender.Recommender`."""
        replica = self.replica

        class _ReplicaIndex(IndexHolder):
            """The replica's index as an :class:`IndexHolder` for the recommender."""

            @property
            def current(self) -> IndexSnapshot | None:
                cur = replica.current
                return None if cur is None else cur.index

        return Recommender(
            _ReplicaIndex(),
            ranker=lambda: self.models().ranker,
            calibrator=self.calibrator,
            user_vectors=self.user_vectors,
            config=self.rt.settings.serving,
            history=history,
            # the snapshot's counts, when it has them and fusion is on here
            fusion=lambda: self.models().fusion if self.rt.settings.fusion.enabled else None,
            on_history_dropped=on_history_dropped,
        )

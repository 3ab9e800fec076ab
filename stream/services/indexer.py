"""Indexer room: periodic retrieval index builds."""

from __future__ import annotations

import logging
import time

from index.faiss_index import IndexHolder, build_snapshot
from index.hard_negatives import HardNegativePool
from learners.ranker import TorchRanker
from learners.two_tower import TwoTowerModel
from monitoring.metrics import StreamrecMetrics
from stream.control import IndexRejected, IndexVersion
from stream.services.catalogue import Catalogue
from stream.settings import Settings

log = logging.getLogger(__name__)


class IndexerService:
    """Rebuilds the FAISS index over item embeddings and the hard-negative pools."""

    def __init__(self, settings: Settings, metrics: StreamrecMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.holder = IndexHolder()
        self.pool = HardNegativePool(
            per_user=settings.indexer.pool_per_user, max_users=settings.indexer.max_users
        )
        self.version = 0
        self.built_at_update = 0  # the retrieval model's update count at the last build
        self.built_items = 0  # catalogue items at the last build

    def due(self, ranker: TorchRanker, two_tower: TwoTowerModel | None) -> bool:
        """True when ``indexer.refresh_updates`` model updates happened since the last
        build (the timer refreshes every ``indexer.refresh_s`` seconds as well)."""
        every = self.settings.indexer.refresh_updates
        updates = ranker.n_updates if two_tower is None else two_tower.n_updates
        return every > 0 and updates - self.built_at_update >= every

    def refresh(
        self, ranker: TorchRanker, catalogue: Catalogue, two_tower: TwoTowerModel | None = None
    ) -> IndexVersion | IndexRejected | None:
        """Build a new snapshot off the serving path from the retrieval model's item
        vectors (``two_tower``, else the ranker's embeddings), verify it (size, unit norms,
        recall@K against exact search on a sample) and swap it in atomically; a snapshot
        that fails keeps the old one serving and is counted. Then refresh the hard-negative
        pools from it. Returns the ``control`` message (``index`` or ``index_rejected``), or
        None when there is nothing to index or nothing changed since the last build (same
        model update count and catalogue size)."""
        items = list(catalogue.items)
        if not items:
            return None
        model: TorchRanker | TwoTowerModel = two_tower if two_tower is not None else ranker
        if self.version > 0 and (model.n_updates, len(items)) == (
            self.built_at_update,
            self.built_items,
        ):
            return None  # the same model over the same catalogue: nothing to rebuild
        t0 = time.perf_counter()
        vectors = model.item_vectors(items)
        m = self.metrics
        try:
            snapshot = build_snapshot(
                items, vectors, version=self.version + 1, config=self.settings.index
            )
        except ValueError as exc:  # e.g. non-finite vectors from a diverged model
            m.index_rejected.inc()
            log.warning("index v%d not built, v%d keeps serving: %s", self.version + 1,
                        self.version, exc)  # fmt: skip
            return IndexRejected(self.version + 1, [str(exc)])
        check = self.holder.swap_if_valid(snapshot)
        if not check.ok:
            m.index_rejected.inc()
            log.warning("index v%d rejected, v%d keeps serving: %s", snapshot.version,
                        self.version, "; ".join(check.reasons))  # fmt: skip
            return IndexRejected(snapshot.version, list(check.reasons))
        self.version = snapshot.version
        self.built_at_update = model.n_updates
        self.built_items = len(items)
        users = list(reversed(catalogue.users))  # most recent first
        now = time.time()
        if users:
            self.pool.refresh(snapshot, users, model.user_vectors(users), catalogue.users,
                              now=now, seen=catalogue.seen_sets())  # fmt: skip
        m.index_refreshes.inc()
        m.index_version.set(self.version)
        m.index_items.set(len(snapshot))
        m.hard_negative_pool_users.set(self.pool.n_users)
        m.hard_negative_pool_items.set(self.pool.size)
        return IndexVersion(
            self.version,
            items=len(snapshot),
            index_kind=snapshot.kind,
            recall_check=check.recall,
            retrieval_model="ranker_embeddings" if two_tower is None else "two_tower",
            pool_users=self.pool.n_users,
            build_s=time.perf_counter() - t0,
        )

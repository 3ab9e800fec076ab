"""The worker's retrieval half as plain objects: two-tower training in the trainer, the
verified index refresh, hard-negative pools from seen items, and serving from them."""

from __future__ import annotations

import numpy as np

from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from learners.two_tower import TwoTowerConfig
from logs.events import Impression, LabeledExample
from monitoring.metrics import StreamrecMetrics
from serving.recommender import Recommender
from stream.services import IndexerService, TrainerService
from stream.settings import IndexerConfig, Settings, TrainerConfig

T0 = 1_700_000_000.0


def settings(**kw: object) -> Settings:
    return Settings(
        ranker=RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=2**10)),
        trainer=TrainerConfig(batch_size=64),
        two_tower=TwoTowerConfig(batch_size=64, ramp_examples=200),
        indexer=IndexerConfig(pool_per_user=5, refresh_updates=2),
        **kw,  # type: ignore[arg-type]
    )


def feed(trainer: TrainerService, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    examples = []
    for k in range(n):
        user = f"u{k % 10}"
        item = f"i{(k % 10) * 3 + int(rng.integers(3))}" if rng.random() < 0.5 else f"i{k % 40}"
        label = int(item in {f"i{(k % 10) * 3 + j}" for j in range(3)} and rng.random() < 0.6)
        imp = Impression(f"x{k}", T0 + k, user, item, position=1)
        examples.append(
            LabeledExample(imp, label, imp.ts, kind="positive" if label else "negative")
        )
    trainer.add(examples)
    while trainer.buffer:
        trainer.step()


def test_two_tower_index_refresh_pools_and_recommend() -> None:
    s = settings()
    metrics = StreamrecMetrics()
    trainer = TrainerService(s, metrics)
    indexer = IndexerService(s, metrics)
    assert trainer.two_tower is not None
    assert not indexer.due(trainer.ranker, trainer.two_tower)
    feed(trainer, 640)
    assert trainer.two_tower.n_updates >= 2
    assert indexer.due(trainer.ranker, trainer.two_tower)
    msg = indexer.refresh(trainer.ranker, trainer.catalogue, trainer.two_tower)
    assert msg is not None and msg.kind == "index" and msg.retrieval_model == "two_tower"
    snapshot = indexer.holder.current
    assert snapshot is not None and snapshot.dim == s.two_tower.embedding_dim
    assert not indexer.due(trainer.ranker, trainer.two_tower)
    # pools hold items the user saw without clicking (or that outrank a click)
    for user in list(trainer.catalogue.users)[:5]:
        pool = indexer.pool.negatives(user)
        assert not set(pool) & trainer.catalogue.users[user]
    assert metrics.registry.get_sample_value("streamrec_hard_negative_pool_items") == (
        indexer.pool.size
    )
    rec = Recommender(
        indexer.holder,
        ranker=lambda: trainer.ranker,
        calibrator=trainer.serving_calibrator,
        user_vectors=trainer.two_tower.user_vectors,
    )
    out = rec.recommend("u3", k=5)
    assert out["retrieval_model"] == "two_tower" and len(out["items"]) == 5


def test_a_snapshot_failing_verification_keeps_the_old_one_and_is_counted() -> None:
    s = settings(retrieval="ranker")
    metrics = StreamrecMetrics()
    trainer = TrainerService(s, metrics)
    indexer = IndexerService(s, metrics)
    assert trainer.two_tower is None
    feed(trainer, 128)
    first = indexer.refresh(trainer.ranker, trainer.catalogue)
    assert first is not None and first.kind == "index"

    class Broken:  # the ranker (one update later) turns its item vectors non-finite
        n_updates = trainer.ranker.n_updates + 1

        def item_vectors(self, items: list[str]) -> np.ndarray:
            v = trainer.ranker.item_vectors(items)
            v[0] = np.nan
            return v

    msg = indexer.refresh(Broken(), trainer.catalogue)  # type: ignore[arg-type]
    assert msg is not None and msg.kind == "index_rejected"
    assert indexer.holder.current is not None and indexer.holder.current.version == 1
    assert metrics.registry.get_sample_value("streamrec_index_rejected_total") == 1


def test_the_trainer_observes_clicks_against_the_serving_index_for_the_fusion_pick() -> None:
    """Without a serving index the fusion learns but observes nothing; with one, each
    batch's clicks (at most ``observe_per_batch``) are scored before they are learnt, and
    both the ranker-embedding and the two-tower retrieval paths work."""
    from learners.retrieval_fusion import FusionConfig

    for retrieval in ("two_tower", "ranker"):
        s = settings(retrieval=retrieval, fusion=FusionConfig(observe_per_batch=3))
        trainer = TrainerService(s, StreamrecMetrics())
        indexer = IndexerService(s, StreamrecMetrics())
        feed(trainer, 256)
        fusion = trainer.fusion
        assert fusion is not None and fusion.n_clicks > 0 and fusion.n_observed == 0
        assert indexer.refresh(trainer.ranker, trainer.catalogue, trainer.two_tower) is not None
        trainer.serving_index = lambda: indexer.holder.current  # noqa: B023
        feed(trainer, 256, seed=1)
        assert 0 < fusion.n_observed <= 3 * 4  # 4 batches of 64, 3 clicks observed each

"""The trainer publishes to the model store, a replica loads what was announced, and a
restarted trainer resumes from the store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from learners.two_tower import TwoTowerConfig
from logs.events import Impression, LabeledExample
from modelstore.snapshot import ModelReplica
from modelstore.store import DirectoryStore, StoreConfig, StoreError
from monitoring.metrics import StreamrecMetrics
from stream.control import decode_control, encode_control
from stream.services import IndexerService, TrainerService
from stream.settings import Settings, TrainerConfig

T0 = 1_700_000_000.0


def _settings(store: Path) -> Settings:
    enc = EncoderConfig(num_buckets=256)
    return Settings(
        role="trainer",
        model_store=str(store),
        store=StoreConfig(keep=2, publish_every_s=3600.0),
        ranker=RankerConfig(model="logreg", device="cpu", encoder=enc),
        two_tower=TwoTowerConfig(device="cpu", user_encoder=enc, item_encoder=enc),
        trainer=TrainerConfig(batch_size=8),
    )


def _train(trainer: TrainerService, n: int, tag: str) -> None:
    imps = [Impression(f"{tag}{k}", T0 + k, f"u{k % 3}", f"x{k % 5}") for k in range(n)]
    trainer.add([LabeledExample(imp, k % 2, imp.ts, kind="negative") for k, imp in
                 enumerate(imps)])  # fmt: skip
    while trainer.step() is not None:
        pass


def test_trainer_publishes_a_replica_loads_it_and_a_restart_resumes(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "store")
    metrics = StreamrecMetrics()
    trainer = TrainerService(settings, metrics)
    assert not trainer.publish_due()  # nothing trained yet
    _train(trainer, 16, "a")
    indexer = IndexerService(settings, metrics)
    assert indexer.refresh(trainer.ranker, trainer.catalogue, trainer.two_tower) is not None
    assert trainer.publish_due(indexer.holder.current, force=True)
    m = trainer.publish(indexer.holder.current)
    assert not trainer.publish_due(indexer.holder.current, force=True)  # nothing changed
    assert m is not None and m.version == 1
    msg = decode_control(encode_control(trainer.store_announcement(m)))  # as on the topic
    assert msg.kind == "model" and msg.digest == m.digest
    assert msg.model_version == trainer.model_version >= 1

    replica = ModelReplica(DirectoryStore(settings.model_store))
    assert replica.announce(msg.to_dict()) == 1 and replica.refresh() is not None
    cur = replica.current
    assert cur is not None and cur.index is not None and cur.two_tower is not None
    rows = [{"user_id": "u1", "item_id": f"x{j}", "position": 1} for j in range(5)]
    np.testing.assert_allclose(cur.ranker.predict_proba_many(rows),
                               trainer.ranker.predict_proba_many(rows), rtol=1e-6)  # fmt: skip
    assert cur.index.version == indexer.version and len(cur.index) == 5
    # the candidate fusion's counts (8 of the 16 examples are clicks) travel with it
    assert trainer.fusion is not None and trainer.fusion.n_clicks == 8
    assert cur.fusion is not None and cur.fusion.popular_top(5) == trainer.fusion.popular_top(5)

    _train(trainer, 16, "b")
    trainer.publish(indexer.holder.current)
    trainer.publish(indexer.holder.current)
    assert DirectoryStore(settings.model_store).versions() == [2, 3]  # keep=2
    with pytest.raises(StoreError, match="one trainer per store") as refused:
        TrainerService(settings, StreamrecMetrics())  # while the first one runs
    assert refused.value.reason == "writer_locked" and str(os.getpid()) in str(refused.value)
    trainer.close()  # as its process ending would
    restarted = TrainerService(settings, StreamrecMetrics())
    assert restarted.model_version == trainer.model_version
    assert restarted.fusion is not None and restarted.fusion.n_clicks == 16  # resumed too
    np.testing.assert_allclose(restarted.ranker.predict_proba_many(rows),
                               trainer.ranker.predict_proba_many(rows), rtol=1e-6)  # fmt: skip


def test_the_hard_negative_source_reaches_the_two_tower_fresh_and_resumed(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "store")

    def source(user: str, n: int) -> list[str]:
        return []

    trainer = TrainerService(settings, StreamrecMetrics(), hard_negatives=source)
    assert trainer.two_tower is not None and trainer.two_tower.hard_negatives is source
    _train(trainer, 16, "a")
    indexer = IndexerService(settings, StreamrecMetrics())
    indexer.refresh(trainer.ranker, trainer.catalogue, trainer.two_tower)
    assert trainer.publish(indexer.holder.current) is not None
    trainer.close()
    resumed = TrainerService(settings, StreamrecMetrics(), hard_negatives=source)
    assert resumed.model_version == trainer.model_version  # it did load the store's model
    assert resumed.two_tower is not None and resumed.two_tower.hard_negatives is source
    resumed.close()
    assert TrainerService(settings, StreamrecMetrics()).two_tower.hard_negatives is None  # type: ignore[union-attr]

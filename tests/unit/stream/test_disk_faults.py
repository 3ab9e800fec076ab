"""Faults of the data directory and the model store on the real write paths: a full disk
(a write that fails with ENOSPC half-way) and a truncated version. The writer reports it
clearly and leaves no corrupt state; a restart uses the previous good version."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from logs.events import Impression, LabeledExample
from modelstore.store import DirectoryStore, StoreConfig
from monitoring.metrics import StreamrecMetrics
from stream.runs import RUNS_FILE, note_start
from stream.services import TrainerService
from stream.settings import Settings, TrainerConfig

T0 = 1_700_000_000.0
ROWS = [{"user_id": "u1", "item_id": f"x{j}", "position": 1} for j in range(5)]


def _settings(tmp: Path) -> Settings:
    return Settings(
        role="trainer", retrieval="ranker", model_store=str(tmp / "store"),
        store=StoreConfig(keep=3, publish_every_s=3600.0),
        ranker=RankerConfig(model="logreg", device="cpu",
                            encoder=EncoderConfig(num_buckets=256)),
        trainer=TrainerConfig(batch_size=8, checkpoint_dir=str(tmp / "ckpt"),
                              keep_checkpoints=3),
    )  # fmt: skip


def _train(trainer: TrainerService, n: int, tag: str) -> None:
    imps = [Impression(f"{tag}{k}", T0 + k, f"u{k % 3}", f"x{k % 5}") for k in range(n)]
    trainer.add([LabeledExample(imp, k % 2, imp.ts, kind="negative") for k, imp in
                 enumerate(imps)])  # fmt: skip
    while trainer.step() is not None:
        pass


class DiskFull:
    """``torch.save`` that writes half of what it would, then fails like a full disk."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def __call__(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        import io

        self.calls += 1
        buf = io.BytesIO()
        self.real(obj, buf, *args, **kwargs)
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(data)
        else:
            Path(f).write_bytes(data)
        raise OSError(errno.ENOSPC, "No space left on device")


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")} if d.exists() else set()


def test_a_full_disk_keeps_the_previous_checkpoint_and_store_version_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    metrics = StreamrecMetrics()
    trainer = TrainerService(settings, metrics)
    _train(trainer, 16, "a")
    good_ckpt = trainer.maybe_checkpoint(force=True)
    good = trainer.publish(None)
    assert good_ckpt is not None and good is not None
    before = (_files(tmp_path / "ckpt"), _files(tmp_path / "store"))
    good_scores = trainer.ranker.predict_proba_many(ROWS)

    _train(trainer, 16, "b")  # newer models, then the disk fills up
    full = DiskFull(torch.save)
    monkeypatch.setattr(torch, "save", full)
    with caplog.at_level(logging.ERROR):
        assert trainer.maybe_checkpoint(force=True) is None  # no exception
        assert trainer.publish(None) is None
    assert full.calls == 2
    assert "No space left on device" in caplog.text and "previous one is kept" in caplog.text
    failures = {r: metrics.registry.get_sample_value("streamrec_store_failures_total",
                                                     {"reason": r}) for r in
                ("checkpoint", "publish")}  # fmt: skip
    assert failures == {"checkpoint": 1.0, "publish": 1.0}
    # no half-written file, no temp file, LATEST still names the good checkpoint
    assert (_files(tmp_path / "ckpt"), _files(tmp_path / "store")) == before
    assert (tmp_path / "ckpt" / "LATEST").read_text() == good_ckpt.name
    _train(trainer, 16, "c")  # training is not interrupted
    monkeypatch.undo()

    # a restart resumes from the last good version
    trainer.close()
    restarted = TrainerService(settings, StreamrecMetrics())
    assert restarted.model_version == good.meta["model_version"]
    np.testing.assert_allclose(restarted.ranker.predict_proba_many(ROWS), good_scores,
                               rtol=1e-6)  # fmt: skip


def test_a_truncated_newest_version_is_rejected_and_the_previous_one_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    trainer = TrainerService(settings, StreamrecMetrics())
    _train(trainer, 16, "a")
    v1 = trainer.publish(None)
    scores_v1 = trainer.ranker.predict_proba_many(ROWS)
    _train(trainer, 16, "b")
    v2 = trainer.publish(None)
    assert v1 is not None and v2 is not None and v2.meta["model_version"] > v1.meta["model_version"]
    ranker = v2.path / "ranker.pt"
    ranker.write_bytes(ranker.read_bytes()[:1000])  # a crash mid-copy, a bad disk
    trainer.close()
    with caplog.at_level(logging.WARNING):
        restarted = TrainerService(settings, StreamrecMetrics())
    assert "cannot resume from version 2" in caplog.text and "truncated" in caplog.text
    assert restarted.model_version == v1.meta["model_version"]
    np.testing.assert_allclose(restarted.ranker.predict_proba_many(ROWS), scores_v1, rtol=1e-6)
    assert DirectoryStore(settings.model_store).versions() == [1, 2]  # evidence kept


def test_a_full_disk_at_start_leaves_the_run_counter_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert note_start(tmp_path) == (1, 0)
    import json

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError, match="No space left"):
        note_start(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUNS_FILE]  # no temp file left
    assert note_start(tmp_path) == (2, 1)  # the file was not corrupted

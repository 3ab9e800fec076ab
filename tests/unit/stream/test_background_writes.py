"""Checkpoints and model-store versions are copied under the trainer lock and written on a
writer thread: training goes on while a slow write runs, what is written is the models of
the copy's instant, a version is announced only once it is durably in the store, a failed
write is counted and the next one works, retention holds, and shutdown waits for the write
under way before the final one. Writes are held with events (no wall-clock thresholds)."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
import pytest
import torch

import stream.services.trainer as trainer_module
from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from learners.two_tower import TwoTowerConfig
from logs.batches import encode_labeled
from logs.events import TOPIC_LABELED, Impression, LabeledExample
from modelstore.store import DirectoryStore, StoreConfig
from monitoring.metrics import StreamrecMetrics
from stream.agents import Outputs, TrainerAgents
from stream.agents.runtime import Runtime
from stream.control import decode_control
from stream.services import IndexerService, JoinService, MonitorService, TrainerService
from stream.settings import Settings, TrainerConfig
from tests.unit.stream.test_agents import FakeEvent, FakeStream

T0 = 1_700_000_000.0
BATCH = 8
ENTER_S = 60.0  # only a guard against a hang: the gated writer enters at once


class FakeTopic:
    """Records what was sent and, for ``control``, the store's versions at that moment."""

    def __init__(self, store: Path | None = None) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []
        self.headers: list[dict | None] = []  # parallel to sent
        self.store = store
        self.versions_at_send: list[list[int]] = []

    async def send(
        self, key: bytes | None = None, value: bytes = b"", headers: dict | None = None
    ) -> asyncio.Future[None]:
        self.sent.append((key, value))
        self.headers.append(headers)
        if self.store is not None:
            self.versions_at_send.append(DirectoryStore(self.store).versions())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class Gate:
    """Wraps a writer: each call signals ``entered`` then waits for ``opened``; ``fail``
    makes the next call raise it instead (then the real writer again)."""

    def __init__(self, real: Callable[..., Any], hold: bool = True) -> None:
        self.real = real
        self.entered = threading.Event()
        self.opened = threading.Event()
        if not hold:
            self.opened.set()
        self.fail: BaseException | None = None
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        self.entered.set()
        self.opened.wait()
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return self.real(*args)


def _wired(tmp_path: Path, store: bool = False, keep: int = 5, offload: bool = True) -> Any:
    enc = EncoderConfig(num_buckets=2**10)
    settings = Settings(
        role="trainer",
        broker="127.0.0.1:1",
        data_dir=str(tmp_path / "data"),
        model_store=str(tmp_path / "store") if store else None,
        store=StoreConfig(keep=keep, publish_every_s=1e-9),  # due at every micro-batch
        ranker=RankerConfig(model="logreg", encoder=enc),
        two_tower=TwoTowerConfig(device="cpu", user_encoder=enc, item_encoder=enc),
        trainer=TrainerConfig(
            batch_size=BATCH,
            flush_s=60.0,
            offload=offload,
            checkpoint_dir=str(tmp_path / "ckpt"),
            checkpoint_every_s=0.0,
            keep_checkpoints=keep,
        ),  # fmt: skip
    )
    metrics = StreamrecMetrics()
    app = faust.App("writes-test", broker="kafka://127.0.0.1:1", web_enabled=False)
    rt = Runtime(settings=settings, metrics=metrics, join=JoinService(settings, metrics),
                 trainer=TrainerService(settings, metrics),
                 monitor=MonitorService(settings, metrics),
                 indexer=IndexerService(settings, metrics))  # fmt: skip
    out = Outputs(app, metrics, settings.max_message_bytes)
    for name in ("labeled", "scored", "dead"):
        setattr(out, name, FakeTopic())
    out.control = FakeTopic(tmp_path / "store" if store else None)  # type: ignore[assignment]
    return TrainerAgents(app, rt, out), rt, out


def _batch(offset: int) -> FakeStream:
    examples = [
        LabeledExample(
            Impression(f"b{offset}-{i}", T0 + i, f"u{i % 3}", f"i{i % 4}", position=1),
            i % 2,
            T0 + 99,
        )  # fmt: skip
        for i in range(BATCH)
    ]
    return FakeStream([FakeEvent(TOPIC_LABELED, 0, offset, encode_labeled(examples))])


def _sample(rt: Runtime, name: str, **labels: str) -> float:
    value = rt.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _models(out: Any) -> list[Any]:
    return [decode_control(v) for k, v in out.control.sent if k == b"model"]


def test_training_goes_on_while_a_checkpoint_is_written_and_it_holds_the_snapshot_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents, rt, out = _wired(tmp_path)
    gate = Gate(trainer_module.atomic_torch_save)
    monkeypatch.setattr(trainer_module, "atomic_torch_save", gate)
    ckpt = tmp_path / "ckpt"

    async def go() -> None:
        await agents.run(_batch(0))  # a step, then the checkpoint's copy; its write waits
        assert await asyncio.to_thread(gate.entered.wait, ENTER_S)
        v1 = rt.trainer.model_version
        at_snapshot = {k: v.clone() for k, v in rt.trainer.ranker.model.state_dict().items()}
        await agents.run(_batch(1))  # the loop and the lock are free: the next step runs
        assert len(out.scored.sent) == 2 and rt.trainer.model_version > v1
        assert not (ckpt / f"ranker-v{v1:08d}.pt").exists()  # still being written
        # due again meanwhile: waits for the write under way, counted once
        await agents.train_due()
        assert _sample(rt, "streamrec_store_writes_skipped_total", kind="checkpoint") == 1
        gate.opened.set()
        await agents.drain()
        saved = torch.load(ckpt / f"ranker-v{v1:08d}.pt", weights_only=True)
        assert saved["n_updates"] == v1
        for name, value in at_snapshot.items():  # the copy's instant, not the newer weights
            assert torch.equal(saved["model"][name], value)
        now = rt.trainer.ranker.model.state_dict()
        assert any(not torch.equal(now[n], v) for n, v in at_snapshot.items())
        # the write ended: the deferred checkpoint is taken with the newest models
        await agents.train_due()
        await agents.drain()
        v2 = rt.trainer.model_version
        assert (ckpt / f"ranker-v{v2:08d}.pt").is_file()
        assert (ckpt / "LATEST").read_text() == f"ranker-v{v2:08d}.pt"

    asyncio.run(go())


def test_a_version_is_announced_only_once_it_is_durably_in_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents, rt, out = _wired(tmp_path, store=True)
    gate = Gate(trainer_module.write_snapshot)
    monkeypatch.setattr(trainer_module, "write_snapshot", gate)

    async def go() -> None:
        await agents.run(_batch(0))
        assert await asyncio.to_thread(gate.entered.wait, ENTER_S)
        await agents.run(_batch(1))  # a step while the version is being written
        assert len(out.scored.sent) == 2
        assert _models(out) == [] and DirectoryStore(tmp_path / "store").versions() == []
        gate.opened.set()
        await agents.drain()

    asyncio.run(go())
    (msg,) = _models(out)
    sends = [v for (k, _), v in zip(out.control.sent, out.control.versions_at_send,
                                    strict=True) if k == b"model"]  # fmt: skip
    assert sends == [[1]]  # the version was in the store when it was announced
    store = DirectoryStore(tmp_path / "store")
    assert store.open(1).digest == msg.digest and msg.model_version == 1  # checksums hold


def test_a_failed_background_write_is_counted_and_the_next_one_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents, rt, out = _wired(tmp_path, store=True, offload=False)
    ckpt_gate = Gate(trainer_module.atomic_torch_save, hold=False)
    ckpt_gate.fail = OSError(errno.ENOSPC, "No space left on device")  # logged by the service
    pub_gate = Gate(trainer_module.write_snapshot, hold=False)
    pub_gate.fail = RuntimeError("a bug in the writer")  # unexpected: the agent counts it
    monkeypatch.setattr(trainer_module, "atomic_torch_save", ckpt_gate)
    monkeypatch.setattr(trainer_module, "write_snapshot", pub_gate)

    async def go() -> None:
        await agents.run(_batch(0))
        await agents.drain()
        assert _sample(rt, "streamrec_store_failures_total", reason="checkpoint") == 1
        assert _sample(rt, "streamrec_store_failures_total", reason="publish") == 1
        assert list((tmp_path / "ckpt").glob("*")) == [] and _models(out) == []
        assert DirectoryStore(tmp_path / "store").versions() == []
        await agents.run(_batch(1))  # training went on; the next writes work
        await agents.drain()

    asyncio.run(go())
    assert (ckpt_gate.calls, pub_gate.calls) == (2, 2)
    assert [p.name for p in (tmp_path / "ckpt").glob("ranker-v*.pt")] == [
        f"ranker-v{rt.trainer.model_version:08d}.pt"
    ]
    assert [m.version for m in _models(out)] == [1] and rt.trainer.published is not None
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".tmp-")]


def test_background_writes_keep_the_retention_of_checkpoints_and_store_versions(
    tmp_path: Path,
) -> None:
    agents, rt, out = _wired(tmp_path, store=True, keep=2)

    async def go() -> None:
        for k in range(4):
            await agents.run(_batch(k))
            await agents.drain()

    asyncio.run(go())
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("ranker-v*.pt"))
    assert len(names) == 2 and names[-1] == f"ranker-v{rt.trainer.model_version:08d}.pt"
    assert DirectoryStore(tmp_path / "store").versions() == [3, 4]
    assert [m.version for m in _models(out)] == [1, 2, 3, 4]
    assert rt.trainer.checkpoints == [tmp_path / "ckpt" / n for n in names]


def test_shutdown_waits_for_the_write_under_way_then_writes_the_newest_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents, rt, out = _wired(tmp_path, store=True)
    gate = Gate(trainer_module.atomic_torch_save)
    monkeypatch.setattr(trainer_module, "atomic_torch_save", gate)
    ckpt = tmp_path / "ckpt"

    async def go() -> tuple[Any, Any]:
        await agents.run(_batch(0))
        v1 = rt.trainer.model_version
        assert await asyncio.to_thread(gate.entered.wait, ENTER_S)
        await agents.run(_batch(1))  # newer models; their checkpoint waits
        final = asyncio.create_task(agents.final_writes())
        await asyncio.sleep(0)
        assert not final.done()  # it waits for the write under way
        gate.opened.set()
        path, manifest = await final
        assert (ckpt / f"ranker-v{v1:08d}.pt").is_file()  # the one under way finished
        return path, manifest

    path, manifest = asyncio.run(go())
    v2 = rt.trainer.model_version
    assert path == ckpt / f"ranker-v{v2:08d}.pt" and path.is_file()
    assert (ckpt / "LATEST").read_text() == path.name
    assert manifest is not None and manifest.meta["model_version"] == v2
    agents.writer.shutdown(wait=True)


@pytest.mark.parametrize("reuse", [False, True])
def test_snapshot_buffers_are_recycled_only_when_asked(tmp_path: Path, reuse: bool) -> None:
    enc = EncoderConfig(num_buckets=2**10)
    settings = Settings(
        ranker=RankerConfig(model="logreg", encoder=enc),
        trainer=TrainerConfig(checkpoint_dir=str(tmp_path / "ckpt"),
                              reuse_snapshot_buffers=reuse),
    )  # fmt: skip
    trainer = TrainerService(settings, StreamrecMetrics())

    def pointers(state: Any) -> set[int]:
        found: set[int] = set()

        def walk(x: Any) -> None:
            if isinstance(x, torch.Tensor):
                found.add(x.data_ptr())
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, list | tuple):
                for v in x:
                    walk(v)

        walk(state)
        return found

    first = trainer.checkpoint_snapshot()
    assert first is not None and trainer.write_checkpoint(first) is not None
    kept = pointers(first.state)
    second = trainer.checkpoint_snapshot()
    assert second is not None and kept
    shared = kept & pointers(second.state)
    assert bool(shared) == reuse  # the written copy's memory is reused, or freshly allocated


def test_the_heap_is_trimmed_after_a_write_once_its_copy_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trim that gives freed memory back to the OS runs on the writer thread after the
    write, when nothing references the copy it wrote any more (a trim while the copy is
    alive can return none of its memory)."""
    import weakref

    import stream.agents.trainer as agents_module

    agents, rt, out = _wired(tmp_path)
    jobs: list[weakref.ref[Any]] = []
    take = rt.trainer.checkpoint_snapshot

    def snapshot() -> Any:
        job = take()
        jobs.append(weakref.ref(job))
        return job

    released_at_trim: list[list[bool]] = []

    def trim() -> bool:
        released_at_trim.append([ref() is None for ref in jobs])
        return True

    monkeypatch.setattr(rt.trainer, "checkpoint_snapshot", snapshot)
    monkeypatch.setattr(agents_module, "trim_heap", trim)

    async def go() -> None:
        await agents.run(_batch(0))  # a step, the checkpoint's copy, its write
        await agents.drain()
        # the trim was queued on the (one) writer thread behind the write: wait for it
        await asyncio.get_running_loop().run_in_executor(agents.writer, lambda: None)

    asyncio.run(go())
    assert len(jobs) == 1 and (tmp_path / "ckpt" / "LATEST").is_file()
    assert released_at_trim and released_at_trim[0] == [True]

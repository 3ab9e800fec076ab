"""The model store: atomic versions, checksums, retention, confinement; snapshots round-trip
real torch models and a real FAISS index."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from index.faiss_index import IndexConfig, build_snapshot
from learners.calibration import LogitShiftCalibrator, PlattCalibrator
from learners.encoding import EncoderConfig
from learners.links import fnc_correct
from learners.ranker import RankerConfig, TorchRanker
from learners.two_tower import TwoTowerConfig, TwoTowerModel
from modelstore.snapshot import (
    ModelReplica,
    load_snapshot,
    publish_snapshot,
    state_copy,
    take_snapshot,
    write_snapshot,
)
from modelstore.store import DirectoryStore, StoreConfig, StoreError


def _write(text: str) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        (d / "a.bin").write_text(text)

    return write


def _models() -> tuple[TorchRanker, TwoTowerModel]:
    enc = EncoderConfig(num_buckets=512)
    # the model's own scores (no fallback mixture): the tests compare links exactly
    cfg = RankerConfig(model="dcnv2", device="cpu", encoder=enc, fallback_mixture=False)
    ranker = TorchRanker(cfg, seed=0)
    tt = TwoTowerModel(TwoTowerConfig(device="cpu", user_encoder=enc, item_encoder=enc), seed=0)
    rows = [{"user_id": f"u{i % 7}", "item_id": f"i{i % 13}", "device": "ios"} for i in range(64)]
    y = np.arange(64) % 3 == 0
    ranker.learn_many(rows, y.astype(float))
    tt.learn_many(rows, y.astype(float))
    return ranker, tt


def test_publish_is_atomic_and_keeps_the_last_k_versions(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store", keep=3)
    for i in range(5):
        store.publish(_write(f"v{i}"))
    assert store.versions() == [3, 4, 5]
    names = sorted(os.listdir(store.root))
    assert names == ["v00000003", "v00000004", "v00000005"]  # no temp or deleted dirs left
    assert store.open(5).files["a.bin"].size == 2


def test_a_failed_write_leaves_no_version_and_no_temp_dir(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, keep=2)

    def boom(d: Path) -> None:
        (d / "a.bin").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.publish(boom)
    assert store.versions() == [] and os.listdir(tmp_path) == []


def test_truncated_or_altered_files_are_rejected(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    m = store.publish(_write("0123456789"))
    (m.path / "a.bin").write_text("01234")  # truncated
    with pytest.raises(StoreError) as exc:
        store.open(m.version)
    assert exc.value.reason == "checksum" and "truncated" in str(exc.value)
    (m.path / "a.bin").write_text("0123456780")  # same size, other bytes
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.open(m.version)
    (m.path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError) as exc:
        store.open(m.version)
    assert exc.value.reason == "corrupt"


def test_a_symlinked_file_is_rejected(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "s")
    m = store.publish(_write("x"))
    outside = tmp_path / "evil"
    outside.write_text("x")
    (m.path / "a.bin").unlink()
    (m.path / "a.bin").symlink_to(outside)
    with pytest.raises(StoreError, match="not a regular file"):
        store.open(m.version)


def test_announced_paths_are_confined_to_the_store_and_digest_checked(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "s")
    m = store.publish(_write("x"))
    assert store.resolve(str(m.path), 1, m.digest).version == 1
    assert store.resolve(None, 1, None).version == 1
    for path in ("/etc/passwd", str(tmp_path / "s" / "v00000001" / ".." / ".." / "x"),
                 str(tmp_path / "s" / "v00000002"), str(tmp_path / "s")):  # fmt: skip
        with pytest.raises(StoreError) as exc:
            store.resolve(path, 1, m.digest)
        assert exc.value.reason == "outside_store", path
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "s" / "v00000001")  # resolves into the store: same version
    assert store.resolve(str(link), 1, None).version == 1
    with pytest.raises(StoreError) as exc:
        store.resolve(str(m.path), 1, "0" * 64)
    assert exc.value.reason == "digest"
    with pytest.raises(StoreError) as exc:
        store.resolve(None, 9, None)
    assert exc.value.reason == "missing"


def test_store_config_validates() -> None:
    with pytest.raises(ValueError, match="keep"):
        StoreConfig(keep=0)
    with pytest.raises(ValueError, match="poll_s"):
        StoreConfig(poll_s=float("nan"))


def test_snapshot_round_trips_models_index_and_calibrator(tmp_path: Path) -> None:
    ranker, tt = _models()
    items = [f"i{j}" for j in range(13)]
    index = build_snapshot(items, tt.item_vectors(items), version=4, config=IndexConfig())
    cal = LogitShiftCalibrator(b=0.3)
    store = DirectoryStore(tmp_path, keep=2)
    m = publish_snapshot(store, ranker, tt, index, cal, calibrator_version=7)
    assert set(m.files) == {"ranker.pt", "ranker_optim.pt", "two_tower.pt",
                            "two_tower_optim.pt", "index.faiss", "index.json",
                            "calibrator.json"}  # fmt: skip
    # serving files hold no optimiser moments: a third of the checkpoint's bytes
    assert m.files["ranker.pt"].size < m.files["ranker_optim.pt"].size
    assert m.meta["model_version"] == ranker.n_updates and m.meta["index_version"] == 4
    got = load_snapshot(store, m.version)
    rows = [{"user_id": "u1", "item_id": i, "device": "ios"} for i in items]
    np.testing.assert_allclose(got.ranker.predict_proba_many(rows),
                               ranker.predict_proba_many(rows), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(got.two_tower.user_vectors(["u1"]),  # type: ignore[union-attr]
                               tt.user_vectors(["u1"]), rtol=1e-6)  # fmt: skip
    assert got.index is not None and got.index.version == 4 and len(got.index) == 13
    q = tt.user_vectors(["u2"])
    assert got.index.search(q, 5)[1].tolist() == index.search(q, 5)[1].tolist()
    assert got.calibrator_version == 7
    p = np.array([0.1, 0.5])
    np.testing.assert_allclose(got.calibrator.transform(p), cal.transform(p))


def test_a_snapshot_writes_the_models_of_its_instant_though_they_train_on(
    tmp_path: Path,
) -> None:
    ranker, tt = _models()
    rows = [{"user_id": "u1", "item_id": f"i{j}", "device": "ios"} for j in range(13)]
    at_snapshot = (ranker.predict_proba_many(rows), tt.user_vectors(["u1"]))
    snap = take_snapshot(ranker, tt, None, PlattCalibrator(), 3)
    for _ in range(3):  # training goes on before the snapshot is written
        ranker.learn_many(rows, np.ones(len(rows)))
        tt.learn_many(rows, np.ones(len(rows)))
    assert not np.allclose(ranker.predict_proba_many(rows), at_snapshot[0])
    store = DirectoryStore(tmp_path)
    m = write_snapshot(store, snap)
    assert m.meta["model_version"] == snap.meta["model_version"] < ranker.n_updates
    got = load_snapshot(store, m.version, optimizer=True)
    np.testing.assert_allclose(got.ranker.predict_proba_many(rows), at_snapshot[0], rtol=1e-6)
    np.testing.assert_allclose(got.two_tower.user_vectors(["u1"]),  # type: ignore[union-attr]
                               at_snapshot[1], rtol=1e-6)  # fmt: skip


def test_state_copy_overwrites_only_matching_buffers_of_the_copy_it_reuses() -> None:
    a, b = torch.ones(3), torch.zeros(2, dtype=torch.int64)
    old = state_copy({"a": a, "b": b, "opt": {"m": [a, a]}})
    shared = old["opt"]["m"][0]
    assert shared is old["a"]  # one tensor twice stays one
    new_a, new_m0, new_m1 = torch.full((3,), 2.0), torch.full((3,), 3.0), torch.full((3,), 4.0)
    got = state_copy({"a": new_a, "b": torch.zeros(5), "opt": {"m": [new_m0, new_m1]}},
                     reuse=old)  # fmt: skip
    assert got["a"] is old["a"] and got["a"].tolist() == [2.0] * 3  # reused in place
    assert got["b"] is not old["b"] and got["b"].shape == (5,)  # shape changed: fresh
    # the old tree shared one buffer between "a" and m[0]: used once, never twice
    assert [t.tolist() for t in got["opt"]["m"]] == [[3.0] * 3, [4.0] * 3]
    assert got["a"].tolist() == [2.0] * 3


def test_replica_keeps_the_old_version_when_a_new_one_is_corrupt(tmp_path: Path) -> None:
    ranker, tt = _models()
    store = DirectoryStore(tmp_path, keep=5)
    publish_snapshot(store, ranker, tt, None, PlattCalibrator(), 0)
    replica = ModelReplica(store)
    assert replica.refresh() is not None and replica.version == 1
    assert replica.refresh() is None  # nothing newer
    m2 = publish_snapshot(store, ranker, tt, None, PlattCalibrator(), 0)
    data = (m2.path / "ranker.pt").read_bytes()
    (m2.path / "ranker.pt").write_bytes(data[: len(data) // 2])  # truncated
    assert replica.announce({"kind": "model", "version": 2, "path": str(m2.path),
                             "digest": m2.digest}) == 2  # fmt: skip
    assert replica.refresh() is None
    assert replica.version == 1 and replica.failures == {"checksum": 1}
    assert replica.refresh() is None and replica.failures == {"checksum": 1}  # not retried
    # a hostile announcement: outside the store, or a wrong digest; counted, nothing loaded
    assert replica.announce({"kind": "model", "version": 3, "path": "/etc"}) is None
    assert replica.announce({"kind": "model", "version": True}) is None
    publish_snapshot(store, ranker, tt, None, PlattCalibrator(), 0)  # v3, good
    assert replica.announce({"kind": "model", "version": 3, "digest": "f" * 64}) is None
    assert replica.announce({"kind": "model", "version": 40}) is None  # pruned or unknown
    assert replica.failures == {"checksum": 1, "outside_store": 1, "corrupt": 1, "digest": 1}
    loaded = replica.refresh()  # the forged records did not block the real v3
    assert loaded is not None and replica.version == 3
    assert json.loads((store.path(3) / "calibrator.json").read_text())["version"] == 0


def test_a_publish_killed_midway_leaves_only_an_ignored_temp_dir(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, keep=2)
    store.publish(_write("x"))
    crashed = tmp_path / ".tmp-crashed"  # what SIGKILL during a publish leaves behind
    crashed.mkdir()
    (crashed / "a.bin").write_text("half")
    assert store.versions() == [1] and store.open(1).version == 1
    os.utime(crashed, (0, 0))  # older than an hour: removed by the next prune
    store.publish(_write("y"))
    assert not crashed.exists() and store.versions() == [1, 2]


def test_serving_skips_the_optimiser_files_a_resuming_trainer_needs(tmp_path: Path) -> None:
    ranker, tt = _models()
    store = DirectoryStore(tmp_path)
    m = publish_snapshot(store, ranker, tt, None, PlattCalibrator(), 0)
    full = load_snapshot(store, m.version, optimizer=True)
    sd, want = full.ranker.optimizer.state_dict(), ranker.optimizer.state_dict()
    assert sd["state"] and sd["state"].keys() == want["state"].keys()
    (m.path / "ranker_optim.pt").write_bytes(b"garbage")  # not read by serving
    assert load_snapshot(store, m.version).ranker.n_updates == ranker.n_updates
    with pytest.raises(StoreError) as exc:
        load_snapshot(store, m.version, optimizer=True)
    assert exc.value.reason == "checksum"


def test_a_replica_applies_the_workers_fnc_link_to_a_snapshot_written_without_it(
    tmp_path: Path,
) -> None:
    """A snapshot from before FNC was part of the ranker's config (or from a trainer with
    it off) serves FNC-corrected scores on a replica configured with ``trainer.fnc``."""
    ranker, tt = _models()
    assert not ranker.config.fnc
    store = DirectoryStore(tmp_path, keep=2)
    publish_snapshot(store, ranker, tt, None, LogitShiftCalibrator(b=0.0), calibrator_version=1)
    rows = [{"user_id": "u1", "item_id": f"i{j}", "device": "ios"} for j in range(13)]
    p = ranker.predict_proba_many(rows)
    plain, with_fnc = ModelReplica(store), ModelReplica(store, fnc=True)
    assert plain.refresh() is not None and with_fnc.refresh() is not None
    assert plain.current is not None and with_fnc.current is not None
    np.testing.assert_allclose(plain.current.ranker.predict_proba_many(rows), p, rtol=1e-6)
    got = with_fnc.current.ranker.predict_proba_many(rows)
    assert with_fnc.current.ranker.config.fnc
    np.testing.assert_allclose(got, fnc_correct(p), rtol=1e-6)
    assert not np.allclose(got, p)  # the link changes the scores: applied exactly once


def test_the_candidate_fusion_counts_travel_with_a_snapshot(tmp_path: Path) -> None:
    """``fusion.pt`` (plain types, read with ``weights_only``): a replica fuses exactly as
    the trainer did; a snapshot without it loads without fusion."""
    from learners.retrieval_fusion import FusedRetrieval, FusionConfig

    ranker, tt = _models()
    fusion = FusedRetrieval(FusionConfig(width=8, beta=2.0), temperature=0.07)
    rng = np.random.default_rng(0)
    rows = [
        {"item_id": f"i{rng.integers(30)}", "hist_seq": [f"i{j}" for j in rng.integers(30, size=4)]}
        for _ in range(500)
    ]
    fusion.learn_many(rows, rng.random(500) < 0.4)
    store = DirectoryStore(tmp_path, keep=2)
    m = publish_snapshot(store, ranker, tt, None, PlattCalibrator(), 0, fusion=fusion)
    assert "fusion.pt" in m.files and m.meta["fusion_clicks"] == fusion.n_clicks > 100
    got = load_snapshot(store, m.version).fusion
    assert got is not None and got.config == fusion.config and got.temperature == 0.07
    for r in rows[:20]:
        args = ([["i1", "x", "i5"]], np.array([[0.4, 0.3, 0.2]]), [r["hist_seq"]], 8)
        (a, sa), (b, sb) = fusion.fuse(*args)[0], got.fuse(*args)[0]  # type: ignore[arg-type]
        assert a == b and np.array_equal(sa, sb)
    m2 = publish_snapshot(store, ranker, tt, None, PlattCalibrator(), 0)
    assert load_snapshot(store, m2.version).fusion is None

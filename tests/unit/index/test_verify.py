"""Index kinds by catalogue size, snapshot verification and the verified swap."""

from __future__ import annotations

import threading
import time

import faiss
import numpy as np
import pytest

from index.faiss_index import (
    IndexConfig,
    IndexHolder,
    IndexSnapshot,
    build_snapshot,
    verify_snapshot,
)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, seed: int, n_clusters: int = 100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d))
    return unit_rows(centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d)))


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


def hand_built(vectors: np.ndarray, version: int = 1, n_ids: int | None = None) -> IndexSnapshot:
    """A snapshot whose FAISS index holds ``vectors`` exactly as given (no normalising)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    n = vectors.shape[0] if n_ids is None else n_ids
    ids = np.empty(n, dtype=object)
    ids[:] = [f"i{j}" for j in range(n)]
    return IndexSnapshot(version=version, ids=ids, index=index, dim=vectors.shape[1], built_at=0.0)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_each_kind_finds_a_planted_nearest_neighbour(kind: str) -> None:
    vecs = clustered(3_000, 16, seed=0)
    rng = np.random.default_rng(1)
    query = unit_rows(rng.standard_normal((1, 16)))
    planted = 1234
    vecs[planted] = query[0]  # the exact match scores 1.0; nothing else comes close
    ids = [f"i{j}" for j in range(len(vecs))]
    snap = build_snapshot(ids, vecs, version=1, config=IndexConfig(kind=kind, ivf_nprobe=64))
    scores, got = snap.search(query, k=5)
    assert snap.kind == kind
    assert got[0, 0] == "i1234" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("n_items", "config", "want"),
    [
        (400, IndexConfig(exact_max_items=400), "flat"),
        (401, IndexConfig(exact_max_items=400), "ivf"),
        (401, IndexConfig(exact_max_items=400, auto_approx="hnsw"), "hnsw"),
        (401, IndexConfig(kind="flat", exact_max_items=400), "flat"),
    ],
)
def test_auto_kind_follows_catalogue_size(n_items: int, config: IndexConfig, want: str) -> None:
    vecs = clustered(n_items, 8, seed=2)
    snap = build_snapshot([str(j) for j in range(n_items)], vecs, version=1, config=config)
    assert config.resolve_kind(n_items) == want and snap.kind == want


def test_config_rejects_unknown_kinds_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="auto_approx"):
        IndexConfig(auto_approx="flat")
    with pytest.raises(ValueError, match="min_recall"):
        IndexConfig(min_recall=1.5)
    with pytest.raises(ValueError, match="hnsw_m"):
        IndexConfig(hnsw_m=0)


def test_ivf_cells_are_about_four_sqrt_n_with_enough_points_per_cell() -> None:
    cfg = IndexConfig()
    assert cfg.ivf_cells(1_000_000) == 4_000
    assert cfg.ivf_cells(10_000) == 256  # 4*sqrt(N) = 400 would leave < 39 points per cell
    assert cfg.ivf_cells(10) == 1
    assert IndexConfig(ivf_nlist=50).ivf_cells(20) == 20


def test_ivf_build_is_reproducible_for_a_seed() -> None:
    vecs = clustered(4_000, 16, seed=3)
    ids = [str(j) for j in range(4_000)]
    queries = clustered(50, 16, seed=4)
    cfg = IndexConfig(kind="ivf", ivf_nprobe=4, seed=11)
    a = build_snapshot(ids, vecs, version=1, config=cfg).search(queries, 10)
    b = build_snapshot(ids, vecs, version=1, config=cfg).search(queries, 10)
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "config",
    [
        # Unclustered Gaussian vectors are the worst case for both: a wider HNSW beam, and
        # a quarter of the 512 IVF cells probed.
        IndexConfig(kind="hnsw", hnsw_ef_search=128),
        IndexConfig(kind="ivf", ivf_nprobe=128),
    ],
    ids=["hnsw", "ivf"],
)
def test_approximate_recall_at_10_vs_exact_on_20k_random_vectors(config: IndexConfig) -> None:
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((20_000, 32)).astype(np.float32)
    queries = rng.standard_normal((200, 32)).astype(np.float32)
    ids = [str(j) for j in range(20_000)]
    _, want = build_snapshot(ids, vecs, version=1, config=IndexConfig(kind="flat")).search(
        queries, 10
    )
    snap = build_snapshot(ids, vecs, version=1, config=config)
    _, got = snap.search(queries, 10)
    assert recall_at_k(got, want) >= 0.9
    check = verify_snapshot(snap)
    assert check.ok and check.recall >= 0.9 and check.norm_checked == 20_000


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_verify_passes_a_good_snapshot_of_each_kind(kind: str) -> None:
    vecs = clustered(5_000, 16, seed=6)
    snap = build_snapshot(
        [str(j) for j in range(5_000)], vecs, version=3, config=IndexConfig(kind=kind)
    )
    check = verify_snapshot(snap, sample=100)
    assert check.ok, check.reasons
    assert check.version == 3 and check.n_items == 5_000 and check.size_ok
    assert check.norm_checked == 5_000 and check.max_norm_error <= 1e-3
    assert check.n_queries == 100 and check.k == 10 and check.recall >= 0.9


def test_verify_fails_on_nan_vectors() -> None:
    vecs = clustered(500, 8, seed=8)
    vecs[17, 3] = np.nan
    check = verify_snapshot(hand_built(vecs), sample=50)
    assert not check.ok and check.max_norm_error == np.inf
    assert any(r.startswith("norms") for r in check.reasons)


def test_verify_fails_on_unnormalised_vectors() -> None:
    vecs = clustered(500, 8, seed=9)
    vecs[250] *= 1.01  # 1% off: beyond the 1e-3 tolerance
    check = verify_snapshot(hand_built(vecs), sample=50)
    assert not check.ok and check.max_norm_error == pytest.approx(0.01, rel=1e-3)
    assert check.recall == 1.0  # search itself is still exact


def test_verify_fails_when_ids_and_index_disagree_in_size() -> None:
    check = verify_snapshot(hand_built(clustered(100, 8, seed=10), n_ids=101))
    assert not check.ok and not check.size_ok and check.reasons[0].startswith("size")
    assert np.isnan(check.recall) and check.norm_checked == 0


def test_verify_fails_an_index_whose_recall_is_too_low() -> None:
    rng = np.random.default_rng(11)
    vecs = rng.standard_normal((5_000, 32)).astype(np.float32)
    # One of 128 cells probed on unclustered vectors: most true neighbours are missed.
    cfg = IndexConfig(kind="ivf", ivf_nlist=128, ivf_nprobe=1)
    snap = build_snapshot([str(j) for j in range(5_000)], vecs, version=1, config=cfg)
    check = verify_snapshot(snap, sample=100)
    assert not check.ok and check.recall < 0.9 and check.size_ok
    assert check.reasons == (f"recall@10: {check.recall:.3f} < 0.9",)
    assert verify_snapshot(snap, sample=100, min_recall=0.0).ok


def test_verify_is_deterministic_for_a_seed() -> None:
    vecs = np.random.default_rng(12).standard_normal((3_000, 16)).astype(np.float32)
    cfg = IndexConfig(kind="hnsw", hnsw_ef_search=8)
    snap = build_snapshot([str(j) for j in range(3_000)], vecs, version=1, config=cfg)
    a, b = verify_snapshot(snap, sample=80), verify_snapshot(snap, sample=80)
    assert a.recall == b.recall and a.reasons == b.reasons


def test_rejected_snapshot_leaves_the_old_one_serving_and_is_counted() -> None:
    holder = IndexHolder()
    good = build_snapshot([f"i{j}" for j in range(500)], clustered(500, 8, seed=13), version=1)
    assert holder.swap_if_valid(good, sample=50).ok
    bad_vecs = clustered(500, 8, seed=14) * 2.0
    check = holder.swap_if_valid(hand_built(bad_vecs, version=2), sample=50)
    assert not check.ok and holder.current is good
    assert holder.n_rejected == 1 and holder.n_swaps == 1 and holder.last_check is check
    scores, ids = holder.search(clustered(3, 8, seed=15), k=4)
    assert ids.shape == (3, 4) and np.all(scores <= 1.0 + 1e-5)


def test_swap_if_valid_refuses_a_stale_version_even_when_valid() -> None:
    holder = IndexHolder()
    vecs = clustered(300, 8, seed=16)
    ids = [f"i{j}" for j in range(300)]
    v2 = build_snapshot(ids, vecs, version=2)
    holder.swap(v2)
    check = holder.swap_if_valid(build_snapshot(ids, vecs, version=2), sample=20)
    assert not check.ok and check.reasons[-1].startswith("version")
    assert holder.current is v2 and holder.n_rejected == 1
    newer = build_snapshot(ids, vecs, version=3)
    assert holder.swap_if_valid(newer, sample=20).ok and holder.current is newer


def test_readers_keep_searching_while_a_snapshot_is_verified() -> None:
    holder = IndexHolder()
    ids = [f"i{j}" for j in range(2_000)]
    holder.swap(build_snapshot(ids, clustered(2_000, 16, seed=17), version=1))
    stop = threading.Event()
    seen: set[int] = set()
    errors: list[BaseException] = []
    queries = clustered(4, 16, seed=18)

    def reader() -> None:
        try:
            while not stop.is_set():
                snap = holder.current
                assert snap is not None
                _, got = snap.search(queries, 5)
                assert got.shape == (4, 5)
                seen.add(snap.version)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    deadline = time.monotonic() + 5.0
    while 1 not in seen and not errors and time.monotonic() < deadline:
        time.sleep(0.001)
    cfg = IndexConfig(kind="hnsw")
    for v in range(2, 6):
        snap = build_snapshot(ids, clustered(2_000, 16, seed=17 + v), version=v, config=cfg)
        assert holder.swap_if_valid(snap, sample=50).ok
    stop.set()
    t.join(timeout=10)
    assert not errors, errors[0]
    assert holder.current is not None and holder.current.version == 5 and 1 in seen

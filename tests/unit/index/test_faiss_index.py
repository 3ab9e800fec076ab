from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from index.faiss_index import IndexConfig, IndexHolder, IndexSnapshot, build_snapshot


def random_items(n: int, d: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"item{i}" for i in range(n)], rng.standard_normal((n, d)).astype(np.float32)


def normalized(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True))
    return hits / (k * exact.shape[0])


def test_flat_search_equals_brute_force_inner_product_on_normalized_vectors() -> None:
    ids, vecs = random_items(500, 16, seed=0)
    queries = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32) * 3.0
    snap = build_snapshot(ids, vecs, version=1, config=IndexConfig(kind="flat"))
    scores, got = snap.search(queries, k=10)
    sims = normalized(queries) @ normalized(vecs).T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(sims, want, axis=1), atol=1e-5)
    assert got.tolist() == np.array(ids, dtype=object)[want].tolist()
    assert scores.dtype == np.float32 and got.shape == (20, 10)


def test_auto_uses_flat_for_small_and_the_approximate_kind_above_threshold() -> None:
    ids, vecs = random_items(200, 8, seed=0)
    small = build_snapshot(ids, vecs, version=1, config=IndexConfig(exact_max_items=200))
    large = build_snapshot(ids, vecs, version=1, config=IndexConfig(exact_max_items=199))
    hnsw = build_snapshot(
        ids, vecs, version=1, config=IndexConfig(exact_max_items=199, auto_approx="hnsw")
    )
    assert "Flat" in type(small.index).__name__ and small.kind == "flat"
    assert "IVF" in type(large.index).__name__ and large.kind == "ivf"
    assert "HNSW" in type(hnsw.index).__name__


@pytest.mark.parametrize(
    "config",
    [
        IndexConfig(kind="hnsw"),
        # Unclustered Gaussian data is the worst case for IVF; probe half the cells.
        IndexConfig(kind="ivf", ivf_nlist=64, ivf_nprobe=32),
    ],
    ids=["hnsw", "ivf"],
)
def test_approximate_index_recall_at_10_vs_flat(config: IndexConfig) -> None:
    ids, vecs = random_items(5_000, 32, seed=2)
    queries = np.random.default_rng(3).standard_normal((200, 32)).astype(np.float32)
    exact = build_snapshot(ids, vecs, version=1, config=IndexConfig(kind="flat"))
    approx = build_snapshot(ids, vecs, version=1, config=config)
    _, want = exact.search(queries, 10)
    _, got = approx.search(queries, 10)
    assert recall_at_k(got, want) >= 0.9


def test_ivf_default_settings_recall_on_clustered_embeddings() -> None:
    rng = np.random.default_rng(4)
    centers = rng.standard_normal((50, 32))
    vecs = (centers[rng.integers(0, 50, 5_000)] + 0.3 * rng.standard_normal((5_000, 32))).astype(
        np.float32
    )
    ids = [str(i) for i in range(5_000)]
    queries = (centers[rng.integers(0, 50, 100)] + 0.3 * rng.standard_normal((100, 32))).astype(
        np.float32
    )
    _, want = build_snapshot(ids, vecs, version=1, config=IndexConfig(kind="flat")).search(
        queries, 10
    )
    _, got = build_snapshot(ids, vecs, version=1, config=IndexConfig(kind="ivf")).search(
        queries, 10
    )
    assert recall_at_k(got, want) >= 0.9


def test_build_does_not_mutate_input_and_handles_zero_vectors() -> None:
    vecs = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    before = vecs.copy()
    snap = build_snapshot(["a", "zero", "c"], vecs, version=1)
    np.testing.assert_array_equal(vecs, before)
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    q_before = q.copy()
    scores, ids = snap.search(q, k=3)
    np.testing.assert_array_equal(q, q_before)
    assert ids[0, 0] == "a" and set(ids[0, 1:]) == {"zero", "c"}  # the last two tie at 0
    np.testing.assert_allclose(scores, [[0.6, 0.0, 0.0]], atol=1e-6)


def test_k_larger_than_catalogue_returns_only_n_columns() -> None:
    ids, vecs = random_items(5, 4, seed=0)
    for kind in ("flat", "hnsw", "ivf"):
        snap = build_snapshot(ids, vecs, version=1, config=IndexConfig(kind=kind))
        scores, got = snap.search(vecs[:2], k=50)
        assert scores.shape == got.shape == (2, 5)
        assert len(snap) == 5
        assert all(i is None or i in ids for i in got.ravel())
        assert -1 not in got.ravel().tolist()


def test_missing_approximate_results_are_none_not_minus_one() -> None:
    # Two well-separated clusters, one IVF cell probed: a query finds only its own cell.
    vecs = np.array([[1.0, 0.0]] * 40 + [[-1.0, 0.0]] * 40, dtype=np.float32)
    vecs += np.random.default_rng(0).normal(0, 0.01, vecs.shape).astype(np.float32)
    ids = [str(i) for i in range(80)]
    snap = build_snapshot(
        ids, vecs, version=1, config=IndexConfig(kind="ivf", ivf_nlist=2, ivf_nprobe=1)
    )
    scores, got = snap.search(np.array([[1.0, 0.0]], dtype=np.float32), k=80)
    assert got.shape == (1, 80)
    found = [i for i in got[0] if i is not None]
    assert len(found) == 40 and all(int(i) < 40 for i in found)
    assert all(s == -np.inf for s, i in zip(scores[0], got[0], strict=True) if i is None)


@pytest.mark.parametrize(
    ("ids", "vecs", "match"),
    [
        ([], np.zeros((0, 4)), "zero items"),
        (["a", "b"], np.zeros((3, 4)), "2 ids but 3 vectors"),
        (["a", "b"], np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or infinite"),
        (["a", "b"], np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or infinite"),
        (["a", "a"], np.eye(2), "duplicate item ids: \\['a'\\]"),
        (["a", "b"], np.zeros(2), "shape"),
    ],
)
def test_build_rejects_bad_input(ids: list[str], vecs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_snapshot(ids, vecs, version=1)


def test_build_rejects_unknown_kind_and_search_rejects_bad_queries() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_snapshot(["a"], np.ones((1, 2)), version=1, config=IndexConfig(kind="lsh"))
    snap = build_snapshot(["a"], np.ones((1, 2)), version=1)
    with pytest.raises(ValueError, match="shape"):
        snap.search(np.ones((1, 3)), k=1)
    with pytest.raises(ValueError, match="k must be"):
        snap.search(np.ones((1, 2)), k=0)


def test_holder_swap_returns_old_and_refuses_stale_versions() -> None:
    holder = IndexHolder()
    assert holder.current is None
    with pytest.raises(RuntimeError):
        holder.search(np.ones((1, 2)), k=1)
    s1 = build_snapshot(["a"], np.ones((1, 2)), version=1)
    s2 = build_snapshot(["a", "b"], np.eye(2), version=2)
    assert holder.swap(s1) is None
    assert holder.swap(s2) is s1
    with pytest.raises(ValueError, match="not newer"):
        holder.swap(build_snapshot(["x"], np.ones((1, 2)), version=2))
    assert holder.current is s2 and holder.n_swaps == 2


def test_concurrent_search_during_swaps_always_sees_a_complete_snapshot() -> None:
    dim = 8
    rng = np.random.default_rng(0)
    # Snapshot v has v+1 items whose ids all carry the version: a mixed view would show.
    snaps: list[IndexSnapshot] = []
    for v in range(1, 41):
        n = 50 + v
        snaps.append(
            build_snapshot(
                [f"v{v}-{i}" for i in range(n)],
                rng.standard_normal((n, dim)).astype(np.float32),
                version=v,
                config=IndexConfig(kind="hnsw" if v % 2 else "flat"),
            )
        )
    holder = IndexHolder()
    holder.swap(snaps[0])
    errors: list[BaseException] = []
    stop = threading.Event()
    queries = rng.standard_normal((4, dim)).astype(np.float32)

    searches = [0, 0]

    def reader(slot: int) -> None:
        try:
            while not stop.is_set():
                scores, ids = holder.search(queries, k=1_000)
                searches[slot] += 1
                versions = {i.split("-")[0] for i in ids.ravel()}
                assert len(versions) == 1, versions
                n_items = 50 + int(next(iter(versions))[1:])
                assert ids.shape == (4, n_items)
                assert np.all(np.diff(scores, axis=1) <= 1e-5)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(slot,)) for slot in range(2)]
    for t in threads:
        t.start()
    for snap in snaps[1:]:
        holder.swap(snap)
        # Let both readers search this snapshot before the next swap, so swaps interleave.
        target = [n + 1 for n in searches]
        deadline = time.monotonic() + 5.0
        while any(n < m for n, m in zip(searches, target, strict=True)) and not errors:
            if time.monotonic() > deadline:
                break
            time.sleep(0)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not errors, errors[0]
    assert holder.n_swaps == 40 and holder.current is snaps[-1]
    assert min(searches) >= 39

"""How the FAISS index of an item snapshot is configured and built.

:class:`IndexConfig` holds the settings of the build and of the check of
:mod:`index.faiss_index` (which re-exports it); :func:`make_index` builds the FAISS index
of the kind the catalogue size calls for (exact flat inner product, IVF-flat or HNSW) over
L2-normalised vectors (:func:`normalize_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt

__all__ = ["IndexConfig", "kind_of", "make_index", "normalize_rows"]

_KINDS = ("auto", "flat", "hnsw", "ivf")
_APPROX_KINDS = ("hnsw", "ivf")


@dataclass(frozen=True)
class IndexConfig:
    """How :func:`build_snapshot` builds the FAISS index and :func:`verify_snapshot` checks it
    (both in :mod:`index.faiss_index`).

    Attributes:
        kind: "auto" (flat up to ``exact_max_items`` items, ``auto_approx`` above), "flat",
            "hnsw" or "ivf".
        exact_max_items: largest catalogue "auto" serves with exact (flat) search.
        auto_approx: the approximate kind "auto" uses above ``exact_max_items``.
        hnsw_m: HNSW graph degree (memory ~ ``2 * hnsw_m`` ints per item; build time grows
            with it).
        hnsw_ef_construction: HNSW build beam.
        hnsw_ef_search: HNSW search beam (raised to ``k`` per query when ``k`` is larger).
        ivf_nlist: IVF cells; None means ~4·sqrt(N), capped at N/39 so k-means has enough
            points per centroid.
        ivf_nprobe: IVF cells visited per query.
        ivf_train_per_list: k-means trains on a seeded sample of ``ivf_train_per_list *
            nlist`` vectors (all of them when fewer); FAISS warns below 39.
        seed: seeds the IVF training sample and k-means, and the queries of
            :func:`verify_snapshot`.
        min_recall: :func:`verify_snapshot` fails below this recall@``verify_k``.
        verify_queries: queries :func:`verify_snapshot` samples.
        verify_k: the ``k`` of the recall check.
        norm_tolerance: largest ``| ||v|| - 1 |`` :func:`verify_snapshot` accepts.
    """

    kind: str = "auto"  # "auto" | "flat" | "hnsw" | "ivf"
    exact_max_items: int = 50_000
    # IVF: on 1M clustered 64-d items (bench.index) it kept recall@10 0.998 where HNSW at
    # these defaults fell to 0.77 (below min_recall, so every refresh would be rejected)
    auto_approx: str = "ivf"  # "hnsw" | "ivf"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 64
    ivf_nlist: int | None = None  # None → ~4*sqrt(N)
    ivf_nprobe: int = 16
    ivf_train_per_list: int = 39
    seed: int = 0
    min_recall: float = 0.9
    verify_queries: int = 200
    verify_k: int = 10
    norm_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"IndexConfig.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.auto_approx not in _APPROX_KINDS:
            raise ValueError(
                f"IndexConfig.auto_approx must be one of {_APPROX_KINDS}, got {self.auto_approx!r}"
            )
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ivf_train_per_list", "verify_queries", "verify_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise ValueError(f"IndexConfig.ivf_nlist must be >= 1 or None, got {self.ivf_nlist}")
        if self.exact_max_items < 0:
            raise ValueError(
                f"IndexConfig.exact_max_items must be >= 0, got {self.exact_max_items}"
            )
        if not 0.0 <= self.min_recall <= 1.0:
            raise ValueError(f"IndexConfig.min_recall must be in [0, 1], got {self.min_recall}")
        if not (math.isfinite(self.norm_tolerance) and self.norm_tolerance >= 0):
            raise ValueError(f"IndexConfig.norm_tolerance must be >= 0, got {self.norm_tolerance}")

    def resolve_kind(self, n_items: int) -> str:
        """The concrete kind ("flat", "hnsw" or "ivf") built for ``n_items`` items."""
        if self.kind != "auto":
            return self.kind
        return "flat" if n_items <= self.exact_max_items else self.auto_approx

    def ivf_cells(self, n_items: int) -> int:
        """IVF cells for ``n_items`` items: ``ivf_nlist``, or ~4·sqrt(N) capped at N/39."""
        nlist = self.ivf_nlist
        if nlist is None:
            nlist = min(round(4 * math.sqrt(n_items)), n_items // 39)
        return max(1, min(nlist, n_items))


def normalize_rows(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """L2-normalise rows of ``x`` in place (zero rows stay zero) and return it."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def kind_of(index: faiss.Index) -> str:
    """The kind of a built FAISS index: "hnsw", "ivf" or "flat"."""
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "flat"


def make_index(vectors: npt.NDArray[np.float32], config: IndexConfig) -> faiss.Index:
    """A FAISS inner-product index of kind ``config.resolve_kind(N)`` over ``vectors``
    (N, D) float32 (already normalised), trained (IVF) and filled."""
    n, d = vectors.shape
    kind = config.resolve_kind(n)
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = config.hnsw_ef_construction
        hnsw.hnsw.efSearch = config.hnsw_ef_search
        index = hnsw
    else:
        nlist = config.ivf_cells(n)
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = config.seed
        n_train = min(n, config.ivf_train_per_list * nlist)
        rng = np.random.default_rng(config.seed)
        sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else None
        ivf.train(vectors if sample is None else vectors[sample])
        ivf.nprobe = min(config.ivf_nprobe, nlist)
        ivf.make_direct_map()  # reconstruct() by id, for verify_snapshot
        index = ivf  # faiss's Python wrapper keeps the quantizer alive via the IVF index
    index.add(vectors)
    return index

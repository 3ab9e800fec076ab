"""What the trainer publishes and a serving replica loads: one consistent model set.

A snapshot's files (see :mod:`modelstore.store` for the manifest and checksums):

- ``ranker.pt``: :meth:`learners.ranker.TorchRanker.state` without the optimiser (weights
  and the feature-encoder state, i.e. its categorical slots and vocabularies), what
  serving loads; ``ranker_optim.pt``: the optimiser moments, which only a resuming trainer
  loads (about 2/3 of the bytes);
- ``two_tower.pt`` and ``two_tower_optim.pt``: the same split of
  :meth:`learners.two_tower.TwoTowerModel.state` (with both towers' encoder states), when
  the retrieval model is the two-tower one;
- ``index.faiss`` and ``index.json``: the FAISS index (``faiss.write_index``) and its item
  ids, version, build time and :class:`index.faiss_index.IndexConfig`;
- ``calibrator.json``: the calibrator's ``to_dict()`` and version;
- ``fusion.pt``: :meth:`learners.retrieval_fusion.FusedRetrieval.state_dict` (co-visit
  counts and decayed clicks, plain types), when the trainer fuses candidates.

:class:`ModelReplica` keeps the loaded set a serving worker answers from and swaps it with
one reference assignment; a version that fails to verify or load is counted and the
previous one keeps serving.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from index.faiss_index import IndexConfig, IndexSnapshot
from learners.calibration import Calibrator, calibrator_from_dict
from learners.negatives import HardNegativeSource
from learners.ranker import TorchRanker
from learners.retrieval_fusion import FusedRetrieval
from learners.two_tower import TwoTowerModel
from modelstore.store import DirectoryStore, Manifest, StoreError

__all__ = [
    "LoadedModels",
    "ModelReplica",
    "Snapshot",
    "load_snapshot",
    "publish_snapshot",
    "state_copy",
    "take_snapshot",
    "write_snapshot",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModels:
    """A loaded snapshot: read-only for serving (nothing trains these objects)."""

    version: int  # the store version
    ranker: TorchRanker
    two_tower: TwoTowerModel | None
    index: IndexSnapshot | None
    calibrator: Calibrator
    calibrator_version: int
    manifest: Manifest
    loaded_at: float = field(default_factory=time.time)  # epoch s
    fusion: FusedRetrieval | None = None


def state_copy(obj: Any, reuse: Any = None) -> Any:
    """A copy of a ``state()`` / ``state_dict()`` tree that training cannot change: every
    tensor ``.detach().to("cpu", copy=True)`` (on the CPU path too), numpy arrays copied,
    dicts, lists and tuples rebuilt, anything else deep-copied. A tensor that appears
    twice stays one tensor. What :func:`take_snapshot` and the trainer's checkpoint hold
    while the models train on; serialise it on another thread.

    ``reuse``: an earlier copy of the same tree that nothing reads any more (its write
    ended): a CPU tensor at the same place with the same shape and dtype is overwritten
    (``copy_``) instead of allocated afresh, which spares the page faults of a new
    allocation (a 56 MB copy: ~10 ms instead of ~35 ms). Anything that does not match is
    copied afresh.

    >>> t = torch.zeros(2)
    >>> c = state_copy({"w": t, "v": [t], "n": 1})
    >>> _ = t.add_(1.0)
    >>> c["w"].tolist(), c["v"][0] is c["w"], c["n"]
    ([0.0, 0.0], True, 1)
    >>> d = state_copy({"w": t, "v": [t], "n": 1}, reuse=c)
    >>> d["w"] is c["w"], d["w"].tolist(), d["v"][0] is d["w"]
    (True, [1.0, 1.0], True)
    """
    return _copy(obj, reuse, {}, set())


def _copy(obj: Any, reuse: Any, memo: dict[int, Any], used: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            src = obj.detach()
            if (
                isinstance(reuse, torch.Tensor)
                and id(reuse) not in used  # a buffer shared in the old tree: not twice
                and reuse.device.type == "cpu"
                and reuse.layout == torch.strided == src.layout
                and reuse.shape == src.shape
                and reuse.dtype == src.dtype
            ):
                used.add(id(reuse))
                memo[key] = reuse.copy_(src)
            else:
                memo[key] = src.to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if type(obj) in (dict, OrderedDict):
        old = reuse if isinstance(reuse, dict) else {}
        return type(obj)((k, _copy(v, old.get(k), memo, used)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        olds = list(reuse) if isinstance(reuse, (list, tuple)) else []
        olds += [None] * (len(obj) - len(olds))
        return type(obj)(_copy(v, o, memo, used) for v, o in zip(obj, olds, strict=False))
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)


@dataclass(frozen=True)
class Snapshot:
    """One model set copied at one instant (:func:`take_snapshot`), ready to be written
    by :func:`write_snapshot` on any thread while the live models keep training.
    ``index``: an :class:`IndexSnapshot` is never changed once built (a refresh swaps in
    a new one), so it is shared, not copied."""

    ranker: dict[str, Any]
    two_tower: dict[str, Any] | None
    index: IndexSnapshot | None
    calibrator: dict[str, Any]
    calibrator_version: int
    meta: dict[str, Any]
    #: the live candidate fusion: :func:`write_snapshot` saves its counts then, under its
    #: own lock (copying ~1M entries on the event loop took ~1-2 s), so they may be a few
    #: batches newer than the models'
    fusion: FusedRetrieval | None = None


def take_snapshot(
    ranker: TorchRanker,
    two_tower: TwoTowerModel | None,
    index: IndexSnapshot | None,
    calibrator: Calibrator,
    calibrator_version: int,
    reuse: Snapshot | None = None,
    fusion: FusedRetrieval | None = None,
) -> Snapshot:
    """Copy what :func:`write_snapshot` writes (:func:`state_copy`: tensors to CPU). The
    caller keeps the models still while this runs (no training step); not afterwards.
    ``reuse``: an earlier snapshot, already written, whose buffers may be overwritten."""
    return Snapshot(
        ranker=state_copy(ranker.state(), None if reuse is None else reuse.ranker),
        two_tower=(
            None
            if two_tower is None
            else state_copy(two_tower.state(), None if reuse is None else reuse.two_tower)
        ),
        index=index,
        calibrator=copy.deepcopy(calibrator.to_dict()),
        calibrator_version=calibrator_version,
        meta={
            "model_version": ranker.n_updates,
            "two_tower_updates": None if two_tower is None else two_tower.n_updates,
            "index_version": None if index is None else index.version,
            "index_items": None if index is None else len(index),
            "calibrator_version": calibrator_version,
            "fusion_clicks": None if fusion is None else fusion.n_clicks,
        },
        fusion=fusion,
    )


def write_snapshot(store: DirectoryStore, snap: Snapshot) -> Manifest:
    """Write ``snap`` as one version of ``store`` (atomically, checksummed, then pruned to
    its ``keep``); it touches no live model, so it may run on any thread (one publish at
    a time per store)."""

    def write(d: Path) -> None:
        _save_split(snap.ranker, d, "ranker")
        if snap.two_tower is not None:
            _save_split(snap.two_tower, d, "two_tower")
        index = snap.index
        if index is not None:
            faiss.write_index(index.index, str(d / "index.faiss"))
            (d / "index.json").write_text(json.dumps({
                "version": index.version, "built_at": index.built_at, "dim": index.dim,
                "ids": [str(i) for i in index.ids.tolist()],
                "config": dataclasses.asdict(index.config),
            }))  # fmt: skip
        (d / "calibrator.json").write_text(
            json.dumps({"version": snap.calibrator_version, "params": snap.calibrator})
        )
        if snap.fusion is not None:
            snap.fusion.save(d / "fusion.pt")

    return store.publish(write, meta=snap.meta)


def publish_snapshot(
    store: DirectoryStore,
    ranker: TorchRanker,
    two_tower: TwoTowerModel | None,
    index: IndexSnapshot | None,
    calibrator: Calibrator,
    calibrator_version: int,
    fusion: FusedRetrieval | None = None,
) -> Manifest:
    """Write one version of the models to ``store`` (atomically, then pruned to its
    ``keep``): :func:`take_snapshot` then :func:`write_snapshot`. The caller must keep the
    models still meanwhile (no training step)."""
    snap = take_snapshot(ranker, two_tower, index, calibrator, calibrator_version, fusion=fusion)
    return write_snapshot(store, snap)


_OPTIM_KEYS = ("optimizer", "sparse_optimizer")
#: what serving loads of a version (the ``*_optim.pt`` files are for a resuming trainer)
SERVING_FILES = (
    "ranker.pt", "two_tower.pt", "index.faiss", "index.json", "calibrator.json", "fusion.pt",
)  # fmt: skip


def _save_split(state: Mapping[str, Any], d: Path, name: str) -> None:
    """``name.pt`` (weights, encoders, counters) and ``name_optim.pt`` (the moments)."""
    torch.save({k: v for k, v in state.items() if k not in _OPTIM_KEYS}, d / f"{name}.pt")
    torch.save({k: state[k] for k in _OPTIM_KEYS if k in state}, d / f"{name}_optim.pt")


def _load_split(d: Path, name: str, optimizer: bool) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(d / f"{name}.pt", map_location="cpu", weights_only=True)
    if optimizer and (d / f"{name}_optim.pt").is_file():
        state.update(torch.load(d / f"{name}_optim.pt", map_location="cpu", weights_only=True))
    return state


def _load_index(d: Path) -> IndexSnapshot:
    info = json.loads((d / "index.json").read_text())
    index = faiss.read_index(str(d / "index.faiss"))
    ids = np.empty(len(info["ids"]), dtype=object)
    ids[:] = [str(i) for i in info["ids"]]
    if index.ntotal != len(ids) or index.d != int(info["dim"]):
        raise ValueError(f"index holds {index.ntotal} x {index.d}, ids/dim say "
                         f"{len(ids)} x {info['dim']}")  # fmt: skip
    return IndexSnapshot(version=int(info["version"]), ids=ids, index=index,
                         dim=int(info["dim"]), built_at=float(info["built_at"]),
                         config=IndexConfig(**info["config"]))  # fmt: skip


def load_snapshot(
    store: DirectoryStore,
    version: int,
    device: str | None = None,
    optimizer: bool = False,
    hard_negatives: HardNegativeSource | None = None,
    fnc: bool | None = None,
) -> LoadedModels:
    """Verify (sizes, SHA-256) then load ``version``: what serving needs, and with
    ``optimizer`` the optimiser moments too (a resuming trainer), and the two-tower gets
    the ``hard_negatives`` source. ``fnc`` (None: the snapshot's own) sets the ranker's FNC
    output link, so that a snapshot written before the link was part of the ranker's
    config serves corrected scores under ``trainer.fnc``. Raises :class:`StoreError`."""
    m = store.open(version, only=None if optimizer else SERVING_FILES)
    d = m.path
    if "ranker.pt" not in m.files or "calibrator.json" not in m.files:
        raise StoreError("corrupt", f"version {version}: no ranker.pt or calibrator.json")
    try:
        ranker = TorchRanker.from_state(
            _load_split(d, "ranker", optimizer), device=device, online=True, fnc=fnc
        )
        two_tower = (
            TwoTowerModel.from_state(
                _load_split(d, "two_tower", optimizer), device=device, hard_negatives=hard_negatives
            )
            if "two_tower.pt" in m.files
            else None
        )
        index = _load_index(d) if "index.faiss" in m.files else None
        cal = json.loads((d / "calibrator.json").read_text())
        calibrator = calibrator_from_dict(cal["params"])
        cal_version = int(cal["version"])
        fusion = (
            FusedRetrieval.from_state_dict(
                torch.load(d / "fusion.pt", map_location="cpu", weights_only=True)
            )
            if "fusion.pt" in m.files
            else None
        )
    except Exception as exc:  # the checksums held, yet it does not load: still unusable
        raise StoreError("load_error", f"version {version}: {type(exc).__name__}: {exc}") from exc
    return LoadedModels(version, ranker, two_tower, index, calibrator, cal_version, m,
                        fusion=fusion)  # fmt: skip


class ModelReplica:
    """The models a serving worker answers from, loaded from a store.

    :meth:`refresh` loads the newest version above the current one (catch-up from the
    store, not from ``control`` history); :meth:`announce` validates a ``control``
    ``model`` record (path confined to the store, manifest digest) and remembers its
    version for the next :meth:`refresh`. A version that fails is counted in ``failures``
    (reason -> count), remembered as bad (not retried), and the current one keeps serving.
    ``current`` is replaced by one assignment: a request reads it once.
    """

    def __init__(
        self, store: DirectoryStore, device: str | None = "cpu", fnc: bool | None = None
    ) -> None:
        self.store = store
        self.device = device
        self.fnc = fnc  # the FNC output link of every loaded ranker (None: the snapshot's)
        self.current: LoadedModels | None = None
        self.failures: dict[str, int] = {}
        self.n_failures = 0
        self.bad: set[int] = set()
        self.n_loads = 0
        self.last_error: str | None = None
        #: seconds from a version's manifest time to it serving here, per load
        self.propagation_s: list[float] = []
        self._lock = threading.Lock()  # one load at a time

    @property
    def version(self) -> int:
        return 0 if self.current is None else self.current.version

    def _fail(self, exc: StoreError, version: int | None) -> None:
        self.failures[exc.reason] = self.failures.get(exc.reason, 0) + 1
        self.n_failures += 1
        self.last_error = str(exc)
        if version is not None:
            self.bad.add(version)
        log.warning("model store: %s; serving version %d", exc, self.version)

    def announce(self, msg: Mapping[str, Any]) -> int | None:
        """Check a ``{"kind": "model", "version", "path"?, "digest"?}`` record. Returns
        the announced version when it is acceptable (load it with :meth:`refresh`), None
        when rejected (counted) or not newer."""
        version = msg.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            self._fail(StoreError("corrupt", f"bad model version {version!r}"), None)
            return None
        if version <= self.version or version in self.bad:
            return None
        path, digest = msg.get("path"), msg.get("digest")
        if (path is not None and not isinstance(path, str)) or (
            digest is not None and not isinstance(digest, str)
        ):
            self._fail(StoreError("corrupt", "path and digest must be strings"), None)
            return None
        try:
            self.store.resolve(path, version, digest)
        except StoreError as exc:
            if exc.reason == "missing":  # e.g. an old record of a pruned version: no error
                log.debug("model store: %s", exc)
                return None
            # not marked bad: a forged record must not block the real version's load
            self._fail(exc, None)
            return None
        return version

    def refresh(self) -> LoadedModels | None:
        """Load the newest good version above the current one, if any; returns what was
        loaded (None: nothing new, or it failed and the current one stays)."""
        with self._lock:
            for version in reversed(self.store.versions()):
                if version <= self.version:
                    return None
                if version in self.bad:
                    continue
                try:
                    loaded = load_snapshot(self.store, version, self.device, fnc=self.fnc)
                except StoreError as exc:
                    if exc.reason == "missing":  # pruned meanwhile: try the next one
                        continue
                    self._fail(exc, version)
                    continue
                self.current = loaded
                self.n_loads += 1
                self.propagation_s.append(max(0.0, time.time() - loaded.manifest.created_at))
                del self.propagation_s[:-1000]
                log.info("model store: serving version %d (model %s, index %s)", version,
                         loaded.manifest.meta.get("model_version"),
                         loaded.manifest.meta.get("index_version"))  # fmt: skip
                return loaded
            return None

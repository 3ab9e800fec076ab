"""A directory model store: versioned, checksummed, atomically published, pruned by count.

Layout under ``root`` (a shared directory or volume)::

    v00000007/manifest.json   {"format", "version", "created_at", "files": {name: {sha256,
                               size}}, "meta": {...}}
    v00000007/ranker.pt ...   the files the manifest lists
    .tmp-XXXX/                a version being written (mkdtemp: unique, mode 0700)

A version is written into a fresh temporary directory, every file fsynced, the manifest
written last, and the directory renamed to ``vNNNNNNNN``: a reader sees a complete version
or none. ``keep`` bounds how many versions stay on disk (the oldest are deleted after each
publish). :meth:`DirectoryStore.open` verifies sizes and SHA-256 checksums of every file
before anything is deserialised; :meth:`DirectoryStore.resolve` confines a path named by a
``control`` record to a version directory of this store and checks the manifest's digest.

The interface a loader needs (:class:`ModelStore`) is small so that an object store could
implement it too: ``publish``, ``versions``, ``open``.

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> store = DirectoryStore(root, keep=2)
>>> def write(d):
...     (d / "a.txt").write_text("hello")
>>> [store.publish(write, meta={"n": i}).version for i in range(3)]
[1, 2, 3]
>>> store.versions()
[2, 3]
>>> m = store.open(3)
>>> m.files["a.txt"].size, m.meta
(5, {'n': 2})
>>> store.resolve(str(store.path(3)), 3, m.digest).version
3
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "DirectoryStore",
    "WriterLock",
    "FileEntry",
    "Manifest",
    "ModelStore",
    "StoreConfig",
    "StoreError",
]

FORMAT = 1
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{8})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CHUNK = 1 << 20
#: the largest manifest read (bytes): a hostile one cannot make the reader allocate more
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class StoreConfig:
    """Model store settings (``[store]``; the directory is ``Settings.model_store``).

    Attributes:
        keep: versions kept on disk (>= 1); older ones are deleted after each publish.
        publish_every_s: wall seconds between two snapshots the trainer publishes.
        poll_s: wall seconds between two looks of a serving replica at the store (an
            announcement on ``control`` makes it look at once).
    """

    keep: int = 5
    publish_every_s: float = 30.0
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"store.keep must be >= 1, got {self.keep}")
        for name in ("publish_every_s", "poll_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"store.{name} must be > 0, got {v}")


class StoreError(Exception):
    """A version that cannot be used, or a store that cannot be written; ``reason`` is a
    short metric label (``missing``, ``corrupt``, ``checksum``, ``outside_store``,
    ``digest``, ``load_error``, ``writer_locked``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # hex
    size: int  # bytes


@dataclass(frozen=True)
class Manifest:
    """One published version: ``files`` name -> checksum and size, ``created_at`` epoch
    seconds, ``meta`` what the publisher recorded (model versions, ...), ``digest`` the
    SHA-256 of the manifest file's bytes (what a ``control`` announcement carries)."""

    version: int
    created_at: float
    files: Mapping[str, FileEntry]
    meta: Mapping[str, Any] = field(default_factory=dict)
    digest: str = ""
    path: Path = Path()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


class ModelStore(Protocol):
    """What the trainer and the serving replicas need of a store."""

    def publish(
        self, write: Callable[[Path], None], meta: Mapping[str, Any] | None = None
    ) -> Manifest: ...

    def versions(self) -> list[int]: ...

    def open(self, version: int) -> Manifest: ...


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


WRITER_LOCK = ".writer.lock"


class WriterLock:
    """The store's single-writer lock: an exclusive ``flock`` on ``root/.writer.lock``,
    held while this object is open (the OS drops it when the process dies, so a killed
    trainer never leaves a stale lock). The holder's pid is written in the file for the
    error message of the next one. See :meth:`DirectoryStore.lock_writer`."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / WRITER_LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                "writer_locked",
                f"another trainer (pid {holder}) is publishing to the model store {root}: "
                "one trainer per store (stop it, or give this worker another --model-store)",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DirectoryStore:
    """:class:`ModelStore` in a local or shared directory (see the module docstring).

    Args:
        root: the store's directory (created when missing).
        keep: versions kept on disk, >= 1.
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def path(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def lock_writer(self) -> WriterLock:
        """Take the single-writer lock (a trainer holds it while it runs) or raise
        :class:`StoreError` ``writer_locked`` naming the holder's pid. Readers need none.

        >>> import tempfile
        >>> store = DirectoryStore(tempfile.mkdtemp())
        >>> first = store.lock_writer()
        >>> store.lock_writer()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modelstore.store.StoreError: another trainer (pid ...) is publishing to the model store ...
        >>> first.release(); store.lock_writer().held
        True
        """
        return WriterLock(self.root)

    def versions(self) -> list[int]:
        """Published versions on disk, ascending (complete ones only: a version directory
        appears by rename once its manifest is written)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _VERSION_RE.match(name)
            if m and (self.root / name).is_dir() and not (self.root / name).is_symlink():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    # -- writing ------------------------------------------------------------------------
    def publish(
        self, write: Callable[[Path], None], meta: Mapping[str, Any] | None = None
    ) -> Manifest:
        """Publish a new version: ``write(tmp_dir)`` writes its files (plain names, no
        sub-directories), then checksums, manifest, fsync, rename, and pruning to ``keep``.
        Returns its manifest. The version number is one above the newest on disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            write(tmp)
            files: dict[str, dict[str, Any]] = {}
            for p in sorted(tmp.iterdir()):
                if not _NAME_RE.match(p.name) or p.name == MANIFEST:
                    raise ValueError(f"snapshot file name not allowed: {p.name!r}")
                if p.is_symlink() or not p.is_file():
                    raise ValueError(f"snapshot entry {p.name!r} is not a regular file")
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[p.name] = {"sha256": _sha256(p), "size": p.stat().st_size}
            version = (self.latest() or 0) + 1
            doc = {
                "format": FORMAT,
                "version": version,
                "created_at": time.time(),
                "files": files,
                "meta": dict(meta or {}),
            }
            data = json.dumps(doc, indent=1, sort_keys=True).encode()
            with open(tmp / MANIFEST, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from replicas running as others
            _fsync_dir(tmp)
            final = self.path(version)
            os.rename(tmp, final)  # atomic; fails if a concurrent publisher took the number
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return self._parse(final, data, version)

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep`` versions and stale temporary directories
        (older than an hour); returns the versions deleted."""
        gone = self.versions()[: -self.keep]
        for v in gone:
            # rename first: a reader never sees a half-deleted version as complete
            doomed = self.root / f".del-v{v:08d}-{os.getpid()}"
            try:
                os.rename(self.path(v), doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
        now = time.time()
        for p in self.root.glob(".tmp-*"):
            try:
                if not p.is_symlink() and p.is_dir() and now - p.stat().st_mtime > 3600:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
        return gone

    # -- reading ------------------------------------------------------------------------
    def _parse(self, d: Path, data: bytes, version: int) -> Manifest:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("not a format-1 manifest")
            if doc.get("version") != version:
                raise ValueError(f"manifest says version {doc.get('version')!r}")
            files = {}
            raw_files = doc["files"]
            if not isinstance(raw_files, dict):
                raise ValueError("files must be an object")
            for name, entry in raw_files.items():
                if not isinstance(name, str) or not _NAME_RE.match(name) or name == MANIFEST:
                    raise ValueError(f"file name not allowed: {name!r}")
                sha, size = entry["sha256"], entry["size"]
                if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
                    raise ValueError(f"{name}: bad sha256")
                if not (isinstance(size, int) and size >= 0):
                    raise ValueError(f"{name}: bad size")
                files[name] = FileEntry(sha, size)
            created = float(doc["created_at"])
            meta = doc.get("meta", {})
            if not isinstance(meta, dict):
                raise ValueError("meta must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError("corrupt", f"version {version}: bad manifest: {exc}") from None
        return Manifest(version, created, files, meta, hashlib.sha256(data).hexdigest(), d)

    def manifest(self, version: int) -> Manifest:
        """The manifest of ``version``, parsed (files not checked). Raises StoreError."""
        d = self.path(version)
        mpath = d / MANIFEST
        if d.is_symlink() or mpath.is_symlink():
            raise StoreError("outside_store", f"version {version}: symbolic link in the store")
        try:
            with open(mpath, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise StoreError("missing", f"version {version} is not in {self.root}") from None
        except OSError as exc:
            raise StoreError("corrupt", f"version {version}: {exc}") from None
        if len(data) > MAX_MANIFEST_BYTES:
            raise StoreError("corrupt", f"version {version}: manifest over {MAX_MANIFEST_BYTES}")
        return self._parse(d, data, version)

    def open(self, version: int, only: Collection[str] | None = None) -> Manifest:
        """The manifest of ``version`` after checking every file it lists (or the listed
        ones among ``only``): a regular file (no symlink), the recorded size, the recorded
        SHA-256. Raises StoreError (``missing``, ``corrupt``, ``checksum``) otherwise."""
        m = self.manifest(version)
        for name, entry in m.files.items():
            if only is not None and name not in only:
                continue
            p = m.path / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise StoreError("corrupt", f"version {version}: {name} is missing") from None
            if not os.path.isfile(p) or os.path.islink(p):
                raise StoreError("corrupt", f"version {version}: {name} is not a regular file")
            if st.st_size != entry.size:
                raise StoreError(
                    "checksum",
                    f"version {version}: {name} has {st.st_size} bytes, the manifest says"
                    f" {entry.size} (truncated?)",
                )
            if _sha256(p) != entry.sha256:
                raise StoreError("checksum", f"version {version}: {name} checksum mismatch")
        return m

    def resolve(self, path: str | None, version: int, digest: str | None) -> Manifest:
        """Check a ``control`` announcement: ``path`` (optional) must be this store's
        directory of ``version`` (symlinks resolved: nothing outside the store), and
        ``digest`` (optional) the SHA-256 of that version's manifest. Returns the manifest
        (files not checked yet: :meth:`open` does that). Raises StoreError
        (``outside_store``, ``digest``, ``missing``, ``corrupt``)."""
        if path is not None:
            try:
                given = Path(path).resolve(strict=False)
                root = self.root.resolve(strict=True)
            except (OSError, RuntimeError, ValueError) as exc:
                raise StoreError("outside_store", f"cannot resolve {path!r}: {exc}") from None
            if given != (root / f"v{version:08d}"):
                raise StoreError(
                    "outside_store",
                    f"{path!r} is not version {version} of the model store {root}",
                )
        m = self.manifest(version)
        if digest is not None and digest != m.digest:
            raise StoreError("digest", f"version {version}: manifest digest does not match")
        return m

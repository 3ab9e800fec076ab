"""A worker's start count and unclean restarts, persisted in its data directory.

A crash loop (a worker that exits on a record, is restarted by its supervisor, re-reads the
same record and exits again) leaves no trace in counters that start from zero with every
process. :func:`note_start` keeps two numbers in ``<data_dir>/worker-runs.json``: starts,
and starts whose previous run did not end with :func:`note_exit` (``clean=True``): killed,
crashed or exited with an error. ``streamrec_unclean_restarts`` exports the second, and the
``StreamrecCrashLoop`` alert fires when it climbs.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> note_start(d), note_start(d)  # the first run never ended cleanly
((1, 0), (2, 1))
>>> note_exit(d, clean=True); note_start(d)
(3, 1)
"""

from __future__ import annotations

import json
from pathlib import Path

from learners.util import atomic_write

__all__ = ["RUNS_FILE", "note_exit", "note_start"]

RUNS_FILE = "worker-runs.json"


def _read(path: Path) -> dict[str, int]:
    try:
        d = json.loads(path.read_text())
        return {k: int(d[k]) for k in ("starts", "unclean", "running")}
    except (OSError, ValueError, KeyError, TypeError):
        return {"starts": 0, "unclean": 0, "running": 0}


def _write(path: Path, d: dict[str, int]) -> None:
    # e.g. ENOSPC: the old file stays whole, no temp file is left
    atomic_write(path, lambda f: json.dump(d, f), binary=False, fsync=False, prefix=".worker-runs.")


def note_start(data_dir: str | Path) -> tuple[int, int]:
    """Record a start; returns ``(starts, unclean restarts)`` including this one."""
    path = Path(data_dir) / RUNS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    d = _read(path)
    d["starts"] += 1
    d["unclean"] += d["running"]
    d["running"] = 1
    _write(path, d)
    return d["starts"], d["unclean"]


def note_exit(data_dir: str | Path, clean: bool) -> None:
    """Record the end of a run; an unclean one (``clean=False``) counts at the next start."""
    path = Path(data_dir) / RUNS_FILE
    d = _read(path)
    d["running"] = 0 if clean else 1
    _write(path, d)

"""Give the C heap's free memory back to the operating system.

glibc keeps memory that was freed inside its arenas: at the end of 40- and 45-minute soaks
``malloc_trim(0)``, called in the worker through gdb, cut its RSS by 87 and 73 MB, and
``malloc_stats`` five minutes into a soak showed the main arena holding 295 MB from the
system with 206 MB in use (the model copies and serialisations of checkpoints and store
versions come and go in it). :func:`trim_heap` is called after each background write,
once the copy it wrote is released. :func:`set_mmap_threshold` (the worker's
``malloc_mmap_threshold_kb``, 1 MiB by default) keeps large blocks such as those copies out
of the arenas altogether: they are mapped on their own and unmapped when freed.
:func:`malloc_totals` reads glibc's counters (``mallinfo2``) for diagnostics.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

__all__ = ["configure_mmap_threshold", "malloc_totals", "set_mmap_threshold", "trim_heap"]

#: glibc's ``mallopt`` parameter number of the mmap threshold (``<malloc.h>``)
M_MMAP_THRESHOLD = -3
#: the largest threshold glibc accepts on 64-bit (``HEAP_MAX_SIZE / 2``), bytes
MAX_MMAP_THRESHOLD = 32 * 2**20
#: set by the environment, glibc's own threshold wins over any setting
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"

log = logging.getLogger(__name__)


def _libc_function(name: str, argtypes: list[Any], restype: Any) -> Any:
    """The C library's function ``name`` with these argument and result types, or None
    where there is no C library or it has no such function (they are glibc's: not musl,
    not macOS)."""
    lib = ctypes.util.find_library("c")
    if lib is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    fn: Callable[[int], int] | None = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    return fn


def trim_heap() -> bool | None:
    """``malloc_trim(0)``: True when memory was returned, False when none was, None where
    the C library has no ``malloc_trim``. Never raises. Takes milliseconds on a heap of a
    few hundred MB (it walks the free chunks), so call it off the event loop."""
    fn = _malloc_trim()
    if fn is None:
        return None
    try:
        return bool(fn(0))
    except Exception:  # a foreign function: nothing may escape into a writer thread
        log.debug("malloc_trim failed", exc_info=True)
        return None


@cache
def _mallopt() -> Callable[[int, int], int] | None:
    fn: Callable[[int, int], int] | None = _libc_function(
        "mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int
    )
    return fn


def set_mmap_threshold(nbytes: int) -> bool | None:
    """``mallopt(M_MMAP_THRESHOLD, nbytes)``: from now on a block of at least ``nbytes``
    bytes that the arena's free space cannot hold gets its own mapping, unmapped (back to
    the OS) when freed, instead of growing the arena; and glibc stops moving the threshold
    by itself. Set it at start, before large blocks were freed into an arena (free space
    already there is still used).

    Why (issue 19): glibc starts at 128 KiB and, each time a mapped block is freed, raises
    the threshold to that block's size (up to 32 MiB). The worker frees a copy of its
    models (tensors of up to 16 MB, ~216 MB in all) after every checkpoint and store
    write, so from then on each new copy comes from the arena of the thread that takes
    it, and that arena keeps the memory once the copy is freed: in a 125-minute soak one
    thread arena held 153 MB from the system with 8 MB in use, and the RSS grew with it.
    True when set, False when glibc refused the value, None where the C library has no
    ``mallopt``. Never raises."""
    if not 0 < nbytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap threshold must be in (0, {MAX_MMAP_THRESHOLD}] bytes, got {nbytes}")
    fn = _mallopt()
    if fn is None:
        return None
    try:
        return bool(fn(M_MMAP_THRESHOLD, int(nbytes)))
    except Exception:  # a foreign function
        log.debug("mallopt failed", exc_info=True)
        return None


def configure_mmap_threshold(kib: int, env: Mapping[str, str] | None = None) -> bool | None:
    """The worker's ``malloc_mmap_threshold_kb`` (``kib``): :func:`set_mmap_threshold` of
    that many KiB, unless ``kib`` is 0 (glibc's own) or ``env`` (default ``os.environ``)
    sets :data:`MMAP_THRESHOLD_ENV` (glibc read it at start: the user's choice stands).
    None when nothing was set."""
    env = os.environ if env is None else env
    if kib == 0 or MMAP_THRESHOLD_ENV in env:
        return None
    done = set_mmap_threshold(kib * 1024)
    log.info("glibc mmap threshold %d KiB: %s", kib, "set" if done else "not set")
    return done


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


@cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    fn: Callable[[], _MallInfo2] | None = _libc_function("mallinfo2", [], _MallInfo2)  # >= 2.33
    return fn


def malloc_totals() -> dict[str, float] | None:
    """glibc's allocator over all its arenas, MB: ``arenas`` (taken from the system by the
    heap and the threads' arenas), ``in_use`` and ``free`` inside them (free: kept, not
    returned; :func:`trim_heap` returns what it can), ``mmapped`` (blocks above the mmap
    threshold, each its own mapping). None without glibc >= 2.33. Python's small objects
    (pymalloc's arenas) and mappings made without malloc are not in these."""
    fn = _mallinfo2()
    if fn is None:
        return None
    mi = fn()
    return {"arenas": mi.arena / 1e6, "in_use": mi.uordblks / 1e6, "free": mi.fordblks / 1e6,
            "mmapped": mi.hblkhd / 1e6}  # fmt: skip

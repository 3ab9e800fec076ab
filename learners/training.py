"""What the torch learners share for training (:class:`learners.ranker.TorchRanker`,
:class:`learners.two_tower.TwoTowerModel`): the device choice (:func:`pick_device`), the
optimiser step that skips a non-finite loss or gradient (:func:`guarded_step`), the
atomic checkpoint write (:func:`atomic_torch_save`), its read (:func:`read_checkpoint`) and
the ``save`` both learners have (:class:`Checkpointed`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from learners.util import atomic_write

__all__ = [
    "Checkpointed",
    "atomic_torch_save",
    "build_module",
    "guarded_step",
    "pick_device",
    "read_checkpoint",
    "weights_to_load",
]

#: Per thread: True while a learner is built only to have every weight loaded next.
_LOADING = threading.local()


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def weights_to_load() -> Iterator[None]:
    """Inside it, :func:`build_module` on this thread skips the random initialisation: for a
    ``from_state`` that loads every weight right after (a serving replica loads a version
    every few seconds; drawing ~13M normal and uniform numbers that are then overwritten
    was a sixth of its load time). ``load_state_dict`` is strict, so a state that misses a
    weight still fails instead of leaving uninitialised memory."""
    before = getattr(_LOADING, "on", False)
    _LOADING.on = True
    try:
        yield
    finally:
        _LOADING.on = before


def build_module(build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """``build()`` moved to ``device``; inside :func:`weights_to_load` built on the meta
    device (no memory, no initialisation) and given uninitialised memory on ``device``."""
    if not getattr(_LOADING, "on", False):
        return build().to(device)
    with torch.device("meta"):
        module = build()
    return module.to_empty(device=device)


def guarded_step(
    loss: Tensor,
    dense_params: Sequence[Tensor],
    clip_norm: float,
    optimizers: Sequence[torch.optim.Optimizer],
) -> bool:
    """Backward ``loss`` and step every optimizer, dense gradients clipped to ``clip_norm``
    (sparse embedding gradients are left to lazy Adam). A non-finite loss, dense gradient
    norm or sparse gradient skips the step: gradients are cleared, weights unchanged, and
    False is returned."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    ok = bool(torch.isfinite(loss))
    if ok:
        loss.backward()
        ok = bool(torch.isfinite(nn.utils.clip_grad_norm_(dense_params, clip_norm)))
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if ok and p.grad is not None and p.grad.is_sparse:
                    ok = bool(torch.isfinite(p.grad.coalesce().values()).all())
    if ok:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return ok


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then replace ``path``:
    a reader never sees a half-written checkpoint (:func:`learners.util.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint written by :func:`atomic_torch_save`, loaded onto the CPU with
    ``torch.load(weights_only=True)`` (plain containers and tensors only).

    A missing file raises ``FileNotFoundError``; a file that is not such a checkpoint
    (truncated, another format, a pickle with code in it) a ``ValueError`` naming it,
    instead of torch's advice to load it with ``weights_only=False``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"{os.fspath(path)} is not a readable streamrec checkpoint"
            f" ({type(exc).__name__}: {first[:120]})"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)} is not a streamrec checkpoint (it holds a"
                         f" {type(state).__name__}, not a dict)")  # fmt: skip
    return state


class Checkpointed:
    """A learner whose checkpoint is its :meth:`state` (plain containers and tensors)."""

    def state(self) -> dict[str, Any]:
        """Everything :meth:`save` writes; plain containers and tensors only."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write :meth:`state` as a checkpoint (see :func:`atomic_torch_save`)."""
        atomic_torch_save(self.state(), path)

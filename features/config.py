"""Settings of the feature stage and the event shapes it reads.

:class:`FeatureConfig` is composed into the worker's settings (``stream.settings``);
:class:`ImpressionEvent` / :class:`ClickEvent` are the minimal shapes
:meth:`features.stage.FeatureStage.process` accepts (``logs.events.Impression`` and
``Click`` have the same attribute names and are accepted as they are).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["ClickEvent", "FeatureConfig", "ImpressionEvent"]


@dataclass(frozen=True)
class FeatureConfig:
    """Feature-stage settings (seconds are event-time seconds).

    ``counters`` / ``sequence``: ablation switches (counts, CTRs, recency / the click
    sequence). ``ttl_s``: an idle key expires after this long without an event.
    ``max_keys``: budget on tracked keys (user, item and pair keys together).
    ``max_bytes``: the memory budget of one stage (one input partition), estimated by
    :meth:`FeatureStage.approx_bytes`; 256 MiB by default.
    """

    half_lives_s: tuple[float, ...] = (3600.0, 86_400.0, 30 * 86_400.0)
    seq_len: int = 20
    seq_keep: int = 40
    lateness_s: float = 600.0
    max_buffer: int = 32
    impression_ttl_s: float = 7200.0
    ttl_s: float = 90 * 86_400.0
    max_keys: int = 2_000_000
    max_bytes: int = 256 * 2**20
    ctr_prior: float = 0.05
    ctr_strength: float = 20.0
    counters: bool = True
    sequence: bool = True

    def __post_init__(self) -> None:
        if not self.half_lives_s or any(h <= 0 for h in self.half_lives_s):
            raise ValueError(f"half_lives_s must be positive, got {self.half_lives_s}")
        if self.seq_len < 0 or self.seq_keep < self.seq_len:
            raise ValueError("need 0 <= seq_len <= seq_keep")
        if self.lateness_s < 0 or self.max_buffer < 2:
            raise ValueError("need lateness_s >= 0 and max_buffer >= 2")
        if self.impression_ttl_s <= 0 or self.ttl_s <= 0 or self.max_keys < 1:
            raise ValueError("TTLs and max_keys must be positive")
        if self.max_bytes < 2**20:
            raise ValueError(f"max_bytes must be at least 1 MiB, got {self.max_bytes}")


class ImpressionEvent(NamedTuple):
    """An impression as the stage reads it (``logs.events.Impression`` has the same
    attribute names and is accepted as is)."""

    impression_id: str
    ts: float
    user_id: str
    item_id: str
    position: int | None = None
    features: Mapping[str, object] = {}


class ClickEvent(NamedTuple):
    """A click as the stage reads it (``logs.events.Click`` is accepted as is)."""

    impression_id: str
    ts: float
    user_id: str | None = None

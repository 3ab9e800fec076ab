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

__all__ = ["MAX_HISTORY_FEATURES", "MAX_NAME_LEN", "ClickEvent", "FeatureConfig", "ImpressionEvent"]

#: the longest feature name an event may carry (``logs.events.MAX_FEATURE_NAME_LEN``): the
#: stage never makes a longer one, or the joiner's labelled batches would be refused
MAX_NAME_LEN = 128
#: the most historical features one impression may get (``logs.events`` allows stored
#: impressions this many features beyond an input's)
MAX_HISTORY_FEATURES = 512


@dataclass(frozen=True)
class FeatureConfig:
    """Feature-stage settings (seconds are event-time seconds).

    ``counters`` / ``sequence``: ablation switches (counts, CTRs, recency / the click
    sequence). ``ttl_s``: an idle key expires after this long without an event.
    ``max_keys``: budget on tracked keys (user, item and pair keys together).
    ``max_bytes``: the memory budget of one stage (one input partition), estimated by
    :meth:`FeatureStage.approx_bytes`; 256 MiB by default. ``max_attributes``: the most
    ``item_*`` attributes of one impression that get user x attribute keys (the first
    ones, in the event's order; the rest are skipped and counted): one event cannot make
    hundreds of keys. An attribute whose feature names would exceed :data:`MAX_NAME_LEN`
    is skipped too.
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
    max_attributes: int = 8

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
        if self.max_attributes < 0:
            raise ValueError(f"max_attributes must be >= 0, got {self.max_attributes}")
        if self.n_history_features > MAX_HISTORY_FEATURES:
            raise ValueError(
                f"{self.n_history_features} historical features per impression (half-lives "
                f"x keys: {len(self.half_lives_s)} x {4 + self.max_attributes}) > "
                f"{MAX_HISTORY_FEATURES}: fewer half_lives_s or max_attributes"
            )

    @property
    def n_history_features(self) -> int:
        """The most historical features one impression gets: 3 per half-life (imp, clk,
        ctr) of the user, item, user x item, item x position and each attribute key, the
        user's and the pair's recency and count (5), and the sequence (2)."""
        return 3 * len(self.half_lives_s) * (4 + self.max_attributes) + 5 + 2


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

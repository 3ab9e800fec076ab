"""One settings object composed of the libraries' frozen configs.

Sources, later wins: defaults, a TOML file (sections ``[join]``, ``[ranker]``, ``[trainer]``,
``[drift]``, ``[monitor]``, ``[index]``, ``[indexer]`` and top-level keys), environment
variables ``STREAMREC_<KEY>`` for the top-level keys (e.g. ``STREAMREC_BROKER``), and
explicit keyword overrides.

>>> s = Settings(broker="127.0.0.1:9092")
>>> s.faust_broker
'kafka://127.0.0.1:9092'
>>> s.trainer.batch_size, s.ranker.online_lr_scale
(1024, 0.1)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index.faiss_index import IndexConfig
from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from monitoring.drift import DriftConfig
from stream.join import JoinConfig


@dataclass(frozen=True)
class TrainerConfig:
    """Online trainer: micro-batch ``batch_size`` examples, or fewer after ``flush_s``.

    ``checkpoint_dir``: where versioned checkpoints go (None: none written);
    ``checkpoint_every_s``: wall seconds between checkpoints; ``warm_start``: a checkpoint
    to start from (e.g. from ``streamrec pretrain``).
    """

    batch_size: int = 1024
    flush_s: float = 0.5
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every_s: float = 60.0
    warm_start: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("trainer.batch_size must be >= 1")
        if self.flush_s <= 0:
            raise ValueError("trainer.flush_s must be > 0")


@dataclass(frozen=True)
class MonitorConfig:
    """Calibration monitor: ``window`` examples for the gauges; a recalibration fits on the
    newest ``recal_window`` examples, holding out the newest ``holdout_fraction``. No
    recalibration happens in the first ``warmup`` examples (a cold model is still moving)."""

    window: int = 20_000
    warmup: int = 50_000
    recal_window: int = 2_500
    holdout_fraction: float = 0.25
    max_segments: int = 16
    #: drift test: "window_z" (configured by [drift]), "cusum", "page_hinkley", "adwin",
    #: "river_page_hinkley" (their library defaults; see bench/results/drift.json)
    detector: str = "window_z"
    #: calibrator refitted on an alarm: "shift" (logit shift, 1 parameter: stable on the
    #: small post-alarm window), "platt", "isotonic" or "histogram"
    calibrator: str = "shift"

    def __post_init__(self) -> None:
        from learners.calibration import CALIBRATOR_KINDS
        from monitoring.drift import DETECTOR_NAMES

        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError("monitor.holdout_fraction must be in (0, 1)")
        if self.detector not in DETECTOR_NAMES:
            raise ValueError(f"monitor.detector must be one of {DETECTOR_NAMES}")
        if self.calibrator not in CALIBRATOR_KINDS:
            raise ValueError(f"monitor.calibrator must be one of {CALIBRATOR_KINDS}")


@dataclass(frozen=True)
class IndexerConfig:
    """Refresh the FAISS index and hard-negative pools every ``refresh_s`` wall seconds."""

    refresh_s: float = 5.0
    max_items: int = 1_000_000
    max_users: int = 5_000
    pool_per_user: int = 20


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs. ``broker``: ``host:port[,host:port]`` (``kafka://`` ok)."""

    broker: str = "127.0.0.1:9092"
    app_id: str = "streamrec"
    partitions: int = 4
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    data_dir: str = "runs/worker"
    rebalance_timeout_s: float = 3.0
    session_timeout_s: float = 6.0
    replay_watermark_every: int = 2000
    join: JoinConfig = field(default_factory=JoinConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # 4 sigma over the newest 2,500 examples: the online model itself absorbs a CTR jump
    # within ~5k impressions, so a slower test would never fire; the warm-up
    # (MonitorConfig) keeps a cold, fast-moving model quiet.
    drift: DriftConfig = field(
        default_factory=lambda: DriftConfig(threshold_z=4.0, window=2_500, cooldown=2_500)
    )
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    indexer: IndexerConfig = field(default_factory=IndexerConfig)

    @property
    def bootstrap(self) -> str:
        return self.broker.split("://", 1)[1] if "://" in self.broker else self.broker

    @property
    def faust_broker(self) -> str:
        return ";".join(f"kafka://{h}" for h in self.bootstrap.split(","))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type] = {
    "join": JoinConfig,
    "ranker": RankerConfig,
    "trainer": TrainerConfig,
    "drift": DriftConfig,
    "monitor": MonitorConfig,
    "index": IndexConfig,
    "indexer": IndexerConfig,
}
_TOP = {f.name: f.type for f in dataclasses.fields(Settings) if f.name not in _SECTIONS}


def _coerce(value: str, default: object) -> object:
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _section(cls: type, values: Mapping[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown keys in [{name}]: {sorted(unknown)}; known: {sorted(known)}")
    values = dict(values)
    if cls is RankerConfig and "encoder" in values:
        values["encoder"] = _section(EncoderConfig, values["encoder"], f"{name}.encoder")
    for key in ("hidden", "categorical_keys"):  # TOML arrays -> the configs' tuples
        if key in values:
            values[key] = tuple(values[key])
    return cls(**values)


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from a TOML file, ``STREAMREC_*`` variables and overrides."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    unknown = set(data) - set(_TOP) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"unknown settings keys in {path}: {sorted(unknown)}")
    kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in _TOP}
    defaults = Settings()
    for key in _TOP:
        var = f"STREAMREC_{key.upper()}"
        if var in env:
            kwargs[key] = _coerce(env[var], getattr(defaults, key))
    for name, cls in _SECTIONS.items():
        if name in data:
            kwargs[name] = _section(cls, data[name], name)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**kwargs)

"""The live objects of one worker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from monitoring.metrics import StreamrecMetrics
from stream.services import IndexerService, JoinService, MonitorService, TrainerService
from stream.settings import Settings

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """The live objects of one worker, reachable from the agents and from tests
    (``app.streamrec``)."""

    settings: Settings
    metrics: StreamrecMetrics
    join: JoinService
    trainer: TrainerService
    monitor: MonitorService
    indexer: IndexerService
    started_at: float = field(default_factory=time.time)

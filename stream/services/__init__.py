"""The worker's stages as plain objects; the Faust agents in :mod:`stream.app` are thin
wrappers that move bytes between topics and these objects. Everything here is testable
without Kafka.

One module per room: join, trainer, dedup, monitor, indexer.
"""

from stream.services.control import control_bytes
from stream.services.dedup import SeenKeys
from stream.services.indexer import IndexerService
from stream.services.join import JoinService, JoinState, MemoryJoinState, _pending_value, segment_of
from stream.services.monitor import MonitorService
from stream.services.trainer import Catalogue, StepResult, TakenBatch, TrainerService, _FncThen

__all__ = [
    "Catalogue",
    "IndexerService",
    "JoinService",
    "JoinState",
    "MemoryJoinState",
    "MonitorService",
    "SeenKeys",
    "StepResult",
    "TakenBatch",
    "TrainerService",
    "_FncThen",
    "_pending_value",
    "control_bytes",
    "segment_of",
]

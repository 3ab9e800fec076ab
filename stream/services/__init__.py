"""The worker's stages as plain objects; the Faust agents in :mod:`stream.agents` are thin
wrappers that move bytes between topics and these objects. Everything here is testable
without Kafka.

One module per room: join (its durable state in join_state), trainer (its catalogue in
catalogue), dedup, monitor, indexer, follower (the feature stages of workers that serve
without joining).
"""

from stream.services.catalogue import Catalogue
from stream.services.dedup import SeenKeys
from stream.services.follower import FeatureFollower
from stream.services.indexer import IndexerService
from stream.services.join import JoinService, segment_of
from stream.services.join_state import JoinState, MemoryJoinState
from stream.services.monitor import MonitorService
from stream.services.trainer import StepResult, TakenBatch, TrainerService

__all__ = [
    "Catalogue",
    "FeatureFollower",
    "IndexerService",
    "JoinService",
    "JoinState",
    "MemoryJoinState",
    "MonitorService",
    "SeenKeys",
    "StepResult",
    "TakenBatch",
    "TrainerService",
    "segment_of",
]

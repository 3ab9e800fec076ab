"""Historical features computed from the event stream (a plain library: no Kafka, no Faust).

:class:`features.stage.FeatureStage` turns impressions and clicks, in arrival order, into
point-in-time ``hist_*`` numerics and the ``hist_seq`` / ``hist_seq_age`` behaviour
sequence of the history contract (see ``learners.encoding``).
"""

from features.config import FeatureConfig
from features.stage import FeatureStage, PeekCache

__all__ = ["FeatureConfig", "FeatureStage", "PeekCache"]

"""Online serving as a plain library: retrieve with FAISS, rank, calibrate, cut to ``k``
(:class:`Recommender`), and micro-batching of concurrent requests (:class:`RequestBatcher`).
No HTTP, Kafka or asyncio here: ``stream`` wires it to the web routes (``stream.gate``)."""

from serving.batching import RequestBatcher
from serving.recommender import (
    Recommender,
    ServingConfig,
    ServingError,
    recommend_many,
)

__all__ = ["Recommender", "RequestBatcher", "ServingConfig", "ServingError", "recommend_many"]

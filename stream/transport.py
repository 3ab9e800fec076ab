"""Faust's aiokafka transport with the consumer's fetch wait taken from the settings.

faust-streaming 0.15 builds its worker consumer with ``fetch_max_wait_ms=1500``, fixed.
Apache Kafka answers a waiting fetch as soon as a record arrives, so there the value only
bounds how long an idle fetch is held. The embedded broker (Tansu) holds a fetch longer:
a record on a quiet topic reached an aiokafka consumer after 0.38 s (median, one record
every 0.37 s) with 1,500 ms and after 0.02 s with 100 ms, on this machine. Each hop of
the pipeline (impressions -> joiner, labeled -> trainer, scored -> monitor) paid that
wait, which bounded label -> update from below. :class:`StreamrecApp` uses
``Settings.fetch_max_wait_s`` instead (default 0.1 s).

The override sets one attribute of aiokafka's consumer before it starts (the value its
fetcher is built from); :func:`set_fetch_max_wait` fails loudly if a new aiokafka renames
it, and a unit test checks it on the pinned versions.
"""

from __future__ import annotations

from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

__all__ = ["StreamrecApp", "set_fetch_max_wait"]


def set_fetch_max_wait(consumer: aiokafka.AIOKafkaConsumer, seconds: float) -> None:
    """Set an unstarted aiokafka consumer's fetch wait (its fetcher is built at start)."""
    if not hasattr(consumer, "_fetch_max_wait_ms"):
        raise RuntimeError(
            "aiokafka's consumer has no _fetch_max_wait_ms: this aiokafka version is not "
            "supported by stream.transport (pyproject.toml allows aiokafka <0.15)"
        )
    consumer._fetch_max_wait_ms = max(1, round(seconds * 1000))


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        wait_s = getattr(self.app, "fetch_max_wait_s", None)
        if wait_s is not None:
            set_fetch_max_wait(consumer, wait_s)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class StreamrecApp(faust.App):
    """A :class:`faust.App` whose worker consumer waits at most ``fetch_max_wait_s`` for
    a fetch (``None``: Faust's 1.5 s). Only the ``kafka://`` (aiokafka) transport."""

    #: create_app sets it from ``Settings.fetch_max_wait_s`` (the one default)
    fetch_max_wait_s: float | None = None

    def _new_transport(self) -> Any:
        url = self.conf.broker_consumer[0]
        if faust.transport.by_url(url) is not faust_aiokafka.Transport:
            return super()._new_transport()
        return _Transport(self.conf.broker_consumer, self)  # its loop resolved lazily

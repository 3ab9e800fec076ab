"""The worker's consumer takes its fetch wait from the settings (stream.transport)."""

from __future__ import annotations

import faust
import pytest

from stream.app import create_app
from stream.settings import Settings
from stream.transport import StreamrecApp, set_fetch_max_wait


def _worker_consumer(app: faust.App) -> object:
    # the aiokafka consumer Faust's consumer thread builds (unstarted: no broker needed)
    return app.consumer._thread._create_worker_consumer(app.transport)  # type: ignore[attr-defined]


async def test_the_worker_consumer_waits_the_configured_fetch_time(tmp_path: object) -> None:
    settings = Settings(fetch_max_wait_s=0.05, data_dir=str(tmp_path), table_store="memory")
    app = create_app(settings)
    assert isinstance(app, StreamrecApp)
    assert _worker_consumer(app)._fetch_max_wait_ms == 50  # type: ignore[attr-defined]


async def test_faust_alone_would_wait_1500_ms() -> None:
    # what the override is for: if Faust makes this configurable, use its setting instead
    app = faust.App("plain", broker="kafka://127.0.0.1:9092")
    assert _worker_consumer(app)._fetch_max_wait_ms == 1500  # type: ignore[attr-defined]


def test_an_aiokafka_without_the_attribute_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="not supported"):
        set_fetch_max_wait(object(), 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), 31.0])
def test_a_fetch_wait_outside_0_30_s_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="fetch_max_wait_s"):
        Settings(fetch_max_wait_s=bad)

"""Worker roles: which agents, timers, table and consumer group each role gets (the app is
built, not started: no broker needed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stream.app import JOIN_TABLE, create_app, group_id
from stream.segments import SegmentedState
from stream.services import MemoryJoinState
from stream.settings import Settings, load_settings


def build(role: str, tmp_path: Path) -> tuple[object, set[str]]:
    settings = Settings(broker="127.0.0.1:1", role=role, data_dir=str(tmp_path / role))
    app = create_app(settings)
    return app, set(app.agents)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("role", "agents", "table", "group"),
    [
        ("all", {"joiner", "trainer", "monitor"}, True, "streamrec"),
        ("joiner", {"joiner"}, True, "streamrec"),
        ("trainer", {"trainer", "monitor"}, False, "streamrec-trainer"),
    ],
)
def test_each_role_runs_its_side_of_the_pipeline(
    tmp_path: Path, role: str, agents: set[str], table: bool, group: str
) -> None:
    app, names = build(role, tmp_path)
    assert names == agents
    assert (JOIN_TABLE in app.tables) is table  # type: ignore[attr-defined]
    assert app.conf.id == group  # type: ignore[attr-defined]
    state = app.streamrec.join.state  # type: ignore[attr-defined]
    assert isinstance(state, SegmentedState if table else MemoryJoinState)
    tasks = {t.__name__ for t in app._app_tasks}  # type: ignore[attr-defined]
    assert {"gauges", "control_listener"} <= tasks  # every role: metrics and control
    assert ("labeled_flusher" in tasks) is table
    # only a role that trains builds the ranker and two-tower (~90 MB with the defaults)
    assert app.streamrec.trainer.models_built is ("trainer" in agents)  # type: ignore[attr-defined]
    assert (
        {"trainer_flusher", "indexer"} <= tasks
        if "trainer" in agents
        else not ({"trainer_flusher", "indexer"} & tasks)
    )


def test_a_trainer_worker_is_its_own_consumer_group() -> None:
    assert group_id(Settings(app_id="x")) == "x"
    assert group_id(Settings(app_id="x", role="joiner")) == "x"
    assert group_id(Settings(app_id="x", role="trainer")) == "x-trainer"


def test_an_unknown_role_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        Settings(role="both")
    assert load_settings(env={"STREAMREC_ROLE": "joiner"}).role == "joiner"


def test_a_serve_worker_trains_nothing_and_needs_a_model_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model store"):
        Settings(role="serve")
    settings = Settings(broker="127.0.0.1:1", role="serve", data_dir=str(tmp_path / "s"),
                        model_store=str(tmp_path / "models"), web_port=1)  # fmt: skip
    app = create_app(settings)
    assert set(app.agents) == {"serve-control"}  # type: ignore[attr-defined]
    assert JOIN_TABLE not in app.tables  # type: ignore[attr-defined]
    assert app.conf.id == "streamrec-serve"  # type: ignore[attr-defined]
    tasks = {t.__name__ for t in app._app_tasks}  # type: ignore[attr-defined]
    assert {"control_listener", "store_refresher"} <= tasks
    assert not ({"trainer_flusher", "indexer", "labeled_flusher"} & tasks)
    assert app.replica is not None  # type: ignore[attr-defined]
    assert app.streamrec.trainer.store is None  # type: ignore[attr-defined]  # never publishes
    assert not app.streamrec.trainer.models_built  # type: ignore[attr-defined]  # the store's
    env = {"STREAMREC_ROLE": "serve", "STREAMREC_MODEL_STORE": "/models/store"}
    assert load_settings(env=env).model_store == "/models/store"


def test_a_training_role_fails_at_start_up_on_a_bad_warm_start(tmp_path: Path) -> None:
    """The models of a training role are built with the app, not at the first batch."""
    bad = tmp_path / "ranker.pt"
    bad.write_bytes(b"not a checkpoint")
    settings = Settings(broker="127.0.0.1:1", role="trainer", data_dir=str(tmp_path / "t"))
    settings = dataclasses.replace(
        settings, trainer=dataclasses.replace(settings.trainer, warm_start=str(bad))
    )
    with pytest.raises(ValueError, match="ranker.pt is not a readable streamrec checkpoint"):
        create_app(settings)
    serve = Settings(broker="127.0.0.1:1", role="serve", data_dir=str(tmp_path / "s"),
                     model_store=str(tmp_path / "models"))  # fmt: skip
    serve = dataclasses.replace(
        serve, trainer=dataclasses.replace(serve.trainer, warm_start=str(bad))
    )
    create_app(serve)  # a replica never reads the warm start: its models come from the store

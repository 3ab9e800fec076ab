"""The feature follower (workers that serve without joining): fed the same input records
as the joiner, its stages give the same ``peek`` values as the joiner's own stages; bad
records are skipped and counted; its gauges move; the serve and trainer roles' recommenders
read it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, Click, Impression, Watermark
from monitoring.metrics import StreamrecMetrics
from stream.agents import FeatureFollowerAgent
from stream.app import create_app
from stream.envelope import encode_envelope
from stream.join import JoinConfig
from stream.producer import partition_of
from stream.services import FeatureFollower, JoinService, MemoryJoinState
from stream.settings import Settings

T0 = 1_700_000_000.0
P = 4
SETTINGS = Settings(
    partitions=P,
    join=JoinConfig(window_s=60.0, lateness_s=5.0, orphan_grace_s=30.0, dedup_horizon_s=300.0),
    features=True,
)
USERS = [f"u{k}" for k in range(30)]  # every partition has users
ITEMS = [f"i{k}" for k in range(8)]


def records(n: int, seed: int) -> list[tuple[str, int, bytes]]:
    """(topic, partition, raw) in arrival order: single JSON events, envelopes of several,
    clicks (some before their impression), out-of-order times, duplicates, watermarks."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, int, bytes]] = []
    env: dict[tuple[str, int], list[dict[str, object]]] = {}
    for i in range(n):
        user = USERS[int(rng.integers(len(USERS)))]
        p = partition_of(user.encode(), P)
        ts = T0 + i + float(rng.uniform(-20, 0))  # out of order by up to 20 s
        imp = Impression(f"imp-{i}", ts, user, ITEMS[int(rng.integers(len(ITEMS)))],
                         position=int(rng.integers(1, 4)),
                         features={"item_cat": f"c{i % 3}"})  # fmt: skip
        click = Click(imp.impression_id, ts + float(rng.uniform(1, 30)), user)
        clicked = rng.random() < 0.3
        if clicked and rng.random() < 0.2:  # the click arrives first
            out.append((TOPIC_CLICKS, p, click.to_json()))
        if rng.random() < 0.5:  # an envelope of a few events
            env.setdefault((TOPIC_IMPRESSIONS, p), []).append(imp.to_dict())
        else:
            out.append((TOPIC_IMPRESSIONS, p, imp.to_json()))
        if rng.random() < 0.05:  # a duplicate
            out.append((TOPIC_IMPRESSIONS, p, imp.to_json()))
        if clicked:
            env.setdefault((TOPIC_CLICKS, p), []).append(json.loads(click.to_json()))
        for (topic, q), evs in list(env.items()):
            if len(evs) >= 3:
                out.append((topic, q, encode_envelope(topic, evs)))
                del env[(topic, q)]
        if i % 40 == 39:
            out += [(t, q, Watermark(ts).to_json()) for t in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)
                    for q in range(P)]  # fmt: skip
    for (topic, q), evs in env.items():
        out.append((topic, q, encode_envelope(topic, evs)))
    return out


def bad_records() -> list[tuple[str, int, bytes | None]]:
    """Records the joiner dead-letters (whole or in part)."""
    good = Impression("ok-1", T0 + 5.0, USERS[0], ITEMS[0]).to_dict()
    return [
        (TOPIC_IMPRESSIONS, 0, b"{not json"),
        (TOPIC_IMPRESSIONS, 1, None),
        (TOPIC_CLICKS, 2, b'{"impression_id": 7}'),
        (TOPIC_IMPRESSIONS, 3, b"\xffSRE\x09garbage"),  # an unsupported envelope version
        (TOPIC_IMPRESSIONS, 0, b"\xffSRE\x01\x00\x01"),  # a broken envelope
        # an envelope with one bad event among good ones: only the bad one is skipped
        (TOPIC_IMPRESSIONS, partition_of(USERS[0].encode(), P),
         encode_envelope(TOPIC_IMPRESSIONS, [good, {"impression_id": "x"}])),
        # far in the future: the joiner refuses it (future_ts)
        (TOPIC_IMPRESSIONS, 0, Impression("fut", 4.0e9, USERS[1], ITEMS[1]).to_json()),
    ]  # fmt: skip


def joined(recs: list[tuple[str, int, bytes | None]]) -> JoinService:
    """The joiner itself over the same records, per partition in the same order."""
    join = JoinService(SETTINGS, StreamrecMetrics(), MemoryJoinState())
    for offset, (topic, p, raw) in enumerate(recs):
        join.handle_record(raw, topic, p, offset)
    return join


def followed(recs: list[tuple[str, int, bytes | None]]) -> FeatureFollower:
    follower = FeatureFollower.from_settings(SETTINGS)
    for offset, (topic, p, raw) in enumerate(recs):
        follower.apply_record(raw, topic, p, offset)
    return follower


def assert_same_peeks(follower: FeatureFollower, join: JoinService, at: float) -> int:
    """Every user x item x position's peek equal; returns how many were non-empty."""
    nonempty = 0
    for user in USERS:
        p = partition_of(user.encode(), P)
        mine, theirs = follower.stage_for(user), join.features.get(p)
        assert (mine is None) == (theirs is None), user
        if mine is None or theirs is None:
            continue
        for item in ITEMS:
            for pos in (1, 2, None):
                ctx = {"item_cat": "c1"}
                got = mine.peek(at, user, item, pos, ctx)
                assert got == theirs.peek(at, user, item, pos, ctx), (user, item, pos)
                nonempty += got.get("hist_ui_n", 0.0) > 0  # type: ignore[operator]
    return nonempty


@pytest.mark.parametrize("seed", [0, 1])
def test_the_follower_peeks_what_the_joiners_stages_peek(seed: int) -> None:
    recs: list[tuple[str, int, bytes | None]] = list(records(600, seed))
    join, follower = joined(recs), followed(recs)
    assert follower.skipped == {}
    assert {partition_of(u.encode(), P) for u in USERS} == set(range(P))
    assert sorted(follower.stages) == sorted(join.features) == list(range(P))
    for p, stage in follower.stages.items():
        assert stage.state_dict() == join.features[p].state_dict()
    # mid-stream (out-of-order window) and after the end
    assert assert_same_peeks(follower, join, T0 + 300.0) > 0
    assert assert_same_peeks(follower, join, T0 + 10_000.0) > 50


def test_bad_records_are_skipped_and_counted_never_raised() -> None:
    recs = list(records(200, 2))
    bad = bad_records()
    mixed = recs[:100] + bad + recs[100:]
    join, follower = joined(mixed), followed(mixed)
    # None and "{not json" do not parse; a click without a string id and an enveloped
    # impression without its fields miss fields
    assert follower.skipped == {"bad_json": 2, "missing_field": 2, "unsupported_version": 1,
                                "bad_envelope": 1, "future_ts": 1}  # fmt: skip
    assert_same_peeks(follower, join, T0 + 10_000.0)
    for p, stage in follower.stages.items():
        assert stage.state_dict() == join.features[p].state_dict()
    st = follower.stage_for(USERS[0])
    assert st is not None and "ok-1" in st.state_dict()["imps"]  # its envelope's good event
    assert follower.n_records == len(mixed)


def test_wiring_errors_are_clear() -> None:
    f = FeatureFollower.from_settings(SETTINGS)
    with pytest.raises(ValueError, match="reads 'impressions' and 'clicks'"):
        f.apply_record(b"{}", "labeled", 0, 0)
    with pytest.raises(ValueError, match="partition 4 outside 0..3"):
        f.apply_record(b"{}", TOPIC_IMPRESSIONS, 4, 0)
    with pytest.raises(ValueError, match="partitions"):
        FeatureFollower(f.config, 0)
    with pytest.raises(ValueError, match="feature_follow_from"):
        Settings(feature_follow_from="middle")


def test_staleness_and_state_gauges_move() -> None:
    now = [T0 + 100.0]
    follower = FeatureFollower.from_settings(SETTINGS, clock=lambda: now[0])
    metrics = StreamrecMetrics()
    agent = FeatureFollowerAgent(None, SETTINGS, metrics, follower)
    reg = metrics.registry
    assert math.isinf(follower.staleness_s())
    agent.update_gauges()
    assert reg.get_sample_value("streamrec_feature_follower_staleness_seconds") == 0.0  # unset
    imp = Impression("a", T0 + 90.0, "u1", "i1")
    follower.apply_record(imp.to_json(), TOPIC_IMPRESSIONS, partition_of(b"u1", P), 0)
    agent.update_gauges()
    assert reg.get_sample_value("streamrec_feature_follower_staleness_seconds") == 10.0
    bytes_1 = reg.get_sample_value("streamrec_feature_follower_state_bytes")
    assert bytes_1 is not None and bytes_1 > 0
    now[0] += 5.0
    follower.apply_record(Impression("b", T0 + 104.0, "u2", "i2").to_json(), TOPIC_IMPRESSIONS,
                          partition_of(b"u2", P), 0)  # fmt: skip
    follower.apply_record(b"junk", TOPIC_CLICKS, 0, 1)
    agent.update_gauges()
    assert reg.get_sample_value("streamrec_feature_follower_staleness_seconds") == 1.0
    assert reg.get_sample_value("streamrec_feature_follower_state_bytes") > bytes_1  # type: ignore[operator]
    assert reg.get_sample_value("streamrec_feature_follower_events_total") == 2.0
    assert (
        reg.get_sample_value("streamrec_feature_follower_skipped_total", {"reason": "bad_json"})
        == 1.0
    )
    agent.update_gauges()  # counters advance by what is new only
    assert reg.get_sample_value("streamrec_feature_follower_events_total") == 2.0


@pytest.mark.parametrize("role", ["serve", "trainer", "all", "joiner"])
def test_serving_roles_that_do_not_join_read_the_follower(role: str, tmp_path: Path) -> None:
    settings = Settings(broker="127.0.0.1:1", role=role, data_dir=str(tmp_path / role),
                        model_store=str(tmp_path / "models") if role == "serve" else "",
                        web_port=1)  # fmt: skip
    app = create_app(settings)
    follower = app.feature_follower  # type: ignore[attr-defined]
    tasks = {t.__name__ for t in app._app_tasks}
    if role in ("serve", "trainer"):
        assert isinstance(follower, FeatureFollower)
        assert "feature_follower" in tasks
        rec = app.recommender  # type: ignore[attr-defined]
        assert rec.history is not None
        follower.apply_record(Impression("a", T0, "u1", "i1").to_json(), TOPIC_IMPRESSIONS,
                              partition_of(b"u1", settings.partitions), 0)  # fmt: skip
        assert rec.history("u1") is follower.stage_for("u1") is not None
    else:  # a joining worker reads its own stages (the single-worker path unchanged)
        assert follower is None and "feature_follower" not in tasks
    off = create_app(
        settings.replace(
            feature_follow=False,
            data_dir=str(tmp_path / "off"),
            model_store=settings.model_store and str(tmp_path / "m2"),
        )
    )
    assert off.feature_follower is None  # type: ignore[attr-defined]


def test_a_replica_recommender_builds_the_joining_workers_rows() -> None:
    """The rows a serve/trainer worker ranks (history from its follower) equal those of a
    joining worker (history from its own stages) at the same instant: no skew."""
    from index.faiss_index import IndexHolder
    from serving.recommender import Recommender

    recs: list[tuple[str, int, bytes | None]] = list(records(300, 4))
    join, follower = joined(recs), followed(recs)

    def rec(history: object) -> Recommender:
        return Recommender(IndexHolder(), ranker=lambda: None, calibrator=lambda: None,  # type: ignore[arg-type,return-value]
                           history=history, clock=lambda: T0 + 400.0)  # type: ignore[arg-type]  # fmt: skip

    served = rec(follower.stage_for)
    joining = rec(lambda u: join.features.get(partition_of(u.encode(), P)))
    with_hist = 0
    for user in USERS[:10]:
        rows = served._rows(user, ITEMS, {"item_cat": "c2"})
        assert rows == joining._rows(user, ITEMS, {"item_cat": "c2"})
        with_hist += sum(any(k.startswith("hist_") for k in r) for r in rows)
    assert with_hist == 10 * len(ITEMS)

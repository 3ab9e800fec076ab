"""One impression cannot blow up the feature stage or poison the joiner's output (issue
19): at most ``max_attributes`` user x attribute keys per impression, no feature name past
the event limit, and the impression with its history survives a labelled batch and a
restart of the joiner."""

from __future__ import annotations

import json

import pytest

from features.config import MAX_HISTORY_FEATURES, MAX_NAME_LEN, FeatureConfig
from features.stage import FeatureStage
from logs.batches import decode_labeled, encode_labeled
from logs.events import (
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURES,
    MAX_STORED_FEATURES,
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Impression,
    Watermark,
)
from monitoring.metrics import StreamrecMetrics
from stream.services import JoinService, MemoryJoinState
from stream.settings import Settings

T0 = 1.7e9
LONG = "item_" + "x" * (MAX_FEATURE_NAME_LEN - 5)  # a valid name of the longest length


def test_the_limits_agree_across_packages() -> None:
    assert MAX_NAME_LEN == MAX_FEATURE_NAME_LEN
    assert MAX_STORED_FEATURES == MAX_FEATURES + MAX_HISTORY_FEATURES


def test_at_most_max_attributes_keys_per_impression_and_the_rest_counted() -> None:
    stage = FeatureStage(FeatureConfig(max_attributes=3))
    attrs = {f"item_a{k}": f"v{k}" for k in range(200)} | {"dev": "ios", "item_n": 2.0}
    feats = stage.impression("x", T0, "u", "i", 1, attrs)
    assert feats is not None
    assert stage.n_keys()["a"] == 3
    assert stage.stats["skipped_attributes"] == 197
    assert {k for k in feats if k.startswith("hist_u_")} == {
        f"hist_u_item_a{k}_{c}_{lab}" for k in range(3) for c in ("imp", "clk", "ctr")
        for lab in ("1h", "1d", "30d")
    }  # fmt: skip
    # a read (serving) applies the same rule and counts nothing
    assert set(stage.peek(T0 + 1, "u", "i", 1, attrs)) == set(feats) | {
        "hist_user_since_imp",
        "hist_ui_since_imp",
    }
    assert stage.stats["skipped_attributes"] == 197


def test_no_feature_name_exceeds_the_event_limit() -> None:
    stage = FeatureStage()
    feats = stage.impression("x", T0, "u", "i", 1, {LONG: "v", "item_cat": "c"})
    assert feats is not None
    assert max(map(len, feats)) <= MAX_FEATURE_NAME_LEN
    assert any(k.startswith("hist_u_item_cat_") for k in feats)
    assert stage.stats["skipped_attributes"] == 1


def test_too_many_history_features_are_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="historical features"):
        FeatureConfig(max_attributes=100)
    assert FeatureConfig().n_history_features <= MAX_HISTORY_FEATURES


def _imp(k: int, features: dict[str, str | float]) -> bytes:
    return Impression(f"x{k}", T0 + k, "u", f"i{k % 3}", 1, features).to_json()


def test_a_full_impression_with_its_history_is_labelled_and_survives_a_restart() -> None:
    """An input impression at the feature limit, with a longest-name attribute and the
    most attributes: its labelled batch decodes (the trainer would refuse the whole batch
    otherwise) and its pending state is read back after a restart (it was lost)."""
    full: dict[str, str | float] = {f"item_a{k}": f"v{k}" for k in range(20)}
    full[LONG] = "v"
    full |= {f"f{k}": float(k) for k in range(MAX_FEATURES - len(full))}
    assert len(full) == MAX_FEATURES
    state = MemoryJoinState()
    svc = JoinService(Settings(), StreamrecMetrics(), state)
    out = []
    for k in range(4):
        o, dead = svc.handle_record(_imp(k, full if k == 1 else {"item_cat": "c"}),
                                    TOPIC_IMPRESSIONS, 0, k)  # fmt: skip
        assert dead == []
        out += o
    restarted = JoinService(Settings(), StreamrecMetrics(), state)
    assert sorted(restarted.joiner(0).pending) == ["x0", "x1", "x2", "x3"]
    assert len(restarted.joiner(0).pending["x1"].features) > MAX_FEATURES
    for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
        out += restarted.handle_record(Watermark(T0 + 9000).to_json(), topic, 0, 9)[0]
    assert len(out) == 4
    back = decode_labeled(encode_labeled(out))
    assert [e.impression.impression_id for e in back] == [e.impression.impression_id for e in out]
    big = next(e for e in back if e.impression.impression_id == "x1")
    assert MAX_FEATURES < len(big.impression.features) <= MAX_STORED_FEATURES
    # the JSON form of older joiners reads the same
    raw = json.dumps({"examples": [e.to_dict() for e in out]}).encode()
    assert decode_labeled(raw) == back

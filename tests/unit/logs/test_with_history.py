"""``with_history``: the feature stage's values merged into an impression's features."""

from __future__ import annotations

import random

from features.config import ClickEvent, ImpressionEvent
from features.stage import FeatureStage
from logs.events import (
    MAX_FEATURE_VALUE_LEN,
    SEQ_SEP,
    Impression,
    example_row,
    with_history,
    without_history,
)


def _reference(imp: Impression, hist: dict[str, object]) -> dict[str, object]:
    """The merge written plainly: the impression's own hist_* dropped, every scalar as a
    float in the stage's order, then the sequence and its ages joined, cut from the end
    (oldest first) until both fit."""
    feats: dict[str, object] = without_history(imp.features)[0]
    for k, v in hist.items():
        if not isinstance(v, list):
            feats[k] = float(v)  # type: ignore[arg-type]
    seq, ages = hist.get("hist_seq"), hist.get("hist_seq_age")
    if isinstance(seq, list) and seq:
        items = [str(x) for x in seq]
        age_s = [repr(float(a)) for a in ages] if isinstance(ages, list) else []
        while items:
            width = max(len(SEQ_SEP.join(items)), len(SEQ_SEP.join(age_s[: len(items)])))
            if width <= MAX_FEATURE_VALUE_LEN:
                break
            items.pop()
        if items:
            feats["hist_seq"] = SEQ_SEP.join(items)
            feats["hist_seq_age"] = SEQ_SEP.join(age_s[: len(items)])
    return feats


def test_the_stages_values_merge_in_order_with_sequences_cut_to_the_value_limit() -> None:
    """Over a stage's real outputs (plain floats, absent recencies, sequences of every
    length up to one that must be cut) and impressions that bring hist_* fields of their
    own: the same features, values, types and key order as the plain merge."""
    rng = random.Random(4)
    stage = FeatureStage()
    long_id = "x" * (MAX_FEATURE_VALUE_LEN // 12)  # 12 such ids overflow the value limit
    seen = 0
    for i in range(400):
        user = f"u{rng.randrange(6)}"
        item = long_id + str(rng.randrange(40)) if rng.random() < 0.5 else f"i{rng.randrange(40)}"
        own = {"dev": "ios", "hist_forged": 9.0} if i % 7 == 0 else {"dev": "web"}
        imp = Impression(f"m{i}", 1_700_000_000.0 + i, user, item, 1, own)
        hist = stage.process(
            [ImpressionEvent(imp.impression_id, imp.ts, user, item, 1, imp.features)]
        )[0]
        assert hist is not None
        assert all(type(v) is float for v in hist.values() if not isinstance(v, list))
        if rng.random() < 0.6:  # clicked soon after
            stage.process([ClickEvent(imp.impression_id, imp.ts + 0.5, user)])
        got = with_history(imp, hist)
        want = _reference(imp, hist)
        assert list(got.features.items()) == list(want.items())
        assert all(type(v) is type(want[k]) for k, v in got.features.items())
        assert "hist_forged" not in got.features
        if "hist_seq" in got.features:
            seen += 1
            assert len(str(got.features["hist_seq"])) <= MAX_FEATURE_VALUE_LEN
            row = example_row(got)
            assert len(row["hist_seq"]) == len(row["hist_seq_age"])  # type: ignore[arg-type]
    assert seen > 100

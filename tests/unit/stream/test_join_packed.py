"""The joiner keeps labelled negatives packed: equal when unpacked, smaller in memory, and
the byte estimate the bounds rely on stays close to what tracemalloc sees."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np

from logs.events import Click, Impression
from stream.join import JoinConfig, OnlineJoiner
from stream.join_memory import PackedImpression, impression_bytes, pack_impression, packed_bytes


def decoded(n: int, seed: int = 0) -> list[Impression]:
    """Impressions as a worker holds them: decoded from JSON (every key a string of its
    own), 50 float hist_* features, two strings, an int and a list."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        feats: dict[str, object] = {f"hist_user_clk_{j}d": float(rng.random()) for j in range(50)}
        feats.update(item_genres="Drama|Thriller", ctx_device="ios", slot=3,
                     hist_seq=[f"m{int(k)}" for k in rng.integers(0, 500, 5)])  # fmt: skip
        d = {"impression_id": f"imp{i}", "ts": float(i), "user_id": f"u{i % 97}",
             "item_id": f"m{i % 300}", "position": i % 5, "features": feats}  # fmt: skip
        raw = json.loads(json.dumps(d))
        out.append(Impression(**raw))
    return out


def test_unpack_gives_back_an_equal_impression_and_schemas_are_shared() -> None:
    imps = decoded(20)
    imps[3] = Impression("odd", 1.0, "u", "i", features={"a": 1, "b": "x"}, true_p=0.2)
    schemas: dict = {}
    packed = [pack_impression(imp, schemas) for imp in imps]
    for imp, p in zip(imps, packed, strict=True):
        back = p.unpack()
        assert back == imp and list(back.features) == list(imp.features)
        assert all(type(back.features[k]) is type(v) for k, v in imp.features.items())
    assert len(schemas) == 2 and packed[0].schema is packed[1].schema
    assert len(packed[0].floats) == 50 and len(packed[0].others) == 4


def measure(objs_factory) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = objs_factory()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert kept
    return after - before


def test_packed_negatives_are_a_quarter_the_size_and_the_estimate_holds() -> None:
    n = 3_000
    schemas: dict = {}
    # What survives: the packed negatives (the impressions they came from are dropped).
    packed_real = measure(lambda: [pack_impression(imp, schemas) for imp in decoded(n)]) / n
    raw_real = measure(lambda: decoded(n, seed=1)) / n
    imps = decoded(n)
    packed = [pack_impression(imp, schemas) for imp in imps]
    est = np.mean([packed_bytes(p) for p in packed])
    raw_est = np.mean([impression_bytes(imp) for imp in imps])
    # measured: packed 1,367 B (estimate 1,274), unpacked 7,095 B (estimate 7,788)
    assert packed_real < 0.35 * raw_real, (packed_real, raw_real)
    assert 0.85 * packed_real <= est <= 1.5 * packed_real, (est, packed_real)
    assert est < 0.35 * raw_est


def test_a_late_click_on_a_packed_negative_emits_the_full_correction() -> None:
    j = OnlineJoiner(JoinConfig(window_s=10.0, emit_corrections=True))
    imp = decoded(1)[0]
    j.on_impression(imp)
    out = j.on_watermark(100.0, "impressions") + j.on_watermark(100.0, "clicks")
    assert [e.label for e in out] == [0]
    assert isinstance(j.done[imp.impression_id][2], PackedImpression)
    late = j.on_click(Click(imp.impression_id, imp.ts + 5.0))
    corrections = [e for e in late if e.kind == "correction"]
    assert len(corrections) == 1 and corrections[0].impression == imp

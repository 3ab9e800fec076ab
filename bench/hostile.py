"""Hostile input records, each with the dead-letter reason its one defect fixes.

Shared by the fuzz campaign (``tests/integration/test_fuzz.py``), the control-record tests
(``tests/unit/stream/test_hostile.py``) and the soak's hostile mode
(``python -m bench.soak --hostile-per-s N``):

- :func:`hostile_records`: bad ``impressions``/``clicks`` records (random bytes, invalid
  UTF-8, NaN/Infinity literals, ``ts`` = 1e300 and 10**400, huge integers, ids past every
  length limit, arrays, missing fields, duplicate keys, events from the future, broken
  envelopes, records at and above the 64 KiB event limit and the 1 MB record limit);
- :data:`HOSTILE_CONTROL`: bad ``control`` records with the reason each is rejected with.

Every record is a :class:`Bad`: the topic, the bytes, the reason and a tag for reports.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

from logs.events import MAX_EVENT_BYTES, TOPIC_CLICKS, TOPIC_IMPRESSIONS
from stream.envelope import ENVELOPE_MAGIC

__all__ = ["HOSTILE_CONTROL", "Bad", "hostile_records"]


@dataclass(frozen=True)
class Bad:
    """A record to send, the reason the worker must dead-letter it with, and a tag."""

    topic: str
    value: bytes
    reason: str
    kind: str


def _json(d: object) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def hostile_records(
    rng: random.Random, ts_range: tuple[float, float], n: int, *, oversized: bool = True
) -> list[Bad]:
    """``n`` bad input records, each with the reason its one defect fixes, shuffled.

    ``ts_range``: the (first, last) event time of the log they are mixed into, in epoch
    seconds. With ``oversized`` three more: one byte over the 64 KiB event limit, and
    records of 1 MB and 1.5 MB (over the broker's default 1 MB record limit).
    """
    lo, hi = ts_range
    now = time.time()
    I, C = TOPIC_IMPRESSIONS, TOPIC_CLICKS  # noqa: E741  # short: one per row below

    def imp(**over: object) -> dict[str, object]:
        d: dict[str, object] = {
            "impression_id": f"bad-{rng.getrandbits(40):010x}",
            "ts": round(rng.uniform(lo, hi), 3),
            "user_id": f"u{rng.randrange(500)}",
            "item_id": f"i{rng.randrange(500)}",
            "position": rng.randint(1, 3),
        }
        d.update(over)
        return {k: v for k, v in d.items() if v is not None}

    def junk(k: int) -> bytes:  # bytes >= 0x80: never valid UTF-8 JSON
        return bytes(rng.randrange(0x80, 0x100) for _ in range(k))

    makers = [
        lambda: Bad(I, junk(rng.randint(1, 64)), "bad_json", "random_bytes"),
        lambda: Bad(C, junk(rng.randint(1, 16)), "bad_json", "click_random_bytes"),
        lambda: Bad(I, b'{"impression_id":"\xc3\x28","ts":1}', "bad_json", "invalid_utf8"),
        lambda: Bad(I, b"[" * rng.randint(5_000, 20_000), "bad_json", "deep_nesting"),
        lambda: Bad(I, _json(imp()).replace(b'"ts":', b'"ts":NaN,"x":'), "non_finite",
                    "ts_nan"),
        lambda: Bad(I, _json(imp(ts=1e300)), "bad_timestamp", "ts_1e300"),
        lambda: Bad(I, _json(imp(ts=10**400)), "non_finite", "ts_huge_int"),
        lambda: Bad(I, _json(imp(position=10**40)), "bad_value", "position_huge_int"),
        lambda: Bad(I, _json(imp(impression_id=10**300)), "bad_value", "id_huge_int"),
        lambda: Bad(I, _json(imp(user_id="u" * rng.randint(257, 5_000))), "bad_value",
                    "id_too_long"),
        lambda: Bad(I, _json([imp(), imp()]), "not_an_object", "array"),
        lambda: Bad(I, _json(imp(item_id=None) | {"item_id": None}), "missing_field",
                    "missing_item"),
        lambda: Bad(I, _json(imp())[:-1] + b',"ts":"later"}', "bad_type", "duplicate_key"),
        lambda: Bad(I, _json(imp(ts=now + rng.uniform(3_600, 10**7))), "future_ts",
                    "future_impression"),
        lambda: Bad(C, _json({"impression_id": "x", "ts": now + 86_400}), "future_ts",
                    "future_click"),
        lambda: Bad(I, _json({"type": "watermark", "ts": now + 86_400}), "future_ts",
                    "future_watermark"),
        lambda: Bad(C, b'{"impression_id":"x","ts":Infinity}', "non_finite", "click_inf"),
        lambda: Bad(C, _json({"ts": round(rng.uniform(lo, hi), 3)}), "missing_field",
                    "click_missing_id"),
        lambda: Bad(I, _json(imp(features=[1, 2])), "bad_type", "features_array"),
        lambda: Bad(I, ENVELOPE_MAGIC + b"\x01" + junk(rng.randint(1, 40)), "bad_envelope",
                    "broken_envelope"),
        lambda: Bad(I, ENVELOPE_MAGIC + b"\x09", "unsupported_version", "envelope_v9"),
        # the second label's conversion events travel on clicks too
        lambda: Bad(C, _json({"impression_id": "x", "ts": round(rng.uniform(lo, hi), 3),
                              "type": "purchase"}), "bad_value", "click_unknown_type"),
        lambda: Bad(C, b'{"impression_id":"x","ts":Infinity,"type":"conversion"}',
                    "non_finite", "conversion_inf"),
        lambda: Bad(C, _json({"impression_id": "x", "ts": now + 86_400, "type": "conversion"}),
                    "future_ts", "future_conversion"),
    ]  # fmt: skip
    out = [rng.choice(makers)() for _ in range(n)]
    if not oversized:
        return out
    # at and above every size limit: the 64 KiB event, the 1 MB record, far above it
    pad = MAX_EVENT_BYTES - len(_json(imp(features={"f": ""}))) + 1
    out.append(Bad(I, _json(imp(features={"f": "x" * pad})), "too_large", "event_limit_plus_1"))
    for size in (1_000_000, 1_500_000):
        out.append(Bad(I, _json(imp(impression_id="x" * size)), "too_large", f"id_{size}"))
    rng.shuffle(out)
    return out


# --- control records --------------------------------------------------------------------

HOSTILE_CONTROL: list[tuple[bytes | None, str]] = [
    (b"", "bad_json"),
    (None, "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"[" * 200_000, "bad_json"),  # deep nesting: RecursionError inside json
    (_json([1, 2]), "not_an_object"),
    (_json({"version": 3}), "missing_field"),
    (_json({"kind": ["calibrator"]}), "missing_field"),
    (_json({"kind": "calibrator"}), "missing_field"),
    (_json({"kind": "calibrator", "version": "7", "params": {"a": 1, "b": 0}}), "bad_type"),
    (_json({"kind": "calibrator", "version": True, "params": {"a": 1, "b": 0}}), "bad_type"),
    (_json({"kind": "calibrator", "version": 1.5, "params": {"a": 1, "b": 0}}), "bad_type"),
    (_json({"kind": "calibrator", "version": -1, "params": {"a": 1, "b": 0}}), "bad_value"),
    (_json({"kind": "calibrator", "version": 10**30, "params": {"a": 1, "b": 0}}), "bad_value"),
    (_json({"kind": "calibrator", "version": 2, "params": []}), "bad_type"),
    (_json({"kind": "calibrator", "version": 2}), "bad_type"),
    (b'{"kind": "calibrator", "version": 2, "params": {"a": NaN, "b": 0}}', "non_finite"),
    (b'{"kind": "calibrator", "version": 2, "params": {"a": 1, "b": Infinity}}', "non_finite"),
    (_json({"kind": "calibrator", "version": 2, "params": {"a": 1, "b": 10**400}}),
     "non_finite"),
    (_json({"kind": "calibrator", "version": 2, "params": {"a": -3.0, "b": 0}}), "bad_value"),
    (_json({"kind": "calibrator", "version": 2, "params": {"kind": "nope"}}), "bad_value"),
    (_json({"kind": "calibrator", "version": 2, "params": {"kind": "isotonic", "x": [0.1],
                                                              "y": [0.2, 0.3]}}), "bad_value"),
    (_json({"kind": "calibrator", "version": 2, "params": {"kind": "isotonic",
              "x": [0.1, 0.9], "y": [0.9, 0.1]}}), "bad_value"),
    (b'{"kind": "calibrator", "version": 2, "params": {"a": 1, "b": 0}, "offset": NaN}',
     "bad_value"),
    (_json({"kind": "calibrator", "version": 2, "params": {"a": 1, "b": 0}, "offset": "0.4"}),
     "bad_value"),
    (_json({"kind": "calibrator", "version": 2, "params": {"a": 1, "b": 0}, "offset": 1e6}),
     "bad_value"),
    (_json({"kind": "model", "version": "latest", "path": "/etc/passwd"}), "bad_type"),
    (_json({"kind": "model", "version": 3, "path": ["x"]}), "bad_type"),
    (_json({"kind": "index", "version": {"a": 1}}), "bad_type"),
]  # fmt: skip

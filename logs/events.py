"""Event schemas, their topics and keys, and validation of raw bytes into them.

Input records travel as UTF-8 JSON (or batched envelopes, :mod:`stream.envelope`).
Agents receive *raw bytes* and call the ``parse_*`` / ``decode_*`` functions here, so that
a malformed record becomes an :class:`InvalidEvent` with a short machine-readable
``reason`` (a Prometheus label, bounded set) instead of an exception inside Faust's
deserialiser, which would drop it.

| topic         | key              | value                                                |
|---------------|------------------|------------------------------------------------------|
| impressions   | user_id          | :class:`Impression` or a watermark (JSON), envelope  |
| clicks        | user_id          | :class:`Click` (a click or a conversion) or a        |
|               |                  | watermark (JSON), envelope                           |
| labeled       | joiner partition | :class:`LabeledExample` s: :mod:`logs.batches`       |
| scored        | trainer          | ``ScoredBatch``: :mod:`logs.batches`                 |
| control       | kind             | typed records of :mod:`stream.control`               |
| dead-letter   | none             | :class:`DeadLetter`                                  |

``labeled`` and ``scored`` carry micro-batches rather than one record per example: in
Python a per-record produce costs ~0.3 ms, which would cap the pipeline near 3,000
examples/s on 2 cores; batches make the trainer and monitor hops nearly free. Both are
internal topics written by our own stages, in a versioned MessagePack form
(:mod:`logs.batches`) that a typed decoder validates in C: decoding ~60 features of
every example from JSON and checking them one by one in Python again was a tenth of the
worker's time.

Parsing interns user and item ids and feature names and string values
(:func:`sys.intern`): every record decodes into strings of its own, and the state that
keeps impressions for hours (the join's labelled negatives, the feature stage, the
trainer's per-user sets) would otherwise hold one copy per impression of a few thousand
distinct values. Interned strings are freed with their last reference.

>>> imp = parse_impression(b'{"impression_id": "a", "ts": 1700000000.5, "user_id": "u1",'
...                        b' "item_id": "i1", "position": 2, "features": {"dev": "ios"}}')
>>> imp.position, imp.features
(2, {'dev': 'ios'})
>>> parse_click(b'{"impression_id": "a", "ts": "soon"}')
Traceback (most recent call last):
...
logs.events.InvalidEvent: bad_type: field 'ts' must be a number, got str
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from sys import intern
from typing import Any, TypeVar

TOPIC_IMPRESSIONS = "impressions"
TOPIC_CLICKS = "clicks"
TOPIC_LABELED = "labeled"
TOPIC_SCORED = "scored"
TOPIC_CONTROL = "control"
TOPIC_DEAD_LETTER = "dead-letter"

#: Event times outside this range are rejected as absurd (epoch seconds, 1990-01-01 .. 2100):
#: the lower bound admits every public interaction log (MovieLens' ratings start in 1995;
#: ``streamrec convert-movielens`` writes them as they are) and still rejects relative
#: seconds and other small numbers; the upper one, milliseconds sent as seconds.
MIN_TS = 631_152_000.0
MAX_TS = 4_102_444_800.0
MAX_ID_LEN = 256
MAX_FEATURES = 256
#: an impression the joiner keeps or labels carries its historical features too (at most
#: ``features.config.MAX_HISTORY_FEATURES`` more): the limit on stored and ``labeled``
#: impressions, which were validated against :data:`MAX_FEATURES` when they came in
MAX_STORED_FEATURES = MAX_FEATURES + 512
MAX_FEATURE_NAME_LEN = 128
MAX_FEATURE_VALUE_LEN = 1024
MAX_EVENT_BYTES = 64 * 1024

#: The bounded set of dead-letter reasons (used as a metric label).
REASONS = (
    "bad_json",
    "not_an_object",
    "too_large",
    "missing_field",
    "bad_type",
    "non_finite",
    "bad_timestamp",
    "bad_value",
    "orphan_click",  # a click whose impression never came within join.orphan_grace_s
    "processing_error",  # a record the code failed on (a bug): kept, not retried forever
    "bad_envelope",  # a binary record (envelope, labeled, scored) that cannot be decoded
    "unsupported_version",  # a binary record of a format version this worker does not read
    "future_ts",  # event time beyond the worker's clock + Settings.max_future_skew_s
)


class InvalidEvent(ValueError):
    """A record that cannot be accepted; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Impression:
    """An item shown to a user. ``ts``: event time, epoch seconds (UTC).

    ``true_p`` (synthetic logs only) is carried for monitoring and never used as a feature.
    """

    impression_id: str
    ts: float
    user_id: str
    item_id: str
    position: int | None = None
    features: dict[str, str | float] = field(default_factory=dict)
    served_score: float | None = None
    model_version: int | None = None
    true_p: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this impression (None fields left out). Written by hand:
        ``dataclasses.asdict`` deep-copies and was the joiner's largest cost."""
        d: dict[str, Any] = {
            "impression_id": self.impression_id,
            "ts": self.ts,
            "user_id": self.user_id,
            "item_id": self.item_id,
        }
        if self.position is not None:
            d["position"] = self.position
        d["features"] = self.features
        if self.served_score is not None:
            d["served_score"] = self.served_score
        if self.model_version is not None:
            d["model_version"] = self.model_version
        if self.true_p is not None:
            d["true_p"] = self.true_p
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class Click:
    """A click on an impression. ``ts``: event time of the click, epoch seconds.

    ``conversion``: this record is the impression's SECOND outcome (a conversion after
    its click, ``"type": "conversion"`` in JSON) rather than its click. Conversions travel
    on the ``clicks`` topic, keyed like clicks, so they reach the joiner partition that
    holds their impression, in event-time order with the clicks (their watermarks cover
    both); the joiner attaches them within ``join.conversion_window_s`` of the click.

    ``user_id`` (optional): the clicking user. Impressions and clicks are partitioned by
    ``user_id`` (per-user feature state is partition-local); a click without one is keyed
    by its ``impression_id`` instead and, with more than one partition, may land on
    another partition than its impression and end as an orphan.
    """

    impression_id: str
    ts: float
    user_id: str | None = field(default=None, repr=False)
    conversion: bool = False

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"impression_id": self.impression_id, "ts": self.ts}
        if self.user_id is not None:
            d["user_id"] = self.user_id
        if self.conversion:
            d["type"] = "conversion"
        return json.dumps(d).encode()


@dataclass(frozen=True, slots=True)
class Watermark:
    """A producer's promise that no later record on this partition has ``ts`` below this.

    ``replay`` sends one to every partition of ``impressions`` and ``clicks`` periodically
    and at the end of a log, so the joiner's event time advances even on quiet partitions.
    """

    ts: float

    def to_json(self) -> bytes:
        return json.dumps({"type": "watermark", "ts": self.ts}).encode()


@dataclass(frozen=True, slots=True)
class LabeledExample:
    """An impression with its label.

    ``kind``: ``positive`` (click inside the window), ``negative`` (window closed without
    a click), ``correction`` (a click that arrived after its negative was emitted) or
    ``fake_negative`` (``join.delayed_feedback="fake_negative"``: every impression at once,
    label 0; its click, if any, follows as a ``positive``).
    ``label_ts``: event time at which the label became known, epoch seconds.

    ``label2`` (the second label, ``join.conversion_window_s`` set; None: not known by
    this record): "clicked and converted" (CTCVR) of the impression. Records of every
    impression not clicked carry 0 (final, or provisional as their click label is); a
    clicked impression's comes in a record of its own, kind ``conversion`` (1, at the
    conversion) or ``no_conversion`` (0, when the conversion window closes), with label 1
    and WEIGHT 0: it teaches the second task only, its click was sent already.
    """

    impression: Impression
    label: int
    label_ts: float
    weight: float = 1.0
    kind: str = "positive"
    label2: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.impression.to_dict()
        d.update(label=self.label, label_ts=self.label_ts, weight=self.weight, kind=self.kind)
        if self.label2 is not None:
            d["label2"] = self.label2
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> LabeledExample:
        imp = _impression_from_obj(d, stored=True)
        label = d.get("label")
        if label not in (0, 1):
            raise InvalidEvent("bad_value", f"label must be 0 or 1, got {label!r}")
        label2 = d.get("label2")
        if label2 is not None and (isinstance(label2, bool) or label2 not in (0, 1)):
            raise InvalidEvent("bad_value", f"label2 must be 0, 1 or absent, got {label2!r}")
        return LabeledExample(
            impression=imp,
            label=int(label),
            label_ts=_ts(d, "label_ts"),
            weight=_finite(d, "weight", required=False, default=1.0),
            kind=str(d.get("kind", "positive")),
            label2=None if label2 is None else int(label2),
        )


#: kinds of the records that teach the second label only (weight 0 for the click)
TASK1_KINDS = frozenset({"conversion", "no_conversion"})


#: Bytes of a rejected record's value that its dead letter keeps (base64 in ``raw_b64``);
#: the whole value is identified by ``raw_size`` and ``raw_sha256``. Bounded, so a dead
#: letter never exceeds the record limit and holds little of a hostile or personal payload.
DEAD_LETTER_PREFIX_BYTES = 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record: where it came from, why, the first
    :data:`DEAD_LETTER_PREFIX_BYTES` of its value (base64), and the value's size in bytes
    and SHA-256 (hex)."""

    topic: str
    partition: int
    offset: int
    reason: str
    detail: str
    raw_b64: str
    raw_size: int = 0
    raw_sha256: str = ""

    @staticmethod
    def of(
        topic: str, partition: int, offset: int, exc: InvalidEvent, raw: bytes | None
    ) -> DeadLetter:
        """``raw`` None (a null-value record) is kept as an empty ``raw_b64``."""
        raw = raw or b""
        return DeadLetter(
            topic, partition, offset, exc.reason, exc.detail[:500],
            base64.b64encode(raw[:DEAD_LETTER_PREFIX_BYTES]).decode(), len(raw),
            hashlib.sha256(raw).hexdigest(),
        )  # fmt: skip

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()


# --- parsing -----------------------------------------------------------------------------


def load_object(raw: bytes | str | None, max_bytes: int | None = MAX_EVENT_BYTES) -> dict[str, Any]:
    """A JSON object of at most ``max_bytes`` UTF-8 bytes (None: no limit); raises
    :class:`InvalidEvent` (``bad_json``, ``too_large``, ``not_an_object``)."""
    if raw is None:
        raise InvalidEvent("bad_json", "a null-value record (tombstone): no event")
    if max_bytes is not None:
        # the limit is on UTF-8 bytes: a str (e.g. re-encoded state) is measured encoded
        size = len(raw) if isinstance(raw, bytes | bytearray) else len(raw.encode(errors="replace"))
        if size > max_bytes:
            raise InvalidEvent("too_large", f"{size} bytes > {max_bytes}")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting recurses
        raise InvalidEvent("bad_json", str(exc)[:200]) from None
    return as_object(obj)


def as_object(obj: object) -> dict[str, Any]:
    """``obj`` if it is a JSON object (dict); else :class:`InvalidEvent` ``not_an_object``."""
    if not isinstance(obj, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def normalize_id(s: str) -> str:
    """An id in Unicode normal form C: a precomposed ``é`` and ``e`` + combining acute
    accent are the same id (the same user, item or impression), however a producer spelled
    it. ASCII ids, the common case, are returned as they are (no copy).

    >>> normalize_id("cafe\u0301") == normalize_id("caf\u00e9") == "caf\u00e9"
    True
    """
    return s if s.isascii() else unicodedata.normalize("NFC", s)


def _str_id(d: Mapping[str, Any], name: str) -> str:
    """The id ``d[name]``: a string, or an integer as its decimal string (``12`` is the
    id ``"12"``), NFC-normalised (:func:`normalize_id`), of 1..``MAX_ID_LEN`` characters."""
    if name not in d or d[name] is None:
        raise InvalidEvent("missing_field", f"field {name!r} is required")
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise InvalidEvent("bad_type", f"field {name!r} must be a string, got {type(v).__name__}")
    s = normalize_id(v) if isinstance(v, str) else str(v)
    if not s or len(s) > MAX_ID_LEN:
        raise InvalidEvent("bad_value", f"field {name!r} must have 1..{MAX_ID_LEN} characters")
    return s


def _finite(
    d: Mapping[str, Any], name: str, *, required: bool = True, default: float | None = None
) -> Any:
    v = d.get(name)
    if v is None:
        if required:
            raise InvalidEvent("missing_field", f"field {name!r} is required")
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidEvent("bad_type", f"field {name!r} must be a number, got {type(v).__name__}")
    f = _float(v)
    if not math.isfinite(f):
        raise InvalidEvent("non_finite", f"field {name!r} is {str(v)[:50]}")
    return f


def _float(v: int | float) -> float:
    """``float(v)``, but an integer too large for a float becomes ``inf``, not an error."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _ts(d: Mapping[str, Any], name: str = "ts") -> float:
    ts: float = _finite(d, name)
    if not MIN_TS <= ts < MAX_TS:
        raise InvalidEvent(
            "bad_timestamp", f"{name}={ts!r} is outside [{MIN_TS:.0f}, {MAX_TS:.0f}) epoch s"
        )
    return ts


def _features(d: Mapping[str, Any], max_features: int = MAX_FEATURES) -> dict[str, str | float]:
    raw = d.get("features")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidEvent("bad_type", "field 'features' must be an object")
    if len(raw) > max_features:
        raise InvalidEvent("too_large", f"{len(raw)} features > {max_features}")
    out: dict[str, str | float] = {}
    for k, v in raw.items():
        if len(k) > MAX_FEATURE_NAME_LEN:
            raise InvalidEvent("too_large", f"feature name longer than {MAX_FEATURE_NAME_LEN}")
        if k in RESERVED_FEATURE_NAMES:
            raise InvalidEvent("bad_value", f"feature name {k!r} is reserved")
        if v is None:
            continue
        if isinstance(v, str):
            if len(v) > MAX_FEATURE_VALUE_LEN:
                raise InvalidEvent("too_large", f"feature {k!r} longer than limit")
            out[intern(k)] = intern(v)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            f = _float(v)
            if not math.isfinite(f):
                raise InvalidEvent("non_finite", f"feature {k!r} is {str(v)[:50]}")
            out[intern(k)] = f
        else:
            raise InvalidEvent("bad_type", f"feature {k!r} must be a string or a number")
    return out


RESERVED_FEATURE_NAMES = frozenset(
    {"ts", "impression_id", "user_id", "item_id", "position", "click", "click_ts", "true_p",
     "propensity"}
)  # fmt: skip


def _impression_from_obj(d: Mapping[str, Any], stored: bool = False) -> Impression:
    """The validated impression of the object ``d``; ``stored``: one the joiner kept or
    labelled, with its historical features (up to :data:`MAX_STORED_FEATURES` features)."""
    position = d.get("position")
    if position is not None:
        if isinstance(position, bool) or not isinstance(position, int):
            raise InvalidEvent("bad_type", "field 'position' must be an integer")
        if not 1 <= position <= 10_000:
            raise InvalidEvent("bad_value", f"position {position} outside 1..10000")
    true_p = _finite(d, "true_p", required=False)
    if true_p is not None and not 0.0 <= true_p <= 1.0:
        raise InvalidEvent("bad_value", f"true_p {true_p} outside [0, 1]")
    mv = d.get("model_version")
    return Impression(
        impression_id=_str_id(d, "impression_id"),
        ts=_ts(d),
        user_id=intern(_str_id(d, "user_id")),
        item_id=intern(_str_id(d, "item_id")),
        position=position,
        features=_features(d, MAX_STORED_FEATURES if stored else MAX_FEATURES),
        served_score=_finite(d, "served_score", required=False),
        model_version=mv if isinstance(mv, int) and not isinstance(mv, bool) else None,
        true_p=true_p,
    )


def parse_impression(raw: bytes | str) -> Impression:
    """Validate one ``impressions`` record. Raises :class:`InvalidEvent`."""
    return _impression_from_obj(load_object(raw))


def parse_stored_impression(raw: bytes | str) -> Impression:
    """Validate an impression the joiner's own state kept (with its historical features):
    as :func:`parse_impression`, without the input's byte limit and with
    :data:`MAX_STORED_FEATURES` features. Raises :class:`InvalidEvent`."""
    return _impression_from_obj(load_object(raw, max_bytes=None), stored=True)


def parse_click(raw: bytes | str) -> Click:
    """Validate one ``clicks`` record. Raises :class:`InvalidEvent`."""
    d = load_object(raw)
    return _click_from_obj(d)


def _click_from_obj(d: Mapping[str, Any]) -> Click:
    """A click, or with ``"type": "conversion"`` a conversion; another ``type`` is
    refused (``bad_value``) rather than read as a click."""
    user = d.get("user_id")
    kind = d.get("type")
    if kind is not None and kind not in ("click", "conversion"):
        raise InvalidEvent(
            "bad_value",
            f"field 'type' of a clicks record must be 'click' or 'conversion', "
            f"got {str(kind)[:50]!r}",
        )
    return Click(impression_id=_str_id(d, "impression_id"), ts=_ts(d),
                 user_id=None if user is None else intern(_str_id(d, "user_id")),
                 conversion=kind == "conversion")  # fmt: skip


def parse_input(raw: bytes | str | None, topic: str) -> Impression | Click | Watermark:
    """Parse a record of ``impressions`` or ``clicks``, including producer watermarks."""
    d = load_object(raw)
    if d.get("type") == "watermark":
        return Watermark(ts=_ts(d))
    if topic == TOPIC_CLICKS:
        return _click_from_obj(d)
    return _impression_from_obj(d)


def input_from_obj(d: Mapping[str, Any], topic: str) -> Impression | Click:
    """Validate one decoded event object of ``impressions`` or ``clicks`` (the envelope
    path of :mod:`stream.envelope`; watermarks are never inside an envelope)."""
    if topic == TOPIC_CLICKS:
        return _click_from_obj(d)
    return _impression_from_obj(d)


T = TypeVar("T")

#: separator of the list-valued history features inside an impression's ``features``
SEQ_SEP = "\x1f"

#: the feature names the feature stage computes (``hist_*``): with historical features on
#: an input's own values of them are dropped (:func:`without_history`)
HISTORY_PREFIX = "hist_"


def without_history(features: Mapping[str, T]) -> tuple[dict[str, T], int]:
    """``features`` without the ``hist_*`` names, and how many were dropped. With
    historical features on, the stage owns those names: an input (a producer, a log's
    columns, a client's request context) cannot set or forge them, so a row's history is
    always the stage's point-in-time values, in training and in serving alike."""
    out = {k: v for k, v in features.items() if not k.startswith(HISTORY_PREFIX)}
    return out, len(features) - len(out)


def with_history(imp: Impression, hist: Mapping[str, object]) -> Impression:
    """``imp`` with the feature stage's values (``features.stage``) merged into its
    features, so they travel with it (pending state, labelled example) to the trainer.
    ``hist_seq`` / ``hist_seq_age`` (lists) are stored as ``SEQ_SEP``-joined strings
    (events carry str/float features only), cut to fit ``MAX_FEATURE_VALUE_LEN``;
    :func:`example_row` turns them back into lists. The impression's own ``hist_*``
    features are dropped first (:func:`without_history`). ``hist``: the stage's values,
    floats and the two lists (one ``update``: this runs for every impression)."""
    feats = without_history(imp.features)[0]
    feats.update(hist)  # type: ignore[arg-type]  # floats; the two lists are popped here
    seq: object = feats.pop("hist_seq", None)
    ages: object = feats.pop("hist_seq_age", None)
    if isinstance(seq, list) and seq:
        items = list(map(str, seq))
        age_s = list(map(repr, map(float, ages))) if isinstance(ages, list) else []
        joined, joined_ages = SEQ_SEP.join(items), SEQ_SEP.join(age_s[: len(items)])
        while items and (
            len(joined) > MAX_FEATURE_VALUE_LEN or len(joined_ages) > MAX_FEATURE_VALUE_LEN
        ):
            items.pop()
            joined, joined_ages = SEQ_SEP.join(items), SEQ_SEP.join(age_s[: len(items)])
        if items:
            feats["hist_seq"] = joined
            feats["hist_seq_age"] = joined_ages
    return Impression(imp.impression_id, imp.ts, imp.user_id, imp.item_id, imp.position, feats,
                      imp.served_score, imp.model_version, imp.true_p)  # fmt: skip


def example_row(imp: Impression) -> dict[str, object]:
    """The flat feature dict a learner sees: ids, position and features (never true_p);
    the joined ``hist_seq`` / ``hist_seq_age`` strings of :func:`with_history` as lists."""
    row: dict[str, object] = dict(imp.features)
    row["user_id"] = imp.user_id
    row["item_id"] = imp.item_id
    if imp.position is not None:
        row["position"] = imp.position
    seq = row.get("hist_seq")
    if isinstance(seq, str):
        row["hist_seq"] = seq.split(SEQ_SEP) if seq else []
        ages = row.get("hist_seq_age")
        out: list[float] = []
        for a in ages.split(SEQ_SEP) if isinstance(ages, str) and ages else ():
            try:
                out.append(float(a))
            except ValueError:
                out.append(0.0)
        row["hist_seq_age"] = out
    return row

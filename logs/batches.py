"""The internal topics ``labeled`` and ``scored``: micro-batches in a versioned binary form.

Our own stages write them: the joiner a ``labeled`` record of :class:`LabeledExample` s
(:func:`encode_labeled`), the trainer a ``scored`` record of one micro-batch's
progressive-validation scores (:class:`ScoredBatch`). Batches, not one record per example:
a per-record produce costs ~0.3 ms in Python. MessagePack (msgspec), validated by a typed
decoder in C: decoding ~60 features of every example from JSON and checking them one by one
in Python was a tenth of the worker's time. The JSON form that older joiners and trainers
wrote is still read (a rolling upgrade). Input events and their checks live in
:mod:`logs.events`; this module only imports from it.

"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from sys import intern
from typing import Annotated, Any, Literal

import msgspec

from logs.events import (
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURE_VALUE_LEN,
    MAX_ID_LEN,
    MAX_STORED_FEATURES,
    MAX_TS,
    MIN_TS,
    RESERVED_FEATURE_NAMES,
    Impression,
    InvalidEvent,
    LabeledExample,
    as_object,
    load_object,
)

__all__ = [
    "BATCH_VERSION",
    "LABELED_MAGIC",
    "LABELED_OVERHEAD",
    "SCORED_MAGIC",
    "ScoredBatch",
    "decode_labeled",
    "encode_labeled",
    "encode_labeled_example",
    "encode_labeled_raw",
    "MARKS_HEADER",
    "decode_marks",
    "encode_marks",
]


# A record is a 5-byte header then a MessagePack body, like an envelope (stream.envelope):
#
#   bytes 0..3  magic    FF 53 52 4C ("\xffSRL", labeled) or FF 53 52 53 ("\xffSRS", scored);
#                        0xFF is never the first byte of UTF-8 JSON: a record that starts
#                        otherwise is the old JSON form, still read (a rolling upgrade: old
#                        joiners and trainers may still write it); one that starts with 0xFF
#                        but another magic (an envelope, the other topic) is bad_envelope
#   byte  4     version  01
#   bytes 5..   body     labeled: an array of examples, each an array of _WireLabeled's 13
#                        fields in order (14 with a second label); scored: an array of
#                        _WireScored's 9 fields in order (more, trailing, when set)
#
# Floats are MessagePack float64, so every value round-trips bit-exactly. The typed decoder
# checks types, lengths and ranges in C; a body it refuses is diagnosed by the JSON form's
# per-field checks on the untyped body, so the dead letter names the same reason.

LABELED_MAGIC = b"\xffSRL"
SCORED_MAGIC = b"\xffSRS"
#: Version of the binary ``labeled`` and ``scored`` forms this worker writes and reads.
BATCH_VERSION = 1
_LABELED_HEADER = LABELED_MAGIC + bytes([BATCH_VERSION])
_SCORED_HEADER = SCORED_MAGIC + bytes([BATCH_VERSION])
#: Bytes of a ``labeled`` record besides its examples: the header and the array's header.
LABELED_OVERHEAD = len(_LABELED_HEADER) + 5

_FMAX = sys.float_info.max
#: a finite float: NaN fails every comparison, so msgspec refuses it with the infinities
_Finite = Annotated[float, msgspec.Meta(ge=-_FMAX, le=_FMAX)]
_Ts = Annotated[float, msgspec.Meta(ge=MIN_TS, lt=MAX_TS)]
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
_FeatureValue = Annotated[str, msgspec.Meta(max_length=MAX_FEATURE_VALUE_LEN)] | _Finite
# names unconstrained here: a constrained key type bypasses msgspec's cache of short keys,
# which doubled the decode time; their length is checked after decoding
# a labelled impression carries its historical features too: MAX_STORED_FEATURES
_Features = Annotated[dict[str, _FeatureValue], msgspec.Meta(max_length=MAX_STORED_FEATURES)]


class _WireLabeled(msgspec.Struct, array_like=True, gc=False):
    """One example on ``labeled``: the checks of :meth:`LabeledExample.from_dict` as types
    (feature names, reserved and too long, are checked after decoding). Stricter than the
    JSON form: ids are strings, feature values never None, ``model_version`` an integer or
    None."""

    impression_id: _Id
    ts: _Ts
    user_id: _Id
    item_id: _Id
    position: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None
    features: _Features
    served_score: _Finite | None
    model_version: int | None
    true_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None
    label: Literal[0, 1]
    label_ts: _Ts
    weight: _Finite
    kind: str
    # added in place (version 1): written only when set, so a record without a second
    # label is the same bytes as before it existed; an older trainer ignores it
    label2: Literal[0, 1] | None = None


class _WireScored(msgspec.Struct, array_like=True, gc=False):
    """A :class:`ScoredBatch` on ``scored``, its fields in the same order. ``p_raw`` and
    ``p`` may be non-finite (a diverged model's scores are reported, not dropped)."""

    model_version: int
    calibrator_version: int
    impression_ids: list[str]
    ts: list[_Finite]
    label: list[Annotated[int, msgspec.Meta(ge=0, le=1)]]
    p_raw: list[float]
    p: list[float]
    segment: list[str]
    true_p: list[float | None]
    # added in place (version 1): an older trainer's 9 fields decode with none, and an
    # older monitor ignores the trailing element
    marks: dict[Annotated[int, msgspec.Meta(ge=0)], _Ts] = {}
    # the second label (added in place, written only when set: see ScoredBatch)
    p2: list[float] = []
    label2_ids: list[_Id] = []
    label2: list[Annotated[int, msgspec.Meta(ge=0, le=1)]] = []


_LABELED_FIELDS = _WireLabeled.__struct_fields__
_encoder = msgspec.msgpack.Encoder()
_labeled_decoder = msgspec.msgpack.Decoder(list[_WireLabeled])
_scored_decoder = msgspec.msgpack.Decoder(_WireScored)
_any_decoder = msgspec.msgpack.Decoder()
_encoder_json = msgspec.json.Encoder()
_marks_json = msgspec.json.Decoder(dict[Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,9}$")], _Ts])


def _labeled_row(e: LabeledExample) -> tuple[object, ...]:
    """The fields of :class:`_WireLabeled` (a tuple encodes as the same array)."""
    i = e.impression
    row = (i.impression_id, i.ts, i.user_id, i.item_id, i.position, i.features,
           i.served_score, i.model_version, i.true_p, e.label, e.label_ts, e.weight,
           e.kind)  # fmt: skip
    return row if e.label2 is None else (*row, e.label2)


def encode_labeled(examples: Sequence[LabeledExample]) -> bytes:
    """A ``labeled`` record of ``examples`` (binary, version :data:`BATCH_VERSION`).

    >>> raw = encode_labeled([LabeledExample(Impression("a", 1.7e9, "u", "i"), 1, 1.7e9)])
    >>> raw[:5]
    b'\\xffSRL\\x01'
    >>> decode_labeled(raw)[0].impression.impression_id, decode_labeled(raw)[0].label
    ('a', 1)
    """
    return _LABELED_HEADER + _encoder.encode([_labeled_row(e) for e in examples])


def encode_labeled_example(example: LabeledExample) -> bytes:
    """One example's MessagePack bytes, for :func:`encode_labeled_raw` (sizes first)."""
    return _encoder.encode(_labeled_row(example))


def encode_labeled_raw(parts: Sequence[bytes]) -> bytes:
    """A ``labeled`` record of examples already encoded by :func:`encode_labeled_example`;
    ``len(result) <= LABELED_OVERHEAD + sum(map(len, parts))``."""
    return _LABELED_HEADER + _encoder.encode([msgspec.Raw(p) for p in parts])


def decode_labeled(raw: bytes | None) -> list[LabeledExample]:
    """The examples of a ``labeled`` record; raises :class:`InvalidEvent`.

    Reads the binary form of :func:`encode_labeled` and the JSON form older joiners wrote
    (``{"examples": [example, ...]}``, checked field by field as before). Binary reasons:
    ``bad_envelope`` (not MessagePack, truncated), ``unsupported_version``, and for a bad
    example the reason its JSON form would get (``bad_type``, ``non_finite``,
    ``bad_value``, ``bad_timestamp``, ``missing_field``, ``too_large``); one bad example
    rejects the record (our own joiner wrote it: something is badly wrong).
    """
    if raw is None or raw[:1] != b"\xff":
        return _decode_labeled_json(raw)
    wire = _decode_body(raw, LABELED_MAGIC, "labeled", _labeled_decoder, _diagnose_labeled)
    out = []
    for w in wire:
        if w.features and max(map(len, w.features)) > MAX_FEATURE_NAME_LEN:
            raise InvalidEvent("too_large", f"feature name longer than {MAX_FEATURE_NAME_LEN}")
        if not RESERVED_FEATURE_NAMES.isdisjoint(w.features):
            names = sorted(RESERVED_FEATURE_NAMES.intersection(w.features))
            raise InvalidEvent("bad_value", f"feature names {names} are reserved")
        # ids interned as parsing does (the trainer's catalogue keeps them); feature names
        # and values are not kept past the batch
        imp = Impression(w.impression_id, w.ts, intern(w.user_id), intern(w.item_id),
                         w.position, w.features, w.served_score, w.model_version,
                         w.true_p)  # fmt: skip
        out.append(LabeledExample(imp, w.label, w.label_ts, w.weight, w.kind, w.label2))
    return out


#: The Kafka header of a ``labeled`` record that carries the joiner's event-time marks
#: (:func:`encode_marks`). A header, not a field: an older trainer reads the record as
#: before and ignores it.
MARKS_HEADER = "streamrec-marks"
#: at most this many partitions in one mark (a hostile header cannot grow the monitor)
MAX_MARK_PARTITIONS = 4096


def encode_marks(marks: Mapping[int, float]) -> bytes:
    """The value of :data:`MARKS_HEADER`: input partition -> event-time mark (epoch s).

    A mark ``{p: W}`` on ``labeled`` says that every label the joiner will send for an
    impression of input partition ``p`` with ``ts + join.window_s < W`` was sent before
    it (``W`` is the partition's watermark, lateness already taken off). The trainer passes
    marks on in :attr:`ScoredBatch.marks` after every example that came before them, so
    the monitor can close the attribution windows that the stream's own impression times
    never pass (the end of a replay, a quiet hour).

    >>> encode_marks({0: 1700000000.5, 3: 1700000001.0})
    b'{"0":1700000000.5,"3":1700000001.0}'
    >>> decode_marks({MARKS_HEADER: encode_marks({0: 1.7e9})})
    {0: 1700000000.0}
    """
    return _encoder_json.encode({str(int(p)): float(w) for p, w in marks.items()})


def decode_marks(headers: Mapping[str, bytes] | None) -> dict[int, float]:
    """The marks of a ``labeled`` record's headers (``{}`` without the header); raises
    :class:`InvalidEvent` (``bad_value``) for a header that is not a JSON object of
    partition numbers to finite times within the accepted range."""
    raw = (headers or {}).get(MARKS_HEADER)
    if raw is None:
        return {}
    try:
        obj = _marks_json.decode(raw)
        if len(obj) > MAX_MARK_PARTITIONS:
            raise ValueError(f"more than {MAX_MARK_PARTITIONS} partitions")
        out = {int(p): float(w) for p, w in obj.items()}
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise InvalidEvent("bad_value", f"{MARKS_HEADER} header: {str(exc)[:200]}") from None
    return out


def _body(raw: bytes, magic: bytes, what: str) -> memoryview:
    """The body of a binary record (first byte 0xFF) that must start with ``magic``."""
    if raw[:4] != magic:
        raise InvalidEvent("bad_envelope", f"{raw[:4]!r} is not the magic of a {what} record")
    if len(raw) < 5:
        raise InvalidEvent("bad_envelope", f"{what}: no version byte")
    if raw[4] != BATCH_VERSION:
        raise InvalidEvent(
            "unsupported_version", f"{what} version {raw[4]}; this worker reads {BATCH_VERSION}"
        )
    return memoryview(raw)[5:]


def _decode_body(
    raw: bytes,
    magic: bytes,
    what: str,
    decoder: msgspec.msgpack.Decoder[Any],
    diagnose: Callable[[memoryview, msgspec.ValidationError], InvalidEvent],
) -> Any:
    """A binary record's body decoded by ``decoder``: a value the typed decoder refuses
    gets ``diagnose``'s reason, bytes that are not MessagePack ``bad_envelope``."""
    body = _body(raw, magic, what)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise diagnose(body, exc) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidEvent("bad_envelope", f"{what}: {str(exc)[:200]}") from None


def _diagnose_labeled(body: memoryview, exc: msgspec.ValidationError) -> InvalidEvent:
    """Why the typed decoder refused ``body``: the JSON form's checks name the reason; where
    they pass (the binary form is stricter) or trip on shapes JSON cannot have (non-string
    keys), ``bad_type`` with msgspec's message. Runs on bad records only."""
    try:
        items = _any_decoder.decode(body)
        if not isinstance(items, list):
            return InvalidEvent("bad_type", "labeled batch: not an array")
        for item in items:
            if not isinstance(item, list):
                return InvalidEvent("bad_type", "labeled example: not an array")
            LabeledExample.from_dict(dict(zip(_LABELED_FIELDS, item, strict=False)))
    except InvalidEvent as found:
        return found
    except Exception:  # a hostile shape JSON cannot have: msgspec's message says enough
        pass
    return InvalidEvent("bad_type", f"labeled: {str(exc)[:200]}")


def _decode_labeled_json(raw: bytes | None) -> list[LabeledExample]:
    """The JSON ``labeled`` form of older joiners, field by field (about 10x slower)."""
    obj = load_object(raw, max_bytes=None)
    examples = obj.get("examples")
    if not isinstance(examples, list):
        raise InvalidEvent("missing_field", "labeled batch needs a list 'examples'")
    return [LabeledExample.from_dict(as_object(e)) for e in examples]


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """Progressive-validation scores of one trainer micro-batch, all arrays length B.

    ``p_raw``: the ranker's probability before learning from the batch; ``p``: the served
    (calibrated) probability; ``true_p`` entries are None when unknown.

    >>> b = ScoredBatch(3, 1, ["a"], [1.7e9], [1], [0.1], [0.2], ["1"], [None])
    >>> raw = b.encode()
    >>> raw[:5], ScoredBatch.decode(raw) == b
    (b'\\xffSRS\\x01', True)
    """

    model_version: int
    calibrator_version: int
    impression_ids: list[str]
    ts: list[float]
    label: list[int]
    p_raw: list[float]
    p: list[float]
    segment: list[str]
    true_p: list[float | None]
    #: the joiner's event-time marks that reached the trainer before this batch's last
    #: example was sent (input partition -> mark, :func:`encode_marks`); a batch may be
    #: empty and carry only marks
    marks: dict[int, float] = field(default_factory=dict)
    #: the second label (a two-task ranker, ``join.conversion_window_s`` set): ``p2`` the
    #: ranker's P(clicked and converted) of each row above, before learning (empty: none);
    #: ``label2_ids`` / ``label2`` the clicked impressions' second labels that became
    #: known in this batch (on a positive, or in a ``conversion`` / ``no_conversion``
    #: record: those records are not rows above, their clicks were scored already)
    p2: list[float] = field(default_factory=list)
    label2_ids: list[str] = field(default_factory=list)
    label2: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        """The ``scored`` record (binary, version :data:`BATCH_VERSION`; without marks and
        a second label the same bytes as before they existed)."""
        row: tuple[object, ...] = (
            self.model_version, self.calibrator_version, self.impression_ids, self.ts,
            self.label, self.p_raw, self.p, self.segment, self.true_p,
        )  # fmt: skip
        if self.p2 or self.label2_ids:
            row = (*row, self.marks, self.p2, self.label2_ids, self.label2)
        elif self.marks:
            row = (*row, self.marks)
        return _SCORED_HEADER + _encoder.encode(row)

    @staticmethod
    def decode(raw: bytes | None) -> ScoredBatch:
        """Inverse of :meth:`encode`; also reads the JSON form of older trainers. Raises
        :class:`InvalidEvent`: ``bad_envelope``, ``unsupported_version``,
        ``missing_field``, ``bad_type``, ``bad_value`` (a label not 0/1, arrays of unequal
        lengths), ``non_finite`` (a time)."""
        if raw is None or raw[:1] != b"\xff":
            return _scored_from_json(raw)
        w = _decode_body(raw, SCORED_MAGIC, "scored", _scored_decoder, _diagnose_scored)
        batch = ScoredBatch(w.model_version, w.calibrator_version, w.impression_ids, w.ts,
                            w.label, w.p_raw, w.p, w.segment, w.true_p, w.marks, w.p2,
                            w.label2_ids, w.label2)  # fmt: skip
        _check_lengths(batch)
        return batch


def _check_lengths(batch: ScoredBatch) -> None:
    n = len(batch.impression_ids)
    for name in ("ts", "label", "p_raw", "p", "segment", "true_p"):
        if len(getattr(batch, name)) != n:
            raise InvalidEvent("bad_value", f"scored batch: {name} has wrong length")
    if batch.p2 and len(batch.p2) != n:
        raise InvalidEvent("bad_value", "scored batch: p2 has wrong length")
    if len(batch.label2) != len(batch.label2_ids):
        raise InvalidEvent("bad_value", "scored batch: label2 has wrong length")


def _diagnose_scored(body: memoryview, exc: msgspec.ValidationError) -> InvalidEvent:
    """Why the typed decoder refused a ``scored`` body (runs on bad records only)."""
    detail = f"scored: {str(exc)[:200]}"
    try:
        obj = _any_decoder.decode(body)
    except Exception:  # the typed decoder parsed it; kept safe
        return InvalidEvent("bad_type", detail)
    if not isinstance(obj, list):
        return InvalidEvent("bad_type", detail)
    required = len(_WireScored.__struct_fields__) - len(_WireScored.__struct_defaults__)
    if len(obj) < required:
        return InvalidEvent("missing_field", detail)
    d = dict(zip(_WireScored.__struct_fields__, obj, strict=False))
    ts, label = d["ts"], d["label"]
    if isinstance(label, list) and any(
        isinstance(y, int | float) and not isinstance(y, bool) and y not in (0, 1) for y in label
    ):
        return InvalidEvent("bad_value", detail)
    if isinstance(ts, list) and any(isinstance(t, float) and not math.isfinite(t) for t in ts):
        return InvalidEvent("non_finite", detail)
    return InvalidEvent("bad_type", detail)


def _scored_from_json(raw: bytes | None) -> ScoredBatch:
    """The JSON ``scored`` form of older trainers (its checks: lists of equal length)."""
    obj = load_object(raw, max_bytes=None)
    try:
        batch = ScoredBatch(**obj)
    except TypeError as exc:
        raise InvalidEvent("missing_field", f"scored batch: {exc}") from None
    if not isinstance(batch.impression_ids, list):
        raise InvalidEvent("bad_type", "scored batch: impression_ids must be a list")
    n = len(batch.impression_ids)
    for name in ("ts", "label", "p_raw", "p", "segment", "true_p"):
        value = getattr(batch, name)
        if not isinstance(value, list):
            raise InvalidEvent("bad_type", f"scored batch: {name} must be a list")
        if len(value) != n:
            raise InvalidEvent("bad_value", f"scored batch: {name} has wrong length")
    return batch

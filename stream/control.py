"""The control plane: one typed record per ``control`` message kind, encoded by
:func:`encode_control` and decoded (validated first) by :func:`decode_control`, the one
parser in front of every consumer.

- :class:`CalibratorUpdate` (``calibrator``): a calibrator to serve, from the monitor;
- :class:`ModelAnnouncement` (``model``): a model-store version, from the trainer;
- :class:`IndexVersion` (``index``) and :class:`IndexRejected` (``index_rejected``): an
  index swapped in, or a build that failed its checks, from the indexer;
- :class:`DriftAlarm` (``drift``) and :class:`Recalibration` (``recalibration``): an
  alarm, and a judged refit with its decision, from the monitor;
- :class:`OtherControl`: any other kind, kept whole and applied by no one.

Every worker reads ``control`` from offset 0 at start, so a record that made a consumer
raise would stop every worker on every restart until retention removed it. Nothing is
applied from a record that :func:`parse_control` did not accept; a rejected one raises
:class:`~logs.events.InvalidEvent` with a reason of :data:`logs.events.REASONS` and is
counted and skipped by the listener.

Accepted records (JSON objects, at most :data:`MAX_CONTROL_BYTES`):

=================  =================================================================
``kind``           checked fields
=================  =================================================================
``calibrator``     ``version`` int in [0, 2**53]; ``params`` an object that rebuilds a
                   calibrator (:func:`learners.calibration.calibrator_from_dict`) with
                   finite numbers only, whose map of [0, 1] is finite, inside [0, 1] and
                   non-decreasing; ``offset`` (optional) a finite number of nats in
                   [-20, 20]: the part of ``params``' logit that is the monitor's fast
                   offset (``params`` already includes it: servers apply ``params``)
``model``          ``version`` int; ``path``/``digest`` strings when present
other kinds        ``version`` int when present (``index``, ``drift``, ...: informational)
=================  =================================================================

>>> parse_control(b'{"kind": "calibrator", "version": 3, "params": {"a": 1.0, "b": 0.2}}')
{'kind': 'calibrator', 'version': 3, 'params': {'a': 1.0, 'b': 0.2}}
>>> parse_control(b'{"kind": "calibrator"}')
Traceback (most recent call last):
...
logs.events.InvalidEvent: missing_field: control 'calibrator' needs an integer 'version'
>>> parse_control(b'{"kind": "calibrator", "version": 1, "params": {"a": NaN, "b": 0}}')
Traceback (most recent call last):
...
logs.events.InvalidEvent: non_finite: calibrator params hold a non-finite number
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from logs.events import InvalidEvent

__all__ = [
    "MAX_CONTROL_BYTES",
    "MAX_VERSION",
    "CalibratorUpdate",
    "ControlRecord",
    "DriftAlarm",
    "IndexRejected",
    "IndexVersion",
    "ModelAnnouncement",
    "OtherControl",
    "Recalibration",
    "check_model_record",
    "decode_control",
    "encode_control",
    "parse_control",
]

#: Largest ``control`` record accepted (an isotonic calibrator of a few thousand knots is
#: ~100 KB).
MAX_CONTROL_BYTES = 1024 * 1024
#: Versions are counters: integers in [0, 2**53] (exact as JSON numbers everywhere).
MAX_VERSION = 2**53
#: Largest absolute value of a calibrator record's ``offset`` (nats on the logit scale).
MAX_OFFSET = 20.0
#: Largest absolute value of a calibrator parameter.
MAX_PARAM = 1e9
_MAX_KIND_LEN = 64
_MAX_STR = 4096
#: where a calibrator's map is probed: the ends, tiny and near-one scores, a grid
_PROBE = np.concatenate([[0.0, 1e-12, 1e-6], np.linspace(0.001, 0.999, 57), [1 - 1e-6, 1.0]])


def _version(msg: dict[str, Any], kind: str, *, required: bool) -> int | None:
    v = msg.get("version")
    if v is None:
        if required:
            raise InvalidEvent("missing_field", f"control {kind!r} needs an integer 'version'")
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidEvent("bad_type", f"control {kind!r}: version must be an integer")
    if not 0 <= v <= MAX_VERSION:
        raise InvalidEvent("bad_value", f"control {kind!r}: version outside [0, 2**53]")
    return v


def _finite_numbers(obj: object, depth: int = 0) -> bool:
    """All numbers inside ``obj`` (nested lists/dicts, at most 4 deep) finite and bounded."""
    if depth > 4:
        return False
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return True
    if isinstance(obj, int | float):
        try:
            return math.isfinite(float(obj)) and abs(obj) <= MAX_PARAM
        except OverflowError:
            return False
    if isinstance(obj, list):
        return all(_finite_numbers(x, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return all(_finite_numbers(x, depth + 1) for x in obj.values())
    return False


def _calibrator_params(params: object) -> dict[str, Any]:
    from learners.calibration import calibrator_from_dict

    if not isinstance(params, dict):
        raise InvalidEvent("bad_type", "control 'calibrator': params must be an object")
    if not _finite_numbers(params):
        raise InvalidEvent("non_finite", "calibrator params hold a non-finite number")
    try:
        cal = calibrator_from_dict(params)
        with np.errstate(all="ignore"):
            out = np.asarray(cal.transform(_PROBE.copy()), dtype=np.float64)
    except Exception as exc:  # any malformed shape: rejected, never raised to the listener
        raise InvalidEvent("bad_value", f"calibrator params: {str(exc)[:200]}") from None
    if out.shape != _PROBE.shape or not np.all(np.isfinite(out)):
        raise InvalidEvent("non_finite", "calibrator maps a score to a non-finite value")
    if out.min() < 0.0 or out.max() > 1.0 or np.any(np.diff(out) < -1e-9):
        raise InvalidEvent("bad_value", "calibrator map leaves [0, 1] or decreases")
    return params


def parse_control(raw: bytes | str | None, max_bytes: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """Validate one ``control`` record; returns its object with checked fields (a record of
    an unknown ``kind`` is returned as is: nothing applies it). Raises
    :class:`~logs.events.InvalidEvent`."""
    if raw is None:
        raise InvalidEvent("bad_json", "a null-value control record")
    if len(raw) > max_bytes:
        raise InvalidEvent("too_large", f"control record of {len(raw)} bytes > {max_bytes}")
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidEvent("bad_json", str(exc)[:200]) from None
    if not isinstance(msg, dict):
        raise InvalidEvent("not_an_object", f"control record is {type(msg).__name__}")
    kind = msg.get("kind")
    if not isinstance(kind, str) or not 0 < len(kind) <= _MAX_KIND_LEN:
        raise InvalidEvent("missing_field", "control record needs a string 'kind'")
    if kind == "calibrator":
        msg["version"] = _version(msg, kind, required=True)
        msg["params"] = _calibrator_params(msg.get("params"))
        off = msg.get("offset")
        if off is not None and (
            isinstance(off, bool)
            or not isinstance(off, int | float)
            or not math.isfinite(off)
            or abs(off) > MAX_OFFSET
        ):
            raise InvalidEvent(
                "bad_value", f"control 'calibrator': offset must be a number in +-{MAX_OFFSET:g}"
            )
    elif kind == "model":
        msg["version"] = _version(msg, kind, required=True)
        for name in ("path", "digest"):
            v = msg.get(name)
            if v is not None and (not isinstance(v, str) or len(v) > _MAX_STR):
                raise InvalidEvent("bad_type", f"control 'model': {name} must be a string")
    else:
        _version(msg, kind, required=False)
    return msg


class _Record:
    """A control record: ``to_dict`` gives ``kind`` then the fields in declared order,
    leaving out the optional ones (:attr:`_OPTIONAL`) that are None."""

    kind: ClassVar[str]
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None or f.name not in self._OPTIONAL:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """From a dict :func:`parse_control` accepted; absent fields are None."""
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class CalibratorUpdate(_Record):
    """A calibrator to serve: ``params`` rebuild it
    (:func:`learners.calibration.calibrator_from_dict`); newer versions win. ``offset``:
    the monitor's fast logit offset (:class:`monitoring.offset.LogitOffset`) already
    inside ``params`` (servers ignore it; a monitor adopting the record takes it out)."""

    kind: ClassVar[str] = "calibrator"
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"event_ts", "reason", "offset"})
    version: int
    params: dict[str, Any]
    event_ts: float | None = None  #: event time (s) of the batch that caused it
    reason: str | None = None  #: "alarm", "refit", "identity", "level", "offset", ...
    offset: float | None = None  #: nats of the fast offset inside ``params`` (None: none)


@dataclass(frozen=True)
class ModelAnnouncement(_Record):
    """A model-store version: its directory, the manifest's SHA-256, the model versions."""

    kind: ClassVar[str] = "model"
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    version: int
    path: str | None = None
    digest: str | None = None
    model_version: int | None = None
    index_version: int | None = None
    created_at: float | None = None


@dataclass(frozen=True)
class IndexVersion(_Record):
    """A FAISS index swapped in (informational)."""

    kind: ClassVar[str] = "index"
    version: int | None
    items: int | None = None
    index_kind: str | None = None
    recall_check: float | None = None
    retrieval_model: str | None = None
    pool_users: int | None = None
    build_s: float | None = None


@dataclass(frozen=True)
class IndexRejected(_Record):
    """An index build that failed its checks; the previous version keeps serving."""

    kind: ClassVar[str] = "index_rejected"
    version: int | None
    reasons: list[str] | None = None


@dataclass(frozen=True)
class DriftAlarm(_Record):
    """A calibration drift alarm: ``accepted`` None when nothing was refitted at once
    (``proposed``: a guarded refit was proposed), else the refit's held-out verdict."""

    kind: ClassVar[str] = "drift"
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"proposed", "holdout_logloss_old", "holdout_logloss_new"}
    )
    event_ts: float | None
    examples_seen: int | None = None
    z: float | None = None
    accepted: bool | None = None
    proposed: bool | None = None
    holdout_logloss_old: float | None = None
    holdout_logloss_new: float | None = None


@dataclass(frozen=True)
class Recalibration(_Record):
    """A judged refit: ``decision`` "accepted", "rejected" or "rollback"; the guarded
    policy adds its held-out gain and its standard error (nats)."""

    kind: ClassVar[str] = "recalibration"
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"gain_nats", "se_nats"})
    event_ts: float | None
    examples_seen: int | None = None
    decision: str | None = None
    reason: str | None = None
    gain_nats: float | None = None
    se_nats: float | None = None


@dataclass(frozen=True)
class OtherControl:
    """A record of a kind nothing here applies (kept whole, e.g. for a report)."""

    kind: str
    fields: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)


ControlRecord = (
    CalibratorUpdate
    | ModelAnnouncement
    | IndexVersion
    | IndexRejected
    | DriftAlarm
    | Recalibration
    | OtherControl
)
_KINDS: dict[str, type[_Record]] = {
    c.kind: c
    for c in (
        CalibratorUpdate,
        ModelAnnouncement,
        IndexVersion,
        IndexRejected,
        DriftAlarm,
        Recalibration,
    )  # fmt: skip
}


def encode_control(record: ControlRecord) -> bytes:
    """The ``control`` record value (JSON) of ``record``.

    >>> encode_control(CalibratorUpdate(3, {"a": 1.0, "b": 0.2}))
    b'{"kind": "calibrator", "version": 3, "params": {"a": 1.0, "b": 0.2}}'
    """
    return json.dumps(record.to_dict()).encode()


def decode_control(raw: bytes | str | None, max_bytes: int = MAX_CONTROL_BYTES) -> ControlRecord:
    """The typed record of one ``control`` value, validated by :func:`parse_control`
    first. Raises :class:`~logs.events.InvalidEvent`.

    >>> decode_control(b'{"kind": "calibrator", "version": 3, "params": {"a": 1.0, "b": 0}}')
    CalibratorUpdate(version=3, params={'a': 1.0, 'b': 0}, event_ts=None, reason=None, offset=None)
    >>> decode_control(b'{"kind": "hello", "version": 1}')
    OtherControl(kind='hello', fields={'kind': 'hello', 'version': 1})
    """
    msg = parse_control(raw, max_bytes)
    cls = _KINDS.get(msg["kind"])
    if cls is None:
        return OtherControl(msg["kind"], msg)
    return cls.from_dict(msg)


def check_model_record(msg: ModelAnnouncement, model_store: str) -> str | None:
    """Why a parsed ``model`` record must not be acted on, or None when it may be.

    A ``model`` record only ever names a version of the model store: its ``path`` (when
    given) must be that version's directory inside ``model_store`` (symlinks resolved) and
    its ``digest`` (when given) the SHA-256 of that version's manifest
    (:meth:`modelstore.store.DirectoryStore.resolve`). A worker without a store accepts no
    path at all: a legacy record pointing at a checkpoint file (``{"kind": "model",
    "path": "/x/ranker.pt"}``) is refused (``"outside_store"``), never loaded. A version
    that is not (or no longer) in the store is not an error (an old record of a pruned
    version): None. Returns a :class:`~modelstore.store.StoreError` reason otherwise.

    >>> check_model_record(ModelAnnouncement(3, path="/etc/passwd"), "")
    'outside_store'
    >>> check_model_record(ModelAnnouncement(3), "")
    """
    from modelstore.store import DirectoryStore, StoreError

    path, digest, version = msg.path, msg.digest, msg.version
    if not model_store:
        return "outside_store" if path is not None else None
    if isinstance(version, bool) or not isinstance(version, int):
        return "corrupt"  # parse_control already refuses it
    try:
        DirectoryStore(model_store).resolve(path, version, digest)
    except StoreError as exc:
        return None if exc.reason == "missing" else exc.reason
    return None

"""The canonical impression log format (see ``docs/LOG_FORMAT.md``): its columns, its
normal form, and the validation both the readers and the writer of :mod:`logs.io` apply.

One row per impression, ordered by event time. Reserved columns:

========================  ============================================================
``ts``                    impression event time, epoch seconds (UTC), float64
``impression_id``         unique string id (the impression/click join key)
``user_id``, ``item_id``  strings (read as text, so ``"007"`` stays ``"007"``)
``position``              1-based slot in the slate, nullable ``Int64`` (``<NA>`` = unknown)
``click``                 0 / 1, int64
``click_ts``              epoch seconds (UTC) of the click, float64; NaN exactly when
                          ``click == 0``; ``click_ts >= ts``
``true_p``                true click probability in [0, 1] (synthetic logs); never a feature
``propensity``            logging-policy probability in (0, 1] (OBD); never a feature
``conversion``            optional second outcome, 0 / 1, int64; 1 only on a clicked row
``conversion_ts``         epoch seconds (UTC) of the conversion; NaN exactly when
                          ``conversion == 0``; ``conversion_ts >= click_ts``
``true_cvr``              true P(conversion | click) in [0, 1] (synthetic); never a feature
========================  ============================================================

Every other column is a feature. A feature column is *numeric* (float64) when every
non-empty value parses as a finite number, otherwise *categorical* (``str`` values); an empty
cell is a missing value (NaN), never the category ``"nan"``. Id and categorical columns use
the dtype pandas gives a list of strings (``str`` on pandas >= 3, ``object`` before).

:func:`normalize_frame` returns a table in one normal form (the form
:func:`logs.io.read_log_frame` returns whatever the file format): the reserved columns
present in :data:`RESERVED_COLUMNS` order (``position`` and ``click_ts`` are always there,
filled with missing values when the table lacks them; ``true_p``, ``propensity`` and the
conversion columns only when the table has them; ``conversion`` needs ``conversion_ts``),
then the features sorted by name, with a fresh ``RangeIndex``.

Unsorted input is an error, not silently fixed: a replay must see exactly the order the
writer meant, and ties keep the writer's order, so only the writer can sort (stably).

Nothing here touches a file.

Example:

>>> raw = pd.DataFrame({
...     "ts": [1700000000.25, 1700000001.0],
...     "impression_id": ["imp-1", "imp-2"],
...     "user_id": ["u17", "u17"],
...     "item_id": ["i230", "007"],
...     "click": [0, 1],
...     "click_ts": [None, 1700000093.1],
...     "ctx_device": ["mobile", ""],
... })
>>> frame = normalize_frame(raw, source="example")
>>> list(frame.columns)
['ts', 'impression_id', 'user_id', 'item_id', 'position', 'click', 'click_ts', 'ctx_device']
>>> frame["ctx_device"].isna().tolist(), bool(frame["position"].isna().all())
([False, True], True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import pandas as pd

from logs.events import MAX_TS

__all__ = [
    "RESERVED_COLUMNS",
    "REQUIRED_COLUMNS",
    "LogFormatError",
    "SourceKind",
    "as_object_str",
    "normalize_frame",
]

RESERVED_COLUMNS: tuple[str, ...] = (
    "ts",
    "impression_id",
    "user_id",
    "item_id",
    "position",
    "click",
    "click_ts",
    "true_p",
    "propensity",
    "conversion",
    "conversion_ts",
    "true_cvr",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("ts", "impression_id", "user_id", "item_id", "click")

_ID_COLUMNS = ("impression_id", "user_id", "item_id")
_ALWAYS_PRESENT = ("position", "click_ts")

#: where a table came from; it decides only how an error names a row ("line" numbers of
#: CSV count the header, JSONL has none, a Parquet file or an in-memory frame has no lines)
SourceKind = Literal["csv", "jsonl", "parquet", "frame"]

# the dtype pandas gives a column of Python strings: "str" on pandas >= 3, object before;
# the normal form uses it so frames built from plain lists of str compare equal
_TEXT_DTYPE = pd.Series(["a"]).dtype


class LogFormatError(ValueError):
    """A log file (or frame) does not follow the canonical format.

    The message names the file, the column and, where it makes sense, the data row
    (1-based) and the line of the file (CSV: the header is line 1).
    """


def _locator(kind: SourceKind) -> Callable[[int], str]:
    """Map a 0-based data row to a human-readable position."""
    if kind == "csv":
        return lambda i: f"row {i + 1} (line {i + 2})"
    if kind == "jsonl":
        return lambda i: f"row {i + 1} (line {i + 1})"
    return lambda i: f"row {i + 1}"


def _after_2100(ts: float) -> str:
    """The error for an event time at or after 2100-01-01 (``logs.events.MAX_TS``): the
    format's times are epoch seconds, and a log in milliseconds (or microseconds) would
    otherwise be read as times centuries ahead, with every half-life and window off by
    1,000x."""
    for unit, div in (("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9)):
        if ts / div < MAX_TS:
            return (
                f"ts {ts!r} is after 2100-01-01 as epoch seconds; the format's times are epoch "
                f"seconds: if these are {unit}, divide ts and click_ts by {div:,.0f}"
            )
    return f"ts {ts!r} is after 2100-01-01 as epoch seconds"


def as_object_str(s: pd.Series) -> pd.Series:
    """Values as ``str`` in an object Series; missing and empty strings become NaN."""
    out = s.astype(object)
    missing = out.isna().to_numpy()
    if pd.api.types.infer_dtype(out, skipna=True) not in ("string", "empty"):
        out = pd.Series(
            [v if m or isinstance(v, str) else str(v) for v, m in zip(out, missing, strict=True)],
            index=s.index,
            dtype=object,
        )
    empty = (out == "").to_numpy(dtype=bool)
    if empty.any():
        out = out.where(~empty, np.nan)
    return out.where(out.notna(), np.nan)


def _parse_numbers(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Parse a column as float64. Returns (values, unparsable) where unparsable flags
    non-empty cells that are not numbers; empty cells are NaN and not flagged."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype=float), np.zeros(len(s), dtype=bool)
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s.to_numpy(dtype=float, na_value=np.nan), np.zeros(len(s), dtype=bool)
    text = as_object_str(s)
    present = text.notna().to_numpy()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return values, present & np.isnan(values)


def _feature_column(s: pd.Series) -> pd.Series:
    """Type a feature column by the spec's rule (numeric iff every non-empty value parses
    as a finite number)."""
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        values = s.to_numpy(dtype=float, na_value=np.nan)
        if np.isfinite(values[~np.isnan(values)]).all():
            return pd.Series(values, dtype="float64")
        return as_object_str(s).reset_index(drop=True)
    text = as_object_str(s).reset_index(drop=True)
    try:
        # raise mode stops at the first non-number, so categorical columns cost ~nothing
        values = pd.to_numeric(text).to_numpy(dtype=float, na_value=np.nan)
    except (ValueError, TypeError):
        return text
    if np.isfinite(values[~np.isnan(values)]).all():
        return pd.Series(values, dtype="float64")
    return text


def _probability(
    raw: pd.DataFrame, col: str, low_open: bool, fail: Callable[[str, int, str], LogFormatError]
) -> pd.Series:
    """A probability column: in [0, 1] (``low_open``: (0, 1]) or empty."""
    vals, bad = _parse_numbers(raw[col])
    present = ~np.isnan(vals)
    with np.errstate(invalid="ignore"):
        low = vals <= 0 if low_open else vals < 0
        invalid = bad | (present & (~np.isfinite(vals) | low | (vals > 1)))
    if invalid.any():
        i = int(np.argmax(invalid))
        rng = "(0, 1]" if low_open else "[0, 1]"
        raise fail(col, i, f"expected a probability in {rng} or empty, got {raw[col][i]!r}")
    return pd.Series(vals, dtype="float64")


def _conversions(
    raw: pd.DataFrame,
    click: np.ndarray,
    click_ts: np.ndarray,
    fail: Callable[[str, int, str], LogFormatError],
) -> tuple[np.ndarray, np.ndarray]:
    """The second outcome: ``conversion`` (0/1, only on a clicked row) and its
    ``conversion_ts`` (set exactly when converted, not before the click)."""
    conv, bad = _parse_numbers(raw["conversion"])
    conv = np.where(np.isnan(conv) & ~bad, 0.0, conv)  # empty: not converted
    checks = (
        (bad | ~np.isin(conv, (0.0, 1.0)), "expected 0, 1 or empty"),
        ((conv == 1) & (click != 1), "conversion is 1 on a row with click 0"),
    )
    for mask, msg in checks:
        if mask.any():
            i = int(np.argmax(mask))
            raise fail("conversion", i, f"{msg}, got {raw['conversion'][i]!r}")
    cts = _event_times(raw, "conversion_ts", conv, "conversion", click_ts,
                       ("click_ts", "click_ts"), fail)  # fmt: skip
    return conv, cts


def _event_times(
    raw: pd.DataFrame,
    col: str,
    flag: np.ndarray,
    flag_col: str,
    earlier: np.ndarray,
    earlier_names: tuple[str, str],
    fail: Callable[[str, int, str], LogFormatError],
) -> np.ndarray:
    """An event-time column (``click_ts``, ``conversion_ts``): finite epoch seconds set
    exactly on the rows whose ``flag`` (0/1) is 1, never before ``earlier`` (the time it
    follows; a NaN there checks nothing) and before 2100. ``earlier_names``: that time's
    column and how a message calls it."""
    cts, bad = _parse_numbers(raw[col])
    present = ~np.isnan(cts)
    name, called = earlier_names
    with np.errstate(invalid="ignore"):
        checks = (
            (bad, "expected epoch seconds or empty"),
            (present & ~np.isfinite(cts), "expected finite epoch seconds"),
            ((flag == 1) & ~present, f"{flag_col} is 1 but {col} is empty"),
            ((flag == 0) & present, f"{col} is set on a row with {flag_col} 0"),
            (present & (cts < earlier), f"{col} is before the {called}"),
            (present & (cts >= MAX_TS), f"{col} is after 2100-01-01 as epoch seconds"),
        )
    for mask, msg in checks:
        if mask.any():
            i = int(np.argmax(mask))
            raise fail(col, i, f"{msg} ({col}={raw[col][i]!r}, {name}={earlier[i]!r})")
    return cts


def normalize_frame(raw: pd.DataFrame, *, source: str, kind: SourceKind = "frame") -> pd.DataFrame:
    """A raw log table (read from a file of format ``kind``, or built in memory, e.g. by a
    converter) validated and in the normal form described in the module docstring.
    Raises :class:`LogFormatError` naming ``source``, the column and the row."""
    raw = raw.reset_index(drop=True)
    raw.columns = [str(c) for c in raw.columns]
    where = _locator(kind)

    def fail(col: str, i: int, msg: str) -> LogFormatError:
        return LogFormatError(f"{source}: column {col!r}, {where(i)}: {msg}")

    dupes = sorted({c for c in raw.columns if list(raw.columns).count(c) > 1})
    if dupes:
        raise LogFormatError(f"{source}: duplicate column(s) {', '.join(map(repr, dupes))}")
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise LogFormatError(
            f"{source}: missing required column(s) {', '.join(map(repr, missing))}; "
            f"found {list(raw.columns)}"
        )
    n = len(raw)
    out: dict[str, pd.Series] = {}

    # ts: finite, non-negative epoch seconds, non-decreasing
    ts, bad = _parse_numbers(raw["ts"])
    invalid = bad | ~np.isfinite(ts) | (ts < 0)
    if invalid.any():
        i = int(np.argmax(invalid))
        raise fail("ts", i, f"expected finite non-negative epoch seconds, got {raw['ts'][i]!r}")
    late = ts >= MAX_TS
    if late.any():
        i = int(np.argmax(late))
        raise fail("ts", i, _after_2100(float(ts[i])))
    if n > 1:
        back = np.diff(ts) < 0
        if back.any():
            i = int(np.argmax(back)) + 1
            raise fail(
                "ts",
                i,
                f"ts {float(ts[i])!r} is before the previous row's {float(ts[i - 1])!r}; rows "
                "must be ordered by ts (non-decreasing; sort stably before writing)",
            )
    out["ts"] = pd.Series(ts, dtype="float64")

    for col in _ID_COLUMNS:
        ids = as_object_str(raw[col])
        empty = ids.isna().to_numpy()
        if empty.any():
            raise fail(col, int(np.argmax(empty)), "empty id")
        out[col] = ids.reset_index(drop=True).astype(_TEXT_DTYPE)
    dup = out["impression_id"].duplicated().to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        raise fail("impression_id", i, f"duplicate impression_id {out['impression_id'][i]!r}")

    # position: optional, 1-based integer, empty = unknown
    if "position" in raw.columns:
        pos, bad = _parse_numbers(raw["position"])
        present = ~np.isnan(pos)
        with np.errstate(invalid="ignore"):
            invalid = bad | (present & (~np.isfinite(pos) | (pos < 1) | (pos != np.floor(pos))))
        if invalid.any():
            i = int(np.argmax(invalid))
            raise fail(
                "position", i, f"expected a 1-based integer or empty, got {raw['position'][i]!r}"
            )
        out["position"] = pd.Series(pos, dtype="float64").astype("Int64")
    else:
        out["position"] = pd.Series(pd.array([pd.NA] * n, dtype="Int64"))

    click, bad = _parse_numbers(raw["click"])
    invalid = bad | ~np.isin(click, (0.0, 1.0))
    if invalid.any():
        i = int(np.argmax(invalid))
        raise fail("click", i, f"expected 0 or 1, got {raw['click'][i]!r}")
    out["click"] = pd.Series(click.astype(np.int64))

    # click_ts: set exactly on clicked rows, never before ts; absent column = unknown times
    if "click_ts" in raw.columns:
        cts = _event_times(raw, "click_ts", click, "click", ts, ("ts", "impression ts"), fail)
        out["click_ts"] = pd.Series(cts, dtype="float64")
    else:
        out["click_ts"] = pd.Series(np.full(n, np.nan), dtype="float64")

    for col, low_open in (("true_p", False), ("propensity", True)):
        if col in raw.columns:
            out[col] = _probability(raw, col, low_open, fail)

    has = [c for c in ("conversion", "conversion_ts") if c in raw.columns]
    if len(has) == 1:
        other = "conversion_ts" if has[0] == "conversion" else "conversion"
        raise LogFormatError(f"{source}: column {has[0]!r} needs the column {other!r} beside it")
    if has:
        conv, conv_ts = _conversions(raw, click, out["click_ts"].to_numpy(), fail)
        out["conversion"] = pd.Series(conv.astype(np.int64))
        out["conversion_ts"] = pd.Series(conv_ts, dtype="float64")
    if "true_cvr" in raw.columns:
        out["true_cvr"] = _probability(raw, "true_cvr", False, fail)

    for col in sorted(c for c in raw.columns if c not in RESERVED_COLUMNS):
        feature = _feature_column(raw[col])
        out[col] = feature if feature.dtype == np.float64 else feature.astype(_TEXT_DTYPE)

    frame = pd.DataFrame(out)
    frame.index = pd.RangeIndex(n)
    return frame

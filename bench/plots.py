"""PNG plots of the benchmark results, where a picture says more than the table.

``python -m bench.plots`` (or :func:`bench.run.render`, which calls :func:`render_all`)
reads ``bench/results/<name>.json`` and writes ``bench/results/<name>.png`` for each
results file it knows how to draw; a missing file is skipped, a file without the fields a
plot needs (an older run) is skipped with the reason returned. Matplotlib's ``Agg``
backend: no display needed.

- ``trainer.png``: examples/s against batch size per model and device (log-log), with the
  issue's goal line;
- ``quality.png``: normalised entropy per learner on each log (lower is better), the
  oracle's on the synthetic log;
- ``calibration.png``: the windowed calibration ratio (Σp / Σtrue_p) around the abrupt
  drift of one seed, per learner, with the ±10% band;
- ``delayed_feedback.png``: calibration ratio of the last half per delayed-feedback arm;
- ``e2e.png``: replayed, ingested and scored impressions over wall time, and the lag;
- ``index.png``: build time and recall@10 against catalogue size per index kind;
- ``serving.png``: client-side p50 / p99 latency and answers per second per load phase.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  # after choosing the backend
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _fig(ncols: int = 1, width: float = 7.0) -> tuple[Figure, Any]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols**0.8, 4.2), squeeze=False)
    return fig, axes[0]


def _title(fig: Figure, report: dict[str, Any], what: str) -> None:
    m = report.get("machine", {})
    fig.suptitle(
        f"{what}\n{report.get('command', '?')} · {str(report.get('date', '?'))[:10]} · "
        f"{m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}",
        fontsize=9,
    )


def trainer(report: dict[str, Any]) -> Figure:
    fig, (ax,) = _fig()
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report["results"]:
        label = r["model"] + ("" if r.get("device", "cpu") == "cpu" else f" ({r['device']})")
        label += " amp" if r.get("amp") else ""
        series.setdefault(label, []).append((r["batch"], r["examples_per_s"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax.axhline(100_000, color="grey", ls="--", lw=1, label="goal (dcnv2 @4096, CPU)")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="examples / s")
    batches = sorted({r["batch"] for r in report["results"]})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _title(fig, report, "Trainer throughput (score + learn, online)")
    return fig


def quality(report: dict[str, Any]) -> Figure:
    datasets = report["datasets"]
    fig, axes = _fig(len(datasets), width=5.5)
    for ax, (name, ds) in zip(axes, datasets.items(), strict=True):
        learners = ds["learners"]
        names = list(learners)
        ne = [learners[n]["all"]["normalized_entropy"] for n in names]
        colors = ["tab:blue" if not n.startswith(("river", "vw")) else "tab:orange" for n in names]
        ax.barh(names, ne, color=colors)
        oracle = next((v["all"].get("oracle_normalized_entropy") for v in learners.values()), None)
        if oracle:
            ax.axvline(oracle, color="green", ls="--", lw=1, label=f"oracle {oracle:.3f}")
            ax.legend(fontsize=7, loc="lower right")
        lo = min([*ne, oracle or min(ne)]) - 0.02
        hi = min(max(ne) + 0.02, sorted(ne)[len(ne) // 2] + 0.15)  # keep the pack readable
        ax.set_xlim(lo, hi)
        for i, v in enumerate(ne):
            if v > hi:  # an off-scale bar carries its value
                ax.text(hi, i, f"{v:.2f} →", ha="right", va="center", fontsize=7, color="white")
        ax.invert_yaxis()
        ax.set(title=f"{name}: NE, all rows (lower is better)", xlabel="normalised entropy")
        ax.title.set_fontsize(9)
        ax.grid(True, axis="x", alpha=0.3)
    _title(fig, report, "Prequential quality: streamrec (blue) vs peers (orange)")
    return fig


def calibration(report: dict[str, Any]) -> Figure:
    runs = [r for r in report["runs"] if r["scenario"] == "abrupt"]
    if not runs or "trajectory" not in next(iter(runs[0]["learners"].values())):
        raise KeyError("no trajectory in the runs (re-run python -m bench.calibration)")
    run = runs[0]
    fig, (ax,) = _fig(width=8.0)
    drift = run["drift_row"]
    for name, m in run["learners"].items():
        t = m["trajectory"]
        x = [r - drift for r in t["row"]]
        y = [float("nan") if v is None else v for v in t["ratio"]]
        ax.plot(x, y, lw=1.2, label=name)
    ax.axvline(0, color="black", lw=1)
    ax.axhspan(0.9, 1.1, color="green", alpha=0.08, label="±10%")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(
        xlabel="impressions after the drift (true CTR x1.6)",
        ylabel="Σp / Σtrue_p, trailing window",
        title=f"abrupt drift, seed {run['seed']}",
    )
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _title(fig, report, "Calibration under drift")
    return fig


def delayed_feedback(report: dict[str, Any]) -> Figure:
    results = report["results"]
    logs = sorted({r["log"] for r in results})
    fig, axes = _fig(len(logs), width=5.5)
    for ax, log in zip(axes, logs, strict=True):
        rows = [r for r in results if r["log"] == log]
        labels = [f"{r['model']}: {r['arm']}" for r in rows]
        ratio = [r["tail"]["ratio_vs_true_p"] for r in rows]
        good = ["tab:green" if abs(v - 1) <= 0.05 else "tab:red" for v in ratio]
        ax.barh(labels, ratio, color=good)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=6)
        ax.set(title=f"{log}: Σserved / Σtrue_p, last half", xlabel="ratio (1 = calibrated)")
        ax.title.set_fontsize(9)
    _title(fig, report, "Delayed feedback: within ±5% green")
    return fig


def e2e(report: dict[str, Any]) -> Figure:
    s = report["pipeline"]["samples"]
    fig, (ax, ax2) = _fig(2, width=5.5)
    t = [x["t"] for x in s]
    for key in ("replayed", "impressions", "scored"):
        ax.plot(t, [x[key] for x in s], label=key)
    ax2.plot(t, [x["lag"] for x in s], color="tab:red", label="1 worker")
    for key, ls, c1, c2 in (("scale_out", "--", "tab:green", "tab:purple"),
                            ("split", ":", "tab:olive", "tab:brown")):  # fmt: skip
        so = report.get(key)
        if not so:  # the same log through N workers (scale_out) or joiner + trainer (split)
            continue
        name = f"{so['workers']} workers" if key == "scale_out" else "joiner + trainer"
        t2 = [x["t"] for x in so["samples"]]
        ax.plot(t2, [x["scored"] for x in so["samples"]], ls=ls, color=c1, label=f"scored, {name}")
        ax2.plot(t2, [x["lag"] for x in so["samples"]], ls=ls, color=c2, label=name)
        ax2.legend(fontsize=7)
    ax.set(xlabel="wall s", ylabel="count", title="events replayed / impressions in / scored")
    ax.legend(fontsize=7)
    ax2.set(xlabel="wall s", ylabel="events", title="lag (replayed − consumed)")
    for a in (ax, ax2):
        a.title.set_fontsize(9)
        a.grid(True, alpha=0.3)
    _title(fig, report, f"End to end: {report['pipeline']['impressions_per_s']:,.0f} impressions/s")
    return fig


def index(report: dict[str, Any]) -> Figure:
    rows = report["index"]["results"]
    fig, (ax, ax2) = _fig(2, width=5.5)
    for kind in sorted({r["kind"] for r in rows}):
        pts = sorted((r["n"], r["build_s"], r["recall_at_10"]) for r in rows if r["kind"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=kind)
    ax.set(xscale="log", yscale="log", xlabel="items", ylabel="build s", title="build time")
    ax2.set(xscale="log", xlabel="items", ylabel="recall@10 vs exact", title="recall@10")
    for a in (ax, ax2):
        a.title.set_fontsize(9)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    _title(fig, report, f"FAISS index, dimension {report['index']['dim']}")
    return fig


def serving(report: dict[str, Any]) -> Figure:
    phases = report["phases"]
    labels = [f"{p['phase']}\n{p['endpoint']}\nc={p['concurrency']}" for p in phases]
    x = list(range(len(phases)))
    fig, (ax, ax2) = _fig(2, width=5.5)
    ax.bar([i - 0.2 for i in x], [p["p50_ms"] or 0 for p in phases], width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [p["p99_ms"] or 0 for p in phases], width=0.4, label="p99")
    ax.plot(x, [p["server_p50_ms"] or 0 for p in phases], "k_", ms=18, label="server p50")
    ax.set(ylabel="ms (client side)", title="latency")
    ax2.bar(x, [p["ok_per_s"] or 0 for p in phases], color="tab:green")
    ax2.set(ylabel="answers / s", title="throughput")
    for a in (ax, ax2):
        a.set_xticks(x, labels, fontsize=7)
        a.title.set_fontsize(9)
        a.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    _title(fig, report, "Serving over HTTP (worker web server)")
    return fig


PLOTS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "trainer": trainer,
    "quality": quality,
    "calibration": calibration,
    "delayed_feedback": delayed_feedback,
    "e2e": e2e,
    "index": index,
    "serving": serving,
}


def render(name: str, results_dir: Path | None = None, quick: bool = False) -> Path | None:
    """Write ``<name>.png`` (``<name>_quick.png``) from its JSON; the path, or None when
    there is no plot for ``name`` or no results file. Raises ``KeyError`` / ``TypeError``
    when the file lacks what the plot needs."""
    out_dir = results_dir or RESULTS_DIR
    stem = f"{name}_quick" if quick else name
    src = out_dir / f"{stem}.json"
    if name not in PLOTS or not src.exists():
        return None
    fig = PLOTS[name](json.loads(src.read_text()))
    out = out_dir / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def render_all(results_dir: Path | None = None, quick: bool = False) -> dict[str, str]:
    """Every plot whose results file exists: ``{name: png path or "skipped: reason"}``."""
    done: dict[str, str] = {}
    for name in PLOTS:
        try:
            out = render(name, results_dir, quick)
        except (KeyError, TypeError, IndexError) as exc:
            done[name] = f"skipped: {exc}"
            continue
        if out is not None:
            done[name] = str(out)
    return done


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the *_quick.json files")
    parser.add_argument("--results-dir", type=Path, default=None, help=f"default {RESULTS_DIR}")
    args = parser.parse_args(argv)
    for name, what in render_all(args.results_dir, args.quick).items():
        print(f"{name}: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())

"""Run the benchmarks and render ``bench/results/README.md`` from their JSON files.

``python -m bench.run`` runs every benchmark at full size (a few minutes on 2 cores);
``--quick`` runs the smoke sizes (under a minute in total) and renders
``README_quick.md`` from the ``*_quick.json`` files instead; ``--only drift,trainer`` runs
a subset (the README still shows every results file present).

Each benchmark module exposes ``main(quick, results_dir) -> dict`` (``bench.drift``:
``run``, a wrapper around its command line), writes its JSON file and prints its table.
This module also holds the helpers the benchmarks share: :func:`machine` and
:func:`stamp`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAMES = ("drift", "trainer", "quality", "delayed_feedback", "e2e", "index", "calibration", "joiner")


def machine() -> dict[str, Any]:
    """Where a benchmark ran: platform, Python, CPU count, torch threads and device."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }


def stamp(name: str, quick: bool) -> dict[str, Any]:
    """``benchmark``, ``command`` (to reproduce the file) and UTC ``date`` of a report."""
    return {
        "benchmark": name,
        "command": f"python -m bench.{name}" + (" --quick" if quick else ""),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def results_path(results_dir: Path | None, name: str, quick: bool) -> Path:
    """``<results_dir>/<name>.json`` (``<name>_quick.json`` when quick)."""
    return (results_dir or RESULTS_DIR) / (f"{name}_quick.json" if quick else f"{name}.json")


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _runner(name: str) -> Callable[[bool, Path | None], dict[str, Any]]:
    # Imported lazily: the benchmark modules import the helpers above.
    if name == "joiner":
        from bench import joiner

        return lambda quick, results_dir: joiner.main(quick, results_dir=results_dir)
    if name == "calibration":
        from bench import calibration

        return calibration.run
    if name == "index":
        from bench import index

        return lambda quick, results_dir: index.main(quick, results_dir=results_dir)
    if name == "e2e":
        from bench import e2e

        return e2e.run
    if name == "drift":
        from bench import drift

        return drift.run
    if name == "trainer":
        from bench import trainer

        return lambda quick, results_dir: trainer.main(quick, results_dir=results_dir)
    if name == "delayed_feedback":
        from bench import delayed_feedback

        return lambda quick, results_dir: delayed_feedback.main(quick, results_dir=results_dir)
    from bench import quality

    return lambda quick, results_dir: quality.main(quick, results_dir=results_dir)


def _table(name: str, report: dict[str, Any]) -> str:
    if name == "joiner":
        from bench import joiner

        return joiner.table(report)
    if name == "calibration":
        from bench import calibration

        return calibration.table(report) + "\n\n" + calibration.goal_line(report["goal"])
    if name == "index":
        from bench import index

        return index.table(report)
    if name == "e2e":
        from bench import e2e

        return e2e.table(report) + "\n\n" + e2e.goal_line(report["goal"])
    if name == "drift":
        from bench import drift

        return drift.table(report["detectors"], drift.Plan(**report["plan"]))
    if name == "trainer":
        from bench import trainer

        return trainer.table(report)
    if name == "delayed_feedback":
        from bench import delayed_feedback

        return delayed_feedback.table(report)
    from bench import quality

    return quality.table(report)


def _header(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    parts = [f"{k}={v}" for k, v in m.items()]
    lines = [
        f"- command: `{report.get('command', '?')}`",
        f"- date: {report.get('date', '?')}",
        f"- machine: {', '.join(parts)}",
    ]
    if "wall_seconds" in report:
        lines.append(f"- wall: {report['wall_seconds']} s")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines)


def render(quick: bool, results_dir: Path | None = None) -> Path:
    """Write ``README.md`` (``README_quick.md``) with one table per results file present."""
    out_dir = results_dir or RESULTS_DIR
    sections = [
        "# Benchmark results",
        "",
        "Generated by `python -m bench.run"
        + (" --quick`" if quick else "`")
        + " from the JSON files in this folder; see `bench/README.md` for what is measured.",
    ]
    for name in NAMES:
        path = results_path(results_dir, name, quick)
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        sections += ["", f"## {name} (`{path.name}`)", "", _header(report), ""]
        sections.append(_table(name, report))
        if name == "trainer" and report.get("goal"):
            sections += ["", trainer_goal_line(report["goal"])]
        if name == "quality" and report.get("goal"):
            sections += ["", quality_goal_line(report["goal"])]
    out = out_dir / ("README_quick.md" if quick else "README.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(sections) + "\n")
    return out


def trainer_goal_line(goal: dict[str, Any]) -> str:
    ratio = goal.get("ratio")
    got = (
        "not measured (batch 4096 not in this run)"
        if ratio is None
        else (f"{goal['examples_per_s']:,.0f} ex/s = {ratio:.2f}x the goal")
    )
    return f"Goal: {goal['target']}. Measured: {got}."


def quality_goal_line(goal: dict[str, Any]) -> str:
    from bench import quality

    return quality.goal_text(goal)


def main(
    quick: bool = False, only: tuple[str, ...] = NAMES, results_dir: Path | None = None
) -> dict[str, Any]:
    """Run the named benchmarks, render the README; ``{name: report}``."""
    reports: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name in only:
        t = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        reports[name] = _runner(name)(quick, results_dir)
        print(f"[{name}: {time.perf_counter() - t:.1f} s]", flush=True)
    out = render(quick, results_dir)
    print(f"\nall: {time.perf_counter() - t0:.1f} s; wrote {out}")
    return reports


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (< 60 s in total)")
    parser.add_argument("--only", default=",".join(NAMES), help=f"comma-separated of {NAMES}")
    parser.add_argument("--results-dir", type=Path, default=None, help=f"default {RESULTS_DIR}")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; expected some of {NAMES}")
    main(args.quick, only, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli())

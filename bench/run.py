"""Run the benchmarks and render ``bench/results/README.md`` from their JSON files.

``python -m bench.run`` runs every benchmark at full size (a few minutes on 2 cores);
``--quick`` runs the smoke sizes (under a minute in total) and renders
``README_quick.md`` from the ``*_quick.json`` files instead; ``--only drift,trainer`` runs
a subset (the README still shows every results file present).

Each benchmark module ``bench.<name>`` exposes ``main(quick, *, results_dir) -> dict``
(``bench.drift`` and ``bench.e2e``: ``run``), writes its JSON file and prints its table;
``table(report)`` (or ``markdown(report)``) gives its section of the README, and
:mod:`bench.plots` draws ``<name>.png`` next to the JSON where a plot says more.
This module also holds the helpers the benchmarks share: :func:`machine`, :func:`stamp`,
:func:`load_note`, :func:`publish` (write the JSON, print the table), and the table cells
:func:`or_dash` and :func:`finite_or_dash`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
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
#: The Open Bandit Dataset sample beside the checkout (absent from a fresh clone).
OBD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "obd"
OBD_CSV = OBD_DIR / "random" / "all" / "all.csv"
NAMES = (
    "drift",
    "trainer",
    "quality",
    "delayed_feedback",
    "e2e",
    "index",
    "serving",
    "calibration",
    "joiner",
    "replay",
    "topology",
    "history_models",
    "quality_history",
    "features",
    "calibration_worlds",
    "index_scale",
    "retrieval_ablation",
    "serving_batching",
    "hot_paths",
)


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


def bench_parser(name: str, doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """The command line every ``python -m bench.<name>`` shares: ``--quick`` and
    ``--results-dir``; a benchmark adds its own options to it."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--results-dir", type=Path, default=None, help=f"default {RESULTS_DIR}")
    return parser


def bench_cli(
    name: str,
    doc: str | None,
    quick_help: str,
    main: Callable[..., Any],
    argv: list[str] | None,
) -> int:
    """``python -m bench.<name>`` for a benchmark with no options of its own: parse, then
    ``main(quick, results_dir=...)``."""
    args = bench_parser(name, doc, quick_help).parse_args(argv)
    main(args.quick, results_dir=args.results_dir)
    return 0


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def publish(
    report: dict[str, Any],
    results_dir: Path | None,
    name: str,
    quick: bool,
    table: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Write ``report`` to :func:`results_path`, print ``table(report)`` and the path
    written; the report (a benchmark's ``main`` returns it)."""
    write_report(report, out := results_path(results_dir, name, quick))
    print(table(report))
    print(f"wrote {out}")
    return report


def load_note(load_before: float) -> str:
    """The report note on the machine's load: the 1-minute load average ``load_before``
    (taken at the start) and now, and the CPU count."""
    return (
        f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        f"the end, on {os.cpu_count()} CPUs"
    )


def or_dash(x: float | None, spec: str = ".2f") -> str:
    """A table cell: ``format(x, spec)``, or ``-`` when ``x`` is None."""
    return "-" if x is None else format(x, spec)


def finite_or_dash(x: float | None, spec: str) -> str:
    """A table cell: ``format(x, spec)``, or ``-`` when ``x`` is None, NaN or infinite."""
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


# Every benchmark module is ``bench.<name>`` and has ``main(quick, *, results_dir)`` (here
# ``run`` where ``main`` is its command line) and ``table(report)`` (``markdown(report)``
# where the section needs more than the table, e.g. a goal line).
_ENTRY = {"drift": "run", "e2e": "run"}


def _module(name: str) -> Any:
    # Imported lazily: the benchmark modules import the helpers above.
    return importlib.import_module(f"bench.{name}")


def _run(name: str, quick: bool, results_dir: Path | None) -> dict[str, Any]:
    entry = getattr(_module(name), _ENTRY.get(name, "main"))
    report: dict[str, Any] = entry(quick, results_dir=results_dir)
    return report


def _table(name: str, report: dict[str, Any]) -> str:
    mod = _module(name)
    text: str = getattr(mod, "markdown", mod.table)(report)
    return text


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
    from bench import plots

    pngs = plots.render_all(results_dir, quick)
    for name in NAMES:
        path = results_path(results_dir, name, quick)
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        sections += ["", f"## {name} (`{path.name}`)", "", _header(report), ""]
        sections.append(_table(name, report))
        png = pngs.get(name)
        if png is not None and not png.startswith("skipped"):
            sections += ["", f"![{name}]({Path(png).name})"]
        elif png is not None:
            sections += ["", f"(plot {png})"]
    out = out_dir / ("README_quick.md" if quick else "README.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(sections) + "\n")
    return out


def main(
    quick: bool = False, only: tuple[str, ...] = NAMES, results_dir: Path | None = None
) -> dict[str, Any]:
    """Run the named benchmarks, render the README; ``{name: report}``."""
    reports: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name in only:
        t = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        reports[name] = _run(name, quick, results_dir)
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

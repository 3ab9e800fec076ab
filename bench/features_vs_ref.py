"""Feature stage A/B: ``process`` throughput of this tree against a git ref, in one run.

The ``features`` package of ``--ref`` (default ``main``) is extracted with ``git show``
into a temporary directory and imported under another name; both stages run the
``bench.features`` event stream (5 s jitter), alternated ``--rounds`` times (each a fresh
stage), and their outputs are compared for equality (``==`` on the feature dicts, i.e.
bit-identical floats, same names). Reports impressions/s per run, the ratio of the best
runs and the 1-minute load average before and after (the machine is shared).

``python -m bench.features_vs_ref [--quick] [--ref REF] [--rounds N]`` writes
``bench/results/features_vs_ref.json``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.features import event_stream
from bench.run import bench_parser, machine, results_path, stamp, write_report
from features.stage import FeatureStage

NAME = "features_vs_ref"
_ROOT = Path(__file__).resolve().parents[1]


def old_stage_class(ref: str, into: Path) -> Any:
    """``FeatureStage`` of ``features/`` at git ``ref``, importable as ``features_<ref>``."""
    pkg = "features_ref"
    (into / pkg).mkdir()
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", ref, "features/"],
        cwd=_ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for path in names:
        if not path.endswith(".py"):
            continue
        src = subprocess.run(
            ["git", "show", f"{ref}:{path}"], cwd=_ROOT, check=True, capture_output=True, text=True
        ).stdout
        src = src.replace("from features.", f"from {pkg}.").replace(
            "from features import", f"from {pkg} import"
        )
        (into / pkg / Path(path).name).write_text(src)
    sys.path.insert(0, str(into))
    return importlib.import_module(f"{pkg}.stage").FeatureStage


def main(
    quick: bool = False, ref: str = "main", rounds: int = 2, *, results_dir: Path | None = None
) -> dict[str, Any]:
    n = 50_000 if quick else 300_000
    events = event_stream(n, n_users=20_000, n_items=2_000)
    n_imp = sum(1 for e in events if hasattr(e, "item_id"))
    report: dict[str, Any] = stamp(NAME, quick)
    report["command"] += f" --ref {ref} --rounds {rounds}"
    report["machine"] = machine()
    report["load_before"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        old_cls = old_stage_class(ref, Path(tmp))
        runs: dict[str, list[float]] = {ref: [], "tree": []}
        for _ in range(rounds):
            for name, cls in ((ref, old_cls), ("tree", FeatureStage)):
                stage = cls()
                t0 = time.perf_counter()
                stage.process(events)
                runs[name].append(n_imp / (time.perf_counter() - t0))
                del stage
        identical = old_cls().process(events) == FeatureStage().process(events)
    report["load_after"] = os.getloadavg()[0]
    report["impressions"] = n_imp
    report["impressions_per_s"] = runs
    report["ratio_best"] = max(runs["tree"]) / max(runs[ref])
    report["outputs_identical"] = identical
    write_report(report, out := results_path(results_dir, NAME, quick))
    print(
        f"{ref}: {', '.join(f'{x:,.0f}' for x in runs[ref])} impressions/s; this tree: "
        f"{', '.join(f'{x:,.0f}' for x in runs['tree'])}; ratio (best) "
        f"{report['ratio_best']:.2f}; outputs identical: {identical}; load "
        f"{report['load_before']:.2f} -> {report['load_after']:.2f}\nwrote {out}"
    )
    return report


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser(NAME, __doc__, "50k impressions")
    parser.add_argument("--ref", default="main", help="git ref to compare against")
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of each")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    main(args.quick, args.ref, args.rounds, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())

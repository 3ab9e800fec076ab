"""Summarise a worker's memory diagnostics into one results file: what grows?

Reads what :mod:`stream.memdiag` wrote during a soak (``python -m bench.soak`` with
``STREAMREC_TRACEMALLOC=<dir>`` and/or ``STREAMREC_CENSUS=<dir>`` in the environment) and
the soak's own report:

- ``--tracemalloc DIR``: the traced Python total of every dump (``traced_mb``) and, from
  the last dump, its top differences against the baseline grouped by the innermost frame
  inside the project (``site`` ``file:line``; a frame in a library when no project frame
  is in the traceback): which lines hold the Python allocations that grew;
- ``--census FILE``: per row the RSS, the bytes of live torch tensors and the count of
  live objects, their least-squares slopes after ``--warmup-frac`` (MB or objects per
  hour) and the object types that grew most between the end of the warm-up and the end;
- ``--soak FILE``: the report's ``after_warmup.memory_fits`` and the slopes of the RocksDB
  memory columns (``rocksdb_<kind>_mb``) after the warm-up.

``python -m bench.memory_attribution --out bench/results/x.json --soak a.json --census
a/census.jsonl --tracemalloc tm/`` (every option repeatable, labelled by ``LABEL=PATH``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from bench.memory_series import slope_fit
from bench.run import write_report

__all__ = ["census_summary", "cli", "soak_summary", "tracemalloc_summary"]

_HEAD = re.compile(r"^t_s (\d+) traced_mb ([\d.]+)")
_DIFF = re.compile(r"^([+-][\d.]+) MB \(([\d.]+) MB now\), ([+-]\d+) blocks")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _site(frames: list[tuple[str, int]], root: str) -> str:
    own = [(f, n) for f, n in frames if f.startswith(root) and "/site-packages/" not in f]
    f, n = (own or frames or [("?", 0)])[-1]
    return f"{f.removeprefix(root)}:{n}"


def tracemalloc_summary(folder: Path, root: str = "", top: int = 15) -> dict[str, Any]:
    """``series``: [t_s, traced MB] of every dump; ``top_sites``: the last dump's growth
    (MB, blocks) by innermost project frame, largest first."""
    dumps = []
    for p in folder.glob("tm_*.txt"):
        m = _HEAD.match(p.read_text().split("\n", 1)[0])
        if m:
            dumps.append((int(m.group(1)), float(m.group(2)), p))
    dumps.sort()
    series: list[list[float]] = [[float(t), mb] for t, mb, _ in dumps]
    files = [p for _, _, p in dumps]
    sites: dict[str, float] = {}
    blocks: dict[str, int] = {}
    if len(files) >= 2:
        for block in files[-1].read_text().split("\n\n")[1:]:
            lines = block.strip().split("\n")
            m = _DIFF.match(lines[0])
            if not m:
                continue
            frames = [(f, int(n)) for f, n in _FRAME.findall(block)]
            site = _site(frames, root)
            sites[site] = sites.get(site, 0.0) + float(m.group(1))
            blocks[site] = blocks.get(site, 0) + int(m.group(3))
    return {
        "series_t_s_traced_mb": series,
        "top_sites_mb": [
            [s, round(mb, 2), blocks[s]]
            for s, mb in sorted(sites.items(), key=lambda kv: -kv[1])[:top]
        ],  # fmt: skip
        "listed_growth_mb": round(sum(sites.values()), 1),
    }


def _fit(t: list[float], y: list[float]) -> dict[str, float] | None:
    f = slope_fit(t, y)
    return None if f is None else {"per_h": round(f.ols, 1), "se_per_h": round(f.se, 1)}


def census_summary(path: Path, warmup_frac: float = 1 / 3, top: int = 10) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cut = rows[int(len(rows) * warmup_frac) :]
    t = [r["t_s"] for r in cut]
    first, last = (cut[0]["types"], cut[-1]["types"]) if cut else ({}, {})
    grew = Counter({k: last.get(k, 0) - first.get(k, 0) for k in set(first) | set(last)})
    return {
        "rows": len(rows),
        "from_t_s": t[0] if t else None,
        "rss_mb": [rows[0]["rss_mb"], rows[-1]["rss_mb"]] if rows else None,
        "torch_tensor_mb": [rows[0]["torch_tensor_mb"], rows[-1]["torch_tensor_mb"]]
        if rows
        else None,
        "slopes": {
            "rss_mb": _fit(t, [r["rss_mb"] for r in cut]),
            "torch_tensor_mb": _fit(t, [r["torch_tensor_mb"] for r in cut]),
            "objects": _fit(t, [r["objects"] for r in cut]),
        },
        "types_grown_after_warmup": grew.most_common(top),
    }


def soak_summary(path: Path) -> dict[str, Any]:
    r = json.loads(path.read_text())
    a = r["after_warmup"]
    rows = r["rows"]
    cut = [x for x in rows if x["t_s"] >= (a["from_t_s"] or 0)]
    t = [x["t_s"] for x in cut]
    rocks = {
        k: _fit(t, [x[k] for x in cut])
        for k in sorted(rows[0])
        if k.startswith("rocksdb_") and all(math.isfinite(x[k]) for x in cut)
    }
    return {
        "command": r["command"],
        "worker_rss_mb_mean": a["worker_rss_mb_mean"],
        "max_lag_events": a["max_lag_events"],
        "memory_fits": a["memory_fits"],
        "memory_fits_after_feature_bound": a.get("memory_fits_after_feature_bound"),
        "rocksdb_slopes_mb": rocks,
        "rocksdb_last_mb": {k: rows[-1][k] for k in rocks},
    }


def _labelled(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        label, _, path = item.rpartition("=")
        out.append((label or Path(path).stem, Path(path)))
    return out


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_attribution", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracemalloc", action="append", default=[], metavar="[LABEL=]DIR")
    p.add_argument("--census", action="append", default=[], metavar="[LABEL=]FILE")
    p.add_argument("--soak", action="append", default=[], metavar="[LABEL=]FILE")
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]) + "/",
                   help="the project's folder: frames under it name the site")  # fmt: skip
    p.add_argument("--warmup-frac", type=float, default=1 / 3)
    p.add_argument("--note", default="", help="free text kept in the report")
    a = p.parse_args(argv)
    report: dict[str, Any] = {"benchmark": "memory_attribution", "note": a.note}
    report["tracemalloc"] = {k: tracemalloc_summary(v, a.root)
                             for k, v in _labelled(a.tracemalloc)}  # fmt: skip
    report["census"] = {k: census_summary(v, a.warmup_frac) for k, v in _labelled(a.census)}
    report["soak"] = {k: soak_summary(v) for k, v in _labelled(a.soak)}
    write_report(report, a.out)
    print(json.dumps(report, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())

"""Trainer throughput: examples/s of ``TorchRanker.score_and_learn`` on CPU (and CUDA).

Run ``python -m bench.trainer`` (full: every model in ``learners.ranker.MODELS`` at batch
sizes 256, 512, 1024, 2048, 4096, 8192 on 100k synthetic impressions, about a minute on 2
idle cores) or ``python -m bench.trainer --quick`` (dcnv2 and logreg at 1024 on 20k, CPU
only). When CUDA is available the full run repeats the grid on the GPU (named in the
report), with ``amp`` off and on (bf16 autocast); the CPU rows never use amp (it is
ignored there).

``score_and_learn`` is the streaming trainer's step (score the batch, then one Adam step).
Each (device, model, batch) gets a fresh online ranker (``RankerConfig(model=...)``
defaults on that device, seed 0), one untimed warm-up batch, then every remaining full
batch of the log, timed end to end (feature encoding and the copy of the scores back to the
host, which synchronises CUDA, included). ``encode_share`` is the time
``ranker.encoder.encode`` takes on the same batches afterwards (cache warm, as in steady
state), divided by the timed step time: the rest is the torch forward/backward/Adam step.

Memory-bandwidth floor of the embedding lookups (per device): the bandwidth is measured in
the same run (a 256 MiB tensor copied on the device, best of 5, bytes read + written per
second), and an example moves ``embedding_bytes_per_example`` = ``rows x (D x 4)`` bytes
``x 8``, ``rows`` being the embedding rows the model reads per example (every table, every
categorical slot): the forward gather (1), the sparse gradient (1) and lazy Adam's read and
write of the row, its two moments (6). ``floor_examples_per_s`` = bandwidth / those bytes
is what the step could reach if the embedding traffic were all it did; the ratio of the
measured throughput to it says how far compute and framework overhead keep the step from
the memory roof (on a GPU this is the number to compare with).

Goal (from the issue): >= 100,000 examples/s for DCN-v2 at batch 4096 on 2 cores.
Writes ``bench/results/trainer.json`` (``trainer_quick.json``) and prints a table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.run import bench_cli, machine, results_path, stamp, write_report
from learners.ranker import MODELS, RankerConfig, TorchRanker
from logs.offline import LogExamples, log_examples
from logs.synthetic import SyntheticConfig, generate

FULL_BATCHES = (256, 512, 1024, 2048, 4096, 8192)
QUICK_BATCHES = (1024,)
QUICK_MODELS = ("dcnv2", "logreg")
FULL_N = 100_000
QUICK_N = 20_000
GOAL_MODEL, GOAL_BATCH, GOAL_EXAMPLES_PER_S = "dcnv2", 4096, 100_000.0


def measure(
    examples: LogExamples, model: str, batch_size: int, device: str = "cpu", amp: bool = False
) -> dict[str, Any]:
    """Throughput of one (model, batch size, device, amp) over ``examples``; the first batch
    warms up."""
    ranker = TorchRanker(RankerConfig(model=model, device=device, amp=amp), seed=0, online=True)
    rows, y = examples.rows, examples.y
    ranker.score_and_learn(rows[:batch_size], y[:batch_size])
    # Whole batches only, so each timed step has the nominal size.
    starts = range(batch_size, len(rows) - batch_size + 1, batch_size)
    if not starts:
        raise ValueError(f"need at least {2 * batch_size} examples for batch {batch_size}")
    t0 = time.perf_counter()
    for s in starts:
        ranker.score_and_learn(rows[s : s + batch_size], y[s : s + batch_size])
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    for s in starts:
        ranker.encoder.encode(rows[s : s + batch_size])
    encode_seconds = time.perf_counter() - t1
    n = len(starts) * batch_size
    emb_bytes = embedding_bytes_per_example(ranker)
    return {
        "model": model,
        "device": device,
        "amp": amp,
        "batch": batch_size,
        "examples": n,
        "steps": len(starts),
        "seconds": seconds,
        "examples_per_s": n / seconds,
        "encode_share": encode_seconds / seconds,
        "parameters": sum(p.numel() for p in ranker.model.parameters()),
        "embedding_bytes_per_example": emb_bytes,
    }


def embedding_bytes_per_example(ranker: TorchRanker) -> int:
    """Bytes of embedding traffic per example (see the module docstring): for each table,
    the categorical slots x its row width x 4 bytes, x 8 (gather, sparse gradient, lazy
    Adam's read and write of row and moments)."""
    slots = ranker.config.encoder.max_cat_fields
    widths = [m.embedding_dim for m in ranker.model.modules() if isinstance(m, torch.nn.Embedding)]
    return sum(slots * w * 4 * 8 for w in widths)


def device_bandwidth(device: str, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second a device copy moves (read + write), best of ``repeats``."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def main(
    quick: bool = False, *, results_dir: Path | None = None, n: int | None = None
) -> dict[str, Any]:
    """Run the benchmark, write its JSON, print its table; the report.

    ``n`` overrides the number of impressions (tests use a tiny log).
    """
    n_impressions = n or (QUICK_N if quick else FULL_N)
    models = QUICK_MODELS if quick else MODELS
    batches = QUICK_BATCHES if quick else FULL_BATCHES
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    examples = log_examples(generate(SyntheticConfig(n_impressions=n_impressions, seed=0)))
    runs = [("cpu", False)]
    if torch.cuda.is_available() and not quick:
        runs += [("cuda", False), ("cuda", True)]
    bandwidth = {d: device_bandwidth(d) for d in dict.fromkeys(d for d, _ in runs)}
    rows = []
    for device, amp in runs:
        for m in models:
            for b in batches:
                r = measure(examples, m, b, device, amp)
                r["floor_examples_per_s"] = bandwidth[device] / r["embedding_bytes_per_example"]
                r["share_of_floor"] = r["examples_per_s"] / r["floor_examples_per_s"]
                rows.append(r)
                print(f"  {device}{' amp' if amp else ''} {m} {b}: "
                      f"{r['examples_per_s']:,.0f} ex/s", flush=True)  # fmt: skip
    goal_row = next(
        (
            r
            for r in rows
            if r["model"] == GOAL_MODEL and r["batch"] == GOAL_BATCH and r["device"] == "cpu"
        ),
        None,
    )
    load_end = os.getloadavg()[0]
    report: dict[str, Any] = {
        **stamp("trainer", quick),
        "machine": {
            **machine(),
            "device": str(TorchRanker(RankerConfig(model="logreg")).device),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "notes": [
            f"1-min load average {load_start[0]:.1f} at the start, {load_end:.1f} at the end, "
            f"on {os.cpu_count()} CPUs (above the CPU count, other processes lowered the "
            "throughput)"
        ],
        # Other processes on the machine lower the measured throughput.
        "load_average_1m": {"start": load_start[0], "end": load_end},
        "data": f"log_examples(generate(SyntheticConfig(n_impressions={n_impressions}, seed=0)))",
        "step": "TorchRanker.score_and_learn, online=True, RankerConfig defaults per model",
        "devices": [f"{d}{' amp' if a else ''}" for d, a in runs],
        "bandwidth_bytes_per_s": bandwidth,
        "goal": {
            "target": f">= {GOAL_EXAMPLES_PER_S:,.0f} examples/s for {GOAL_MODEL} at batch "
            f"{GOAL_BATCH} on 2 cores",
            "examples_per_s": None if goal_row is None else goal_row["examples_per_s"],
            "ratio": None if goal_row is None else goal_row["examples_per_s"] / GOAL_EXAMPLES_PER_S,
        },
        "results": rows,
    }
    write_report(report, out := results_path(results_dir, "trainer", quick))
    print(table(report))
    print(f"\ndevice {report['machine']['device']}, torch threads {torch.get_num_threads()}")
    g = report["goal"]
    if g["ratio"] is not None:
        print(f"goal {g['target']}: {g['examples_per_s']:,.0f} ex/s = {g['ratio']:.2f}x")
    print(f"wrote {out}")
    return report


def _label(r: dict[str, Any], cuda_name: str | None) -> str:
    """Row label: the model on CPU; ``model (GPU name[, amp])`` elsewhere."""
    device = r.get("device", "cpu")
    if device == "cpu":
        return str(r["model"])
    name = cuda_name if device == "cuda" and cuda_name else device
    return f"{r['model']} ({name}{', amp' if r.get('amp') else ''})"


def table(report: dict[str, Any]) -> str:
    """Markdown table: one row per (device, model), one column per batch size (ex/s,
    encode share)."""
    rows = report["results"]
    cuda_name = report.get("machine", {}).get("cuda_device")
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(_label(r, cuda_name) for r in rows))
    by = {(_label(r, cuda_name), r["batch"]): r for r in rows}
    head = "| model | " + " | ".join(f"batch {b}: ex/s (encode share)" for b in batches) + " |"
    lines = [head, "|" + "---|" * (len(batches) + 1)]
    for label in labels:
        cells = []
        for b in batches:
            r = by.get((label, b))
            cells.append(
                "-" if r is None else f"{r['examples_per_s']:,.0f} ({r['encode_share']:.0%})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    bw = report.get("bandwidth_bytes_per_s")
    if bw:
        lines += ["", "Memory-bandwidth floor of the embedding traffic (measured copy "
                  "bandwidth / embedding bytes per example), largest batch:", ""]  # fmt: skip
        lines += ["| model | device | bandwidth GB/s | embedding bytes/example | floor ex/s "
                  "| measured / floor |", "|---|---|---|---|---|---|"]  # fmt: skip
        top = max(batches)
        for label in labels:
            r = by.get((label, top))
            if r is None or "floor_examples_per_s" not in r:
                continue
            lines.append(
                f"| {label} | {r['device']} | {bw[r['device']] / 1e9:,.1f} | "
                f"{r['embedding_bytes_per_example']:,} | {r['floor_examples_per_s']:,.0f} | "
                f"{r['share_of_floor']:.3f} |"
            )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("trainer", __doc__, "dcnv2 + logreg at 1024, 20k rows", main, argv)


def markdown(report: dict[str, Any]) -> str:
    """``bench.run``'s README section: the table and the goal line."""
    goal = report.get("goal")
    if not goal:
        return table(report)
    ratio = goal.get("ratio")
    got = (
        "not measured (batch 4096 not in this run)"
        if ratio is None
        else f"{goal['examples_per_s']:,.0f} ex/s = {ratio:.2f}x the goal"
    )
    return f"{table(report)}\n\nGoal: {goal['target']}. Measured: {got}."


if __name__ == "__main__":
    raise SystemExit(cli())

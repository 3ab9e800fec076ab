"""Three hot paths timed against their targets (they were timed assertions in tests,
which a noisy machine made flaky; the tests now check what these paths produce).

Run ``python -m bench.hot_paths`` (about 30 s on 2 cores; ``--quick``: one repeat).
Each is timed best of 3 (``--quick``: 1) and reported as seconds and ``time / target``
(below 1 meets the target):

- ``encode``: :class:`learners.encoding.FeatureEncoder` encodes 4,096 rows of 8 mixed
  fields (the trainer's per-batch cost; target 50 ms);
- ``synthetic``: :func:`logs.synthetic.generate` makes the default 200k-impression log
  (the demo's first step; target 5 s);
- ``report``: :func:`monitoring.report.render_html` draws the HTML report of 200k scored
  impressions (the end of every demo; target 3 s).

and ``codecs`` (issue 14, no target): encoding and decoding the internal topics, the JSON
form the worker used before against the binary form it uses now, on 1,024 labelled examples
the joiner made (51 features each: 4 from the log, 47 ``hist_*``) and the 1,024-example
``scored`` batch of a trainer step. ``labeled`` encode is the joiner's
:func:`stream.limits.labeled_records` under the default record limit (the JSON side: the
same split over per-example ``json.dumps``, as it was); decode is the trainer's
:func:`logs.batches.decode_labeled` of every record (it reads both forms). ``scored``:
:meth:`ScoredBatch.encode` / :meth:`ScoredBatch.decode` against the former ``to_json``
(``json.dumps`` of the fields) and the JSON path of ``decode``.

Writes ``bench/results/hot_paths.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_cli, machine, results_path, stamp, write_report
from learners.encoding import FeatureEncoder
from logs.batches import ScoredBatch, decode_labeled
from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, LabeledExample, Watermark
from logs.io import log_impressions
from logs.synthetic import SyntheticConfig, generate
from monitoring.metrics import StreamrecMetrics
from monitoring.report import ReportData, render_html
from stream.join import JoinConfig
from stream.limits import chunks_by_bytes, labeled_records, payload_limit
from stream.services import JoinService
from stream.settings import Settings

TARGETS_S = {"encode": 0.05, "synthetic": 5.0, "report": 3.0}


def encode_rows(n: int = 4096, seed: int = 0) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "user_id": f"u{rng.integers(1000)}", "item_id": f"i{rng.integers(5000)}",
            "position": int(rng.integers(1, 10)), "user_segment": f"s{rng.integers(5)}",
            "item_cat": f"c{rng.integers(20)}", "item_price": float(rng.random() * 50),
            "age": float(rng.integers(80)), "hour": int(rng.integers(24)),
        }
        for _ in range(n)
    ]  # fmt: skip


def scored(n: int = 200_000, seed: int = 0) -> ReportData:
    """``n`` scored impressions over 3 hours, the CTR up 1.8x half-way, one alarm."""
    rng = np.random.default_rng(seed)
    t0 = 1_700_000_000.0
    ts = t0 + np.sort(rng.uniform(0.0, 10_800.0, n))
    base = rng.uniform(0.01, 0.08, n)
    true_p = np.where(ts >= t0 + 5_400.0, base * 1.8, base)
    y = (rng.random(n) < true_p).astype(np.float64)
    alarm = {"kind": "drift", "event_ts": t0 + 5_700.0, "z": 4.0, "accepted": True}
    return ReportData(ts=ts, y=y, p=base, p_raw=base, true_p=true_p, drift_ts=t0 + 5_400.0,
                      alarms=[alarm], recalibrations=[alarm])  # fmt: skip


def labeled_examples(n: int = 1024, seed: int = 0) -> list[LabeledExample]:
    """``n`` labelled examples as the joiner emits them (history features on: the worker's
    default), from a synthetic log through :class:`stream.services.JoinService`."""
    df = generate(SyntheticConfig(n_impressions=n, n_users=200, n_items=300, seed=seed))
    join = JoinService(Settings(join=JoinConfig(window_s=60.0, lateness_s=0.0)),
                       StreamrecMetrics())  # fmt: skip
    out: list[LabeledExample] = []
    for k, imp in enumerate(log_impressions(df)):
        out += join.handle(imp.to_json(), TOPIC_IMPRESSIONS, 0, k)[0]
    end = Watermark(float(df["ts"].max()) + 10_000.0).to_json()
    out += join.handle(end, TOPIC_IMPRESSIONS, 0, n)[0]
    out += join.handle(end, TOPIC_CLICKS, 0, 0)[0]
    return out[:n]


def json_labeled_records(examples: Sequence[LabeledExample], max_bytes: int) -> list[bytes]:
    """The ``labeled`` records the joiner wrote before issue 14 (JSON, same split)."""
    parts = [
        json.dumps(e.to_dict(), separators=(",", ":"), allow_nan=False).encode() for e in examples
    ]
    head, tail = b'{"examples":[', b"]}"
    ranges = chunks_by_bytes([len(p) for p in parts], max_bytes, overhead=len(head) + len(tail))
    return [head + b",".join(parts[a:b]) + tail for a, b in ranges]


def json_scored(batch: ScoredBatch) -> bytes:
    """The ``scored`` record the trainer wrote before issue 14 (``ScoredBatch.to_json``)."""
    d = {k: getattr(batch, k) for k in ScoredBatch.__dataclass_fields__}
    return json.dumps(d, separators=(",", ":")).encode()


def codecs(repeats: int) -> dict[str, Any]:
    """Encode and decode milliseconds (best of ``repeats``, each the mean of 5 runs),
    record bytes and the JSON / binary ratios, for ``labeled`` and ``scored``."""
    examples = labeled_examples()
    n = len(examples)
    rng = np.random.default_rng(0)
    scored = ScoredBatch(
        model_version=7,
        calibrator_version=2,
        impression_ids=[e.impression.impression_id for e in examples],
        ts=[e.impression.ts for e in examples],
        label=[e.label for e in examples],
        p_raw=rng.random(n).tolist(),
        p=rng.random(n).tolist(),
        segment=["1"] * n,
        true_p=[e.impression.true_p for e in examples],
    )
    limit = payload_limit(Settings().max_message_bytes)
    records = {
        ("labeled", "json"): json_labeled_records(examples, limit),
        ("labeled", "binary"): labeled_records(examples, limit)[0],
        ("scored", "json"): [json_scored(scored)],
        ("scored", "binary"): [scored.encode()],
    }
    encoders: dict[tuple[str, str], Callable[[], object]] = {
        ("labeled", "json"): lambda: json_labeled_records(examples, limit),
        ("labeled", "binary"): lambda: labeled_records(examples, limit),
        ("scored", "json"): lambda: json_scored(scored),
        ("scored", "binary"): lambda: scored.encode(),
    }
    decoders: dict[str, Callable[[list[bytes]], object]] = {
        "labeled": lambda rs: [e for r in rs for e in decode_labeled(r)],
        "scored": lambda rs: [ScoredBatch.decode(r) for r in rs],
    }
    # both forms give the trainer and the monitor the same objects
    for (topic, _), rs in records.items():
        assert decoders[topic](rs) == (examples if topic == "labeled" else [scored])

    def mean_of_5(fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: [fn() for _ in range(5)]

    out: dict[str, Any] = {"examples": n}
    for topic in ("labeled", "scored"):
        row: dict[str, Any] = {}
        for form in ("json", "binary"):
            rs = records[(topic, form)]
            enc = best_of(mean_of_5(encoders[(topic, form)]), repeats) / 5
            dec = best_of(mean_of_5(lambda t=topic, rs=rs: decoders[t](rs)), repeats) / 5  # type: ignore[misc]
            row[form] = {
                "encode_ms": round(enc * 1e3, 3),
                "decode_ms": round(dec * 1e3, 3),
                "total_ms": round((enc + dec) * 1e3, 3),
                "total_us_per_example": round((enc + dec) / n * 1e6, 2),
                "bytes": sum(map(len, rs)),
            }
        j, b = row["json"], row["binary"]
        row["json_over_binary"] = {
            k: round(j[k] / b[k], 2) for k in ("encode_ms", "decode_ms", "total_ms", "bytes")
        }
        out[topic] = row
    return out


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    repeats = 1 if quick else 3
    rows = encode_rows()
    enc = FeatureEncoder()
    enc.encode(rows)  # the slots exist: what every later batch costs
    data = scored()
    seconds = {
        "encode": best_of(lambda: enc.encode(rows), repeats),
        "synthetic": best_of(lambda: generate(SyntheticConfig()), repeats),
        "report": best_of(lambda: render_html(data), repeats),
    }
    report: dict[str, Any] = {
        **stamp("hot_paths", quick),
        "machine": machine(),
        "repeats": repeats,
        "results": [
            {
                "path": k,
                "seconds": round(s, 4),
                "target_s": TARGETS_S[k],
                "ratio_to_target": round(s / TARGETS_S[k], 3),
            }
            for k, s in seconds.items()
        ],  # fmt: skip
        "codecs": codecs(repeats),
    }
    write_report(report, results_path(results_dir, "hot_paths", quick))
    print(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    lines = ["| path | seconds (best) | target s | time / target |", "|---|---|---|---|"]
    for r in report["results"]:
        lines.append(
            f"| {r['path']} | {r['seconds']:.3f} | {r['target_s']:g} | {r['ratio_to_target']:.2f} |"
        )
    codec = report.get("codecs")
    if codec:
        head = f"| topic ({codec['examples']:,} examples) | form | encode ms | decode ms |"
        lines += ["", head + " total ms | µs / example | bytes |", "|---|---|---|---|---|---|---|"]
        for topic in ("labeled", "scored"):
            for form in ("json", "binary", "json_over_binary"):
                r = codec[topic][form]
                per = r.get("total_us_per_example", "")
                size = f"{r['bytes']:,}" if isinstance(r["bytes"], int) else f"{r['bytes']:g}"
                lines.append(f"| {topic} | {form} | {r['encode_ms']:g} | {r['decode_ms']:g} | "
                             f"{r['total_ms']:g} | {per} | {size} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(bench_cli("hot_paths", __doc__, "one repeat", main, None))

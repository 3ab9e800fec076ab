"""The markdown tables of the index benchmarks: :func:`index_table` for
:mod:`bench.index` (index kinds, recommend latency, two-tower recall@10) and
:func:`index_scale_table` for :mod:`bench.index_scale` (the ANN sweep, refresh and
recommend lines). Each reads the report its benchmark writes (``bench/results/*.json``);
the benchmark modules expose them as ``table``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["index_scale_table", "index_table"]


def index_table(report: dict[str, Any]) -> str:
    """``bench.index``'s markdown: the index kinds, the recommend latency line, and the
    recall@10 table."""
    lines = [
        "| items | kind | build s | recall@10 vs exact | query p50 ms | query p99 ms | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["index"]["results"]:
        extra = ""
        if r["kind"] == "ivf":
            extra = f"nlist {r['nlist']}, nprobe {r['nprobe']}"
        elif r["kind"] == "hnsw":
            extra = f"M {r['m']}, efSearch {r['ef_search']}"
        if r.get("note"):
            extra += f"; build extrapolated from {r['measured_on']:,}"
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {r['build_s']:.2f} | {r['recall_at_10']:.3f} | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {extra} |"
        )
    rec = report["recommend"]
    lines += [
        "",
        f"Recommend (k={rec['k']}, {rec['candidates']} candidates, {rec['items']:,}-item "
        f"{rec['index_kind']} index, {rec['retrieval_model']} retrieval, {rec['ranker']}): "
        f"p50 {rec['p50_ms']:.2f} ms, p99 {rec['p99_ms']:.2f} ms, "
        f"{rec['requests_per_s']:.0f} requests/s sequential (retrieve p50 "
        f"{rec['retrieve_p50_ms']:.2f} ms, rank p50 {rec['rank_p50_ms']:.2f} ms).",
        "",
        "| log | test clicks | items | "
        + " | ".join(
            f"{m} recall@10"
            for m in ("two_tower", "two_tower_info_nce", "two_tower_hard_negatives")
        )
        + " | popularity | random | segment oracle | oracle |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for log, r in report["retrieval"].items():
        models = r["models"]
        cells = [
            f"{models[m]['recall_at_10']:.4f}" if m in models else "-"
            for m in (
                "two_tower",
                "two_tower_info_nce",
                "two_tower_hard_negatives",
                "popularity",
                "random",
                "segment_oracle",
                "oracle",
            )
        ]
        lines.append(
            f"| {log} | {r['test_clicks']:,} | {r['items']:,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def index_scale_table(report: dict[str, Any]) -> str:
    """``bench.index_scale``'s markdown: the sweep and the refresh / recommend lines."""
    lines = [
        "| data | kind | params | build s | recall@10 | recall@200 | verify recall@10 | "
        "search(k=200) p50 ms | p99 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for data, rows in report["sweep"]["results"].items():
        for r in rows:
            params = ", ".join(
                f"{k}={r[k]}" for k in ("nlist", "nprobe", "m", "ef_search") if k in r
            )
            lines.append(
                f"| {data} | {r['kind']} | {params} | {r['build_s']:.1f} | "
                f"{r['recall_at_10']:.3f} | {r['recall_at_200']:.3f} | "
                f"{r['verify_recall_at_10']:.3f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |"
            )
    f, rec = report["refresh"], report["recommend"]
    lines += [
        "",
        f"refresh: {f['items']:,} items, item tower {f['items_per_s']:,.0f} items/s (batch "
        f"{f['batch_size']:,}), index build {f['index_build_s']:.1f} s, verify "
        f"{f['verify_s']:.1f} s",
        f"chosen: {report['sweep']['chosen']}",
        f"recommend (k=10, {rec['candidates']} candidates, {rec['items']:,} items, "
        f"{rec['index_kind']}): p50 {rec['p50_ms']:.2f} ms, p99 {rec['p99_ms']:.2f} ms, "
        f"{rec['requests_per_s']:.0f} req/s; bar p99 <= 20 ms: {rec['meets_bar']}",
    ]
    return "\n".join(lines)

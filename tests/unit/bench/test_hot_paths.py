"""bench.hot_paths writes each path's time and its ratio to the target, and the JSON and
binary codecs of the internal topics side by side."""

from __future__ import annotations

import json
from pathlib import Path

from bench import hot_paths


def test_quick_run_reports_each_path_against_its_target(tmp_path: Path) -> None:
    hot_paths.main(quick=True, results_dir=tmp_path)
    written = json.loads((tmp_path / "hot_paths_quick.json").read_text())
    assert written["command"] == "python -m bench.hot_paths --quick"
    rows = {r["path"]: r for r in written["results"]}
    assert set(rows) == set(hot_paths.TARGETS_S)
    for name, r in rows.items():
        assert r["seconds"] > 0 and r["target_s"] == hot_paths.TARGETS_S[name]
        assert abs(r["ratio_to_target"] - r["seconds"] / r["target_s"]) < 0.01
    assert "| encode |" in hot_paths.table(written)
    codec = written["codecs"]
    assert codec["examples"] == 1024
    for topic in ("labeled", "scored"):
        json_form, binary = codec[topic]["json"], codec[topic]["binary"]
        assert json_form["total_ms"] > 0 and binary["total_ms"] > 0
        assert 0 < binary["bytes"] < json_form["bytes"]  # sizes are deterministic; times not
        assert codec[topic]["json_over_binary"]["bytes"] == round(
            json_form["bytes"] / binary["bytes"], 2
        )
    assert "| labeled | binary |" in hot_paths.table(written)

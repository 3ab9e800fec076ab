"""Smoke test of the benchmark harness: it runs and writes a sane report (no timing limits)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import run, trainer


def test_trainer_quick_writes_positive_dcnv2_throughput(tmp_path: Path) -> None:
    report = trainer.main(quick=True, results_dir=tmp_path, n=4_096)

    written = json.loads((tmp_path / "trainer_quick.json").read_text())
    dcnv2 = [r for r in written["results"] if r["model"] == "dcnv2"]
    assert dcnv2 and all(r["examples_per_s"] > 0 for r in dcnv2)
    assert written["machine"]["device"] == report["machine"]["device"]
    assert written["command"] == "python -m bench.trainer --quick"


def test_render_writes_a_table_per_results_file(tmp_path: Path) -> None:
    trainer.main(quick=True, results_dir=tmp_path, n=4_096)

    readme = run.render(quick=True, results_dir=tmp_path).read_text()

    assert "## trainer" in readme and "| dcnv2 |" in readme
    assert "## quality" not in readme

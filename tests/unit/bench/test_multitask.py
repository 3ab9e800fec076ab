"""The multi-task bench on a tiny two-label log: every arm reports each task it learns,
and the bars compare the multi-task arms with their single-task models."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import multitask


def test_multitask_quick_reports_every_arm_and_the_single_task_comparison(
    tmp_path: Path,
) -> None:
    report = multitask.main(quick=True, results_dir=tmp_path, n=3_000, seeds=1)
    written = json.loads((tmp_path / "multitask_quick.json").read_text())
    assert written["command"] == "python -m bench.multitask --quick"
    (run,) = written["runs"]
    assert run["clicks"] > run["conversions"] > 0
    for arm, (_, learns) in multitask.ARMS.items():
        tasks = multitask.TASKS if learns == "both" else (learns,)
        for task in tasks:
            q = run["arms"][arm][task]
            assert math.isfinite(q["normalized_entropy"]) and 0.0 < q["ratio_vs_true_p"] < 10.0
    bar = written["bars"]["mmoe_esmm.ctcvr"]
    want = (
        run["arms"]["mmoe_esmm"]["ctcvr"]["normalized_entropy"]
        - run["arms"]["mmoe_ctcvr"]["ctcvr"]["normalized_entropy"]
    )
    assert bar["against"] == "mmoe_ctcvr" and bar["ne_minus_single"] == [want]
    assert bar["below_single_every_seed"] == (want < 0)
    assert report["bars"] == written["bars"]

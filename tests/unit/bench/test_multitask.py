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
    ne = {arm: run["arms"][arm]["ctcvr"]["normalized_entropy"]
          for arm in ("mmoe_esmm", "mmoe_ctcvr", "dcnv2_ctcvr")}  # fmt: skip
    for name, ref in (("single", "mmoe_ctcvr"), ("default", "dcnv2_ctcvr")):
        want = ne["mmoe_esmm"] - ne[ref]
        assert bar[f"against_{name}"] == ref and bar[f"ne_minus_{name}"] == [want]
        assert bar[f"median_ne_minus_{name}"] == want  # one seed: its own difference
        assert bar[f"below_{name}_every_seed"] == bar[f"below_{name}_median"] == (want < 0)
    assert report["bars"] == written["bars"]


def test_multitask_bars_take_the_median_over_seeds() -> None:
    def run(multi: float, single: float, default: float) -> dict[str, object]:
        q = {"ctr": {"normalized_entropy": multi}, "ctcvr": {"normalized_entropy": multi}}
        return {"arms": {
            **{arm: q for arm, (_, learns) in multitask.ARMS.items() if learns == "both"},
            "mmoe_ctr": {"ctr": {"normalized_entropy": single}},
            "mmoe_ctcvr": {"ctcvr": {"normalized_entropy": single}},
            "dcnv2_ctr": {"ctr": {"normalized_entropy": default}},
            "dcnv2_ctcvr": {"ctcvr": {"normalized_entropy": default}},
        }}  # fmt: skip

    # below the single-task model in 2 of 3 seeds (median below, not every seed); above
    # the default in 2 of 3
    bars = multitask.bars([run(0.90, 0.91, 0.89), run(0.95, 0.94, 0.96), run(0.97, 0.98, 0.96)])
    bar = bars["mmoe_direct.ctr"]
    assert math.isclose(bar["median_ne_minus_single"], -0.01)
    assert bar["below_single_median"] and not bar["below_single_every_seed"]
    assert math.isclose(bar["median_ne_minus_default"], 0.01)
    assert not bar["below_default_median"] and not bar["below_default_every_seed"]

"""The serving benchmark end to end: a worker's web server under concurrent HTTP load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream.broker import BrokerNotFound, find_tansu_binary

pytestmark = pytest.mark.integration


def test_serving_quick_answers_every_phase_over_http(tmp_path: Path) -> None:
    try:
        find_tansu_binary()
    except BrokerNotFound as exc:  # pragma: no cover - the dev extras install it
        pytest.skip(str(exc))
    from bench import run, serving

    report = serving.main(quick=True, results_dir=tmp_path)

    written = json.loads((tmp_path / "serving_quick.json").read_text())
    assert written["command"] == "python -m bench.serving --quick"
    phases = {(p["phase"], p["endpoint"], p["concurrency"]): p for p in written["phases"]}
    want = {("idle", "recommend", c) for c in serving.IDLE_CONCURRENCY}
    want |= {("idle", "score", serving.SCORE_CONCURRENCY)}
    assert want <= set(phases)
    for key in want:
        p = phases[key]
        assert p["status"].get("200", 0) > 0 and set(p["status"]) == {"200"}, p
        assert not p["transport_errors"]
        # the server's own time is part of the client's, never more
        assert 0 < p["server_p50_ms"] <= p["p50_ms"]
    assert report["index_items"] and report["index_items"] > 100
    readme = run.render(quick=True, results_dir=tmp_path).read_text()
    assert "## serving" in readme and "| idle | recommend | 16 |" in readme
    assert (tmp_path / "serving_quick.png").exists()

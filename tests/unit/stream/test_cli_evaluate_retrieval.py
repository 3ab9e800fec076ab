"""``streamrec evaluate-retrieval``: the command end to end on a small synthetic log."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from logs.synthetic import SyntheticConfig, write_synthetic
from stream.cli import main


def test_evaluate_retrieval_prints_and_writes_every_row_with_the_oracle(tmp_path: Path) -> None:
    log = tmp_path / "syn.csv"
    write_synthetic(
        SyntheticConfig(n_impressions=8_000, n_users=200, n_items=100, drift_at=None), log
    )
    out = tmp_path / "r.json"
    r = CliRunner().invoke(
        main,
        ["evaluate-retrieval", str(log), "--k", "5", "--behaviour-len", "0", "--json", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert "recall@5" in r.output and "oracle" in r.output
    report = json.loads(out.read_text())
    assert report["behaviour_len"] == 0 and report["k"] == 5 and report["test_clicks"] > 0
    assert set(report["rows"]) == {"model", "popularity", "cooccurrence", "random", "oracle"}
    for m in report["rows"].values():
        assert 0.0 <= m["ndcg_at_k"] <= m["recall_at_k"] <= 1.0 and 0.0 < m["coverage"] <= 1.0
    assert report["rows"]["oracle"]["recall_at_k"] > report["rows"]["random"]["recall_at_k"]
    assert report["exclude_seen"] is False
    r = CliRunner().invoke(
        main, ["evaluate-retrieval", str(log), "--k", "5", "--exclude-seen", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["exclude_seen"] is True
    r = CliRunner().invoke(
        main, ["evaluate-retrieval", str(log), "--k", "5", "--prior", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert {"model_prior", "popularity_decayed"} <= set(report["rows"])
    assert report["prior"]["beta"] in report["prior"]["betas"] and "beta" in r.output
    r = CliRunner().invoke(
        main, ["evaluate-retrieval", str(log), "--k", "5", "--served", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert "served" in report["rows"] and "served setting after" in r.output
    assert report["served_setting"]["observed"] > 0  # the online pick saw clicks
    assert 0.0 < report["rows"]["served"]["recall_at_k"] <= 1.0


def test_evaluate_retrieval_rejects_a_bad_split(tmp_path: Path) -> None:
    log = tmp_path / "syn.csv"
    write_synthetic(SyntheticConfig(n_impressions=500, n_users=20, n_items=10), log)
    r = CliRunner().invoke(main, ["evaluate-retrieval", str(log), "--train-fraction", "1.5"])
    assert r.exit_code != 0 and "train-fraction" in r.output


def test_a_log_without_test_clicks_is_a_clear_error_not_an_empty_table(tmp_path: Path) -> None:
    log = tmp_path / "tiny.csv"
    log.write_text("ts,impression_id,user_id,item_id,click\n"
                   "1700000000,a,u,i,1\n1700000001,b,u,i,0\n")  # fmt: skip
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["evaluate-retrieval", str(log), "--json", str(out)])
    assert r.exit_code == 1 and "no click in the test part" in r.output
    assert "nan" not in r.output and not out.exists()

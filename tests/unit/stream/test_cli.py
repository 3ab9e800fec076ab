"""CLI error paths a user meets first: clear messages, non-zero exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from stream.broker import free_port
from stream.cli import main


def test_dashboards_publish_reports_an_unreachable_grafana() -> None:
    port = free_port()
    r = CliRunner().invoke(main, ["dashboards", "publish", "--url", f"http://127.0.0.1:{port}"])
    assert r.exit_code == 1
    assert "cannot connect to Grafana" in r.output


def test_generate_rejects_bad_settings_with_a_message(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["generate", str(tmp_path / "x.csv"), "--impressions", "0"])
    assert r.exit_code == 1
    assert "Error" in r.output and "n_impressions" in r.output


def test_replay_reports_a_malformed_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("ts,impression_id,user_id,item_id\n1700000000,a,u,i\n")  # no click column
    r = CliRunner().invoke(
        main, ["replay", str(bad), "--broker", "127.0.0.1:1", "--no-create-topics"]
    )
    assert r.exit_code == 1
    assert "click" in r.output


def test_convert_obd_reports_a_file_that_is_not_obd(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    r = CliRunner().invoke(main, ["convert-obd", str(bad), str(tmp_path / "out.csv")])
    assert r.exit_code == 1
    assert "Error: " in r.output and "not an Open Bandit Dataset file" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "out.csv").exists()
    bad.write_text(",timestamp,item_id,position,click,propensity_score\n"
                   "0,2019-11-24 00:00:34+00:00,1,1,x,0.1\n")  # fmt: skip
    r = CliRunner().invoke(main, ["convert-obd", str(bad), str(tmp_path / "out.csv")])
    assert r.exit_code == 1 and "column 'click', row 1" in r.output


def test_demo_checks_its_log_before_starting_a_broker(tmp_path: Path) -> None:
    for text, message in [
        ("a,b\n1,2\n", "missing required column"),
        ("ts,impression_id,user_id,item_id,click\n", "no rows"),
        # relative seconds: the worker would dead-letter every event (bad_timestamp)
        ("ts,impression_id,user_id,item_id,click\n0,a,u,i,0\n", "before 1990-01-01"),
        ("ts,impression_id,user_id,item_id,click\n1700000000000,a,u,i,0\n", "milliseconds"),
        (
            f"ts,impression_id,user_id,item_id,click\n1700000000,a,{'u' * 300},i,0\n",
            "would refuse 1 of 1 impressions checked",
        ),
    ]:
        log = tmp_path / "log.csv"
        log.write_text(text)
        r = CliRunner().invoke(main, ["demo", "--log", str(log), "--run-dir", str(tmp_path / "r")])
        assert r.exit_code == 1 and message in r.output
        assert "broker" not in r.output  # nothing was started for a log that cannot replay


OBD_FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "obd" / "all.csv"


def test_pretrain_refuses_an_empty_log_and_warns_about_one_without_clicks(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("ts,impression_id,user_id,item_id,click\n")
    r = CliRunner().invoke(main, ["pretrain", str(log), "--out", str(tmp_path / "r.pt")])
    assert r.exit_code == 1 and "no rows; nothing to pretrain on" in r.output
    assert "Traceback" not in r.output
    rows = "".join(f"{1700000000 + k},m{k},u{k % 3},i{k % 4},0\n" for k in range(40))
    log.write_text("ts,impression_id,user_id,item_id,click\n" + rows)
    r = CliRunner().invoke(main, ["pretrain", str(log), "--out", str(tmp_path / "r.pt")])
    assert r.exit_code == 0
    assert "every one of the log's 40 impressions is unclicked" in r.output


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["pretrain", "{log}", "--out", "{out}"], "the checkpoint"),
        (["evaluate", "{log}", "--json", "{out}"], "the results"),
        (["evaluate-retrieval", "{log}", "--json", "{out}"], "the results"),
        (["generate", "{out}", "--impressions", "50"], "the log"),
        (["convert-obd", str(OBD_FIXTURE), "{out}"], "the log"),
    ],
)
def test_output_files_get_their_folder_or_a_clear_error_before_the_work(
    tmp_path: Path, args: list[str], what: str
) -> None:
    log = tmp_path / "log.csv"
    rows = "".join(
        f"{1700000000 + k},m{k},u{k % 3},i{k % 4},{int(k % 5 == 0)}\n" for k in range(60)
    )
    log.write_text("ts,impression_id,user_id,item_id,click\n" + rows)
    out = tmp_path / "new" / "deeper" / "out.csv"
    r = CliRunner().invoke(main, [a.format(log=log, out=out) for a in args])
    assert r.exit_code == 0 and out.is_file(), r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the folder should be
    r = CliRunner().invoke(main, [a.format(log=log, out=blocker / "out.csv") for a in args])
    assert r.exit_code == 1 and f"cannot write {what}" in r.output, r.output
    assert "Traceback" not in r.output and "wrote" not in r.output  # before the work


def test_generate_names_a_file_name_that_is_no_log_format(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["generate", str(tmp_path / "x.txt"), "--impressions", "10"])
    assert r.exit_code == 1 and "unknown log format" in r.output and r.exception is not None
    assert isinstance(r.exception, SystemExit)  # click's error exit, not a traceback


def test_evaluate_learns_a_logs_final_labels_with_bce_not_the_workers_fnw(tmp_path: Path) -> None:
    """The worker's settings train with fnw (bce on its fake-negative stream); on a log's
    final labels fnw learns about p / (1 - p): at a 30% CTR the calibration ratio was
    ~1.4. ``evaluate`` trains with plain BCE instead and refuses ``--loss fnw``."""
    import json

    import numpy as np

    from stream.cli_logs import _ranker_config
    from stream.settings import Settings

    assert Settings().ranker.loss == "fnw"  # what the worker trains with
    cfg = _ranker_config(None, None, None, Settings().ranker)
    assert (cfg.loss, cfg.fnc) == ("bce", False)
    rng = np.random.default_rng(0)
    n = 4000
    click = rng.random(n) < 0.3
    rows = ["ts,impression_id,user_id,item_id,click,click_ts"]
    for i in range(n):
        ts = 1_700_000_000 + i
        rows.append(f"{ts},i{i},u{rng.integers(50)},m{rng.integers(30)},{int(click[i])},"
                    + (f"{ts + 5}" if click[i] else ""))  # fmt: skip
    log = tmp_path / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    r = CliRunner().invoke(
        main, ["evaluate", str(log), "--model", "logreg", "--no-features", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    ratio = json.loads(out.read_text())["all"]["calibration_ratio"]
    assert 0.8 < ratio < 1.05, ratio  # fnw: 1.17 (1.31 with bias_prior_strength 10)
    r = CliRunner().invoke(main, ["evaluate", str(log), "--loss", "fnw"])
    assert r.exit_code == 2 and "fake-negative stream" in r.output


def test_evaluate_learns_and_judges_the_second_label_with_mmoe(tmp_path: Path) -> None:
    """A log with a conversion column: ``--model mmoe`` learns "clicked and converted" as
    task 1 and reports it (ESMM: pCTR x pCVR); a single-task model reports the click only."""
    import json

    from logs.synthetic import SyntheticConfig, write_synthetic

    log = tmp_path / "log.csv"
    write_synthetic(SyntheticConfig(n_impressions=3000, n_users=200, n_items=100, seed=1,
                                    drift_at=None, conversion=True, base_cvr=0.3), log)  # fmt: skip
    out = tmp_path / "r.json"
    args = ["evaluate", str(log), "--no-features", "--json", str(out)]
    r = CliRunner().invoke(main, [*args, "--model", "mmoe", "--task1", "esmm"])
    assert r.exit_code == 0, r.output
    assert "task 1 (clicked and converted, esmm)" in r.output
    task1 = json.loads(out.read_text())["task1"]
    assert task1["n"] == 3000 and 0.5 < task1["ratio_vs_true_p"] < 2.0
    assert task1["ctr"] < json.loads(out.read_text())["all"]["ctr"]  # conversions need clicks
    r = CliRunner().invoke(main, [*args, "--model", "logreg"])
    assert r.exit_code == 0 and "task 1" not in r.output
    assert "task1" not in json.loads(out.read_text())

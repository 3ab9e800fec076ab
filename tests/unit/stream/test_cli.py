"""CLI error paths a user meets first: clear messages, non-zero exit codes."""

from __future__ import annotations

from pathlib import Path

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
    ]:
        log = tmp_path / "log.csv"
        log.write_text(text)
        r = CliRunner().invoke(main, ["demo", "--log", str(log), "--run-dir", str(tmp_path / "r")])
        assert r.exit_code == 1 and message in r.output
        assert "broker" not in r.output  # nothing was started for a log that cannot replay


def test_pretrain_writes_into_a_new_folder_and_names_an_unwritable_one(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("ts,impression_id,user_id,item_id,click\n1700000000,a,u,i,1\n"
                   "1700000001,b,u,j,0\n")  # fmt: skip
    out = tmp_path / "new" / "deeper" / "m.pt"
    r = CliRunner().invoke(main, ["pretrain", str(log), "--out", str(out)])
    assert r.exit_code == 0 and out.is_file(), r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the folder should be
    r = CliRunner().invoke(main, ["pretrain", str(log), "--out", str(blocker / "m.pt")])
    assert r.exit_code == 1 and "cannot write the checkpoint" in r.output
    assert "pretrained" not in r.output  # it failed before training

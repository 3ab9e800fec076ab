"""Settings from defaults, TOML, ``STREAMREC_*`` variables and overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from monitoring.drift import DriftConfig
from stream.join import JoinConfig
from stream.settings import (
    IndexerConfig,
    MonitorConfig,
    Settings,
    TrainerConfig,
    load_settings,
)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamrec.toml"
    path.write_text(text)
    return path


def test_without_sources_the_settings_are_the_defaults() -> None:
    assert load_settings(None, env={}) == Settings()


def test_toml_sections_and_top_level_keys_are_applied(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
        broker = "10.0.0.1:9092"
        partitions = 8

        [join]
        window_s = 900.0
        emit_positives = "click"

        [ranker]
        model = "logreg"
        hidden = [32, 16]

        [ranker.encoder]
        num_buckets = 4096
        categorical_keys = ["position", "dev"]

        [trainer]
        batch_size = 256

        [drift]
        threshold_z = 4.0

        [monitor]
        window = 1000

        [indexer]
        pool_per_user = 5
        """,
    )
    s = load_settings(path, env={})
    assert s == Settings(
        broker="10.0.0.1:9092",
        partitions=8,
        join=JoinConfig(
            window_s=900.0,
            emit_positives="click",
            delayed_feedback="fake_negative",
            align_fake_negatives=True,
        ),
        ranker=RankerConfig(
            model="logreg",
            hidden=(32, 16),
            encoder=EncoderConfig(
                num_buckets=4096,
                categorical_keys=("position", "dev"),
                admit_after=20,
                max_num_fields=64,
            ),
        ),
        trainer=TrainerConfig(batch_size=256),
        drift=DriftConfig(threshold_z=4.0),
        monitor=MonitorConfig(window=1000),
        indexer=IndexerConfig(pool_per_user=5),
    )
    hash(s)  # frozen all the way down: TOML arrays became tuples


def test_unknown_top_level_key_raises_value_error_naming_it(tmp_path: Path) -> None:
    path = toml(tmp_path, 'brokr = "x:1"\n')
    with pytest.raises(ValueError, match="brokr"):
        load_settings(path, env={})


def test_unknown_section_raises_value_error_naming_it(tmp_path: Path) -> None:
    path = toml(tmp_path, "[joiner]\nwindow_s = 1.0\n")
    with pytest.raises(ValueError, match="joiner"):
        load_settings(path, env={})


def test_unknown_key_in_a_section_raises_value_error_naming_key_and_section(
    tmp_path: Path,
) -> None:
    path = toml(tmp_path, "[trainer]\nbatch = 5\n")
    with pytest.raises(ValueError, match=r"\[trainer\].*batch"):
        load_settings(path, env={})


def test_unknown_key_in_the_encoder_table_raises_value_error_naming_it(tmp_path: Path) -> None:
    path = toml(tmp_path, "[ranker.encoder]\nbuckets = 5\n")
    with pytest.raises(ValueError, match="buckets"):
        load_settings(path, env={})


def test_invalid_section_values_are_rejected_by_the_config(tmp_path: Path) -> None:
    path = toml(tmp_path, "[trainer]\nbatch_size = 0\n")
    with pytest.raises(ValueError, match="batch_size"):
        load_settings(path, env={})


def test_environment_variables_are_coerced_to_the_field_types() -> None:
    s = load_settings(
        None,
        env={
            "STREAMREC_BROKER": "kafka://h:1",
            "STREAMREC_PARTITIONS": "12",
            "STREAMREC_SESSION_TIMEOUT_S": "9.5",
            "UNRELATED": "x",
        },
    )
    assert (s.broker, s.partitions, s.session_timeout_s) == ("kafka://h:1", 12, 9.5)
    assert isinstance(s.partitions, int) and isinstance(s.session_timeout_s, float)


def test_precedence_is_defaults_then_toml_then_env_then_overrides(tmp_path: Path) -> None:
    path = toml(tmp_path, 'broker = "toml:1"\npartitions = 2\napp_id = "from-toml"\n')
    env = {"STREAMREC_BROKER": "env:2", "STREAMREC_PARTITIONS": "3"}
    s = load_settings(path, env=env, partitions=5, metrics_port=None)
    assert s.app_id == "from-toml"  # TOML over the default
    assert s.broker == "env:2"  # env over TOML
    assert s.partitions == 5  # override over env
    assert s.metrics_port == Settings().metrics_port  # a None override changes nothing


def test_section_override_replaces_the_toml_section(tmp_path: Path) -> None:
    path = toml(tmp_path, "[trainer]\nbatch_size = 256\n")
    s = load_settings(path, env={}, trainer=TrainerConfig(batch_size=8))
    assert s.trainer.batch_size == 8


@pytest.mark.parametrize(
    ("broker", "bootstrap", "faust"),
    [
        ("127.0.0.1:9092", "127.0.0.1:9092", "kafka://127.0.0.1:9092"),
        ("kafka://h:1", "h:1", "kafka://h:1"),
        ("kafka://a:1,b:2", "a:1,b:2", "kafka://a:1;kafka://b:2"),
        ("a:1,b:2", "a:1,b:2", "kafka://a:1;kafka://b:2"),
    ],
)
def test_bootstrap_strips_the_scheme_and_faust_broker_adds_it_per_host(
    broker: str, bootstrap: str, faust: str
) -> None:
    s = Settings(broker=broker)
    assert s.bootstrap == bootstrap
    assert s.faust_broker == faust


def test_replace_returns_a_changed_copy() -> None:
    s = Settings()
    t = s.replace(partitions=1)
    assert t.partitions == 1 and s.partitions == Settings().partitions


@pytest.mark.parametrize(
    "make",
    [
        lambda: TrainerConfig(batch_size=0),
        lambda: TrainerConfig(flush_s=0),
        lambda: MonitorConfig(holdout_fraction=1.0),
        lambda: MonitorConfig(holdout_fraction=0.0),
    ],
)
def test_section_configs_reject_invalid_values(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]  # a lambda


def test_the_worker_defaults_to_fresh_labels_with_fnw(tmp_path: Path) -> None:
    """Fake negatives + FNW by default, from code and from a file with a [join] section;
    a file that picks the window scheme gets plain BCE."""
    assert Settings().join.delayed_feedback == "fake_negative"
    assert Settings().ranker.loss == "fnw"
    cfg = tmp_path / "s.toml"
    cfg.write_text("[join]\nwindow_s = 60.0\n")
    s = load_settings(cfg, env={})
    assert (s.join.delayed_feedback, s.ranker.loss) == ("fake_negative", "fnw")
    cfg.write_text('[join]\ndelayed_feedback = "window"\n')
    s = load_settings(cfg, env={})
    assert (s.join.delayed_feedback, s.ranker.loss) == ("window", "bce")


def test_section_keys_from_the_environment() -> None:
    env = {"STREAMREC_JOIN__DELAYED_FEEDBACK": "window", "STREAMREC_MONITOR__WARMUP": "7"}
    s = load_settings(None, env=env)
    assert (s.join.delayed_feedback, s.ranker.loss, s.monitor.warmup) == ("window", "bce", 7)
    assert load_settings(None, env={}).join.delayed_feedback == "fake_negative"


def test_an_optional_bool_from_the_environment_is_a_bool_not_a_string() -> None:
    from stream.settings import load_settings

    def check(value: str) -> object:
        env = {"STREAMREC_RECOVERY_CONSISTENCY_CHECK": value}
        return load_settings(env=env).recovery_consistency_check

    # "false" must not stay the (truthy) string "false": stack and tests set it
    assert [check(v) for v in ("false", "0", "true", "1", "auto", "")] == [
        False, False, True, True, None, None]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[offset]\nmin_delay_clicks = 0\n", {}, "[offset]: min_delay_clicks must be >= 1"),
        ('[ranker]\nbase_lr = "fast"\n', {}, "[ranker] base_lr must be a number, got 'fast'"),
        ('partitions = "four"\n', {}, "partitions must be an integer, got 'four'"),
        ('features = "yes"\n', {}, "features must be true or false, got 'yes'"),
        ("[trainer]\nbatch_size = 10.5\n", {}, "[trainer] batch_size must be an integer, got 10.5"),
        ("[ranker]\nhidden = 5\n", {}, "[ranker] hidden must be an array, got 5"),
        ("[ranker.encoder]\nnum_buckets = true\n", {}, "[ranker.encoder] num_buckets must be an"),
        ("[ranker\n", {}, "Expected ']'"),
        ("", {"STREAMREC_OFFSET__MIN_DELAY_CLICKS": "0"}, "min_delay_clicks must be >= 1"),
        ("", {"STREAMREC_PARTITIONS": "four"}, "STREAMREC_PARTITIONS must be an integer, got"),
        ("", {"STREAMREC_JOIN__WINDOW_S": "abc"}, "STREAMREC_JOIN__WINDOW_S must be a number"),
    ],
)
def test_bad_settings_are_a_clear_cli_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict, message: str
) -> None:
    from click.testing import CliRunner

    from stream.cli import main
    from stream.settings import SettingsError

    cfg = tmp_path / "s.toml"
    cfg.write_text(text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(cfg)
    from logs.synthetic import SyntheticConfig, write_synthetic

    log = tmp_path / "log.csv.gz"
    write_synthetic(SyntheticConfig(n_impressions=50), log)
    r = CliRunner().invoke(main, ["evaluate", str(log), "--config", str(cfg)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert f"Error: bad settings {cfg}" in r.output and message in r.output


def test_nice_is_a_niceness_increment_from_0_to_19(tmp_path: Path) -> None:
    assert Settings().nice == 0
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="nice must be in"):
            Settings(nice=bad)
    conf = tmp_path / "s.toml"
    conf.write_text("nice = 7\n")
    assert load_settings(conf).nice == 7
    assert load_settings(conf, nice=3).nice == 3  # the CLI's --nice wins over the file

"""monitoring.redact: no password or token survives in a message or a log line."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from monitoring.redact import redact
from stream.cli import install_log_redaction, main

SECRETS = [
    ("kafka://svc:pa55word@broker:9092", "kafka://svc:***@broker:9092"),
    ("http://u:p%40ss:w/rd@h:1/x", "http://u:***@h:1/x"),
    ("sasl_plain_password=pa55word", "sasl_plain_password=***"),
    ('{"password": "pa55word"}', '{"password": ***}'),
    ("GRAFANA_TOKEN: glsa_pa55word", "GRAFANA_TOKEN: ***"),
    ("Authorization: Basic YWRtaW46cGE1NXdvcmQ=", "Authorization: Basic ***"),
]


@pytest.mark.parametrize(("text", "expected"), SECRETS)
def test_redact_hides_passwords_and_tokens(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "pa55word" not in redact(text)


def test_redact_keeps_text_without_credentials() -> None:
    text = "http://127.0.0.1:6066/recommend?user_id=u1&k=10 at 12:30:01 (mailto:a@b)"
    assert redact(text) == text


@pytest.fixture
def redacting_log() -> Iterator[None]:
    before = logging.getLogRecordFactory()
    install_log_redaction()
    install_log_redaction()  # idempotent
    try:
        yield
    finally:
        logging.setLogRecordFactory(before)


def test_every_log_record_is_redacted_with_its_arguments_and_traceback(
    redacting_log: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("some.library")
    with caplog.at_level(logging.INFO):
        log.info("connecting to %s", "http://admin:pa55word@grafana:3000")
        try:
            raise ConnectionError("refused: http://admin:pa55word@grafana:3000/api")
        except ConnectionError:
            log.exception("upload failed")
    assert "admin:***@grafana" in caplog.text
    assert "pa55word" not in caplog.text


def test_cli_error_messages_are_redacted() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = logging.getLogRecordFactory()
    try:
        result = CliRunner().invoke(
            main, ["dashboards", "publish", "--url", f"http://admin:pa55word@127.0.0.1:{port}"]
        )
    finally:
        logging.setLogRecordFactory(before)
    assert result.exit_code == 1
    assert "pa55word" not in result.output
    assert "admin:***@127.0.0.1" in result.output


def test_a_redacted_record_formats_with_fausts_own_formatter(redacting_log: None) -> None:
    import io

    from mode.utils.logging import ExtensionFormatter

    record = logging.getLogger("faust.x").makeRecord(
        "faust.x", logging.WARNING, "f", 1, "dead letter from %s[%d]: %s 100%%",
        ("impressions", 2, "kafka://u:pa55word@h"), None,
    )  # fmt: skip
    text = ExtensionFormatter(stream=io.StringIO()).format(record)
    assert "dead letter from impressions[2]: kafka://u:***@h 100%" in text

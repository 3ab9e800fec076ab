"""Shared fixtures of the integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.broker import free_port, wait_for_port

#: The workers these tests start label with the window scheme (positives and negatives at
#: window close, each impression labelled exactly once), which their assertions count on;
#: the worker's default is fresh labels (fake negatives + FNW), tested on its own in
#: test_fresh_labels.py, which starts its workers with this variable removed.
WINDOW_SCHEME_ENV = "STREAMREC_JOIN__DELAYED_FEEDBACK"


@pytest.fixture(scope="session", autouse=True)
def _window_scheme_workers() -> Iterator[None]:
    before = os.environ.get(WINDOW_SCHEME_ENV)
    os.environ[WINDOW_SCHEME_ENV] = "window"
    yield
    if before is None:
        os.environ.pop(WINDOW_SCHEME_ENV, None)
    else:
        os.environ[WINDOW_SCHEME_ENV] = before


class S3Server:
    """``moto_server`` (moto 5.2, S3 with conditional PUT) on a loopback port, with one
    bucket: the persistent storage of a Tansu broker that outlives a broker restart."""

    def __init__(self, log_path: Path, bucket: str = "tansu") -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s=30)
            self._create_bucket(timeout_s=30)
        except BaseException:
            self.stop()
            raise

    def _create_bucket(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        req = urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT")
        while True:
            try:
                urllib.request.urlopen(req, timeout=10).close()  # noqa: S310  # loopback
                return
            except OSError:  # the server may still be loading its S3 backend
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path / "s3.log")
    yield server
    server.stop()

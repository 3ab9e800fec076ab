"""``streamrec stack`` safety without starting a stack: a bare pid is never signalled, and
a port left in TIME-WAIT by ``stack down`` is free for the next ``stack up``."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.stack import (
    StackError,
    _check_port_free,
    _proc_start_time,
    _write_state,
    pid_alive,
    read_state,
    stop_processes,
)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_record_without_start_time_is_never_signalled() -> None:
    proc = _sleeper()
    try:
        bare = {"role": "worker", "name": "w", "pid": proc.pid}  # an old stack.json
        results = stop_processes({"processes": [bare]}, timeout_s=1)
        assert results == [(bare, "not signalled")]
        time.sleep(0.2)
        assert proc.poll() is None  # still running: nothing was sent to it
        # a recorded start time that does not match (the pid was reused): not signalled
        reused = {**bare, "start_time": "1"}
        assert stop_processes({"processes": [reused]}, timeout_s=1) == [(reused, "not running")]
        assert proc.poll() is None
        # the right start time: stopped
        mine = {**bare, "start_time": _proc_start_time(proc.pid)}
        assert stop_processes({"processes": [mine]}, timeout_s=10) == [(mine, "stopped")]
        assert not pid_alive(proc.pid, mine["start_time"])
    finally:
        proc.kill()
        proc.wait()


def test_a_port_in_time_wait_is_free_but_a_listening_one_is_not() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    with pytest.raises(StackError, match="already in use"):
        _check_port_free(port, "test")
    conn.close()  # the server side closes first: its end sits in TIME-WAIT
    server.close()
    client.close()
    time.sleep(0.1)
    plain = socket.socket()  # what the check did before: a bind without SO_REUSEADDR
    try:
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    finally:
        plain.close()
    _check_port_free(port, "test")  # no StackError: stack up right after stack down works


def test_the_state_file_is_written_through_a_unique_temp_name(tmp_path: Path) -> None:
    planted = tmp_path / "stack.json.tmp"
    target = tmp_path / "victim"
    target.write_text("keep")
    planted.symlink_to(target)  # the old fixed temp name, pointing elsewhere
    _write_state(tmp_path, {"processes": []})
    assert target.read_text() == "keep"
    assert read_state(tmp_path) == {"processes": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.json", "stack.json.tmp",
                                                          "victim"]  # fmt: skip


@pytest.mark.parametrize(
    "processes",
    [
        [{"name": "x", "pid": 123}],  # no role
        [{"role": "worker", "name": "w", "pid": "123"}],  # pid not a number
        [{"role": "worker", "name": "w", "pid": -1}],  # kill(-1) would signal every process
        [{"role": "worker", "name": "w", "pid": 0}],  # kill(0): this process group
        ["worker"],
        {"worker": 1},
    ],
)
def test_a_damaged_state_file_is_a_clear_error_and_nothing_is_signalled(
    tmp_path: Path, processes: object
) -> None:
    import json

    (tmp_path / "stack.json").write_text(json.dumps({"processes": processes}))
    with pytest.raises(StackError, match="damaged process list"):
        read_state(tmp_path)

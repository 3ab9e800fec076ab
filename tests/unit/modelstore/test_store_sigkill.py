"""SIGKILL of a process in the middle of publishing model-store versions (files, checksums,
manifest, rename, pruning): whatever the moment, every version a reader lists is complete
and passes its checksums, and the next publisher goes on from the newest one."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from modelstore.store import DirectoryStore

PUBLISHER = """
import os, sys
from modelstore.store import DirectoryStore
store = DirectoryStore(sys.argv[1], keep=3)
def write(d):
    for name in ("ranker.pt", "index.faiss", "calibrator.json"):
        with open(d / name, "wb") as f:
            f.write(os.urandom(256 * 1024))
while True:
    store.publish(write, meta={"pid": os.getpid()})
"""


def test_sigkill_during_publishing_never_leaves_a_listed_version_incomplete(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    rng = random.Random(8)
    store = DirectoryStore(root, keep=3)
    seen_versions = 0
    mid_write = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(root)])
        time.sleep(0.6 + rng.random() * 0.6)  # interpreter start-up, then mid-publish
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_write += any(root.glob(".tmp-*"))  # killed while a version was being written
        versions = store.versions()
        assert versions, "nothing was published before the kill"
        for v in versions:
            m = store.open(v)  # every file present, right size, right checksum
            assert set(m.files) == {"ranker.pt", "index.faiss", "calibrator.json"}
        assert len(versions) <= 3 + 1  # keep=3, plus one published before its prune ran
        assert versions[-1] >= seen_versions
        seen_versions = versions[-1]
    assert mid_write >= 1  # the kills did land in the middle of a publish
    # a new publisher continues after the newest complete version
    m = store.publish(lambda d: (d / "ranker.pt").write_bytes(b"x"))
    assert m.version == seen_versions + 1
    assert store.versions()[-1] == m.version and len(store.versions()) <= 3

"""bench.quality's pickle cache: never in the shared temp directory, never unpickling a
file someone else could have written."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import pytest

from bench.quality import cache_dir, synthetic_examples
from logs.synthetic import SyntheticConfig

CFG = SyntheticConfig(n_impressions=300, seed=1, drift_at=None)


class Planted:
    """What a hostile pickle would run: here it only leaves a mark."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path("planted-was-loaded").touch, ())


def test_the_default_cache_is_not_under_the_shared_temp_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STREAMREC_BENCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert not str(cache_dir()).startswith(tempfile.gettempdir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "streamrec" / "bench"


def test_the_cache_is_private_and_reused(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    first = synthetic_examples(CFG, d)
    assert os.stat(d).st_mode & 0o777 == 0o700
    (pkl,) = d.glob("*.pkl")
    assert synthetic_examples(CFG, d).rows == first.rows
    assert not os.stat(pkl).st_mode & 0o022


@pytest.mark.parametrize("how", ["world_writable_dir", "symlinked_dir", "writable_file"])
def test_a_cache_others_could_write_is_not_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.chdir(tmp_path)
    real = tmp_path / "real"
    synthetic_examples(CFG, real)  # the file name the next run would look for
    (pkl,) = real.glob("*.pkl")
    pkl.write_bytes(pickle.dumps(Planted()))
    d = real
    if how == "world_writable_dir":
        real.chmod(0o777)
    elif how == "symlinked_dir":
        d = tmp_path / "link"
        d.symlink_to(real)
    else:
        pkl.chmod(0o666)
    out = synthetic_examples(CFG, d)
    assert len(out) == CFG.n_impressions
    assert not (tmp_path / "planted-was-loaded").exists()

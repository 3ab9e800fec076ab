"""Every ``python -m bench.<name> --option`` the READMEs name exists (docs match code)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCS = (ROOT / "README.md", ROOT / "bench" / "README.md")


def named() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for doc in DOCS:
        for m in re.finditer(r"python -m (bench\.\w+)((?: [^`|\n#]*)?)", doc.read_text()):
            opts = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2))
            out.setdefault(m.group(1), set()).update(opts)
    return out


NAMED = named()


def test_the_readmes_name_benches_and_options() -> None:
    assert len(NAMED) >= 20 and sum(map(len, NAMED.values())) >= 20


@pytest.mark.parametrize("module", sorted(NAMED))
def test_each_named_bench_has_a_command_line_with_the_named_options(
    module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = importlib.import_module(module)
    entry = getattr(mod, "cli", None) or mod.main
    with pytest.raises(SystemExit) as exc:
        entry(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    missing = [o for o in sorted(NAMED[module]) if o not in text]
    assert not missing, f"{module}: the README names {missing}, not in its --help"


def test_every_results_file_the_docs_cite_is_committed() -> None:
    docs = (*DOCS, ROOT / "docs" / "DESIGN.md")
    cited = set()
    for doc in docs:
        cited |= set(re.findall(r"bench/results/[\w./-]+?\.(?:json|png)", doc.read_text()))
    assert len(cited) >= 20
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, f"the docs cite results that are not in the tree: {missing}"

"""The dependency rule of docs/DESIGN.md, read from the source: which packages may import
what. A plain library imports nothing of Kafka, Faust, asyncio or ``stream``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("stream", "learners", "index", "monitoring", "modelstore", "features", "logs",
           "serving")  # fmt: skip
WIRING_ONLY = {"faust", "kafka", "aiokafka", "mode", "asyncio", "stream"}
#: package (or module) -> the project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "learners": set(),
    # calibration's refit guards judge on held-out log loss: the one in the statistics
    "learners.calibration": {"monitoring"},
    "learners.recalibration": {"monitoring"},
    "index": set(),
    "monitoring": set(),
    "features": set(),
    "modelstore": {"learners", "index"},
    "logs": set(),
    "logs.offline": {"learners", "features", "monitoring"},
    "serving": {"learners", "index", "features", "logs"},
}


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (anywhere in the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def _rule(module: str) -> set[str]:
    return ALLOWED.get(module, ALLOWED[module.split(".")[0]])


LIBRARY_FILES = sorted(p for pkg in ALLOWED if "." not in pkg for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_library_imports_only_what_the_rule_allows(path: Path) -> None:
    rel = path.relative_to(ROOT).with_suffix("")
    module = ".".join(rel.parts).removesuffix(".__init__")
    pkg = rel.parts[0]
    got = imports_of(path)
    assert not got & WIRING_ONLY, f"{module} imports wiring: {sorted(got & WIRING_ONLY)}"
    project = (got & set(PROJECT)) - {pkg}
    assert project <= _rule(module), f"{module} imports {sorted(project - _rule(module))}"


def test_the_rule_sees_the_moved_packages() -> None:
    # the scan is not vacuous: it reads the library files, and stream (wiring) is not one
    names = {str(p.relative_to(ROOT)) for p in LIBRARY_FILES}
    assert {"logs/events.py", "logs/io.py", "serving/recommender.py"} <= names
    assert not any(n.startswith("stream/") for n in names)
    assert "asyncio" in imports_of(ROOT / "stream" / "gate.py")


def test_the_image_copies_every_package() -> None:
    """The Dockerfile copies each package pyproject installs (features/ was once missing)."""
    docker = (ROOT / "Dockerfile").read_text()
    for pkg in PROJECT:
        assert f"COPY {pkg} ./{pkg}" in docker, pkg

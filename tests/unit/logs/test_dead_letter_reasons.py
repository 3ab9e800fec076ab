"""Every dead-letter reason the code can raise is in ``REASONS`` and in the README's table."""

from __future__ import annotations

import re
from pathlib import Path

from logs.events import REASONS

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = (
    "features",
    "index",
    "learners",
    "logs",
    "modelstore",
    "monitoring",
    "serving",
    "stream",
)
RAISED = re.compile(r'InvalidEvent\(\s*"([a-z_]+)"')


def _raised_reasons() -> set[str]:
    found: set[str] = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            found.update(RAISED.findall(path.read_text(encoding="utf-8")))
    return found


def test_every_raised_reason_is_declared() -> None:
    raised = _raised_reasons()
    assert len(raised) >= 10  # the scan found the code
    assert raised - set(REASONS) == set()


def test_every_reason_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\s*\| `([a-z_]+)` \|", readme, flags=re.MULTILINE))
    assert set(REASONS) - rows == set()

"""The README's settings example is a file the worker accepts (docs that match the code)."""

from __future__ import annotations

import re
from pathlib import Path

from stream.settings import load_settings

README = Path(__file__).resolve().parents[3] / "README.md"


def test_every_toml_example_in_the_readme_loads(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "no ```toml example in README.md"
    for k, block in enumerate(blocks):
        path = tmp_path / f"example{k}.toml"
        path.write_text(block)
        settings = load_settings(path, env={})  # raises on unknown keys or bad values
        assert settings.broker

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


def test_every_cli_option_the_readme_names_exists() -> None:
    import click

    from stream.cli import main

    assert isinstance(main, click.Group)
    named = 0
    # commands in code only: fenced blocks and inline code spans
    text = README.read_text()
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    code = "\n".join(fenced + inline)
    for m in re.finditer(r"(?:^|\s|/)streamrec ([a-z][a-z-]*)((?: [^|\n#]*)?)", code, re.M):
        cmd: click.Command | None = main.get_command(click.Context(main), m.group(1))
        assert cmd is not None, f"README names an unknown command: streamrec {m.group(1)}"
        words = m.group(2).split()
        if isinstance(cmd, click.Group) and words and not words[0].startswith("-"):
            sub = cmd.get_command(click.Context(cmd), words[0].split("|")[0])
            assert sub is not None, f"unknown command: streamrec {m.group(1)} {words[0]}"
            cmd = sub
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2)):
            named += 1
            assert opt in opts, f"streamrec {m.group(1)}: README names {opt}, not an option"
    assert named >= 20  # the README does name options: the check reads what it should

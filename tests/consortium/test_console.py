"""The CLI's console: a message sent to a pipe or a file stays one line; a terminal still wraps it."""

from __future__ import annotations

import io
import os
import shutil

import yaml
from rich.table import Table

from consortium.console import Console
from tests.helpers import console_script


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_output_keeps_a_long_path_on_one_line(tmp_path, small_config_dict):
    """The console script with stdout and stderr piped, as in a log or ``| grep``, 80 columns wide."""
    deep = tmp_path.joinpath(*(f"nested_folder_{level}" for level in range(8)))
    deep.mkdir(parents=True)
    shutil.copy(tmp_path / "m.h5ad", deep / "m.h5ad")
    config = deep / "consortium.yaml"
    config.write_text(yaml.safe_dump(small_config_dict))
    assert len(str(deep / "m.split.csv")) > 120
    env = {**os.environ, "COLUMNS": "80"}

    checked = console_script(["data", "check", "--config", str(config), "--member", "m1"], timeout=300, env=env)
    assert checked.returncode == 0, checked.stderr
    assert any(f"({deep / 'm.h5ad'}): 80 samples" in line for line in checked.stdout.splitlines()), checked.stdout

    split = console_script(["data", "split", "--config", str(config), "--member", "m1"], timeout=300, env=env)
    assert split.returncode == 0, split.stderr
    assert any(line.startswith(f"stored split in {deep / 'm.split.csv'}: ") for line in split.stdout.splitlines())

    absent = deep / "absent.yaml"
    missing = console_script(["data", "check", "--config", str(absent), "--member", "m1"], timeout=300, env=env)
    assert missing.returncode == 2
    assert any(f"{absent}: no such file" in line for line in missing.stderr.splitlines()), missing.stderr


def test_a_terminal_still_wraps_messages_and_tables_at_its_width():
    message = "the member's file " + "/nested_folder" * 12 + "/m.h5ad is not fit to join"
    table = Table("level", "problem")
    table.add_row("error", "a problem described at length, " * 6)
    terminal, piped = _Terminal(), io.StringIO()
    for stream in (terminal, piped):
        console = Console(file=stream, width=80, color_system=None)
        console.print(message)
        console.print(table)
    assert max(len(line) for line in terminal.getvalue().splitlines()) <= 80
    lines = piped.getvalue().splitlines()
    assert lines[0] == message  # not wrapped
    assert max(len(line) for line in lines[1:]) <= 80  # a table keeps its width, its cells wrapped inside it

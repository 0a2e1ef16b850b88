"""The README's commands are ones the code accepts, and its test command is what CI runs."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rwkvq_onnx.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_test_command_is_what_ci_runs():
    ci = [l for l in (REPO / ".ci" / "run").read_text().splitlines()
          if l and not l.startswith(("#", "set ", "cd ", "rm "))]
    assert ci[-1] == _bash_blocks()[1].strip()
    assert "--full" in ci[-1]


def _readme_cli_commands() -> list[list[str]]:
    commands = []
    for block in _bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):  # a comment line
                continue
            for part in re.split(r"&&|;|\|", line.split(" #")[0]):
                words = shlex.split(part.replace("&", ""))
                if words[:1] == ["rwkvq-onnx"]:
                    commands.append(words[1:])
    return commands


@pytest.mark.parametrize("argv", _readme_cli_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_cli_commands_parse(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_readme_validate_example_uses_the_defaults():
    assert ["validate", "fp.onnx", "q.onnx"] in _readme_cli_commands()

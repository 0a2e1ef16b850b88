"""Every flag of every subcommand says what it does and what its default is (issue 16, item 6)."""
from __future__ import annotations

import argparse
import re

import pytest

from rwkvq_onnx.cli import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


SUBCOMMANDS = sorted(_subparsers())


def _option_entries(help_text: str) -> dict[str, str]:
    """Map each option's first flag to its help text, from the rendered `options:` section of --help."""
    section = help_text.split("options:", 1)[1]
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_every_subcommand_is_covered():
    assert {"export", "eval", "generate", "quantize", "build-engine", "triton-repo", "validate", "report",
            "demo"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_states_meaning_and_default_of_every_option(command):
    sub = _subparsers()[command]
    entries = _option_entries(sub.format_help())
    flags = {a.option_strings[0]: a for a in sub._actions if a.option_strings and a.dest != "help"}
    assert flags, command
    for flag, action in flags.items():
        assert flag in entries, f"{command} {flag} missing from --help"
        text = entries[flag]
        assert action.help, f"{command} {flag} has no help text"
        if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._VersionAction)):
            continue  # a required flag has no default; a switch is off unless given
        assert re.search(r"default|required", text, re.I), f"{command} {flag}: no default stated: {text}"
        if action.default not in (None, False) and not isinstance(action.default, bool):
            shown = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
            assert shown in text, f"{command} {flag}: help does not show the default {shown!r}: {text}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_positionals_are_explained(command):
    for action in _subparsers()[command]._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            assert action.help, f"{command} {action.dest} has no help text"

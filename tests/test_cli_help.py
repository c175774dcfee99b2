"""The command line explains itself: a version, and help text on every flag of every command."""

from __future__ import annotations

import argparse
import subprocess
import sys

from isoscope import __version__
from isoscope.cli import build_parser


def test_version_is_the_package_version() -> None:
    out = subprocess.run([sys.executable, "-m", "isoscope.cli", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"isoscope {__version__}"


def test_every_flag_of_every_command_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and not action.help and action.dest != "help":
                missing.append(f"{name} {'/'.join(action.option_strings)}")
    assert not missing, missing

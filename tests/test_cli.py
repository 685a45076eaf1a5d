"""The CLI surface: one registry, complete help, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llavatune.cli import COMMANDS, main


def test_help_lists_exactly_the_registered_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("commands:")[1].strip("\n").splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_complete_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llavatune " + name) or f"llavatune {name}" in out
    assert "--" in out  # options are documented


def test_unknown_command_is_one_line(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'train'" in err


def test_unknown_flag_is_one_line(capsys):
    assert main(["eval", "--no-such-flag", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-such-flag" in err and "Traceback" not in err


def test_console_script_help_does_not_import_torch():
    code = "import sys; from llavatune.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")

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


def _option_classes():
    """Every options dataclass of every command (prepare's per source, train's sections)."""
    import dataclasses
    import importlib

    seen = {}
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and any(
                    "help" in f.metadata for f in dataclasses.fields(obj)):
                seen.setdefault(obj, name)
        for extra in getattr(module, "SECTIONS", ()):
            seen.setdefault(extra, name)
        for source in getattr(module, "SOURCES", {}).values():
            seen.setdefault(source.options, name)
    return seen


def test_every_boolean_flag_of_every_command_takes_no_x():
    """--no-X works for every boolean option of every command (HfArgumentParser alone adds it only when the
    default is true), in both spellings, and the last of --X / --no-X wins."""
    import dataclasses
    import typing

    from llavatune.config import _make_parser

    checked = 0
    for cls, command in _option_classes().items():
        parser = _make_parser(f"llavatune {command}", "", [cls])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or hints[f.name] not in (bool, typing.Optional[bool]):
                continue
            dashed = f.name.replace("_", "-")
            assert vars(parser.parse_args([f"--no-{dashed}"]))[f.name] is False, (command, f.name)
            assert vars(parser.parse_args([f"--no_{f.name}"]))[f.name] is False, (command, f.name)
            assert vars(parser.parse_args([f"--no-{dashed}", f"--{f.name}", "true"]))[f.name] is True
            checked += 1
    assert checked > 40  # train alone has dozens


LOADING = ("predict", "chat", "serve", "eval", "merge")


@pytest.mark.parametrize("name", LOADING)
def test_loading_options_are_one_vocabulary(name, capsys, tmp_path):
    """--model, --base_model, --dtype, --template and --device: spelled, documented and validated once
    (llavatune.infer.options.LoadOptions), whichever command loads the model."""
    import dataclasses
    import importlib

    from llavatune.infer.options import LoadOptions

    module = importlib.import_module(COMMANDS[name][0])
    (cls,) = [c for c in vars(module).values() if isinstance(c, type) and c is not LoadOptions
              and issubclass(c, LoadOptions)]
    shared = {f.name: f.metadata["help"] for f in dataclasses.fields(LoadOptions)}
    assert {f.name: f.metadata.get("help") for f in dataclasses.fields(cls) if f.name in shared} == shared
    for bad, flag in ((["--dtype", "fp8"], "--dtype"), (["--template", "vicuna"], "--template"),
                      (["--device", "gpu"], "--device")):
        assert main([name, "--model", "x", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err, err
    # the same from a YAML file (argparse checks choices only on the command line)
    yml = tmp_path / "c.yaml"
    yml.write_text("template: vicuna\n")
    assert main([name, str(yml), "--model", "x"]) == 2
    assert "--template: invalid value 'vicuna'" in capsys.readouterr().err

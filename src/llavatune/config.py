"""One config system: dataclasses -> YAML -> CLI flags.

Every command's options are dataclasses. A field's docstring (the string literal right after it, as in
litgpt) becomes its ``--help`` text; ``transformers.HfArgumentParser`` turns the fields into flags
(``--snake_case`` and ``--kebab-case`` both work; a boolean is ``--X``, ``--X true|false`` or ``--no-X``, in every
command), a YAML file given as the first positional argument
supplies values, and flags on the command line override the YAML. The resolved values are written
into every output directory (``llavatune_config.yaml``) so a run can always be reproduced.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from llavatune.files import CONFIG_FILE  # noqa: F401  (the resolved configuration, in every output directory)


class ConfigError(ValueError):
    """A user-facing configuration error. The message names the flag or YAML key at fault."""


def _field_docstrings(cls: type) -> dict[str, str]:
    """Map field name -> the docstring literal that follows its annotation in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def config(cls: type) -> type:
    """``@dataclass`` that also copies each field's docstring into ``metadata['help']``.

    ``HfArgumentParser`` reads ``metadata['help']``, so the docstring is the single place a field is
    documented: in the code, in ``--help`` and in ``docs/``.
    """
    cls = dataclasses.dataclass(cls)
    docs = _field_docstrings(cls)
    for f in dataclasses.fields(cls):
        if f.name in docs and "help" not in f.metadata:
            f.metadata = types.MappingProxyType({**f.metadata, "help": docs[f.name]})
    return cls


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show a field's default unless it is None or the docstring already speaks of its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "default" not in text.lower() and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _make_parser(prog: str, description: str, dataclass_types: Sequence[type]):
    from transformers import HfArgumentParser

    class _Parser(HfArgumentParser):
        def error(self, message: str):  # one line, not a usage dump or a traceback
            sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
            raise SystemExit(2)

    parser = _Parser(list(dataclass_types), prog=prog, description=description, formatter_class=_HelpFormatter)
    _add_negations(parser, dataclass_types)
    return parser


def _add_negations(parser: argparse.ArgumentParser, dataclass_types: Sequence[type]) -> None:
    """``--no-X`` / ``--no_X`` for every boolean option, in every command.

    ``HfArgumentParser`` adds them only for booleans whose default is true; the others take ``--X false``, and a
    ``--no-X`` that works for some flags and not others is a trap (a script that turns a feature off breaks when its
    default changes). Not listed in ``--help`` (one line per boolean would double it); the module docstring and the
    README say so."""
    import typing

    for dt in dataclass_types:
        hints = typing.get_type_hints(dt)
        for f in dataclasses.fields(dt):
            if not f.init or hints.get(f.name) not in (bool, Optional[bool]) or f.default is True:
                continue
            options = [f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"]
            if any(o in parser._option_string_actions for o in options):
                continue  # a real option of that name (or HfArgumentParser's own negation)
            parser.add_argument(*dict.fromkeys(options), action="store_false", dest=f.name, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)


def _known_fields(dataclass_types: Sequence[type]) -> set[str]:
    return {f.name for dt in dataclass_types for f in dataclasses.fields(dt) if f.init}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    from llavatune.data.reader import DataError, read_text

    try:
        data = yaml.safe_load(read_text(p)) or {}
    except DataError as e:
        raise ConfigError(f"config file {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def parse_config(
    dataclass_types: Sequence[type],
    argv: Sequence[str],
    prog: str = "llavatune",
    description: str = "",
    allow_yaml: bool = True,
    adjust: Callable[[dict[str, Any]], None] | None = None,
    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
):
    """Parse ``[CONFIG.yaml] [--flag value ...]`` into instances of ``dataclass_types``.

    YAML keys use the field names; unknown keys are an error naming the key. Flags win over YAML.
    ``translate(values)`` maps the YAML's values onto the options first (``plan`` reads a training recipe).
    ``adjust(values)`` may change the merged ``{field: value}`` dict before the dataclasses are built (for
    decisions their constructors depend on, such as ``train --smoke`` turning bf16 off on a CPU).
    """
    parser = _make_parser(prog, description, dataclass_types)
    if allow_yaml:
        parser.add_argument(
            "config",
            nargs="?",
            default=None,
            help="optional YAML file with option: value pairs; flags given after it override it",
        )
    argv = list(argv)
    yaml_path = None
    if allow_yaml and argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        yaml_path = argv[0]
    if yaml_path:
        known = _known_fields(dataclass_types)
        values = flatten_sections(load_yaml(yaml_path), known, yaml_path)
        if translate is not None:
            values = translate(values)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{yaml_path}: unknown option(s) {', '.join(unknown)}; see '{prog} --help'")
        parser.set_defaults(**values)
    ns = parser.parse_args(argv)
    if adjust is not None:
        adjust(vars(ns))
    outputs = []
    for dtype in dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        kwargs = {k: v for k, v in vars(ns).items() if k in keys}
        _check_choices(dtype, kwargs)
        try:
            outputs.append(dtype(**kwargs))
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
    return outputs


def flatten_sections(values: dict[str, Any], known: set[str], path: str | os.PathLike = "") -> dict[str, Any]:
    """The options of a resolved configuration as :func:`save_resolved` writes it (``{section: {option: value}}``,
    an output folder's ``llavatune_config.yaml``), flat, so that it feeds back into its command as given. A YAML file
    of options (``option: value``) is returned as is: it is taken for sections only when every value is a mapping
    and some key is not an option."""
    if not values or not all(isinstance(v, dict) for v in values.values()) or set(values) <= known:
        return values
    flat: dict[str, Any] = {}
    for section in values.values():
        for k, v in section.items():
            if k in flat and flat[k] != v:
                raise ConfigError(f"{path}: option {k!r} has two values in different sections")
            flat[k] = v
    return flat


def _check_choices(dtype: type, values: dict[str, Any]) -> None:
    """Values of ``Literal`` options must be one of their choices, also when they come from a YAML file (argparse
    checks only what is typed on the command line)."""
    import typing

    hints = typing.get_type_hints(dtype)
    for name, value in values.items():
        hint = hints.get(name)
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Union and type(None) in args:
            if value is None:
                continue
            hint = next(a for a in args if a is not type(None))
        if typing.get_origin(hint) is typing.Literal:
            check_choice(name, value, typing.get_args(hint))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Reject a value not in ``choices``, naming the flag."""
    if value not in choices:
        raise ConfigError(f"--{name}: invalid value {value!r}; choose one of {', '.join(map(str, choices))}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain-data dict of a config dataclass (TrainingArguments included), safe for YAML."""
    if hasattr(obj, "to_dict"):
        data = obj.to_dict()
    else:
        data = dataclasses.asdict(obj)
    return json.loads(json.dumps(data, default=str))


def save_resolved(path: str | os.PathLike, sections: dict[str, Any], command: str | None = None) -> None:
    """Write the resolved config (``{section: dataclass}``) as YAML, atomically; it feeds back into the command
    (see :func:`flatten_sections`). ``command``: the command line that reruns it, written as a first comment line."""
    from llavatune.utils import atomic_write_text

    data = {name: to_dict(obj) for name, obj in sections.items()}
    head = f"# {command}\n" if command else ""
    atomic_write_text(path, head + yaml.safe_dump(data, sort_keys=False))

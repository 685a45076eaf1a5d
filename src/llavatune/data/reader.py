"""Reading the files users give: text, JSON and JSON Lines, with one error type that says where.

Every command that reads a JSON, JSONL or text file it was given (``prepare``, ``check``, ``train``, ``eval``,
``predict --input``, ``score``, ``synth``) reads it here:

- **text** (:func:`read_text`): UTF-8, a byte-order mark dropped; a byte that is not UTF-8 is a
  :class:`DataError` naming its byte offset and line (:func:`decode_text` can also keep going, for ``check``).
- **JSON** (:func:`load_json`): a syntax error names its line and column.
- **JSON Lines** (:func:`parse_jsonl`): split on ``"\\n"`` only (``str.splitlines`` would also split inside strings
  holding U+2028 and the like), blank lines skipped but counted, every object with its line number.
- **a list of records** (:func:`read_json_objects`): a ``.json`` list, the same list wrapped as ``{"data": [...]}``,
  or a ``.jsonl`` file.

:class:`DataError` reads ``FILE[:LINE]: record REF: field 'NAME': message``; its ``kind`` classifies it (the kinds
:class:`~llavatune.data.records.Problem` uses, e.g. ``invalid-json``), so callers never match message text.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Any, Iterator

from llavatune.utils import UserError


class DataError(UserError):
    """Bad input data. ``str()`` is ``FILE[:LINE]: record ID: field FIELD: message``; ``kind`` classifies it (the
    same kinds :class:`~llavatune.data.records.Problem` uses, e.g. ``unknown-role``), so callers never match
    message text."""

    def __init__(
        self,
        file: str | os.PathLike | None,
        record: Any,
        field_name: str | None,
        message: str,
        *,
        line: int | None = None,
        kind: str = "malformed-record",
    ):
        self.file, self.record, self.field, self.message = file, record, field_name, message
        self.line = line  # line number in ``file``, when the error is about one line
        self.kind = kind
        where = str(file) if file else "<data>"
        parts = [f"{where}:{line}" if line is not None else where]
        if record is not None:
            parts.append(f"record {record}")
        if field_name:
            parts.append(f"field '{field_name}'")
        super().__init__(": ".join(parts) + f": {message}")


def _for(what: str | None) -> str:
    return f" ({what})" if what else ""


def existing_file(path: str | os.PathLike, what: str | None = None) -> Path:
    """``path`` as a ``Path`` when it is a file; else a :class:`DataError` (``what``: the flag it came from)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(p, None, None, f"is a folder; give a file{_for(what)}", kind="file-not-found")
    if not p.is_file():
        raise DataError(p, None, None, f"file not found{_for(what)}", kind="file-not-found")
    return p


def decode_text(raw: bytes, path: str | os.PathLike | None, *, lenient: bool = False) -> tuple[str, DataError | None]:
    """``raw`` decoded as UTF-8 (a byte-order mark dropped) and, when a byte is not UTF-8, the error naming it.

    Strict (the default) raises that error. ``lenient`` decodes the bad bytes as lone surrogates
    (``surrogateescape``: ``\\udc80``-``\\udcff``, written back unchanged) and returns the error with the text.
    """
    body = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return body.decode("utf-8"), None
    except UnicodeDecodeError as e:
        offset = len(raw) - len(body) + e.start
        line = raw[:offset].count(b"\n") + 1
        if not lenient:
            raise DataError(path, None, None, f"invalid UTF-8 at byte {offset} (line {line}); re-save the file as UTF-8",
                            kind="invalid-utf8") from None
        text = body.decode("utf-8", errors="surrogateescape")
        n_bad = sum(1 for c in text if "\udc80" <= c <= "\udcff")
        err = DataError(path, None, None, f"invalid UTF-8 at byte {offset} (line {line}); {n_bad} bad byte(s) in all; "
                        "the records holding them are rejected; re-save the file as UTF-8", kind="invalid-utf8")
        return text, err


def read_text(path: str | os.PathLike, what: str | None = None) -> str:
    """The text of a UTF-8 file; a missing file or a byte that is not UTF-8 is a one-line :class:`DataError`."""
    p = existing_file(path, what)
    return decode_text(p.read_bytes(), p)[0]


def parse_json(text: str, path: str | os.PathLike | None) -> Any:
    """``json.loads(text)``; a syntax error is a :class:`DataError` naming ``path``, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, None, None, f"not valid JSON (column {e.colno}): {e.msg}", line=e.lineno,
                        kind="invalid-json") from None


def load_json(path: str | os.PathLike, what: str | None = None) -> Any:
    """The JSON value in a file (see :func:`read_text` and :func:`parse_json` for its errors)."""
    return parse_json(read_text(path, what), path)


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each non-blank line of JSON Lines ``text``, split on ``"\\n"`` only."""
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit in strings
        if line.strip():
            yield n, line


def parse_jsonl_line(line: str, path: str | os.PathLike | None, n: int) -> Any:
    """One JSON Lines line's value; a syntax error is a :class:`DataError` naming ``path``, line ``n`` and the column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, None, None, f"not valid JSON (column {e.colno}): {e.msg}", line=n,
                        kind="invalid-json") from None


def parse_jsonl(path: str | os.PathLike | None, text: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of JSONL ``text`` read from ``path`` (named in errors),
    parsed lazily: a bad line fails when it is reached."""
    for n, line in jsonl_lines(text):
        yield n, parse_jsonl_line(line, path, n)


def iter_jsonl_lines(path: str | os.PathLike, what: str | None = None) -> Iterator[tuple[int, Any]]:
    """Lazy :func:`read_jsonl_lines`: a missing or non-UTF-8 file fails at once, bad JSON when its line is reached.

    For callers that check each object as it comes, so the first bad line (of any kind) is the one reported.
    """
    return parse_jsonl(path, read_text(path, what))


def read_jsonl_lines(path: str | os.PathLike, what: str | None = None) -> list[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSONL file; errors name the file and line."""
    return list(iter_jsonl_lines(path, what))


def record_list(data: Any, path: str | os.PathLike | None) -> list[Any]:
    """The records of a parsed ``.json`` file: the list itself, or the list of a ``{"data": [...]}`` wrapper."""
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, None, None, "expected a JSON list of records (or a .jsonl file, one record per line), "
                        f"got {type(data).__name__}", kind="not-a-list")
    return data


def read_json_objects(path: str | os.PathLike, what: str | None = None) -> list[Any]:
    """The records of a ``.json`` list (or ``{"data": [...]}``) or of a ``.jsonl`` file; errors name file and line."""
    if Path(path).suffix == ".jsonl":
        return [obj for _, obj in read_jsonl_lines(path, what)]
    return record_list(load_json(path, what), path)

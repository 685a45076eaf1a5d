"""The one internal record type, and readers/writers for LLaVA JSON(L) and the "messages" format.

LLaVA format (haotian-liu/LLaVA)::

    {"id": "q1", "image": "COCO_val2014_000000000042.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "a cat"}],
     "question_id": 1, "answers": [...]}          # extra fields are kept

``image`` may be a string, a list of strings (several images) or absent (text-only). Messages format
(TRL / LLaMA-Factory / ms-swift)::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                  {"role": "assistant", "content": "a cat"}],
     "images": ["a.jpg"]}

Both become :class:`Record`. Errors name the file, the record (id, or index when it has none) and the
field, and say what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from llavatune.utils import UserError, atomic_write_json

IMAGE_TOKEN = "<image>"
ROLE_ALIASES = {
    "human": "human", "user": "human",
    "gpt": "gpt", "assistant": "gpt",
    "system": "system",
}  # fmt: skip


class DataError(UserError):
    """Bad input data. ``str()`` is ``FILE: record ID: field FIELD: message``."""

    def __init__(
        self,
        file: str | os.PathLike | None,
        record: Any,
        field_name: str | None,
        message: str,
        *,
        line: int | None = None,
    ):
        self.file, self.record, self.field, self.message = file, record, field_name, message
        self.line = line  # line number in ``file``, when the error is about one line
        parts = [str(file) if file else "<data>"]
        if record is not None:
            parts.append(f"record {record}")
        if field_name:
            parts.append(f"field '{field_name}'")
        super().__init__(": ".join(parts) + f": {message}")


@dataclass
class Turn:
    role: str  # "human" | "gpt" | "system"
    value: str


@dataclass
class Record:
    """One training/eval sample."""

    id: str
    conversations: list[Turn]
    images: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # file the record came from (for messages)
    index: int | None = None  # position in that file

    @property
    def ref(self) -> str:
        """How error messages name this record."""
        return f"{self.id!r}" if self.id is not None else f"#{self.index}"

    @property
    def n_placeholders(self) -> int:
        return sum(t.value.count(IMAGE_TOKEN) for t in self.conversations)

    def to_llava(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if len(self.images) == 1:
            out["image"] = self.images[0]
        elif self.images:
            out["image"] = list(self.images)
        out["conversations"] = [{"from": t.role, "value": t.value} for t in self.conversations]
        out.update(self.extra)
        return out


def _messages_to_turns(obj: dict, where: tuple) -> tuple[list[Turn], list[str]]:
    file, rec = where
    images = obj.get("images") or []
    if isinstance(images, str):
        images = [images]
    part_images: list[str] = []
    turns = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(file, rec, f"messages[{i}]", "each message needs 'role' and 'content'")
        role = ROLE_ALIASES.get(m["role"])
        if role is None:
            raise DataError(file, rec, f"messages[{i}].role", f"unknown role {m['role']!r} (use user/assistant/system)")
        content = m["content"]
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(str(part.get("text", "")))
                elif kind in ("image", "image_url"):
                    pieces.append(IMAGE_TOKEN)
                    path = part.get("image") or part.get("path") or part.get("url")
                    if isinstance(path, dict):
                        path = path.get("url")
                    if isinstance(path, str):
                        part_images.append(path)
                else:
                    raise DataError(file, rec, f"messages[{i}].content[{j}]", "content parts need type 'text' or 'image'")
            # An image part before text means "<image>\n question", as LLaVA writes it.
            text = ""
            for p in pieces:
                if text and not text.endswith("\n") and text.endswith(IMAGE_TOKEN):
                    text += "\n"
                text += p
        else:
            raise DataError(file, rec, f"messages[{i}].content", "must be a string or a list of parts")
        turns.append(Turn(role, text))
    if part_images and images:
        raise DataError(file, rec, "images", "give image paths either in 'images' or in the content parts, not both")
    return turns, list(images) or part_images


def parse_record(obj: Any, file: str | os.PathLike | None = None, index: int = 0) -> Record:
    """Turn one JSON object into a :class:`Record`, or raise :class:`DataError`."""
    if not isinstance(obj, dict):
        raise DataError(file, f"#{index}", None, f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    rec = repr(rid) if rid is not None else f"#{index}"
    if "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list):
            raise DataError(file, rec, "conversations", "must be a list of {from, value} turns")
        turns = []
        for i, t in enumerate(conv):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise DataError(file, rec, f"conversations[{i}]", "each turn needs 'from' and 'value'")
            role = ROLE_ALIASES.get(t["from"])
            if role is None:
                raise DataError(
                    file, rec, f"conversations[{i}].from", f"unknown role {t['from']!r} (use human/gpt/system)"
                )
            if not isinstance(t["value"], str):
                raise DataError(file, rec, f"conversations[{i}].value", "must be a string")
            turns.append(Turn(role, t["value"]))
        image = obj.get("image")
        if image is None:
            images = []
        elif isinstance(image, str):
            images = [image]
        elif isinstance(image, list) and all(isinstance(x, str) for x in image):
            images = list(image)
        else:
            raise DataError(file, rec, "image", "must be a path string or a list of path strings")
        extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
    elif "messages" in obj:
        if not isinstance(obj["messages"], list):
            raise DataError(file, rec, "messages", "must be a list of {role, content} messages")
        turns, images = _messages_to_turns(obj, (file, rec))
        extra = {k: v for k, v in obj.items() if k not in ("id", "images", "messages")}
    else:
        raise DataError(file, rec, None, "needs 'conversations' (LLaVA format) or 'messages' (messages format)")
    if rid is None:
        rid = f"{Path(file).stem if file else 'record'}-{index}"
    return Record(id=str(rid), conversations=turns, images=images, extra=extra, source=str(file), index=index)


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(p, None, None, f"invalid UTF-8 at byte {e.start} (line {line}); re-save the file as UTF-8") from None


def iter_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Lazy :func:`read_jsonl_lines`: a missing or non-UTF-8 file fails at once, bad JSON when its line is reached.

    For callers that check each object as it comes, so the first bad line (of any kind) is the one reported.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "file not found")
    return parse_jsonl(p, _read_text(p))


def parse_jsonl(p: Path, text: str) -> Iterator[tuple[int, Any]]:
    """``(line number, object)`` for each non-blank line of JSONL ``text`` read from ``p`` (named in errors)."""
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit in strings
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(p, f"on line {n}", None, f"not valid JSON: {e.msg}", line=n) from None
        yield n, obj


def read_jsonl_lines(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line number, object)`` for each non-blank line of a JSONL file; errors name the file and line."""
    return list(iter_jsonl_lines(path))


def read_json_objects(path: str | os.PathLike) -> list[Any]:
    """Read a ``.json`` list or a ``.jsonl`` file; errors name the file and line."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return [obj for _, obj in read_jsonl_lines(p)]
    if not p.is_file():
        raise DataError(p, None, None, "file not found")
    text = _read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(p, None, None, f"not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(p, None, None, "expected a JSON list of records (or a .jsonl file, one record per line)")
    return data


def load_records(path: str | os.PathLike) -> list[Record]:
    """Load every record of a LLaVA/messages ``.json`` or ``.jsonl`` file (strict: first error raises)."""
    return [parse_record(o, path, i) for i, o in enumerate(read_json_objects(path))]


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records as a LLaVA-format JSON list (atomically)."""
    atomic_write_json(path, [r.to_llava() for r in records], indent=1)


def record_problems(rec: Record) -> list[tuple[str, str]]:
    """Structural problems of one record as ``(field, message)`` pairs (empty list: fine)."""
    problems = []
    turns = [t for t in rec.conversations if t.role != "system"]
    if not turns:
        problems.append(("conversations", "has no human/gpt turns"))
        return problems
    if turns[0].role != "human":
        problems.append(("conversations[0]", "must start with a human turn"))
    for i, t in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if t.role != want:
            problems.append((f"conversations[{i}].from", f"turns must alternate human/gpt; got {t.role!r}, expected {want!r}"))
            break
    for i, t in enumerate(rec.conversations):
        if not t.value.strip():
            problems.append((f"conversations[{i}].value", "empty turn"))
    if not any(t.role == "gpt" for t in turns):
        problems.append(("conversations", "has no gpt (answer) turn to learn from"))
    if rec.n_placeholders != len(rec.images):
        problems.append(
            ("image", f"{rec.n_placeholders} '<image>' placeholder(s) but {len(rec.images)} image(s); they must match")
        )
    for i, t in enumerate(rec.conversations):
        if t.role == "gpt" and IMAGE_TOKEN in t.value:
            problems.append((f"conversations[{i}].value", "'<image>' in an answer turn; place it in a human turn"))
    return problems


def image_root(data_file: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> Path:
    """The folder a data file's relative image paths resolve against: ``--image_folder``, else the file's own."""
    return Path(image_folder) if image_folder else Path(data_file).resolve().parent


def normalize_image_placement(rec: Record) -> Record:
    """Single-image LLaVA convention: ``<image>`` alone at the start of its turn (``<image>\\n...``).

    The original LLaVA code moves the placeholder there; we do the same so prompts match the released
    models. Records with several images keep their placeholders where the user put them.
    """
    if len(rec.images) != 1:
        return rec
    for t in rec.conversations:
        if IMAGE_TOKEN in t.value and t.value.count(IMAGE_TOKEN) == 1 and not t.value.startswith(IMAGE_TOKEN):
            t.value = IMAGE_TOKEN + "\n" + t.value.replace(IMAGE_TOKEN, "").strip()
    return rec

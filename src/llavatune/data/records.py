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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from llavatune.data.reader import (  # noqa: F401  (re-exported: records' readers are the reader module's)
    DataError,
    decode_text,
    iter_jsonl_lines,
    jsonl_lines,
    parse_json,
    parse_jsonl,
    parse_jsonl_line,
    read_json_objects,
    read_jsonl_lines,
    record_list,
)
from llavatune.utils import UserError, atomic_write_json

IMAGE_TOKEN = "<image>"
ROLE_ALIASES = {
    "human": "human", "user": "human",
    "gpt": "gpt", "assistant": "gpt",
    "system": "system",
}  # fmt: skip


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
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise DataError(file, rec, "images", "must be a path string or a list of path strings", kind="bad-image-field")
    part_images: list[str] = []
    turns = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(file, rec, f"messages[{i}]", "each message needs 'role' and 'content'")
        role = ROLE_ALIASES.get(m["role"])
        if role is None:
            raise DataError(file, rec, f"messages[{i}].role", f"unknown role {m['role']!r} (use user/assistant/system)",
                            kind="unknown-role")
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
        raise DataError(file, rec, "images", "give image paths either in 'images' or in the content parts, not both",
                        kind="bad-image-field")
    return turns, list(images) or part_images


def parse_record(obj: Any, file: str | os.PathLike | None = None, index: int = 0) -> Record:
    """Turn one JSON object into a :class:`Record`, or raise :class:`DataError`."""
    if not isinstance(obj, dict):
        raise DataError(file, f"#{index}", None, f"expected a JSON object, got {type(obj).__name__}", kind="not-an-object")
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
                    file, rec, f"conversations[{i}].from", f"unknown role {t['from']!r} (use human/gpt/system)",
                    kind="unknown-role",
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
            raise DataError(file, rec, "image", "must be a path string or a list of path strings", kind="bad-image-field")
        extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
    elif "messages" in obj:
        if not isinstance(obj["messages"], list):
            raise DataError(file, rec, "messages", "must be a list of {role, content} messages")
        turns, images = _messages_to_turns(obj, (file, rec))
        extra = {k: v for k, v in obj.items() if k not in ("id", "images", "messages")}
    else:
        raise DataError(file, rec, None, "needs 'conversations' (LLaVA format) or 'messages' (messages format)",
                        kind="missing-conversations")
    if rid is None:
        rid = f"{Path(file).stem if file else 'record'}-{index}"
    return Record(id=str(rid), conversations=turns, images=images, extra=extra, source=str(file), index=index)


def load_records(path: str | os.PathLike) -> list[Record]:
    """Load every record of a LLaVA/messages ``.json`` or ``.jsonl`` file (strict: first error raises)."""
    return [parse_record(o, path, i) for i, o in enumerate(read_json_objects(path))]


def collect_texts(records: Iterable[Record]) -> list[str]:
    """Every turn's text, in order: what a built-in tiny model trains its tokenizer on (``train --model tiny``)."""
    return [t.value for r in records for t in r.conversations]


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records as a LLaVA-format JSON list (atomically)."""
    atomic_write_json(path, [r.to_llava() for r in records], indent=1)


ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES = (ERROR, WARNING, INFO)
PURPOSES = ("train", "eval", "predict")


@dataclass
class Problem:
    """One finding about the data, as data: ``(severity, kind, message)`` plus where (file, record, field).

    ``str()`` reads ``FILE: record REF: field FIELD: message``. ``structural`` problems mean the file itself is wrong
    (not JSON, not a list, not UTF-8, no records): every command refuses the file. Other errors are per record: the
    record is skipped (with a report) up to ``--max_bad_records``. Warnings and info never reject anything.
    """

    severity: str  # "error" | "warning" | "info"
    kind: str  # e.g. "image-missing", "not-alternating", "duplicate-id", "too-long"
    message: str
    file: str | None = None  # the data file ("file:line" for .jsonl) or, for image-only findings, the image
    record: str | None = None  # the record's id as written ('q1'), or #index when it has none
    index: int | None = None  # the record's position in the file
    field: str | None = None
    image: str | None = None  # the image path as written in the data
    structural: bool = False

    def __str__(self) -> str:
        parts = [self.file or "<data>"]
        if self.record is not None:
            parts.append(f"record {self.record}")
        if self.field:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + f": {self.message}"


def record_problems(rec: Record, purpose: str = "train") -> list[Problem]:
    """Per-record errors of a parsed record (empty list: fine), each with its kind and field.

    ``purpose`` "train" needs an answer to learn from; "eval" needs a question to answer (the answer, when there,
    is the reference); "predict" rows are one question with its images.
    """
    out: list[Problem] = []

    def add(kind: str, field_name: str | None, message: str) -> None:
        out.append(Problem(ERROR, kind, message, file=rec.source, record=rec.ref, index=rec.index, field=field_name))

    turns = [t for t in rec.conversations if t.role != "system"]
    if purpose == "predict":
        if not turns or not turns[-1].value.strip():
            add("missing-question", "question", "the question is missing or empty")
    elif not turns:
        add("no-turns", "conversations", "has no human/gpt turns")
        return out
    else:
        if turns[0].role != "human":
            add("not-starting-with-human", "conversations[0]", f"must start with a human turn, not {turns[0].role!r}")
        for i, t in enumerate(turns):
            want = "human" if i % 2 == 0 else "gpt"
            if t.role != want:
                if i > 0:  # a gpt first turn is reported once, above
                    add("not-alternating", f"conversations[{i}].from",
                        f"turns must alternate human/gpt; got {t.role!r}, expected {want!r}")
                break
        for i, t in enumerate(rec.conversations):
            if not t.value.strip():
                add("empty-answer" if t.role == "gpt" else "empty-turn", f"conversations[{i}].value",
                    "empty answer" if t.role == "gpt" else "empty turn")
        if purpose == "train" and not any(t.role == "gpt" for t in turns):
            add("no-gpt-turn", "conversations", "has no gpt (answer) turn to learn from")
        if purpose == "eval":
            last_gpt = max((i for i, t in enumerate(turns) if t.role == "gpt"), default=None)
            prompt = turns if last_gpt is None else turns[:last_gpt]
            if not prompt or prompt[-1].role != "human":
                add("no-question", "conversations", "nothing to answer: no human turn before the last answer")
        for i, t in enumerate(rec.conversations):
            if t.role == "gpt" and IMAGE_TOKEN in t.value:
                add("image-in-answer", f"conversations[{i}].value", "'<image>' in an answer turn; place it in a human turn")
        per_turn = rec.extra.get("turns")  # prepare --group_by_image: one scoring object per question/answer pair
        n_pairs = sum(t.role == "gpt" for t in turns)
        if per_turn is not None and (not isinstance(per_turn, list) or len(per_turn) != n_pairs
                                     or not all(isinstance(m, dict) for m in per_turn)):
            add("turns-mismatch", "turns",
                f"must hold one object per question/answer pair ({n_pairs} here); re-create the file with "
                "'llavatune prepare --group_by_image' or remove the field")
    if rec.n_placeholders != len(rec.images):
        add("placeholder-mismatch", "image",
            f"{rec.n_placeholders} '<image>' placeholder(s) but {len(rec.images)} image(s); they must match")
    return out


def image_root(data_file: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> Path:
    """The folder a data file's relative image paths resolve against: ``--image_folder``, else the file's own."""
    return Path(image_folder) if image_folder else Path(data_file).resolve().parent


def normalize_image_placement(rec: Record) -> Record:
    """Single-image LLaVA convention: ``<image>`` alone at the start of its turn (``<image>\\n...``).

    The original LLaVA code (``preprocess_multimodal``) rewrites every turn holding the placeholder as
    ``(<image> + "\\n" + rest.strip()).strip()`` — also ``"<image>What"`` and ``"<image> What"``, which become
    ``"<image>\\nWhat"``; we do the same so prompts match the released models. Records with several images keep
    their placeholders where the user put them.
    """
    if len(rec.images) != 1:
        return rec
    for t in rec.conversations:
        if t.value.count(IMAGE_TOKEN) == 1:
            t.value = (IMAGE_TOKEN + "\n" + t.value.replace(IMAGE_TOKEN, "").strip()).strip()
    return rec


# ------------------------------------------------------------------------------- one validation path
#
# ``validate_data`` is the one function every command that reads a dataset goes through (``check``, ``train``,
# ``eval``, ``predict --input``): records -> problems. ``Validation.accept`` applies the policy: structural problems
# refuse the file, per-record problems skip the record with a report, up to ``--max_bad_records``.

MAX_BAD_RECORDS = 0.01
"""Default ``--max_bad_records``: the fraction of records that may be skipped for problems before a command refuses
the file (1 %: a few broken images in a large set are skipped and listed; a systematically wrong file is refused)."""

_MODE_INFO = {
    "image-mode-cmyk": "CMYK image (converted to RGB)",
    "image-mode-alpha": "image with transparency (composited on white)",
    "image-mode-16bit": "16/32-bit image (scaled by its bit depth to 8 bits: 65535 -> 255)",
    "image-mode-grayscale": "grayscale image (converted to RGB)",
    "image-mode-other": "non-RGB image (converted to RGB)",
}


@dataclass
class Entry:
    """One record slot of a data file (a JSON object, or a .jsonl line that is not valid JSON)."""

    index: int
    raw: Any
    ref: str  # how messages name the record: 'id' (or 'id' (#i) when the id repeats), else #index
    loc: str  # the data file, "file:line" for .jsonl
    line: int | None = None
    record: Record | None = None
    images: list[str] = field(default_factory=list)
    image_field: str = "image"
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [q for q in self.problems if q.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, severity: str, kind: str, message: str, field_name: str | None = None, image: str | None = None):
        self.problems.append(Problem(severity, kind, message, file=self.loc, record=self.ref, index=self.index,
                                     field=field_name, image=image))

    def reject_row(self) -> dict[str, Any]:
        """The ``*.rejects.jsonl`` / ``skipped_records.jsonl`` row: where, why, and the record as written."""
        row: dict[str, Any] = {"index": self.index}
        if self.line:
            row["line"] = self.line
        if isinstance(self.raw, dict) and self.raw.get("id") is not None:
            row["id"] = self.raw["id"]
        row["reasons"] = [
            {k: v for k, v in (("kind", q.kind), ("field", q.field), ("message", q.message), ("image", q.image)) if v}
            for q in self.errors
        ]
        row["record"] = self.raw
        return row


@dataclass
class Validation:
    """Everything :func:`validate_data` found in one data file."""

    data: Path
    image_folder: Path
    purpose: str = "train"
    readable: bool = True  # False: the file could not be read as records at all
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # not tied to one record: file-level, per image file
    n_image_refs: int = 0
    n_image_files: int = 0
    n_bad_image_files: int = 0
    image_modes: dict[str, int] = field(default_factory=dict)
    image_files: list[Path] = field(default_factory=list)  # every image file referenced, as opened

    @property
    def structural(self) -> list[Problem]:
        return [q for q in self.problems if q.structural]

    @property
    def bad(self) -> list[Entry]:
        return [e for e in self.entries if not e.ok]

    @property
    def records(self) -> list[Record]:
        """The records without errors, in file order."""
        return [e.record for e in self.entries if e.ok and e.record is not None]

    def all_problems(self) -> list[Problem]:
        order = {ERROR: 0, WARNING: 1, INFO: 2}
        found = list(self.problems) + [q for e in self.entries for q in e.problems]
        return sorted(found, key=lambda q: (order[q.severity], not q.structural, -1 if q.index is None else q.index))

    def accept(self, max_bad_records: float = MAX_BAD_RECORDS, flag: str = "--max_bad_records") -> list[Record]:
        """Apply the policy: the usable records, or a one-line :class:`DataError`.

        Refused: any structural problem, or more than ``max_bad_records`` (a fraction) of the records with errors.
        """
        if self.structural:
            q = self.structural[0]
            raise DataError(q.file or self.data, None, None,
                            f"{q.message}; the file is refused ('llavatune check {self.data}' lists every problem)",
                            kind=q.kind)
        bad = self.bad
        if bad and len(bad) > max_bad_records * len(self.entries):
            q = bad[0].errors[0]
            raise DataError(
                q.file, q.record, q.field,
                f"{q.message} -- {len(bad)} of {len(self.entries)} record(s) ({len(bad) / len(self.entries):.1%}) have "
                f"problems, over {flag} {max_bad_records:g}; see them all with 'llavatune check {self.data}', drop them "
                f"with 'llavatune check {self.data} --fix CLEAN.json', or raise {flag}",
                kind=q.kind,
            )
        return self.records

    def skip_report(self, name: str, shown: int = 20) -> list[str]:
        """Log lines naming every skipped record and why (the first ``shown``; all are in the rejects file)."""
        bad = self.bad
        if not bad:
            return []
        lines = [f"{name}: skipping {len(bad)} of {len(self.entries)} record(s) of {self.data} with problems:"]
        for e in bad[:shown]:
            lines.append(f"  {e.errors[0]}" + (f" (+{len(e.errors) - 1} more)" if len(e.errors) > 1 else ""))
        if len(bad) > shown:
            lines.append(f"  ... and {len(bad) - shown} more")
        return lines


def _find_surrogate(obj: Any, path: str = "") -> str | None:
    """The field path of the first string holding an undecodable byte (``surrogateescape``), else None."""
    if isinstance(obj, str):
        return path or "<record>" if any("\udc80" <= c <= "\udcff" for c in obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            if _find_surrogate(k) is not None:
                return sub
            hit = _find_surrogate(v, sub)
            if hit is not None:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = _find_surrogate(v, f"{path}[{i}]")
            if hit is not None:
                return hit
    return None


def _read_entries(p: Path, v: Validation) -> list[Entry] | None:
    """Read the file leniently: bad bytes and bad .jsonl lines become problems, not exceptions."""

    def structural(err: DataError) -> None:
        v.problems.append(Problem(ERROR, err.kind, err.message, file=str(p) if err.line is None else f"{p}:{err.line}",
                                  structural=True))

    text, bad_bytes = decode_text(p.read_bytes(), p, lenient=True)
    if bad_bytes is not None:
        structural(bad_bytes)
    entries: list[Entry] = []
    if p.suffix == ".jsonl":
        for n, line_text in jsonl_lines(text):
            loc = f"{p}:{n}"
            try:
                obj = parse_jsonl_line(line_text, p, n)
            except DataError as err:
                ent = Entry(index=len(entries), raw=line_text, ref=f"#{len(entries)}", loc=loc, line=n)
                ent.add(ERROR, err.kind, err.message)
                entries.append(ent)
                continue
            entries.append(Entry(index=len(entries), raw=obj, ref="", loc=loc, line=n))
        return entries
    try:
        data = record_list(parse_json(text, p), p)
    except DataError as err:
        structural(err)
        return None
    return [Entry(index=i, raw=obj, ref="", loc=str(p)) for i, obj in enumerate(data)]


def _raw_id(obj: Any) -> str | None:
    return str(obj["id"]) if isinstance(obj, dict) and obj.get("id") is not None else None


def _raw_images(obj: Any, purpose: str) -> tuple[list[str], str]:
    """Best-effort image paths of a record that does not parse, so its images are still checked."""
    if not isinstance(obj, dict):
        return [], "image"
    key = "images" if "messages" in obj and "conversations" not in obj and purpose != "predict" else "image"
    value = obj.get(key)
    if isinstance(value, str):
        return [value], key
    if isinstance(value, list):
        return [x for x in value if isinstance(x, str)], key
    return [], key


def parse_query_row(obj: Any, file: str | os.PathLike | None, index: int, ref: str) -> Record:
    """A ``predict --input`` row ``{"image": PATH or [PATHS], "question": TEXT, ...}`` as a one-turn record.

    The image placeholders go at the start of the question (``<image>\\n...``, the LLaVA-1.5 convention) unless
    the question places its ``<image>`` tokens itself.
    """
    if not isinstance(obj, dict):
        raise DataError(file, ref, None, 'expected an object like {"image": "a.jpg", "question": "..."}',
                        kind="not-an-object")
    question = obj.get("question")
    if not isinstance(question, str):
        raise DataError(file, ref, "question", "is missing or not a string", kind="missing-question")
    images = obj.get("image")
    images = [] if images in (None, "") else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise DataError(file, ref, "image", "must be a path or a list of paths", kind="bad-image-field")
    text = question.strip()
    if images and IMAGE_TOKEN not in text:
        text = (IMAGE_TOKEN + "\n") * len(images) + text
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", "question")}
    rid = obj.get("id")
    return Record(id=str(rid) if rid is not None else ref, conversations=[Turn("human", text)], images=list(images),
                  extra=extra, source=str(file), index=index)


def validate_data(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    *,
    purpose: str = "train",
    verify_images: bool = True,
    max_pixels: int | None = None,
    workers: int | None = None,
    cache: Any = None,
    progress: bool | None = None,
    workers_flag: str = "--image_workers",
) -> Validation:
    """Every problem of a LLaVA / messages ``.json`` / ``.jsonl`` file (or ``predict --input`` rows), as data.

    Reads leniently (a bad record or line is a problem, not an exception), parses every record, checks its
    structure (:func:`record_problems`), duplicate ids, image paths (escapes, missing, a directory) and, with
    ``verify_images``, decodes every image once (in parallel processes, verdicts remembered in ``cache``, a
    :class:`~llavatune.data.images.VerdictCache`). Image paths resolve against ``image_folder`` or the file's
    folder. Raises :class:`DataError` only when there is nothing to read (file or folder missing).
    """
    from llavatune.utils import resolve_under

    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    p = Path(path)
    if p.is_dir():
        raise DataError(p, None, None, "is a directory; give the data file (.json or .jsonl) inside it",
                        kind="file-not-found")
    if not p.is_file():
        raise DataError(p, None, None, "file not found", kind="file-not-found")
    root = Path(image_folder) if image_folder is not None else p.parent
    if not root.is_dir():
        raise UserError(f"--image_folder {root}: is not a folder")
    root = Path(os.path.realpath(root))
    v = Validation(data=p, image_folder=root, purpose=purpose)
    entries = _read_entries(p, v)
    if entries is None:
        v.readable = False
        return v
    v.entries = entries
    if not entries:
        v.problems.append(Problem(ERROR, "no-records", "the file holds no records", file=str(p), structural=True))
        return v

    _name_entries(entries, purpose)
    parsed = [e for e in entries if not e.errors]  # an invalid JSON line: nothing more to check
    for e in parsed:
        _check_entry(e, p, purpose)
    _check_duplicate_ids(parsed, purpose)
    _check_images(v, root, verify_images, max_pixels, workers, cache, progress, workers_flag, resolve_under)
    return v


def _name_entries(entries: list[Entry], purpose: str) -> None:
    """How messages name each record: the id as written, with the position when the id repeats (else both would
    read the same), or ``#index`` when it has none."""
    ids = [_raw_id(e.raw) for e in entries]
    counts: dict[str, int] = {}
    for rid in ids:
        if rid is not None:
            counts[rid] = counts.get(rid, 0) + 1
    for e, rid in zip(entries, ids):
        if e.ref:
            continue
        if purpose == "predict":
            e.ref = f"{rid!r}" if rid is not None else f"#{e.index}"
        else:
            e.ref = f"{rid!r}" if rid is not None and counts[rid] == 1 else (
                f"{rid!r} (#{e.index})" if rid is not None else f"#{e.index}")


def _check_entry(e: Entry, p: Path, purpose: str) -> None:
    """Parse one record and add its problems (undecodable bytes, structure, :func:`record_problems`); a record that
    does not parse still has its image paths collected, so its images are checked too."""
    obj = e.raw
    bad_field = _find_surrogate(obj)
    if bad_field is not None:
        e.add(ERROR, "invalid-utf8", "holds invalid UTF-8 bytes", bad_field)
    try:
        rec = parse_query_row(obj, e.loc, e.index, e.ref) if purpose == "predict" else parse_record(obj, p, e.index)
    except DataError as err:
        e.add(ERROR, err.kind, err.message, err.field)
        e.images, e.image_field = _raw_images(obj, purpose)
        return
    rec.source, rec.index = e.loc, e.index
    e.record = rec
    e.images = list(rec.images)
    e.image_field = "images" if isinstance(obj, dict) and "messages" in obj and purpose != "predict" else "image"
    for q in record_problems(rec, purpose):
        e.add(q.severity, q.kind, q.message, q.field)


def _check_duplicate_ids(entries: list[Entry], purpose: str) -> None:
    """Every record after the first with a given id is an error (evaluation matches answers by id); ``predict`` rows
    need no id."""
    if purpose == "predict":
        return
    first_by_id: dict[str, Entry] = {}
    for e in entries:
        rid = _raw_id(e.raw)
        if rid is None and e.record is not None:
            rid = e.record.id
        if rid is None:
            continue
        first = first_by_id.setdefault(rid, e)
        if first is not e:
            e.add(ERROR, "duplicate-id",
                  f"record #{e.index}{_line(e)} repeats the id {rid!r} of record #{first.index}{_line(first)}; ids "
                  "must be unique (evaluation matches answers by id)", "id")


def _line(e: Entry) -> str:
    return f" (line {e.line})" if e.line else ""


def _mode_kind(mode: str, alpha: bool) -> str | None:
    if mode == "CMYK":
        return "image-mode-cmyk"
    if alpha:
        return "image-mode-alpha"
    if mode.startswith("I;16") or mode in ("I", "F"):
        return "image-mode-16bit"
    if mode in ("L", "1"):
        return "image-mode-grayscale"
    if mode != "RGB":
        return "image-mode-other"
    return None


def _check_images(v: Validation, root: Path, verify: bool, max_pixels, workers, cache, progress, workers_flag,
                  resolve_under) -> None:
    refs: dict[Path, list[tuple[Entry, str, str]]] = {}
    for e in v.entries:
        for j, rel in enumerate(e.images):
            fld = e.image_field if len(e.images) == 1 else f"{e.image_field}[{j}]"
            v.n_image_refs += 1
            try:
                full = resolve_under(root, rel)
            except UserError:
                e.add(ERROR, "image-path-escapes",
                      f"{rel!r} is outside the image folder {root}; move the image inside it or pass --image_folder",
                      fld, rel)
                continue
            except (ValueError, OSError) as err:
                e.add(ERROR, "image-missing", f"{rel!r}: not a usable path ({err})", fld, rel)
                continue
            refs.setdefault(full, []).append((e, fld, rel))
    v.n_image_files = len(refs)
    v.image_files = list(refs)
    if not refs:
        return
    from llavatune.data.images import MAX_PIXELS, ImageVerdict, inspect_image, verify_images

    limit = max_pixels or MAX_PIXELS
    if verify:
        verdicts = verify_images(list(refs), limit, workers=workers, cache=cache, progress=progress,
                                 workers_flag=workers_flag)
    else:  # paths only: a missing file or a directory is still caught, the pixels are not decoded
        verdicts = {f: ImageVerdict(None) if f.is_file() else inspect_image(f, limit) for f in refs}
    modes: dict[str, int] = {}
    for full, uses in refs.items():  # insertion order: deterministic, in record order
        verdict = verdicts[full]
        if verdict.mode:
            modes[verdict.mode] = modes.get(verdict.mode, 0) + 1
        if verdict.kind:
            v.n_bad_image_files += 1
            for e, fld, rel in uses:
                e.add(ERROR, verdict.kind, f"{rel!r} ({full}): {verdict.message}", fld, rel)
        elif verdict.mode:
            mk = _mode_kind(verdict.mode, verdict.alpha)
            if mk:
                more = f" and {len(uses) - 1} more" if len(uses) > 1 else ""
                v.problems.append(Problem(INFO, mk, f"{_MODE_INFO[mk]}, mode {verdict.mode}; used by record "
                                                    f"{uses[0][0].ref}{more}", file=str(full), image=uses[0][2]))
    v.image_modes = modes

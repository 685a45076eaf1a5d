"""Tables of image path, question and answer (``prepare csv``, ``prepare jsonl``): one row or object per question,
image paths relative to ``--image-root`` (paths escaping it are refused); optional id and reference-answers
columns. Conversion never opens an image."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from llavatune.config import config
from llavatune.data.prepare.items import Item, Opened, Reject, human_turn, majority_answer, require
from llavatune.data.reader import existing_file, read_json_objects, read_jsonl_lines, read_text
from llavatune.data.records import DataError
from llavatune.utils import UserError, resolve_under


@config
class CsvOptions:
    input: Optional[str] = None
    """CSV file with a header row (required). A .tsv file is read tab-separated."""
    image_column: str = "image"
    """Column holding the image path, relative to --image-root or absolute (but inside it)."""
    question_column: str = "question"
    """Column holding the question."""
    answer_column: str = "answer"
    """Column holding the answer the model learns. May be absent when --answers-column is given: the most
    frequent of those answers is used."""
    answers_column: Optional[str] = None
    """Optional column with all reference answers for VQA scoring: a JSON list (["2", "two"]) or
    '|'-separated text (2|two|2). Kept as the record's 'answers'."""
    id_column: Optional[str] = None
    """Optional column with a unique record id (default: FILESTEM-ROW)."""
    image_root: Optional[str] = None
    """Folder that image paths are relative to (default: the CSV file's folder). Paths escaping it are
    refused."""
    delimiter: Optional[str] = None
    """Field separator (default: ',' or a tab for .tsv files)."""
    prompt_suffix: str = ""
    """Text appended on its own line after each question, e.g. 'Answer the question using a single word or
    phrase.' (default: none)."""

    def __post_init__(self):
        require(self.input, "input", "the CSV file to convert")


@config
class JsonlOptions:
    input: Optional[str] = None
    """JSON Lines file, one object per line (or a .json file holding a list of objects) (required)."""
    image_key: str = "image"
    """Key holding the image path, relative to --image-root or absolute (but inside it)."""
    question_key: str = "question"
    """Key holding the question."""
    answer_key: str = "answer"
    """Key holding the answer the model learns. May be absent when --answers-key is given: the most
    frequent of those answers is used."""
    answers_key: Optional[str] = None
    """Optional key with all reference answers for VQA scoring: a list, a JSON list string or '|'-separated
    text. Kept as the record's 'answers'."""
    id_key: Optional[str] = None
    """Optional key with a unique record id (default: FILESTEM-LINE)."""
    image_root: Optional[str] = None
    """Folder that image paths are relative to (default: the input file's folder). Paths escaping it are
    refused."""
    prompt_suffix: str = ""
    """Text appended on its own line after each question, e.g. 'Answer the question using a single word or
    phrase.' (default: none)."""

    def __post_init__(self):
        require(self.input, "input", "the JSONL file to convert")


def parse_answer_list(value: Any) -> list[str]:
    """Reference answers from a list, a JSON-list string or '|'-separated text."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError("starts with '[' but is not a valid JSON list") from None
        else:
            return [a.strip() for a in text.split("|") if a.strip()]
    if isinstance(value, (list, tuple)):
        out = []
        for a in value:
            if isinstance(a, dict):
                a = a.get("answer")
            if not isinstance(a, (str, int, float)) or isinstance(a, bool):
                raise ValueError("list entries must be strings (or {'answer': ...} objects)")
            if str(a).strip():
                out.append(str(a).strip())
        return out
    raise ValueError(f"expected a list or text, got {type(value).__name__}")


@dataclass
class Columns:
    image: str
    question: str
    answer: str
    answers: str | None
    id: str | None
    flag: str  # "column" or "key": the options are --image-column / --image-key, ...

    def required(self) -> list[tuple[str, str]]:
        """``(name, option)`` for each column the table must have, in the order they are checked."""
        need = [(self.image, "image"), (self.question, "question")]
        if not self.answers:
            need.append((self.answer, "answer"))
        need += [(c, opt) for c, opt in ((self.answers, "answers"), (self.id, "id")) if c]
        return [(c, f"{opt}-{self.flag}") for c, opt in need]


def row_item(
    row: dict, ref: str, file: Path, cols: Columns, root: Path, suffix: str, default_id: str
) -> Item | Reject:
    def value(name: str, required: bool) -> Any:
        v = row.get(name)
        if isinstance(v, str):
            v = v.strip()
        if required and (v is None or v == ""):
            raise DataError(file, ref, name, "missing value")
        return v

    image = value(cols.image, True)
    if not isinstance(image, str):
        raise DataError(file, ref, cols.image, f"expected an image path, got {type(image).__name__}")
    question = value(cols.question, True)
    if not isinstance(question, str):
        raise DataError(file, ref, cols.question, f"expected text, got {type(question).__name__}")
    answers: list[str] | None = None
    if cols.answers:
        try:
            answers = parse_answer_list(value(cols.answers, False))
        except ValueError as e:
            raise DataError(file, ref, cols.answers, str(e)) from None
    answer = value(cols.answer, False)
    if answer is None or answer == "":
        if not answers:
            raise DataError(file, ref, cols.answer, "missing value (and no reference answers to take it from)")
        answer = majority_answer(answers)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise DataError(file, ref, cols.answer, f"expected text, got {type(answer).__name__}")
    rid = default_id
    if cols.id:
        rid = value(cols.id, True)
        rid = str(rid)
    try:
        path = resolve_under(root, image)
    except UserError as e:
        raise DataError(file, ref, cols.image, str(e)) from None
    if not path.is_file():
        return Reject(rid, str(file), ref, cols.image, "missing_image", f"image {image!r} not found under {root}")
    extra: dict[str, Any] = {}
    if answers is not None:
        extra["answers"] = answers
    dest = path.relative_to(root).as_posix()
    return Item(rid, human_turn(question, suffix), answer, path, dest, extra, ref)


def image_root(opt_root: str | None, default: Path) -> Path:
    root = Path(opt_root) if opt_root else default
    if not root.is_dir():
        raise DataError(root, None, None, "image root folder not found (--image-root)")
    return root.resolve()


def open_csv(opts: CsvOptions) -> Opened:
    file = existing_file(opts.input, "--input")
    text = read_text(file)
    root = image_root(opts.image_root, file.parent)
    delimiter = opts.delimiter or ("\t" if file.suffix.lower() == ".tsv" else ",")
    cols = Columns(
        opts.image_column, opts.question_column, opts.answer_column, opts.answers_column, opts.id_column, "column"
    )
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = next(reader, None)
        rows = []
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(file, None, None, f"not valid CSV: {e}") from None
    if not header:
        raise DataError(file, None, None, "empty file; expected a header row")
    header = [h.strip() for h in header]
    for name, flag in cols.required():
        if name not in header:
            raise DataError(file, None, name, f"column not found; the header has: {', '.join(header)} (set --{flag})")
    stem = file.stem

    def iterate(_stage: Path) -> Iterator[Item | Reject]:
        for n, (line, cells) in enumerate(rows, 1):
            ref = f"row {n} (line {line})"
            if len(cells) > len(header):
                raise DataError(
                    file,
                    ref,
                    None,
                    f"{len(cells)} fields but the header has {len(header)}; quote fields that contain the separator",
                )
            row = dict(zip(header, cells))
            yield row_item(row, ref, file, cols, root, opts.prompt_suffix, f"{stem}-{n}")

    return Opened(total=len(rows), iterate=iterate, inputs={"input": str(file), "image_root": str(root)})


def open_jsonl(opts: JsonlOptions) -> Opened:
    file = existing_file(opts.input, "--input")
    root = image_root(opts.image_root, file.parent)
    cols = Columns(opts.image_key, opts.question_key, opts.answer_key, opts.answers_key, opts.id_key, "key")
    if file.suffix.lower() == ".json":
        objs = [(f"#{i}", o) for i, o in enumerate(read_json_objects(file, "--input"))]
    else:
        objs = [(f"line {n}", o) for n, o in read_jsonl_lines(file, "--input")]
    stem = file.stem

    def iterate(_stage: Path) -> Iterator[Item | Reject]:
        for n, (ref, obj) in enumerate(objs, 1):
            if not isinstance(obj, dict):
                raise DataError(file, ref, None, f"expected a JSON object, got {type(obj).__name__}")
            for key, flag in ((cols.image, "image-key"), (cols.question, "question-key")):
                if key not in obj:
                    raise DataError(file, ref, key, f"missing key (set --{flag})")
            if cols.answer not in obj and not cols.answers:
                raise DataError(file, ref, cols.answer, "missing key (set --answer-key or --answers-key)")
            yield row_item(obj, ref, file, cols, root, opts.prompt_suffix, f"{stem}-{n}")

    return Opened(total=len(objs), iterate=iterate, inputs={"input": str(file), "image_root": str(root)})

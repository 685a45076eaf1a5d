"""``llavatune prepare SOURCE``: convert a dataset into LLaVA JSON + an images folder.

    llavatune prepare okvqa --questions OpenEnded_mscoco_val2014_questions.json \\
        --annotations mscoco_val2014_annotations.json --images coco/ --out data/okvqa_val
    llavatune prepare csv --input qa.csv --image-column file --out data/mine --val-fraction 0.1

Output (``--out DIR``)::

    DIR/data.json            LLaVA format; image paths relative to DIR ("images/COCO_val2014_...jpg")
    DIR/images/              each distinct image once: a hard link to the source (a copy across
                             file systems); never decoded or re-encoded
    DIR/prepare_report.json  counts, skipped records by reason, inputs and options
    DIR/rejects.jsonl        one line per skipped record (only when something was skipped)
    DIR/llavatune_config.yaml  the resolved options (feed it back: llavatune prepare SOURCE FILE.yaml)

With ``--val-fraction F`` the images (with all their questions, so no image is in both splits) are split
deterministically into ``DIR/train/`` and ``DIR/val/``, each a self-contained ``data.json`` + ``images/``.

Speed and memory: OK-VQA / VQAv2 / CSV / JSONL conversion never opens an image; the COCO folder is
listed once and images are linked, so memory does not grow with image bytes. The ``hf`` source writes
embedded image bytes out as files exactly as stored (the format sniffed from the bytes).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

from llavatune._compat import streaming_features
from llavatune.config import ConfigError, config, parse_config, save_resolved
from llavatune.data.reader import existing_file, load_json, read_json_objects, read_jsonl_lines, read_text
from llavatune.data.records import (
    IMAGE_TOKEN,
    DataError,
    Record,
    Turn,
    write_records,
)
from llavatune.files import CONFIG_FILE, PREPARE_REJECTS_FILE, PREPARE_REPORT_FILE
from llavatune.utils import (
    UserError,
    atomic_write_json,
    atomic_write_text,
    prepare_output_dir,
    progress,
    resolve_under,
)

VQA_SUFFIX = "Answer the question using a single word or phrase."
MAX_PRINTED_REJECTS = 10

# --------------------------------------------------------------------------------------------------
# Options (one dataclass per source + the output options shared by all)
# --------------------------------------------------------------------------------------------------


def _require(value: Any, flag: str, what: str) -> None:
    if value is None or value == "":
        raise ConfigError(f"--{flag} is required: {what}")


@config
class OutputOptions:
    out: Optional[str] = None
    """Output folder (required). Receives data.json (LLaVA format), images/, prepare_report.json, the
    resolved options (llavatune_config.yaml) and, when a record was skipped, rejects.jsonl."""
    overwrite: bool = False
    """Replace a non-empty --out folder. Without it a non-empty folder is refused."""
    val_fraction: float = 0.0
    """Hold out this fraction of the images, with all their questions, as a validation split: writes
    DIR/train/ and DIR/val/, each with its own data.json and images/. 0 keeps everything in DIR/data.json."""
    seed: int = 0
    """Seed of the train/val split; the same input, fraction and seed always give the same split."""
    limit: Optional[int] = None
    """Keep only the first N usable records (a quick trial run)."""
    strict: bool = False
    """Stop with an error at the first record whose image is missing, instead of skipping it and listing it
    in rejects.jsonl."""
    max_skipped: float = 0.5
    """Fail (exit 1, nothing written) when more than this fraction of the records read is skipped (missing or
    unusable images: usually a wrong --images / --image-root). A run that keeps no record always fails."""
    group_by_image: bool = False
    """Write one multi-turn record per image holding all its questions (the <image> placeholder in the first
    turn only, question order shuffled with --seed), as LLaVA-1.5's training mix stores VQA data: the image
    and its prompt prefix are then encoded once per image instead of once per question. Each question's id,
    answers and types are kept in the record's 'turns' list, so eval still scores every question. Trade-offs:
    an epoch has fewer, longer samples (divide --per_device_train_batch_size or raise the learning rate
    accordingly), and answers to later questions see the earlier ones. See docs/data.md."""
    max_turns_per_record: int = 10
    """With --group-by-image: at most this many questions per record; an image with more is split into
    several records (each with the image)."""

    def __post_init__(self):
        _require(self.out, "out", "the folder to write data.json and images/ into")
        if not 0.0 <= self.max_skipped <= 1.0:
            raise ConfigError(f"--max-skipped must be a fraction in [0, 1], got {self.max_skipped}")
        if self.max_turns_per_record < 1:
            raise ConfigError(f"--max-turns-per-record must be a positive number of questions, got {self.max_turns_per_record}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be a positive number of records, got {self.limit}")


@config
class OkvqaOptions:
    questions: Optional[str] = None
    """OK-VQA questions file, e.g. OpenEnded_mscoco_val2014_questions.json (required)."""
    annotations: Optional[str] = None
    """OK-VQA annotations file, e.g. mscoco_val2014_annotations.json (required)."""
    images: Optional[str] = None
    """COCO 2014 image folder (required). Images are found by their COCO names
    (COCO_val2014_000000000042.jpg) in this folder or in its train2014/ and val2014/ subfolders."""
    answer_field: Literal["answer", "raw_answer"] = "answer"
    """Which annotator field becomes the answers: 'answer' (OK-VQA v1.1: normalised and stemmed, what the
    official evaluation compares against) or 'raw_answer' (as typed by the annotator)."""
    prompt_suffix: str = VQA_SUFFIX
    """Text appended on its own line after each question (LLaVA-1.5's short-answer prompt). Pass an empty
    string to disable."""

    def __post_init__(self):
        _require(self.questions, "questions", "the OpenEnded_mscoco_*2014_questions.json file")
        _require(self.annotations, "annotations", "the mscoco_*2014_annotations.json file")
        _require(self.images, "images", "the COCO 2014 image folder")


@config
class Vqav2Options:
    questions: Optional[str] = None
    """VQAv2 questions file, e.g. v2_OpenEnded_mscoco_val2014_questions.json (required)."""
    annotations: Optional[str] = None
    """VQAv2 annotations file, e.g. v2_mscoco_val2014_annotations.json (required)."""
    images: Optional[str] = None
    """COCO 2014 image folder (required). Images are found by their COCO names
    (COCO_val2014_000000000042.jpg) in this folder or in its train2014/ and val2014/ subfolders."""
    prompt_suffix: str = VQA_SUFFIX
    """Text appended on its own line after each question (LLaVA-1.5's short-answer prompt). Pass an empty
    string to disable."""

    def __post_init__(self):
        _require(self.questions, "questions", "the v2_OpenEnded_mscoco_*2014_questions.json file")
        _require(self.annotations, "annotations", "the v2_mscoco_*2014_annotations.json file")
        _require(self.images, "images", "the COCO 2014 image folder")


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
        _require(self.input, "input", "the CSV file to convert")


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
        _require(self.input, "input", "the JSONL file to convert")


@config
class HfOptions:
    input: Optional[str] = None
    """A local Hugging Face dataset: a folder written by save_to_disk(), a .parquet file, a folder of
    .parquet files or a glob such as 'data/*.parquet' (required). Nothing is downloaded."""
    split: Optional[str] = None
    """Split to convert when the folder holds a DatasetDict (default: its only split)."""
    image_column: str = "image"
    """Column holding the image: an Image feature, a {'bytes', 'path'} dict, raw bytes or a path."""
    question_column: str = "question"
    """Column holding the question."""
    answer_column: str = "answer"
    """Column holding the answer the model learns. May be absent when --answers-column is given: the most
    frequent of those answers is used."""
    answers_column: Optional[str] = None
    """Optional column with all reference answers (a list of strings or of {'answer': ...} dicts, or
    '|'-separated text). Kept as the record's 'answers'."""
    id_column: Optional[str] = None
    """Optional column with a unique record id (default: NAME-INDEX)."""
    image_root: Optional[str] = None
    """Folder that path-only images are relative to (default: the dataset's folder). Paths escaping it are
    refused."""
    prompt_suffix: str = ""
    """Text appended on its own line after each question, e.g. 'Answer the question using a single word or
    phrase.' (default: none)."""

    def __post_init__(self):
        _require(self.input, "input", "the save_to_disk folder or parquet file(s)")


# --------------------------------------------------------------------------------------------------
# Items produced by the sources
# --------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One usable question: its source image file and where it goes under ``images/``."""

    id: str
    question: str
    answer: str
    image: Path  # existing source file
    dest: str  # path under images/ (unique per distinct image)
    extra: dict[str, Any] = field(default_factory=dict)
    ref: str = ""  # how messages name it ("question_id 42", "row 3")
    staged: bool = False  # image was written by us (hf bytes): move it instead of linking


@dataclass
class Reject:
    """A record skipped because its image is missing or unusable."""

    id: str | None
    file: str | None
    ref: str
    field: str
    reason: str
    message: str

    def error(self) -> DataError:
        return DataError(self.file, self.ref, self.field, self.message)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "file": self.file,
            "record": self.ref,
            "field": self.field,
            "reason": self.reason,
            "message": self.message,
        }


@dataclass
class Opened:
    """A validated source, ready to iterate."""

    total: int | None
    iterate: Callable[[Path], Iterator[Item | Reject]]  # arg: staging folder for images we write
    inputs: dict[str, str]
    stats: dict[str, Any] = field(default_factory=dict)
    cleanup: Callable[[], None] | None = None


def majority_answer(answers: Iterable[str]) -> str:
    """The most frequent answer; ties go to the one that occurs first (deterministic)."""
    answers = list(answers)
    if not answers:
        raise ValueError("no answers")
    counts = collections.Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def human_turn(question: str, suffix: str) -> str:
    text = f"{IMAGE_TOKEN}\n{question.strip()}"
    if suffix and suffix.strip():
        text += "\n" + suffix.strip()
    return text


# --------------------------------------------------------------------------------------------------
# COCO image index
# --------------------------------------------------------------------------------------------------

_COCO_NAME = re.compile(r"^(?:COCO_([A-Za-z]+\d{4})_)?(\d{12})\.(?:jpe?g|png)$", re.IGNORECASE)
_SPLIT_DIR = re.compile(r"^(train|val|test)20\d\d$")


@dataclass
class CocoIndex:
    root: Path
    by_id: dict[int, list[tuple[str, Path]]]  # image_id -> [(subtype, path)] sorted
    subtypes: collections.Counter

    def find(self, image_id: int, prefer: str | None) -> Path | None:
        found = self.by_id.get(image_id)
        if not found:
            return None
        if prefer:
            for subtype, path in found:
                if subtype == prefer:
                    return path
        return found[0][1]

    def expected_name(self, image_id: int, prefer: str | None) -> str:
        subtype = prefer or (self.subtypes.most_common(1)[0][0] if self.subtypes else "val2014")
        return f"COCO_{subtype}_{image_id:012d}.jpg"


def index_coco_images(folder: str | os.PathLike) -> CocoIndex:
    """List COCO-named images in ``folder`` and its split subfolders (train2014/, val2014/, ...)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(root, None, None, "image folder not found (--images)")
    by_id: dict[int, list[tuple[str, Path]]] = {}
    subtypes: collections.Counter = collections.Counter()
    dirs = [root]
    with os.scandir(root) as it:
        dirs += sorted(Path(e.path) for e in it if _SPLIT_DIR.match(e.name) and e.is_dir())
    for d in dirs:
        with os.scandir(d) as it:
            for e in it:
                m = _COCO_NAME.match(e.name)
                if not m:
                    continue
                subtype = m.group(1) or (d.name if d != root else "")
                by_id.setdefault(int(m.group(2)), []).append((subtype, Path(e.path)))
                if subtype:
                    subtypes[subtype] += 1
    for found in by_id.values():
        found.sort()
    if not by_id:
        raise DataError(
            root,
            None,
            None,
            "no COCO images found (names like COCO_val2014_000000000042.jpg) in this folder or its "
            "train2014/ and val2014/ subfolders; point --images at the COCO image folder",
        )
    return CocoIndex(root, by_id, subtypes)


# --------------------------------------------------------------------------------------------------
# OK-VQA / VQAv2
# --------------------------------------------------------------------------------------------------


def _open_vqa(opts: OkvqaOptions | Vqav2Options, source: str) -> Opened:
    answer_field = getattr(opts, "answer_field", "answer")
    qfile, afile = Path(opts.questions), Path(opts.annotations)
    qobj = load_json(qfile, "--questions")
    if not isinstance(qobj, dict) or not isinstance(qobj.get("questions"), list):
        hint = (
            "this looks like an annotations file; pass it as --annotations"
            if isinstance(qobj, dict) and "annotations" in qobj
            else f"expected the official {source} questions file: a JSON object with a 'questions' list"
        )
        raise DataError(qfile, None, "questions", hint)
    aobj = load_json(afile, "--annotations")
    if not isinstance(aobj, dict) or not isinstance(aobj.get("annotations"), list):
        hint = (
            "this looks like a questions file; pass it as --questions"
            if isinstance(aobj, dict) and "questions" in aobj
            else f"expected the official {source} annotations file: a JSON object with an 'annotations' list"
        )
        raise DataError(afile, None, "annotations", hint)

    annotations: dict[Any, dict] = {}
    for i, ann in enumerate(aobj["annotations"]):
        if not isinstance(ann, dict) or "question_id" not in ann:
            raise DataError(afile, f"#{i}", "question_id", "each annotation needs a 'question_id'")
        qid = ann["question_id"]
        if qid in annotations:
            raise DataError(afile, f"question_id {qid}", "question_id", "duplicate annotation for this question")
        annotations[qid] = ann

    # slim tuples only, so the parsed files (every annotator dict) are freed before writing starts
    pairs: list[tuple[dict, dict, list[str]]] = []
    seen: set = set()
    for i, q in enumerate(qobj["questions"]):
        if not isinstance(q, dict):
            raise DataError(qfile, f"#{i}", None, f"expected a JSON object, got {type(q).__name__}")
        for key, types_ in (("question_id", (int, str)), ("image_id", (int,)), ("question", (str,))):
            if key not in q:
                raise DataError(qfile, f"#{i}", key, "missing")
            if not isinstance(q[key], types_) or isinstance(q[key], bool):
                raise DataError(qfile, f"#{i}", key, f"expected {types_[0].__name__}, got {type(q[key]).__name__}")
        qid = q["question_id"]
        ref = f"question_id {qid}"
        if qid in seen:
            raise DataError(qfile, ref, "question_id", "duplicate question id")
        seen.add(qid)
        ann = annotations.get(qid)
        if ann is None:
            raise DataError(
                afile, ref, "annotations", "no annotation for this question; are the two files of the same split?"
            )
        if ann.get("image_id", q["image_id"]) != q["image_id"]:
            raise DataError(afile, ref, "image_id", f"annotation says {ann['image_id']}, question says {q['image_id']}")
        raw = ann.get("answers")
        if not isinstance(raw, list) or not raw:
            raise DataError(afile, ref, "answers", "needs a non-empty list of annotator answers")
        answers = []
        for j, a in enumerate(raw):
            if not isinstance(a, dict) or not isinstance(a.get(answer_field), str):
                extra = " (VQAv2 answers have no raw_answer)" if answer_field == "raw_answer" else ""
                raise DataError(afile, ref, f"answers[{j}].{answer_field}", f"missing or not a string{extra}")
            answers.append(a[answer_field].strip())
        keep = ("question_type", "answer_type", "multiple_choice_answer")
        slim = {"question_id": qid, "image_id": q["image_id"], "question": q["question"]}
        pairs.append((slim, {k: ann[k] for k in keep if k in ann}, answers))

    index = index_coco_images(opts.images)
    prefer = qobj.get("data_subtype") if isinstance(qobj.get("data_subtype"), str) else None
    suffix = opts.prompt_suffix
    where = f"{index.root} (or its train2014/ and val2014/ subfolders)"

    def iterate(_stage: Path) -> Iterator[Item | Reject]:
        for q, ann, answers in pairs:
            qid, image_id = q["question_id"], q["image_id"]
            rid = f"{source}-{qid}"
            path = index.find(image_id, prefer)
            if path is None:
                yield Reject(
                    rid,
                    str(qfile),
                    f"question_id {qid}",
                    "image_id",
                    "missing_image",
                    f"image {index.expected_name(image_id, prefer)} not found in {where}",
                )
                continue
            extra: dict[str, Any] = {"question_id": qid, "image_id": image_id, "answers": answers, **ann}
            yield Item(
                rid,
                human_turn(q["question"], suffix),
                majority_answer(answers),
                path,
                path.name,
                extra,
                f"question_id {qid}",
            )

    unused = len(annotations) - len(pairs)
    del qobj, aobj, annotations
    return Opened(
        total=len(pairs),
        iterate=iterate,
        inputs={"questions": str(qfile), "annotations": str(afile), "images": str(index.root)},
        stats={"annotations_without_question": unused, "coco_images_indexed": len(index.by_id)},
    )


# --------------------------------------------------------------------------------------------------
# CSV / JSONL (tables of image path, question, answer)
# --------------------------------------------------------------------------------------------------


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
class _Columns:
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


def _row_item(
    row: dict, ref: str, file: Path, cols: _Columns, root: Path, suffix: str, default_id: str
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


def _image_root(opt_root: str | None, default: Path) -> Path:
    root = Path(opt_root) if opt_root else default
    if not root.is_dir():
        raise DataError(root, None, None, "image root folder not found (--image-root)")
    return root.resolve()


def _open_csv(opts: CsvOptions) -> Opened:
    file = existing_file(opts.input, "--input")
    text = read_text(file)
    root = _image_root(opts.image_root, file.parent)
    delimiter = opts.delimiter or ("\t" if file.suffix.lower() == ".tsv" else ",")
    cols = _Columns(
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
            yield _row_item(row, ref, file, cols, root, opts.prompt_suffix, f"{stem}-{n}")

    return Opened(total=len(rows), iterate=iterate, inputs={"input": str(file), "image_root": str(root)})


def _open_jsonl(opts: JsonlOptions) -> Opened:
    file = existing_file(opts.input, "--input")
    root = _image_root(opts.image_root, file.parent)
    cols = _Columns(opts.image_key, opts.question_key, opts.answer_key, opts.answers_key, opts.id_key, "key")
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
            yield _row_item(obj, ref, file, cols, root, opts.prompt_suffix, f"{stem}-{n}")

    return Opened(total=len(objs), iterate=iterate, inputs={"input": str(file), "image_root": str(root)})


# --------------------------------------------------------------------------------------------------
# Local Hugging Face datasets (save_to_disk folder or parquet)
# --------------------------------------------------------------------------------------------------

_MAGIC = [
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
]


def image_extension(data: bytes) -> str | None:
    """File extension for encoded image ``data`` (from its magic bytes; Pillow as a fallback)."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:
        return None
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}" if fmt else None)


def _load_hf(opts: HfOptions, tmp: Callable[[], Path]):
    """The dataset to iterate (a Dataset or an IterableDataset), its length and its folder."""
    import glob

    import datasets

    spec = opts.input
    p = Path(spec)
    if p.is_dir() and (
        (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()
    ):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises many types; report one line
            raise DataError(p, None, None, f"could not load the saved dataset: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            split = opts.split or (splits[0] if len(splits) == 1 else None)
            if split is None or split not in ds:
                what = f"no split {opts.split!r}" if opts.split else "several splits"
                raise DataError(p, None, "split", f"{what}; choose one with --split ({', '.join(splits)})")
            ds = ds[split]
        return ds, len(ds), p
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.parquet"))
        base = p
    elif p.is_file():
        files, base = [str(p)], p.parent
    else:
        files, base = sorted(glob.glob(spec)), Path(spec).parent
    if not files:
        raise DataError(
            p,
            None,
            None,
            "not found: expected a save_to_disk folder, a .parquet file, a folder of "
            ".parquet files or a glob (--input)",
        )
    if not all(f.endswith(".parquet") for f in files):
        raise DataError(p, None, None, "only .parquet files (or a save_to_disk folder) are supported by the hf source")
    try:
        import pyarrow.parquet as pq

        n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True, cache_dir=str(tmp()))
    except Exception as e:  # noqa: BLE001
        raise DataError(p, None, None, f"could not read the parquet file(s): {e}") from None
    return ds, n, base


def _open_hf(opts: HfOptions) -> Opened:
    import datasets

    tmpdir: list[str] = []

    def tmp() -> Path:
        if not tmpdir:
            tmpdir.append(tempfile.mkdtemp(prefix="llavatune-hf-"))
        return Path(tmpdir[0])

    def cleanup() -> None:
        for d in tmpdir:
            shutil.rmtree(d, ignore_errors=True)

    try:
        ds, n, base = _load_hf(opts, tmp)
        ds = streaming_features(ds)  # streaming without a known schema: resolved from the first rows
        features = ds.features
    except BaseException:
        cleanup()
        raise
    names = list(features)
    src = Path(opts.input)
    cols = _Columns(
        opts.image_column, opts.question_column, opts.answer_column, opts.answers_column, opts.id_column, "column"
    )
    for name, flag in cols.required():
        if name not in names:
            cleanup()
            raise DataError(src, None, name, f"column not found; the dataset has: {', '.join(names)} (set --{flag})")
    keep = [
        c
        for c in dict.fromkeys(
            [opts.image_column, opts.question_column, opts.answer_column, opts.answers_column, opts.id_column]
        )
        if c and c in names
    ]
    ds = ds.select_columns(keep)
    if isinstance(features[opts.image_column], datasets.Image):
        ds = ds.cast_column(opts.image_column, datasets.Image(decode=False))
    root = _image_root(opts.image_root, base)
    answer_col = opts.answer_column if opts.answer_column in names else "\0absent"
    table_cols = dataclasses.replace(cols, image="\0image", answer=answer_col)
    stem = src.stem if src.suffix else src.name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "hf"
    written: set[str] = set()

    def iterate(stage: Path) -> Iterator[Item | Reject]:
        stage.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(ds):
            ref = f"row {i}"
            rid = str(row[opts.id_column]) if opts.id_column and row.get(opts.id_column) is not None else f"{stem}-{i}"
            value = row.get(opts.image_column)
            data, path = None, None
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
            elif isinstance(value, (bytes, bytearray, memoryview)):
                data = bytes(value)
            elif isinstance(value, str):
                path = value
            elif value is not None and hasattr(value, "save"):  # a PIL image (only without decode=False)
                fname = getattr(value, "filename", "")
                if fname and Path(fname).is_file():
                    path = fname
                else:  # no encoded bytes exist: store losslessly
                    buf = io.BytesIO()
                    value.save(buf, format="PNG")
                    data = buf.getvalue()
            elif value is not None:
                raise DataError(
                    src, ref, opts.image_column, f"expected an image, bytes or a path, got {type(value).__name__}"
                )
            if data:
                ext = image_extension(data)
                if ext is None:
                    yield Reject(
                        rid,
                        str(src),
                        ref,
                        opts.image_column,
                        "bad_image",
                        "image bytes are not in a known image format",
                    )
                    continue
                name = hashlib.sha1(data).hexdigest()[:20] + ext
                target = stage / name
                if name not in written:
                    target.write_bytes(data)
                    written.add(name)
                # relative to the staging folder, the root it is resolved against (a relative --out must not be
                # joined onto itself: out/.staging/out/.staging/...)
                row = {**row, "\0image": name}
                item = _row_item(row, ref, src, table_cols, stage.resolve(), opts.prompt_suffix, rid)
                if isinstance(item, Item):
                    item.staged = True
                yield item
            elif path:
                row = {**row, "\0image": path}
                yield _row_item(row, ref, src, table_cols, root, opts.prompt_suffix, rid)
            else:
                yield Reject(rid, str(src), ref, opts.image_column, "missing_image", "no image in this row")

    return Opened(
        total=n,
        iterate=iterate,
        inputs={"input": str(src), "image_root": str(root)},
        stats={"dataset_rows": n},
        cleanup=cleanup,
    )


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class ImagePlacer:
    """Put each image into the output: hard link, falling back to a copy; never re-encode."""

    def __init__(self) -> None:
        self.can_link = True
        self.linked = self.copied = self.moved = 0
        self._dirs: set[Path] = set()

    def place(self, src: Path, dst: Path, move: bool = False) -> None:
        if dst.parent not in self._dirs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(dst.parent)
        try:
            if move:
                os.replace(src, dst)
                self.moved += 1
                return
            if self.can_link:
                try:
                    os.link(src, dst)
                    self.linked += 1
                    return
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        raise
                    if e.errno == errno.EXDEV:  # another file system: stop trying
                        self.can_link = False
            shutil.copy2(src, dst)
            self.copied += 1
        except FileNotFoundError:
            raise UserError(f"image {src} disappeared while preparing the dataset") from None


def split_items(items: list[Item], fraction: float, seed: int) -> dict[str, list[Item]]:
    """Deterministic train/val split by image (an image's questions stay together)."""
    if fraction <= 0:
        return {"": items}
    keys = sorted({it.dest for it in items})
    if len(keys) < 2:
        raise UserError(f"--val-fraction needs at least 2 distinct images; the data has {len(keys)}")
    rng = random.Random(seed)
    rng.shuffle(keys)
    n_val = min(max(1, round(fraction * len(keys))), len(keys) - 1)
    val = set(keys[:n_val])
    return {"train": [it for it in items if it.dest not in val], "val": [it for it in items if it.dest in val]}


def group_items(items: list[Item], max_turns: int, seed: int) -> list[list[Item]]:
    """``--group-by-image``: the questions of each image (images in order of first appearance), shuffled with
    ``seed`` (the same input and seed always give the same order), in chunks of at most ``max_turns``."""
    by_image: dict[str, list[Item]] = {}
    for it in items:
        by_image.setdefault(it.dest, []).append(it)
    rng = random.Random(seed)
    groups = []
    for its in by_image.values():
        its = list(its)
        rng.shuffle(its)
        groups += [its[k : k + max_turns] for k in range(0, len(its), max_turns)]
    return groups


def grouped_record(items: list[Item], image: str) -> Record:
    """One multi-turn record for questions about one image: ``<image>`` only in the first human turn (LLaVA-1.5's
    layout), each question's own id and fields (question_id, answers, types, ...) in ``turns``, in turn order."""
    conversations = []
    for k, it in enumerate(items):
        question = it.question
        if k and question.startswith(IMAGE_TOKEN):
            question = question[len(IMAGE_TOKEN):].lstrip("\n")
        conversations += [Turn("human", question), Turn("gpt", it.answer)]
    rid = items[0].id if len(items) == 1 else f"{items[0].id}+{len(items) - 1}"
    return Record(id=rid, conversations=conversations, images=[image],
                  extra={"turns": [{"id": it.id, **it.extra} for it in items]})


def _check_out_vs_inputs(out: Path, inputs: dict[str, str]) -> None:
    out_r = out.resolve()
    for name, value in inputs.items():
        p = Path(value).resolve()
        if p == out_r or out_r in p.parents:
            raise UserError(
                f"--out {out} contains the input {value} (--{name.replace('_', '-')}); "
                "write the prepared data to another folder"
            )


def run_prepare(source: str, opts: Any, out_opts: OutputOptions) -> dict[str, Any]:
    """Convert ``source`` (options ``opts``) into ``out_opts.out``; return the report (also written)."""
    t0 = time.perf_counter()
    opened = SOURCES[source].open(opts)
    try:
        out = Path(out_opts.out)
        _check_out_vs_inputs(out, opened.inputs)
        created = not out.exists()
        out = prepare_output_dir(out, overwrite=out_opts.overwrite, kind="prepare", flag="--out",
                                 inputs={f"--{k.replace('_', '-')}": v for k, v in opened.inputs.items()})
        stage = out / ".staging"
        items: list[Item] = []
        rejects: list[Reject] = []
        ids: dict[str, str] = {}
        read = 0
        for x in progress(opened.iterate(stage), total=opened.total, desc=f"prepare {source}", unit="rec"):
            read += 1
            if isinstance(x, Reject):
                if out_opts.strict:
                    raise x.error()
                rejects.append(x)
                continue
            if x.id in ids:
                raise DataError(
                    opened.inputs.get("input") or opened.inputs.get("questions"),
                    x.ref,
                    "id",
                    f"duplicate id {x.id!r} (also used by {ids[x.id]})",
                )
            ids[x.id] = x.ref
            items.append(x)
            if out_opts.limit and len(items) >= out_opts.limit:
                break
        problem = _too_few(source, read, items, rejects, out_opts.max_skipped)
        if problem:
            shutil.rmtree(stage, ignore_errors=True)
            if created:  # made by this run: only the (removed) staging area and the output marker are in it
                shutil.rmtree(out, ignore_errors=True)
            _print_rejects([r.to_json() for r in rejects[:MAX_PRINTED_REJECTS]], len(rejects), None)
            raise UserError(problem)

        splits = split_items(items, out_opts.val_fraction, out_opts.seed)
        placer = ImagePlacer()
        outputs: dict[str, str] = {}
        counts_by_split: dict[str, dict[str, int]] = {}
        for name, its in splits.items():
            base = out / name if name else out
            placed: dict[str, str] = {}
            for it in progress(its, total=len(its), desc=f"images {name or 'all'}", unit="rec"):
                rel = placed.get(it.dest)
                if rel is None:
                    rel = f"images/{it.dest}"
                    placer.place(it.image, base / rel, move=it.staged)
                    placed[it.dest] = rel
            if out_opts.group_by_image:
                groups = group_items(its, out_opts.max_turns_per_record, out_opts.seed)
                records = [grouped_record(g, placed[g[0].dest]) for g in groups]
            else:
                records = [
                    Record(
                        id=it.id,
                        conversations=[Turn("human", it.question), Turn("gpt", it.answer)],
                        images=[placed[it.dest]],
                        extra=it.extra,
                    )
                    for it in its
                ]
            base.mkdir(parents=True, exist_ok=True)
            write_records(base / "data.json", records)  # last: no data.json means an unfinished run
            outputs[name or "data"] = str(base / "data.json")
            counts_by_split[name or "all"] = {"records": len(records), "questions": len(its), "images": len(placed)}
        shutil.rmtree(stage, ignore_errors=True)
    finally:
        if opened.cleanup:
            opened.cleanup()

    reasons = collections.Counter(r.reason for r in rejects)
    if rejects:
        atomic_write_text(out / PREPARE_REJECTS_FILE, "".join(json.dumps(r.to_json()) + "\n" for r in rejects))
        outputs["rejects"] = str(out / PREPARE_REJECTS_FILE)
    from llavatune import __version__

    report = {
        "source": source,
        "inputs": opened.inputs,
        "options": {**dataclasses.asdict(opts), **dataclasses.asdict(out_opts)},
        "counts": {
            "read": read,
            "records": sum(c["records"] for c in counts_by_split.values()),
            "questions": len(items),
            "skipped": len(rejects),
            "images": placer.linked + placer.copied + placer.moved,
            "images_linked": placer.linked,
            "images_copied": placer.copied,
            "images_written": placer.moved,
            "splits": counts_by_split,
            **opened.stats,
        },
        "skipped_by_reason": dict(reasons),
        "skipped_examples": [r.to_json() for r in rejects[:20]],
        "outputs": outputs,
        "seconds": round(time.perf_counter() - t0, 3),
        "llavatune_version": __version__,
    }
    atomic_write_json(out / PREPARE_REPORT_FILE, report)
    save_resolved(out / CONFIG_FILE, {source: opts, "output": out_opts},
                  command=f"llavatune prepare {source} {out / CONFIG_FILE}")
    return report


def _too_few(source: str, read: int, items: list, rejects: list[Reject], max_skipped: float) -> str | None:
    """Why the conversion must fail instead of writing a dataset (no record kept, or too many skipped), or None."""
    if read == 0:
        return f"prepare {source}: the input holds no records; nothing written"
    if items and len(rejects) <= max_skipped * read:
        return None
    reasons = ", ".join(f"{n} {k}" for k, n in collections.Counter(r.reason for r in rejects).items())
    first = rejects[0]
    what = ("no usable record" if not items else
            f"{len(rejects)} of {read} records skipped, more than --max-skipped {max_skipped:g} allows")
    return (f"prepare {source}: {what} ({reasons}; e.g. {first.file}: record {first.ref}: {first.message}); nothing "
            "written. Check --images / --image-root (or raise --max-skipped)")


def _print_rejects(rows: list[dict[str, Any]], total: int, out: str | None) -> None:
    """The first skipped records (``Reject.to_json`` rows) on stderr, and how many more there are."""
    for r in rows[:MAX_PRINTED_REJECTS]:
        sys.stderr.write(f"skipped {r['file']}: record {r['record']}: {r['message']}\n")
    if total > MAX_PRINTED_REJECTS:
        where = f" (see {out}/rejects.jsonl)" if out else ""
        sys.stderr.write(f"... and {total - MAX_PRINTED_REJECTS} more skipped{where}\n")


def _print_summary(report: dict[str, Any], out: str) -> None:
    c = report["counts"]
    _print_rejects(report["skipped_examples"], c["skipped"], out)
    how = ", ".join(
        f"{n} {k}"
        for k, n in (("linked", c["images_linked"]), ("copied", c["images_copied"]), ("written", c["images_written"]))
        if n
    )
    split = "; ".join(f"{k}: {v['records']} records, {v['images']} images" for k, v in c["splits"].items())
    grouped = f" ({c['questions']} questions grouped by image)" if c["questions"] != c["records"] else ""
    print(
        f"prepared {c['records']} records{grouped} from {report['source']} ({c['read']} read, {c['skipped']} skipped"
        + (f": {', '.join(f'{n} {k}' for k, n in report['skipped_by_reason'].items())}" if c["skipped"] else "")
        + f") in {report['seconds']:.1f}s"
    )
    print(f"  {split}; images {how or 'none'}")
    for name, path in report["outputs"].items():
        print(f"  {name}: {path}")
    print(f"  report: {Path(out) / 'prepare_report.json'}")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    options: type
    open: Callable[[Any], Opened]
    summary: str
    description: str


SOURCES: dict[str, Source] = {
    "okvqa": Source(
        OkvqaOptions,
        lambda o: _open_vqa(o, "okvqa"),
        "OK-VQA official questions + annotations + COCO images",
        "Convert the official OK-VQA files. The answer learned is the most frequent of the 10 annotator "
        "answers (ties: the earliest); all 10 are kept as 'answers' for VQA scoring, with question_id, "
        "image_id, question_type and answer_type. Record ids are okvqa-QUESTION_ID.",
    ),
    "vqav2": Source(
        Vqav2Options,
        lambda o: _open_vqa(o, "vqav2"),
        "VQAv2 official questions + annotations + COCO images",
        "Convert the official VQAv2 files. The answer learned is the most frequent of the 10 annotator "
        "answers (ties: the earliest); all 10 are kept as 'answers', with multiple_choice_answer, question_id, "
        "image_id, question_type and answer_type. Record ids are vqav2-QUESTION_ID.",
    ),
    "csv": Source(
        CsvOptions,
        _open_csv,
        "a CSV/TSV table of image path, question, answer",
        "Convert a CSV (or TSV) file with a header row: one row per question, with an image path column, a "
        "question column and an answer column; optional id and reference-answers columns.",
    ),
    "jsonl": Source(
        JsonlOptions,
        _open_jsonl,
        "a JSON Lines file of {image, question, answer} objects",
        "Convert a JSON Lines file (or a .json list): one object per question, with image path, question "
        "and answer keys; optional id and reference-answers keys.",
    ),
    "hf": Source(
        HfOptions,
        _open_hf,
        "a local Hugging Face dataset (save_to_disk folder or parquet)",
        "Convert a local Hugging Face dataset, read with the datasets library without any download. Embedded "
        "image bytes are written out as files exactly as stored (named by their hash, so repeated images are "
        "stored once); path-only images are linked.",
    ),
}


def _usage() -> str:
    width = max(map(len, SOURCES))
    lines = [
        "usage: llavatune prepare SOURCE [CONFIG.yaml] [--flag value ...] --out DIR",
        "",
        "Convert a dataset into LLaVA JSON: DIR/data.json (image paths relative to DIR), DIR/images/ (each",
        "image once, hard-linked, never re-encoded), DIR/prepare_report.json and, for skipped records,",
        "DIR/rejects.jsonl. --val-fraction F writes DIR/train/ and DIR/val/ instead.",
        "",
        "sources:",
    ]
    lines += [f"  {name:<{width}}  {s.summary}" for name, s in SOURCES.items()]
    lines += [
        "",
        "common options: --out DIR (required), --overwrite, --val-fraction F, --seed N, --limit N, --strict,",
        "  --max-skipped F (fail when more than this fraction of the records is skipped; default 0.5)",
        "  --group-by-image [--max-turns-per-record N] (one multi-turn record per image)",
        "Run 'llavatune prepare SOURCE --help' for a source's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str], prog: str = "llavatune prepare") -> int:
    argv = list(argv)
    if not argv:
        sys.stderr.write(_usage() + "\n")
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    source, rest = argv[0], argv[1:]
    if source not in SOURCES:
        import difflib

        hint = difflib.get_close_matches(source, SOURCES, n=1)
        extra = f"did you mean '{hint[0]}'? " if hint else ""
        raise ConfigError(f"unknown source '{source}'; {extra}choose one of {', '.join(SOURCES)}")
    spec = SOURCES[source]
    opts, out_opts = parse_config(
        [spec.options, OutputOptions], rest, prog=f"{prog} {source}", description=spec.description
    )
    report = run_prepare(source, opts, out_opts)
    _print_summary(report, out_opts.out)
    return 0

"""The VQA-style official files (``prepare okvqa``, ``prepare vqav2``): questions + annotations JSON and a COCO image
folder. The answer learned is the most frequent of the 10 annotator answers (ties: the earliest); all of them are
kept as ``answers`` for VQA scoring. Conversion never opens an image: the COCO folder is listed once."""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from llavatune.config import config
from llavatune.data.prepare.items import VQA_SUFFIX, Item, Opened, Reject, human_turn, majority_answer, require
from llavatune.data.reader import load_json
from llavatune.data.records import DataError


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
        require(self.questions, "questions", "the OpenEnded_mscoco_*2014_questions.json file")
        require(self.annotations, "annotations", "the mscoco_*2014_annotations.json file")
        require(self.images, "images", "the COCO 2014 image folder")


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
        require(self.questions, "questions", "the v2_OpenEnded_mscoco_*2014_questions.json file")
        require(self.annotations, "annotations", "the v2_mscoco_*2014_annotations.json file")
        require(self.images, "images", "the COCO 2014 image folder")


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


def _official(path: Path, flag: str, key: str, other: str, source: str) -> dict:
    """An official questions or annotations file: a JSON object holding the ``key`` list (the other file given in
    its place is named as such)."""
    obj = load_json(path, f"--{flag}")
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        hint = (
            f"this looks like {'an' if other == 'annotations' else 'a'} {other} file; pass it as --{other}"
            if isinstance(obj, dict) and other in obj
            else f"expected the official {source} {key} file: a JSON object with {'an' if key[0] == 'a' else 'a'} "
                 f"'{key}' list"
        )
        raise DataError(path, None, key, hint)
    return obj


def _annotations_by_question(afile: Path, annotations: list) -> dict[Any, dict]:
    out: dict[Any, dict] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "question_id" not in ann:
            raise DataError(afile, f"#{i}", "question_id", "each annotation needs a 'question_id'")
        qid = ann["question_id"]
        if qid in out:
            raise DataError(afile, f"question_id {qid}", "question_id", "duplicate annotation for this question")
        out[qid] = ann
    return out


def _question_pairs(qfile: Path, afile: Path, questions: list, annotations: dict[Any, dict],
                    answer_field: str) -> list[tuple[dict, dict, list[str]]]:
    """Each question with its annotation's kept fields and answers, checked; slim tuples only, so the parsed files
    (every annotator dict) are freed before writing starts."""
    pairs: list[tuple[dict, dict, list[str]]] = []
    seen: set = set()
    for i, q in enumerate(questions):
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
        pairs.append((
            {"question_id": qid, "image_id": q["image_id"], "question": q["question"]},
            {k: ann[k] for k in ("question_type", "answer_type", "multiple_choice_answer") if k in ann},
            _answers(afile, ref, ann, answer_field),
        ))  # fmt: skip
    return pairs


def _answers(afile: Path, ref: str, ann: dict, answer_field: str) -> list[str]:
    raw = ann.get("answers")
    if not isinstance(raw, list) or not raw:
        raise DataError(afile, ref, "answers", "needs a non-empty list of annotator answers")
    answers = []
    for j, a in enumerate(raw):
        if not isinstance(a, dict) or not isinstance(a.get(answer_field), str):
            extra = " (VQAv2 answers have no raw_answer)" if answer_field == "raw_answer" else ""
            raise DataError(afile, ref, f"answers[{j}].{answer_field}", f"missing or not a string{extra}")
        answers.append(a[answer_field].strip())
    return answers


def open_vqa(opts: OkvqaOptions | Vqav2Options, source: str) -> Opened:
    """The questions of an official OK-VQA / VQAv2 file pair, each with its COCO image (or a missing_image reject)."""
    qfile, afile = Path(opts.questions), Path(opts.annotations)
    qobj = _official(qfile, "questions", "questions", "annotations", source)
    aobj = _official(afile, "annotations", "annotations", "questions", source)
    annotations = _annotations_by_question(afile, aobj["annotations"])
    pairs = _question_pairs(qfile, afile, qobj["questions"], annotations, getattr(opts, "answer_field", "answer"))
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
                yield Reject(rid, str(qfile), f"question_id {qid}", "image_id", "missing_image",
                             f"image {index.expected_name(image_id, prefer)} not found in {where}")
                continue
            extra: dict[str, Any] = {"question_id": qid, "image_id": image_id, "answers": answers, **ann}
            yield Item(rid, human_turn(q["question"], suffix), majority_answer(answers), path, path.name, extra,
                       f"question_id {qid}")

    unused = len(annotations) - len(pairs)
    del qobj, aobj, annotations
    return Opened(
        total=len(pairs),
        iterate=iterate,
        inputs={"questions": str(qfile), "annotations": str(afile), "images": str(index.root)},
        stats={"annotations_without_question": unused, "coco_images_indexed": len(index.by_id)},
    )

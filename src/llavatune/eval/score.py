"""``llavatune score``: VQA accuracy of a predictions file against official VQA / OK-VQA annotations.

    llavatune score --questions OpenEnded_mscoco_val2014_questions.json \\
        --annotations mscoco_val2014_annotations.json --predictions preds.jsonl [--out metrics.json]

Inputs use the official schemas: questions ``{"questions": [{image_id, question, question_id}]}``,
annotations ``{"annotations": [{question_id, question_type, answer_type, answers: [{answer, ...}]}]}``,
predictions one ``{"question_id": ..., "answer": ...}`` per line (JSONL; ``llavatune predict --out`` writes it)
or a JSON list of such objects (the official results format), or ``llavatune eval``'s ``predictions.jsonl``
(``"prediction"`` instead of ``"answer"``). The questions file defines the question set; every question needs an
annotation (extra annotations are ignored) and, unless ``--allow-partial``, a prediction.

The metric is ``llavatune.eval.vqa_metric.vqa_score`` (see its module docstring for the normalization).
``score_predictions`` is the library entry point; ``aggregate`` turns per-question scores into the
overall / per-type summary and is shared with the ``eval`` command.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Hashable, Iterator, Mapping, Optional

from llavatune.config import ConfigError, config, parse_config
from llavatune.data.reader import DataError, load_json, parse_jsonl, read_text
from llavatune.utils import UserError, atomic_write_json, check_output_file

from .vqa_metric import vqa_score

_SHOW = 5  # how many offending ids an error message lists
# The answer field of each predictions format: the official results format and `llavatune predict --out` write
# "answer", `llavatune eval --out`'s predictions.jsonl writes "prediction".
ANSWER_KEYS = ("answer", "prediction")


@config
class ScoreConfig:
    questions: Optional[str] = None
    """Required. Questions JSON in the official VQA / OK-VQA format:
    {"questions": [{"image_id": ..., "question": ..., "question_id": ...}]}. It defines the question set."""
    annotations: Optional[str] = None
    """Required. Annotations JSON in the official format: {"annotations": [{"question_id", "question_type",
    "answer_type", "answers": [{"answer": ...}, ...]}]}. OK-VQA v1.1 answers are stemmed: see --stem."""
    predictions: Optional[str] = None
    """Required. Model answers: llavatune eval's predictions.jsonl ("prediction" field), predict's JSONL output, or
    one {"question_id": ..., "answer": ...} per line, or a JSON list of such objects (the official results format)."""
    out: Optional[str] = None
    """Write the metrics as JSON here (overall, by question/answer type, per question), atomically."""
    allow_partial: bool = False
    """Score only the questions that have a prediction, instead of failing when some are missing or when
    predictions name unknown question ids (those are then ignored)."""
    stem: bool = False
    """Porter-stem prediction and ground-truth tokens before matching (for OK-VQA v1.1, whose answers are
    stemmed). Needs NLTK: pip install nltk."""

    def __post_init__(self):
        missing = [f"--{name}" for name in ("questions", "annotations", "predictions") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"missing required option(s) {', '.join(missing)}")


# ------------------------------------------------------------------------------------------- reading


def _qid_key(value: Any) -> str | None:
    """Question ids are compared as strings (ints and digit strings meet); None if not a valid id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _entries(path: str | os.PathLike, what: str, key: str) -> list[Any]:
    data = load_json(path, f"--{what}")
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        got = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(path, None, None, f'expected the official {what} format {{"{key}": [...]}}, got {got}')
    return data[key]


def _entries_by_id(path: str | os.PathLike, key: str) -> Iterator[tuple[int, str, dict]]:
    """``(index, question id, entry)`` for each entry of an official ``{key: [...]}`` file, in file order.

    Raises on an entry without a valid question id or with one already seen.
    """
    seen: set[str] = set()
    for i, entry in enumerate(_entries(path, key, key)):
        qid = _qid_key(entry.get("question_id")) if isinstance(entry, dict) else None
        if qid is None:
            raise DataError(path, None, None, f"{key}[{i}] has no valid question_id (an integer or a string)")
        if qid in seen:
            raise DataError(path, None, None, f"{key}[{i}]: duplicate question_id {qid}")
        seen.add(qid)
        yield i, qid, entry


def load_questions(path: str | os.PathLike) -> dict[str, dict]:
    """``{question_id: question entry}`` in file order, from an official questions file."""
    out: dict[str, dict] = {}
    for _, qid, q in _entries_by_id(path, "questions"):
        out[qid] = q
    if not out:
        raise DataError(path, None, None, "the questions list is empty")
    return out


def load_annotations(path: str | os.PathLike) -> dict[str, dict]:
    """``{question_id: {"answers": [str, ...], "question_type", "answer_type"}}`` from an official file."""
    out: dict[str, dict] = {}
    for i, qid, a in _entries_by_id(path, "annotations"):
        answers = a.get("answers")
        if not isinstance(answers, list) or not answers:
            raise DataError(path, None, None, f"annotations[{i}] (question_id {qid}) has no answers list")
        texts = []
        for j, ans in enumerate(answers):
            text = ans.get("answer") if isinstance(ans, dict) else None
            if not isinstance(text, str):
                raise DataError(path, None, None, f'annotations[{i}] (question_id {qid}): answers[{j}] needs an "answer" string')
            texts.append(text)
        out[qid] = {
            "answers": texts,
            "question_type": a.get("question_type"),
            "answer_type": a.get("answer_type"),
        }
    return out


def _json_values(path: str | os.PathLike, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each element of a top-level JSON list, keeping element line numbers."""
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def lineno(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def bad(line: int, message: str) -> DataError:
        return DataError(path, None, None, message, line=line, kind="invalid-json")

    pos = skip(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        pos = skip(pos + 1)
    else:
        while True:
            start = pos
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise bad(e.lineno, f"not valid JSON (column {e.colno}): {e.msg}") from None
            yield lineno(start), value
            pos = skip(pos)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos = skip(pos + 1)
                break
            raise bad(lineno(pos), "not valid JSON (expected ',' or ']' in the list)")
    if pos < len(text):
        raise bad(lineno(pos), "not valid JSON (extra data after the list)")


def load_predictions(path: str | os.PathLike) -> dict[str, tuple[int, str]]:
    """``{question_id: (line number, answer)}`` from a JSONL file or a JSON list of objects.

    The answer is the ``answer`` field (official results format, ``llavatune predict``) or the ``prediction``
    field (``llavatune eval``'s predictions.jsonl). Every error names the file and the line: bad JSON, a missing
    or invalid ``question_id`` or answer, an empty answer, a duplicate question id.
    """
    text = read_text(path, "--predictions")
    values = _json_values(path, text) if text.lstrip().startswith("[") else parse_jsonl(path, text)
    out: dict[str, tuple[int, str]] = {}

    def bad(line: int, message: str) -> DataError:
        return DataError(path, None, None, message, line=line)

    for line, obj in values:
        if not isinstance(obj, dict):
            raise bad(line, f'expected an object {{"question_id": ..., "answer": ...}}, got {type(obj).__name__}')
        keys = ", ".join(sorted(obj)) or "none"
        if "question_id" not in obj:
            raise bad(line, f'prediction has no "question_id" (keys: {keys}); eval and predict copy it from '
                             "records that have one, as prepare okvqa / vqav2 write them")
        key = next((k for k in ANSWER_KEYS if k in obj), None)
        if key is None:
            raise bad(line, f'prediction has no "answer" (predict, official results) or "prediction" (eval) '
                             f"(keys: {keys})")
        qid = _qid_key(obj["question_id"])
        if qid is None:
            raise bad(line, f"invalid question_id {obj['question_id']!r} (need an integer or a string)")
        answer = obj[key]
        if not isinstance(answer, str):
            raise bad(line, f"answer for question_id {qid} must be a string, got {type(answer).__name__}")
        if not answer.strip():
            raise bad(line, f"empty answer for question_id {qid}")
        if qid in out:
            raise bad(line, f"duplicate question_id {qid} (first at line {out[qid][0]})")
        out[qid] = (line, answer)
    if not out:
        raise UserError(f"{path}: no predictions found")
    return out


# ------------------------------------------------------------------------------------------- scoring


def _pct(total: float, n: int) -> float:
    return round(100.0 * total / n, 2)


def aggregate(
    per_question_scores: Mapping[Hashable, float],
    meta: Mapping[Hashable, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Summarize per-question scores in [0, 1] (insertion order kept) as the official evaluator does.

    ``meta[qid]`` may give ``question_type`` and ``answer_type``; questions without one (or with no
    meta) are left out of that breakdown, which is empty when no question has a type. Percentages are
    rounded to 2 decimals, as the official ``vqaEval.py`` reports them.

    Returns ``{"vqa_accuracy": pct, "n", "by_question_type": {type: {"vqa_accuracy", "n"}},
    "by_answer_type": {...}, "per_question": {str(qid): score}}``.
    """
    n = len(per_question_scores)
    if n == 0:
        raise ValueError("aggregate needs at least one scored question")
    meta = meta or {}
    groups: dict[str, dict[str, list[float]]] = {"question_type": defaultdict(list), "answer_type": defaultdict(list)}
    for qid, score in per_question_scores.items():
        info = meta.get(qid) or {}
        for field, buckets in groups.items():
            kind = info.get(field)
            if kind is not None:
                buckets[str(kind)].append(score)

    def breakdown(buckets: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
        return {k: {"vqa_accuracy": _pct(sum(v), len(v)), "n": len(v)} for k, v in sorted(buckets.items())}

    return {
        "vqa_accuracy": _pct(sum(per_question_scores.values()), n),
        "n": n,
        "by_question_type": breakdown(groups["question_type"]),
        "by_answer_type": breakdown(groups["answer_type"]),
        "per_question": {str(k): float(v) for k, v in per_question_scores.items()},
    }


def _examples(ids: list[str], lines: Mapping[str, int] | None = None) -> str:
    shown = [f"{q} (line {lines[q]})" if lines else q for q in ids[:_SHOW]]
    return ", ".join(shown) + (", ..." if len(ids) > _SHOW else "")


def score_predictions(
    questions_path: str | os.PathLike,
    annotations_path: str | os.PathLike,
    predictions_path: str | os.PathLike,
    allow_partial: bool = False,
    stem: bool = False,
) -> dict[str, Any]:
    """VQA accuracy of a predictions file against official questions + annotations files.

    Returns ``aggregate``'s dict plus ``coverage`` (question / prediction / scored / missing / extra
    counts) and ``settings``. Raises ``UserError`` on bad input, and on missing or unknown question ids
    unless ``allow_partial`` (then only the overlap is scored).
    """
    questions = load_questions(questions_path)
    annotations = load_annotations(annotations_path)
    no_annotation = [q for q in questions if q not in annotations]
    if no_annotation:
        raise UserError(
            f"{annotations_path}: {len(no_annotation)} of {len(questions)} questions in {questions_path} "
            f"have no annotation (e.g. {_examples(no_annotation)})"
        )
    predictions = load_predictions(predictions_path)
    missing = [q for q in questions if q not in predictions]
    extra = [q for q in predictions if q not in questions]
    scored = [q for q in questions if q in predictions]
    if (missing or extra) and not allow_partial:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(questions)} questions have no prediction (e.g. {_examples(missing)})")
        if extra:
            lines = {q: predictions[q][0] for q in extra}
            parts.append(
                f"{len(extra)} of {len(predictions)} predictions are for question ids not in {questions_path} "
                f"(e.g. {_examples(extra, lines)})"
            )
        raise UserError(
            f"{predictions_path}: " + "; ".join(parts) + f"; pass --allow-partial to score only the {len(scored)} "
            "questions that have a prediction"
        )
    if not scored:
        raise UserError(
            f"{predictions_path}: none of the {len(predictions)} predictions is for a question in {questions_path}"
        )

    per_question = {q: vqa_score(predictions[q][1], annotations[q]["answers"], stem=stem) for q in scored}
    result = aggregate(per_question, annotations)
    per_q = result.pop("per_question")
    result["coverage"] = {
        "questions": len(questions),
        "predictions": len(predictions),
        "scored": len(scored),
        "missing": len(missing),
        "extra": len(extra),
    }
    result["settings"] = {
        "questions": str(questions_path),
        "annotations": str(annotations_path),
        "predictions": str(predictions_path),
        "allow_partial": allow_partial,
        "stem": stem,
    }
    result["per_question"] = per_q
    return result


def format_summary(result: Mapping[str, Any]) -> str:
    """Human-readable report: overall accuracy, coverage note if partial, per-type breakdowns."""
    lines = [f"VQA accuracy: {result['vqa_accuracy']:.2f}  ({result['n']} questions)"]
    cov = result.get("coverage")
    if cov and (cov["missing"] or cov["extra"]):
        lines.append(
            f"partial: scored {cov['scored']} of {cov['questions']} questions "
            f"({cov['missing']} without a prediction; {cov['extra']} predictions for unknown ids ignored)"
        )
    for key, title in (("by_answer_type", "by answer type"), ("by_question_type", "by question type")):
        groups = result.get(key) or {}
        if not groups:
            continue
        width = max(len(k) for k in groups)
        lines.append(f"{title}:")
        lines += [f"  {k:<{width}}  {v['vqa_accuracy']:6.2f}  (n={v['n']})" for k, v in groups.items()]
    return "\n".join(lines)


def main(argv: list[str], prog: str) -> int:
    (cfg,) = parse_config(
        [ScoreConfig],
        argv,
        prog=prog,
        description="Score predictions with the official VQA accuracy (VQAv2 / OK-VQA annotation format).",
    )
    if cfg.out:  # the scores never land on the files they are computed from
        check_output_file(cfg.out, {"--questions": cfg.questions, "--annotations": cfg.annotations,
                                    "--predictions": cfg.predictions}, "--out")
    result = score_predictions(
        cfg.questions, cfg.annotations, cfg.predictions, allow_partial=cfg.allow_partial, stem=cfg.stem
    )
    print(format_summary(result))
    if cfg.out:
        atomic_write_json(cfg.out, result)
        print(f"wrote {cfg.out}")
    return 0

"""What a ``prepare`` source yields: usable questions (:class:`Item`), skipped records (:class:`Reject`), and the
opened source (:class:`Opened`) the writer iterates; the helpers every source shares."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from llavatune.config import ConfigError
from llavatune.data.records import IMAGE_TOKEN, DataError

VQA_SUFFIX = "Answer the question using a single word or phrase."


def require(value: Any, flag: str, what: str) -> None:
    """A required option: a one-line error naming it and what it is when missing."""
    if value is None or value == "":
        raise ConfigError(f"--{flag} is required: {what}")


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

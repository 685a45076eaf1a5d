"""Turning an LLM reply into human/gpt turns: ``Question: ... === Answer: ...`` blocks for ``conversation`` and
``complex``, a description for ``detail``; a reply that cannot be used is a :class:`ReplyError` with its reason."""

from __future__ import annotations

import hashlib
import re

from llavatune.data.records import IMAGE_TOKEN, Turn
from llavatune.data.synth.prompts import DETAIL_INSTRUCTIONS


class ReplyError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


_LABEL_RE = re.compile(
    r"^[ \t]*(?:[*_#>]+[ \t]*)?(question|answer|q|a|user|assistant)(?:[ \t]*\d+)?[ \t]*[*_]*[ \t]*[:：][ \t]*[*_]*[ \t]*",
    re.I | re.M,
)
_SEPARATOR_RE = re.compile(r"^[ \t]*(?:={3,}|-{3,}|\*{3,})[ \t]*$", re.M)
_THINK_RE = re.compile(r"<think>.*?</think>", re.S | re.I)


def _clean(text: str) -> str:
    return _SEPARATOR_RE.sub("", text).strip()


def strip_reasoning(text: str) -> str:
    """Drop ``<think>...</think>`` blocks that reasoning models put before their answer."""
    text = _THINK_RE.sub("", text)
    if "</think>" in text.lower():  # an opening tag lost by the server's chat template
        text = text[text.lower().rindex("</think>") + len("</think>") :]
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def parse_qa(text: str) -> list[tuple[str, str]]:
    """``Question: ... === Answer: ...`` blocks -> ``[(question, answer), ...]`` or :class:`ReplyError`.

    Tolerated: text before the first question, ``Q:``/``A:``, numbered (``Question 2:``) or markdown-bold
    labels, the label's text on the same line, missing or extra ``===``/``---`` separators, and one unanswered
    question at the very end (dropped).
    """
    text = strip_reasoning(text)
    marks = list(_LABEL_RE.finditer(text))
    if not marks:
        raise ReplyError("no-qa-blocks", "no 'Question:' / 'Answer:' blocks in the reply")
    blocks = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        role = "q" if m.group(1).lower() in ("question", "q", "user") else "a"
        blocks.append((role, _clean(text[m.end() : end])))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(blocks):
        role, body = blocks[i]
        if role != "q":
            raise ReplyError("qa-order", f"block {i + 1} is an answer without a question before it")
        if i + 1 == len(blocks):
            if pairs:  # a last question without an answer: drop it
                break
            raise ReplyError("qa-order", "the question has no answer")
        role2, body2 = blocks[i + 1]
        if role2 != "a":
            raise ReplyError("qa-order", f"question {len(pairs) + 1} is followed by another question, not an answer")
        if not body or not body2:
            raise ReplyError("empty-qa", f"question {len(pairs) + 1} or its answer is empty")
        pairs.append((body, body2))
        i += 2
    return pairs


def detail_instruction(key: str) -> str:
    """The ``detail`` instruction of an image: fixed per image path, spread evenly over the list."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return DETAIL_INSTRUCTIONS[h % len(DETAIL_INSTRUCTIONS)]


def reply_to_turns(kind: str, key: str, reply: str, finish_reason: str | None) -> list[Turn]:
    """An LLM reply -> human/gpt turns with ``<image>\\n`` opening the first human turn (or :class:`ReplyError`)."""
    if finish_reason == "content_filter":
        raise ReplyError("content-filtered", "the server filtered the reply (finish_reason content_filter)")
    text = strip_reasoning(reply or "")
    if not text:
        raise ReplyError("empty-reply", "the reply is empty")
    truncated = finish_reason == "length"
    if kind == "detail":
        if truncated:
            raise ReplyError("truncated-reply", "the reply was cut off at --max-tokens (finish_reason length)")
        if _LABEL_RE.match(text):
            raise ReplyError("unexpected-qa", "a detail reply should be a description, not Question/Answer blocks")
        pairs = [(detail_instruction(key), text)]
    else:
        pairs = parse_qa(text)
        if truncated:  # the last answer may be cut mid-sentence
            if kind == "complex" or len(pairs) < 2:
                raise ReplyError("truncated-reply", "the reply was cut off at --max-tokens (finish_reason length)")
            pairs = pairs[:-1]
        if kind == "complex":
            pairs = pairs[:1]
    turns: list[Turn] = []
    for i, (q, a) in enumerate(pairs):
        if IMAGE_TOKEN in q or IMAGE_TOKEN in a:
            raise ReplyError("image-token-in-reply", f"the reply contains the {IMAGE_TOKEN} placeholder")
        turns += [Turn("human", (IMAGE_TOKEN + "\n" if i == 0 else "") + q), Turn("gpt", a)]
    return turns

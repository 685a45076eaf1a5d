"""What ``synth`` sends: the built-in (or the user's) system message and few-shot examples per kind, and each image's
context (its captions and, for ``detail`` and ``complex``, its object boxes normalized to 0-1)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Sequence

from llavatune.config import ConfigError
from llavatune.data.reader import parse_json, read_text

if TYPE_CHECKING:
    from llavatune.data.synth.inputs import Item

KINDS = ("conversation", "detail", "complex")

#: Instructions of ``detail`` samples; each image always gets the same one (a hash of its path picks it).
DETAIL_INSTRUCTIONS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Give a detailed description of the image.",
    "What do you see in this picture? Describe it thoroughly.",
    "Write a thorough description of this image.",
    "Explain what this image shows, in detail.",
    "Describe everything you can see in this photo.",
    "Provide a comprehensive account of what this image shows.",
    "Walk me through the scene in this image in detail.",
    "Can you describe this picture carefully and completely?",
    "Tell me about this image in as much detail as you can.",
    "Give an elaborate description of the scene shown here.",
    "Describe the image: its objects, where they are and what is happening.",
)


@dataclass
class PromptSet:
    """System message and few-shot (user, assistant) pairs of one kind."""

    system: str
    examples: list[tuple[str, str]]
    source: str = "built-in"


_MARK_RE = re.compile(r"^<<<(user|assistant)>>>[ \t]*$", re.M)


def parse_examples(text: str, name: str = "<examples>") -> list[tuple[str, str]]:
    """Parse an examples file: ``<<<user>>>`` / ``<<<assistant>>>`` marker lines, text before the first ignored."""
    marks = list(_MARK_RE.finditer(text))
    blocks = [
        (m.group(1), text[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)].strip())
        for i, m in enumerate(marks)
    ]
    pairs = []
    for i in range(0, len(blocks), 2):
        if blocks[i][0] != "user" or i + 1 >= len(blocks) or blocks[i + 1][0] != "assistant":
            raise ConfigError(
                f"--examples {name}: example {i // 2 + 1} must be a <<<user>>> block followed by an <<<assistant>>> "
                "block (each marker on a line of its own)"
            )
        if not blocks[i][1] or not blocks[i + 1][1]:
            raise ConfigError(f"--examples {name}: example {i // 2 + 1} has an empty block")
        pairs.append((blocks[i][1], blocks[i + 1][1]))
    return pairs


def builtin_prompt_file(kind: str, part: str) -> str:
    """The text of a built-in prompt file (``part``: 'system' or 'examples')."""
    return resources.files("llavatune.data").joinpath("synth_prompts", f"{kind}_{part}.txt").read_text("utf-8")


def load_prompts(kind: str, system_file: str | None = None, examples_file: str | None = None) -> PromptSet:
    """The prompts of ``kind``: built-in, or replaced by ``system_file`` / ``examples_file``."""
    system = read_text(system_file, "--system-prompt") if system_file else builtin_prompt_file(kind, "system")
    system = system.strip()
    if not system:
        raise ConfigError(f"--system-prompt {system_file}: the file is empty")
    if examples_file:
        text = read_text(examples_file, "--examples")
        if examples_file.endswith(".json"):
            data = parse_json(text, examples_file) if text.strip() else []
            ok = isinstance(data, list) and all(
                isinstance(d, dict) and isinstance(d.get("user"), str) and isinstance(d.get("assistant"), str)
                for d in data
            )
            if not ok:
                raise ConfigError(
                    f'--examples {examples_file}: expected a JSON list of {{"user": ..., "assistant": ...}}'
                )
            examples = [(d["user"].strip(), d["assistant"].strip()) for d in data]
        else:
            examples = parse_examples(text, examples_file)
    else:
        examples = parse_examples(builtin_prompt_file(kind, "examples"), f"built-in {kind}")
    src = "built-in" if not (system_file or examples_file) else "custom"
    return PromptSet(system=system, examples=examples, source=src)


def format_box(category: str, box: Sequence[float]) -> str:
    return f"{category}: [{', '.join(f'{v:.3f}' for v in box)}]"


def format_context(item: Item, with_boxes: bool) -> str:
    """This image's part of the prompt: its captions and (``with_boxes``) its boxes."""
    lines = ["Captions:", *item.captions]
    if with_boxes and item.boxes:
        lines += ["", "Objects:", *(format_box(c, b) for c, b in item.boxes)]
    return "\n".join(lines)

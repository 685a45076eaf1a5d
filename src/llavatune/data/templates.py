"""Conversation templates and the prompt/answer *segments* that loss masking is built from.

A conversation is rendered as a list of ``(text, supervised)`` segments; tokens of supervised
segments (the assistant answers, with their end-of-turn marker) get labels, every other token gets
-100. Tokenizing segment by segment makes the mask exact by construction, instead of the original
LLaVA code's re-splitting of the rendered prompt on separators, which silently masks whole samples
when a tokenizer version merges tokens differently ("WARNING: tokenization mismatch", loss 0:
haotian-liu/LLaVA #661, #1166, #1706).

Named templates reproduce the original LLaVA ones (``llava/conversation.py``):

- ``vicuna_v1``  ``{system} USER: {q} ASSISTANT: {a}</s>USER: ...`` (LLaVA-1.5)
- ``llava_llama_2``  ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...``
- ``plain``  ``<image>{caption}\\n`` (stage-1 projector pretraining; only the caption is learned)
- ``chatml``  ``<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n``

``template: auto`` uses the tokenizer/processor chat template when it has one: the segments are then
derived by rendering growing prefixes of the conversation (with and without the generation prompt)
and taking the differences, so any prefix-stable Jinja template masks correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llavatune.data.records import IMAGE_TOKEN, Turn

Segment = tuple[str, bool]

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
TEMPLATE_NAMES = ("auto", "vicuna_v1", "llava_llama_2", "plain", "chatml")


def _split_system(turns: list[Turn], default: str) -> tuple[str, list[Turn]]:
    system = default
    rest = []
    for t in turns:
        if t.role == "system":
            system = t.value
        else:
            rest.append(t)
    return system, rest


def _vicuna(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
    system, turns = _split_system(turns, VICUNA_SYSTEM)
    segs: list[Segment] = []
    text = (system + " ") if system else ""
    for t in turns:
        if t.role == "human":
            text += f"USER: {t.value} ASSISTANT:"
        else:
            segs.append((text, False))
            segs.append((f" {t.value}{eos}", True))
            text = ""
    if text:
        segs.append((text, False))
    return segs


def _llama2(turns: list[Turn], eos: str, gen: bool, bos: str = "<s>") -> list[Segment]:
    system, turns = _split_system(turns, LLAMA2_SYSTEM)
    segs: list[Segment] = []
    text, first = "", True
    for t in turns:
        if t.role == "human":
            msg = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else "") + t.value
            text += ("" if first else bos) + f"[INST] {msg} [/INST]"
            first = False
        else:
            segs.append((text, False))
            segs.append((f" {t.value} {eos}", True))
            text = ""
    if text:
        segs.append((text, False))
    return segs


def _plain(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
    # Original LLaVA pretraining: the human text is dropped, only "<image>" + caption + "\n" remain.
    human = next((t for t in turns if t.role == "human"), None)
    answer = next((t for t in turns if t.role == "gpt"), None)
    n_images = human.value.count(IMAGE_TOKEN) if human else 0
    segs: list[Segment] = [(IMAGE_TOKEN * max(n_images, 1) if n_images else "", False)]
    if answer is not None:
        segs.append((answer.value + "\n", True))
    return segs


def _chatml(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
    system, turns = _split_system(turns, "")
    segs: list[Segment] = []
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for t in turns:
        if t.role == "human":
            text += f"<|im_start|>user\n{t.value}<|im_end|>\n<|im_start|>assistant\n"
        else:
            segs.append((text, False))
            segs.append((f"{t.value}<|im_end|>", True))
            text = "\n"
    if text and (text != "\n" or not gen):
        segs.append((text, False))
    return segs


NAMED: dict[str, Callable[[list[Turn], str, bool], list[Segment]]] = {
    "vicuna_v1": _vicuna,
    "llava_llama_2": _llama2,
    "plain": _plain,
    "chatml": _chatml,
}


def _to_messages(turns: list[Turn]) -> list[dict]:
    """Turns -> HF chat-template messages with ``{"type": "image"}`` parts where ``<image>`` stood."""
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    msgs = []
    for t in turns:
        parts = []
        pieces = t.value.split(IMAGE_TOKEN)
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
            piece = piece.strip("\n") if i > 0 or len(pieces) > 1 else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        msgs.append({"role": role[t.role], "content": parts})
    return msgs


@dataclass
class ChatTemplateSegmenter:
    """Derive segments from a Jinja chat template by rendering growing prefixes."""

    render: Callable[..., str]  # tokenizer/processor.apply_chat_template

    def _r(self, turns: list[Turn], gen: bool) -> str:
        return self.render(_to_messages(turns), tokenize=False, add_generation_prompt=gen)

    def __call__(self, turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
        segs: list[Segment] = []
        done = ""
        for i, t in enumerate(turns):
            if t.role != "gpt":
                continue
            prompt = self._r(turns[:i], gen=True)
            full = self._r(turns[: i + 1], gen=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(
                    "the model's chat template is not prefix-stable, so answer spans cannot be located; "
                    "set --template to one of vicuna_v1, llava_llama_2, chatml, plain"
                )
            answer = full[len(prompt) :]
            # Templates such as llava-1.5-hf's end answers with a space and no EOS: the model would never
            # learn to stop (LLaVA #682, #1578). Supervise an EOS after each answer.
            if eos and eos not in answer:
                answer = answer.rstrip(" ") + eos
            segs.append((prompt[len(done) :], False))
            segs.append((answer, True))
            done = full
        if gen and (not turns or turns[-1].role != "gpt"):
            prompt = self._r(turns, gen=True)
            segs.append((prompt[len(done) :], False))
        return segs


def get_segmenter(name: str, processor=None) -> Callable[[list[Turn], str, bool], list[Segment]]:
    """Return ``f(turns, eos_text, generation) -> segments`` for a template name.

    ``auto``: the processor's (or its tokenizer's) chat template when set, else ``vicuna_v1``.
    """
    if name == "auto":
        for obj in (processor, getattr(processor, "tokenizer", None)):
            if obj is not None and getattr(obj, "chat_template", None):
                return ChatTemplateSegmenter(obj.apply_chat_template)
        return NAMED["vicuna_v1"]
    if name not in NAMED:
        raise ValueError(f"--template: unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    return NAMED[name]


# The Jinja form of vicuna_v1 without a system prompt (as llava-hf/llava-1.5 renders prompts), saved with
# tiny/composed models so that stock transformers' apply_chat_template produces the prompts we train on.
VICUNA_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] if message['content'] is not string "
    "else message['content'] }}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ASSISTANT:' }}"
    "{% else %}{{ ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

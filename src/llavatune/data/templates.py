"""Conversation templates and the prompt/answer *segments* that loss masking is built from.

A conversation is rendered as a list of ``(text, supervised)`` segments; tokens of supervised
segments (the assistant answers, with their end-of-turn marker) get labels, every other token gets
-100. Building labels from these spans makes the mask exact by construction, instead of the original
LLaVA code's re-splitting of the rendered prompt on separators, which silently masks whole samples
when a tokenizer version merges tokens differently ("WARNING: tokenization mismatch", loss 0:
haotian-liu/LLaVA #661, #1166, #1706).

Named templates render byte for byte what the original ``llava/conversation.py``
``conv_templates[NAME].get_prompt()`` renders (``preprocess_plain`` for ``plain``), training text and
generation prompt alike (``</s>`` below is the tokenizer's EOS, which is ``</s>`` for Llama/Vicuna/Mistral):

- ``vicuna_v1`` (alias ``v1``; LLaVA-1.5's ``--version v1`` and ``--conv-mode vicuna_v1``):
  ``{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:`` with the system prompt "A chat between a
  curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite
  answers to the user's questions."
- ``llava_v1``: the same with "a curious human" / "the human's questions" (a different original template).
- ``llava_llama_2``: ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST]``.
- ``mistral_instruct``: ``[INST] {q} [/INST] {a} </s>[INST] {q2} [/INST]`` (no system prompt).
- ``chatml_direct`` (alias ``mistral_direct``; LLaVA-NeXT-34B): ``<|im_start|>system\\nAnswer the
  questions.<|im_end|><|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n{a}<|im_end|>`` (MPT style: no
  newline after ``<|im_end|>``).
- ``plain`` (stage-1 projector pretraining): ``<image>{caption}\\n``, the human text dropped; only the caption
  (and its ``\\n``) is learned. Its generation prompt is the training prefix ``<image>``.

Supervised: each answer plus its end-of-turn marker (``" {a}</s>"``, ``" {a} </s>"``, ``"{a}<|im_end|>"``,
``"{caption}\\n"``), exactly the tokens the original code leaves unmasked. A ``system`` turn replaces the
default system prompt (the original code has no such turn; this is the chat-template convention).

``chatml`` is *not* an original LLaVA template: the common ChatML with a newline after every ``<|im_end|>``
and no system prompt unless given (``<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>``).
``paligemma`` is PaliGemma's own prompt format (it ships no chat template): ``<image>``... ``<bos>{q}\\n``, then
``{a}<eos>`` learned; ``template: auto`` picks it for PaliGemma models (``llavatune.model.families``).

``template: auto`` uses the tokenizer/processor chat template when it has one (Qwen-VL's ChatML, Gemma 3's
``<start_of_turn>``, ...): the segments are then derived by rendering growing prefixes of the conversation (with and
without the generation prompt) and taking the differences, so any prefix-stable Jinja template masks correctly.
Without a chat template: the family's own format where it has one (``paligemma``), else ``vicuna_v1``.
:func:`chat_template` gives the Jinja form of each named template (what ``llavatune convert`` saves),
so stock ``apply_chat_template`` renders the same text.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Literal

from llavatune.data.records import IMAGE_TOKEN, Turn

logger = logging.getLogger("llavatune")
Segment = tuple[str, bool]

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
CHATML_DIRECT_SYSTEM = "Answer the questions."
# Names as the original conv_templates spells them; "chatml" is ours (not an original LLaVA template).
ALIASES = {"v1": "vicuna_v1", "mistral_direct": "chatml_direct"}
# Every name --template accepts, in every command ("auto": the checkpoint's or the model's own), listed here only:
# options type themselves with TemplateName (their --help lists the choices), ChatTemplateName those with a Jinja form.
TEMPLATE_NAMES = ("auto", "vicuna_v1", "v1", "llava_v1", "llava_llama_2", "mistral_instruct", "chatml_direct",
                  "mistral_direct", "plain", "chatml", "paligemma")
CHAT_TEMPLATE_NAMES = tuple(n for n in TEMPLATE_NAMES if n not in ("auto", "plain", "paligemma"))
TemplateName = Literal[TEMPLATE_NAMES]  # type: ignore[valid-type]
ChatTemplateName = Literal[CHAT_TEMPLATE_NAMES]  # type: ignore[valid-type]


def _split_system(turns: list[Turn], default: str) -> tuple[str, list[Turn]]:
    system = default
    rest = []
    for t in turns:
        if t.role == "system":
            system = t.value
        else:
            rest.append(t)
    return system, rest


def _sep_two(default_system: str) -> Callable[[list[Turn], str, bool], list[Segment]]:
    """``SeparatorStyle.TWO`` (vicuna_v1, llava_v1): ``system + " "``, ``"USER: " + q + " "``,
    ``"ASSISTANT: " + a + "</s>"``, and ``"ASSISTANT:"`` for the message being generated."""

    def render(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
        system, turns = _split_system(turns, default_system)
        segs: list[Segment] = []
        text = system + " "
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

    return render


def _sep_llama2(default_system: str, sep: str) -> Callable[[list[Turn], str, bool], list[Segment]]:
    """``SeparatorStyle.LLAMA_2`` (llava_llama_2 with sep ``<s>``, mistral_instruct with sep ``""``): each user
    message wrapped as ``[INST] {q} [/INST]`` (the first with the ``<<SYS>>`` block when there is a system
    prompt) and preceded by ``sep`` except the first; each answer ``" " + a + " </s>"``."""

    def render(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
        system, turns = _split_system(turns, default_system)
        segs: list[Segment] = []
        text, first = "", True
        for t in turns:
            if t.role == "human":
                msg = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else "") + t.value
                text += ("" if first else sep) + f"[INST] {msg} [/INST]"
                first = False
            else:
                segs.append((text, False))
                segs.append((f" {t.value} {eos}", True))
                text = ""
        if text:
            segs.append((text, False))
        return segs

    return render


def _chatml_direct(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
    """``SeparatorStyle.MPT`` (chatml_direct): ``<|im_start|>system\\n{system}<|im_end|>``, then
    ``<|im_start|>user\\n{q}<|im_end|>`` and ``<|im_start|>assistant\\n{a}<|im_end|>`` with nothing between."""
    system, turns = _split_system(turns, CHATML_DIRECT_SYSTEM)
    segs: list[Segment] = []
    text = f"<|im_start|>system\n{system}<|im_end|>"
    for t in turns:
        if t.role == "human":
            text += f"<|im_start|>user\n{t.value}<|im_end|><|im_start|>assistant\n"
        else:
            segs.append((text, False))
            segs.append((f"{t.value}<|im_end|>", True))
            text = ""
    if text:
        segs.append((text, False))
    return segs


def _plain(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
    # Original LLaVA pretraining (preprocess_plain): the human text is dropped, only "<image>" + caption + "\n"
    # remain, and the caption + "\n" is learned.
    human = next((t for t in turns if t.role == "human"), None)
    answer = next((t for t in turns if t.role == "gpt"), None)
    n_images = human.value.count(IMAGE_TOKEN) if human else 0
    segs: list[Segment] = [(IMAGE_TOKEN * n_images, False)]
    if answer is not None:
        segs.append((answer.value + "\n", True))
    return segs


def _chatml(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
    """Not an original LLaVA template: ChatML with a newline after each ``<|im_end|>``, system only when given."""
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


PALIGEMMA_BOS = "<bos>"


def _paligemma(turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
    """PaliGemma's prompt format (it has no chat template; what ``PaliGemmaProcessor`` builds from ``text`` and
    ``suffix``): every image first, then ``<bos>``, the question and ``\n``; the answer plus EOS is learned. Later
    exchanges continue with ``{question}\n`` and ``{answer}{eos}``. A system turn is put before the first question."""
    system, turns = _split_system(turns, "")
    n_images = sum(t.value.count(IMAGE_TOKEN) for t in turns if t.role == "human")
    segs: list[Segment] = []
    text = IMAGE_TOKEN * n_images + PALIGEMMA_BOS
    first = True
    for t in turns:
        if t.role == "human":
            q = " ".join(t.value.replace(IMAGE_TOKEN, " ").split()) if IMAGE_TOKEN in t.value else t.value.strip()
            text += (f"{system}\n" if first and system else "") + q + "\n"
            first = False
        else:
            segs.append((text, False))
            segs.append((t.value + eos, True))
            text = ""
    if text:
        segs.append((text, False))
    return segs


NAMED: dict[str, Callable[[list[Turn], str, bool], list[Segment]]] = {
    "vicuna_v1": _sep_two(VICUNA_V1_SYSTEM),
    "llava_v1": _sep_two(LLAVA_V1_SYSTEM),
    "llava_llama_2": _sep_llama2(LLAMA2_SYSTEM, "<s>"),
    "mistral_instruct": _sep_llama2("", ""),
    "chatml_direct": _chatml_direct,
    "plain": _plain,
    "chatml": _chatml,
    "paligemma": _paligemma,
}


def canonical(name: str) -> str:
    """The template name an alias stands for (``v1`` -> ``vicuna_v1``); other names unchanged."""
    return ALIASES.get(name, name)


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


_SENTINEL = "LLAVATUNEANSWERSENTINEL"


@dataclass
class ChatTemplateSegmenter:
    """Derive segments from a Jinja chat template by rendering growing prefixes.

    The prompt of the answer to turn ``i`` is the rendering of the turns before it with the generation prompt; the
    answer is what the finished conversation adds after that prompt. Some templates write the assistant header
    differently in a finished conversation than in their generation prompt (llava-onevision-hf's: ``assistant \n``
    + answer, but ``assistant\n`` to generate); the answer and its end-of-turn text are then found with a sentinel
    answer, and training uses the generation prompt's form: what the model sees when it answers.
    """

    render: Callable[..., str]  # tokenizer/processor.apply_chat_template
    warned: bool = False

    def _r(self, turns: list[Turn], gen: bool) -> str:
        return self.render(_to_messages(turns), tokenize=False, add_generation_prompt=gen)

    def _answer(self, turns: list[Turn], i: int, full: str) -> str | None:
        """The answer of turn ``i`` with its end-of-turn text, for a template whose finished turn does not extend its
        generation prompt; None when even that cannot be located."""
        probe = self._r(turns[:i] + [Turn("gpt", _SENTINEL)], gen=False)
        at = probe.find(_SENTINEL)
        if at < 0 or not full.startswith(probe[:at]):
            return None
        suffix = probe[at + len(_SENTINEL):]
        if not full.endswith(suffix) or len(full) - len(suffix) < at:
            return None
        if not self.warned:
            self.warned = True
            logger.warning(
                f"the chat template writes a finished assistant turn as {probe[max(0, at - 24):at]!r} + answer but "
                f"prompts generation with {self._r(turns[:i], gen=True)[-24:]!r}; training uses the generation prompt's "
                "form, which is what the model sees when it answers")
        return full[at:]

    def __call__(self, turns: list[Turn], eos: str, gen: bool) -> list[Segment]:
        segs: list[Segment] = []
        done = ""
        for i, t in enumerate(turns):
            if t.role != "gpt":
                continue
            prompt = self._r(turns[:i], gen=True)
            full = self._r(turns[: i + 1], gen=False)
            answer = full[len(prompt):] if full.startswith(prompt) else None
            if answer is None and prompt.startswith(done):
                answer = self._answer(turns, i, full)
            if answer is None or not prompt.startswith(done):
                raise ValueError(
                    "the model's chat template is not prefix-stable, so answer spans cannot be located; "
                    "set --template to one of " + ", ".join(n for n in TEMPLATE_NAMES if n != "auto")
                )
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
    name = canonical(name)
    if name not in NAMED:
        raise ValueError(f"--template: unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    return NAMED[name]


# ----------------------------------------------------------------------------------------------------
# Jinja forms (chat templates), for stock transformers / vLLM

# Message content as text: a string, or parts where an image part becomes "<image>\n" (the original places the
# image first in its turn, followed by a newline).
_CONTENT_MACRO = (
    "{%- macro content_text(content) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for c in content -%}{%- if c['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
)


def _system_prelude(default: str) -> str:
    """Jinja: ``system`` = a leading system message's text, else ``default``; ``loop_messages`` = the rest."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = content_text(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {json.dumps(default)} -%}}{{%- set loop_messages = messages -%}}"
        "{%- endif -%}"
    )


def _jinja_two(default: str) -> str:
    return (
        _CONTENT_MACRO + _system_prelude(default) + "{{ system }}{{ ' ' }}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}{{ content_text(message['content']) }}{{ ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{{ content_text(message['content']) }}"
        "{{ eos_token }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def _jinja_llama2(default: str, sep: str) -> str:
    return (
        _CONTENT_MACRO + _system_prelude(default) +
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first -%}{{ '[INST] ' }}{%- if system -%}{{ '<<SYS>>\n' }}{{ system }}{{ '\n<</SYS>>\n\n' }}"
        f"{{%- endif -%}}{{%- else -%}}{{{{ {json.dumps(sep + '[INST] ')} }}}}{{%- endif -%}}"
        "{{ content_text(message['content']) }}{{ ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' }}{{ content_text(message['content']) }}"
        "{{ ' ' }}{{ eos_token }}{%- endif -%}{%- endfor -%}"
    )


_JINJA_CHATML_DIRECT = (
    _CONTENT_MACRO + _system_prelude(CHATML_DIRECT_SYSTEM) +
    "{{ '<|im_start|>system\n' }}{{ system }}{{ '<|im_end|>' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<|im_start|>user\n' }}{{ content_text(message['content']) }}"
    "{{ '<|im_end|>' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\n' }}"
    "{{ content_text(message['content']) }}{{ '<|im_end|>' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

_JINJA_CHATML = (
    _CONTENT_MACRO + _system_prelude("") +
    "{%- if system -%}{{ '<|im_start|>system\n' }}{{ system }}{{ '<|im_end|>\n' }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<|im_start|>user\n' }}{{ content_text(message['content']) }}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\n' }}"
    "{{ content_text(message['content']) }}{{ '<|im_end|>\n' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

_JINJA = {
    "vicuna_v1": _jinja_two(VICUNA_V1_SYSTEM),
    "llava_v1": _jinja_two(LLAVA_V1_SYSTEM),
    "llava_llama_2": _jinja_llama2(LLAMA2_SYSTEM, "<s>"),
    "mistral_instruct": _jinja_llama2("", ""),
    "chatml_direct": _JINJA_CHATML_DIRECT,
    "chatml": _JINJA_CHATML,
}


def chat_template(name: str) -> str:
    """The Jinja chat template that renders what the named template renders: the default system prompt unless
    the first message is a system message, image parts as ``<image>\\n``, the tokenizer's ``eos_token`` after
    each answer. ``plain`` has none (pretraining captions are not a chat)."""
    name = canonical(name)
    if name not in _JINJA:
        raise ValueError(f"template {name!r} has no chat-template form; choose one of {', '.join(_JINJA)}")
    return _JINJA[name]


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

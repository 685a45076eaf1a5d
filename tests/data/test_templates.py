"""Each named template renders what the original haotian-liu/LLaVA code renders, byte for byte.

The expected strings are facts about the original code, written down here (not computed from it):
``llava/conversation.py`` ``conv_templates[NAME]`` with ``append_message(roles[0], q)``,
``append_message(roles[1], a or None)`` and ``get_prompt()``; ``llava/train/train.py`` ``preprocess_plain`` for
``plain``. The supervised text is what the original's ``preprocess_*`` masking leaves unmasked: each answer and its
end-of-turn marker. The Jinja form of each template (what ``convert`` saves) renders the same strings through
stock ``apply_chat_template``.
"""

from __future__ import annotations

import pytest

from llavatune.data.records import Turn
from llavatune.data.templates import NAMED, TEMPLATE_NAMES, _to_messages, chat_template, get_segmenter

Q1, A1 = "<image>\nWhat is the man holding?", "an umbrella"
Q2, A2 = "What color is it?", "red"
CONVERSATIONS = {"gen1": [Q1], "train1": [Q1, A1], "train2": [Q1, A1, Q2, A2], "gen2": [Q1, A1, Q2]}

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions.")
LLAMA2 = ("You are a helpful language and vision assistant. You are able to understand the visual content that the "
          "user provides, and assist the user with a variety of tasks using natural language.")

EXPECTED = {
    "vicuna_v1": {
        "gen1": VICUNA + " USER: <image>\nWhat is the man holding? ASSISTANT:",
        "train1": VICUNA + " USER: <image>\nWhat is the man holding? ASSISTANT: an umbrella</s>",
        "train2": VICUNA + " USER: <image>\nWhat is the man holding? ASSISTANT: an umbrella</s>"
                           "USER: What color is it? ASSISTANT: red</s>",
        "gen2": VICUNA + " USER: <image>\nWhat is the man holding? ASSISTANT: an umbrella</s>"
                         "USER: What color is it? ASSISTANT:",
    },
    "llava_v1": {
        "gen1": LLAVA_V1 + " USER: <image>\nWhat is the man holding? ASSISTANT:",
        "train1": LLAVA_V1 + " USER: <image>\nWhat is the man holding? ASSISTANT: an umbrella</s>",
        "train2": LLAVA_V1 + " USER: <image>\nWhat is the man holding? ASSISTANT: an umbrella</s>"
                             "USER: What color is it? ASSISTANT: red</s>",
        "gen2": LLAVA_V1 + " USER: <image>\nWhat is the man holding? ASSISTANT: an umbrella</s>"
                           "USER: What color is it? ASSISTANT:",
    },
    "llava_llama_2": {
        "gen1": "[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>\n\n<image>\nWhat is the man holding? [/INST]",
        "train1": "[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>\n\n<image>\nWhat is the man holding? [/INST] an umbrella </s>",
        "train2": "[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>\n\n<image>\nWhat is the man holding? [/INST] an umbrella </s>"
                  "<s>[INST] What color is it? [/INST] red </s>",
        "gen2": "[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>\n\n<image>\nWhat is the man holding? [/INST] an umbrella </s>"
                "<s>[INST] What color is it? [/INST]",
    },
    "mistral_instruct": {
        "gen1": "[INST] <image>\nWhat is the man holding? [/INST]",
        "train1": "[INST] <image>\nWhat is the man holding? [/INST] an umbrella </s>",
        "train2": "[INST] <image>\nWhat is the man holding? [/INST] an umbrella </s>[INST] What color is it? [/INST] red </s>",
        "gen2": "[INST] <image>\nWhat is the man holding? [/INST] an umbrella </s>[INST] What color is it? [/INST]",
    },
    "chatml_direct": {
        "gen1": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is the man holding?"
                "<|im_end|><|im_start|>assistant\n",
        "train1": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is the man holding?"
                  "<|im_end|><|im_start|>assistant\nan umbrella<|im_end|>",
        "train2": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is the man holding?"
                  "<|im_end|><|im_start|>assistant\nan umbrella<|im_end|><|im_start|>user\nWhat color is it?<|im_end|>"
                  "<|im_start|>assistant\nred<|im_end|>",
        "gen2": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is the man holding?"
                "<|im_end|><|im_start|>assistant\nan umbrella<|im_end|><|im_start|>user\nWhat color is it?<|im_end|>"
                "<|im_start|>assistant\n",
    },
}
# What the original masking leaves to learn, per template: each answer with its end-of-turn marker
SUPERVISED = {
    "vicuna_v1": [" an umbrella</s>", " red</s>"],
    "llava_v1": [" an umbrella</s>", " red</s>"],
    "llava_llama_2": [" an umbrella </s>", " red </s>"],
    "mistral_instruct": [" an umbrella </s>", " red </s>"],
    "chatml_direct": ["an umbrella<|im_end|>", "red<|im_end|>"],
}
ALIASES = {"v1": "vicuna_v1", "mistral_direct": "chatml_direct"}  # conv_templates entries pointing at the same object


def turns_of(messages: list[str]) -> list[Turn]:
    return [Turn("human" if i % 2 == 0 else "gpt", m) for i, m in enumerate(messages)]


def cases():
    for name, rendered in EXPECTED.items():
        for alias in [name] + [a for a, n in ALIASES.items() if n == name]:
            for kind in CONVERSATIONS:
                yield alias, kind, rendered[kind]


@pytest.mark.parametrize("name,kind,want", list(cases()))
def test_template_renders_the_original_get_prompt(name, kind, want):
    segs = get_segmenter(name)(turns_of(CONVERSATIONS[kind]), "</s>", kind.startswith("gen"))
    assert "".join(text for text, _ in segs) == want
    supervised = [text for text, sup in segs if sup]
    n_answers = len(CONVERSATIONS[kind]) // 2
    assert supervised == SUPERVISED[ALIASES.get(name, name)][:n_answers]


@pytest.mark.parametrize("name,kind,want", list(cases()))
def test_jinja_form_renders_the_same_through_apply_chat_template(tiny_processor, name, kind, want):
    tok = tiny_processor.tokenizer
    assert tok.eos_token == "</s>"
    saved = tok.chat_template
    try:
        tok.chat_template = chat_template(name)
        got = tok.apply_chat_template(_to_messages(turns_of(CONVERSATIONS[kind])), tokenize=False,
                                      add_generation_prompt=kind.startswith("gen"))
    finally:
        tok.chat_template = saved
    assert got == want


def test_system_turn_replaces_the_default_system_prompt(tiny_processor):
    turns = [Turn("system", "Answer briefly.")] + turns_of([Q1])
    render = {n: "".join(t for t, _ in NAMED[n](turns, "</s>", True)) for n in NAMED}
    assert render["vicuna_v1"] == "Answer briefly. USER: <image>\nWhat is the man holding? ASSISTANT:"
    assert render["llava_llama_2"] == ("[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n<image>\nWhat is the man holding? "
                                       "[/INST]")
    assert render["chatml_direct"] == ("<|im_start|>system\nAnswer briefly.<|im_end|><|im_start|>user\n<image>\n"
                                       "What is the man holding?<|im_end|><|im_start|>assistant\n")
    # an empty system prompt: the original wrap_sys leaves the <<SYS>> block out
    empty = [Turn("system", "")] + turns_of([Q1])
    assert "".join(t for t, _ in NAMED["llava_llama_2"](empty, "</s>", True)) == "[INST] <image>\nWhat is the man holding? [/INST]"
    tok = tiny_processor.tokenizer
    saved = tok.chat_template
    try:
        for name in ("vicuna_v1", "llava_llama_2", "chatml_direct"):
            tok.chat_template = chat_template(name)
            assert tok.apply_chat_template(_to_messages(turns), tokenize=False, add_generation_prompt=True) == render[name]
    finally:
        tok.chat_template = saved


def test_plain_is_preprocess_plain():
    # source[0]['value'] = DEFAULT_IMAGE_TOKEN; conversation = "<image>" + caption + "\n"; only the caption is learned
    turns = turns_of(["<image>\nDescribe the image briefly.", "a man with an umbrella"])
    segs = get_segmenter("plain")(turns, "</s>", False)
    assert segs == [("<image>", False), ("a man with an umbrella\n", True)]
    # generating a caption starts from the training prefix
    assert "".join(t for t, _ in get_segmenter("plain")(turns[:1], "</s>", True)) == "<image>"
    with pytest.raises(ValueError, match="no chat-template form"):
        chat_template("plain")


def test_chatml_is_kept_as_a_non_original_alias():
    """``chatml`` is not an original LLaVA template (that is chatml_direct, without newlines)."""
    got = "".join(t for t, _ in get_segmenter("chatml")(turns_of([Q1, A1, Q2]), "</s>", True))
    assert got == ("<|im_start|>user\n<image>\nWhat is the man holding?<|im_end|>\n<|im_start|>assistant\nan umbrella"
                   "<|im_end|>\n<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\n")
    assert got != "".join(t for t, _ in get_segmenter("chatml_direct")(turns_of([Q1, A1, Q2]), "</s>", True))
    import llavatune.data.templates as t

    assert "``chatml`` is *not* an original LLaVA template" in t.__doc__
    assert set(TEMPLATE_NAMES) >= {"vicuna_v1", "llava_v1", "llava_llama_2", "mistral_instruct", "chatml_direct",
                                   "plain", "chatml", "auto"}

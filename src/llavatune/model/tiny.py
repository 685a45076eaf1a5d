"""``model: tiny`` — a tiny random LLaVA built from the real classes, for demos, tests and smoke runs.

    llavatune train --model tiny --data DIR/data.json --output_dir RUN

Real ``CLIPVisionModel`` + ``LlamaForCausalLM`` inside ``LlavaForConditionalGeneration`` (2 layers,
small widths) with a word-level tokenizer trained by the ``tokenizers`` library on the training
data's own text, and a ``LlavaProcessor`` with a chat template. Everything is built locally from
code, nothing is downloaded; the result is saved like any llava-hf checkpoint, so every later step
(QLoRA loading, merging, stock-transformers reload) treats it exactly as a real model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from llavatune.data.records import IMAGE_TOKEN
from llavatune.data.templates import VICUNA_JINJA

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
# Text every prompt contains, so the vocabulary covers the templates whatever the data says (the system prompts
# of vicuna_v1 and llava_v1, which differ in "user"/"human", and chatml_direct's).
TEMPLATE_TEXT = (
    "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> <|im_start|> <|im_end|> system user assistant "
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. Answer the question using a single word or phrase. "
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. Answer the questions."
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, image_token: bool = True):
    """A Llama-style BPE tokenizer (byte-level, so any text round-trips) trained on ``texts``.

    ``image_token=False`` leaves ``<image>`` out, like a plain LM's tokenizer (for composing tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS if image_token else SPECIAL_TOKENS[:-1],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + [TEMPLATE_TEXT], trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN} if image_token else None,
        padding_side="right",
    )
    fast.chat_template = VICUNA_JINJA
    return fast


def tiny_config_kwargs(image_size: int = 32, patch_size: int = 8, hidden_size: int = 64, vision_hidden_size: int = 32,
                       num_layers: int = 2) -> dict:
    """The shapes of ``build_tiny``'s model: CLIP vision and Llama config fields and the feature selection
    (the tokenizer adds the vocabulary and special token ids). ``llavatune plan --model tiny`` reads them too."""
    return {
        "vision_config": dict(
            hidden_size=vision_hidden_size,
            intermediate_size=vision_hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=vision_hidden_size,
        ),
        "text_config": dict(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }


def build_tiny(
    texts: Iterable[str],
    out_dir: str | os.PathLike | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    next: bool = False,
):
    """Build (and optionally save) a tiny random LLaVA + processor. Returns ``(model, processor)``.

    ``next=True`` builds a tiny LLaVA-NeXT instead ("any resolution": each image is tiled on a grid chosen
    by its size, plus a base view, so its token count depends on the image's height and width).
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tokenizer = train_tokenizer(texts)
    shapes = tiny_config_kwargs(image_size, patch_size, hidden_size, vision_hidden_size, num_layers)
    vision = CLIPVisionConfig(**shapes["vision_config"])
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shapes["text_config"],
    )
    n_tokens = (image_size // patch_size) ** 2  # "default" strategy drops CLS
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_tokens,
        vision_feature_layer=shapes["vision_feature_layer"],
        vision_feature_select_strategy=shapes["vision_feature_select_strategy"],
        projector_hidden_act="gelu",
    )
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints) if next else LlavaConfig(**common)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config) if next else LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if next:
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        )
    else:
        image_processor = LlavaImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_pad=True,  # LLaVA-1.5 "pad" aspect ratio: pad to square with the mean colour, then resize
        )
    processor = (LlavaNextProcessor if next else LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_JINJA,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


SMOKE_WIDTHS = {"vision": 32, "text": 64}


def shrink_config(sub, hidden: int) -> None:
    """Make a vision or text sub-config tiny in place (2 layers, ``hidden`` wide, 4 heads), keeping its family's
    other settings (activation, norm, rope, image and patch size, vocabulary, special token ids)."""
    sub.hidden_size, sub.intermediate_size = hidden, hidden * 2
    for k, val in {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}.items():
        if hasattr(sub, k):
            setattr(sub, k, val)
    if hasattr(sub, "head_dim"):
        sub.head_dim = hidden // 4
    if hasattr(sub, "projection_dim"):
        sub.projection_dim = hidden
    for k in ("layer_types", "sliding_window_layers"):  # per-layer lists must match the new depth
        if isinstance(getattr(sub, k, None), list):
            setattr(sub, k, getattr(sub, k)[:2])
    # Qwen-VL's vision towers: "depth" layers of "embed_dim"/"hidden_size" width with "num_heads"; block lists by index
    for k, val in {"depth": 2, "num_heads": 4, "embed_dim": hidden}.items():
        if hasattr(sub, k):
            setattr(sub, k, val)
    for k, val in {"fullatt_block_indexes": [1], "deepstack_visual_indexes": [0]}.items():
        if getattr(sub, k, None):
            setattr(sub, k, val)
    rope = getattr(sub, "rope_parameters", None)
    # M-RoPE (Qwen-VL; its default [16, 24, 24] when the config names none) splits half the head dimension in three
    if isinstance(rope, dict) and (rope.get("mrope_section") or "_vl_text" in str(getattr(sub, "model_type", ""))):
        half = (getattr(sub, "head_dim", None) or hidden // sub.num_attention_heads) // 2
        t = half // 4
        rope["mrope_section"] = [t, (half - t) // 2, half - t - (half - t) // 2]


def fit_vision_to_text(cfg) -> None:
    """After shrinking: the sizes the vision side hands to the language model follow its new width (Qwen2-VL's merger
    output ``hidden_size``, Qwen2.5/3-VL's ``out_hidden_size``, PaliGemma's ``projection_dim``)."""
    hidden, vision = cfg.text_config.hidden_size, cfg.vision_config
    if hasattr(vision, "embed_dim"):  # Qwen2-VL: embed_dim is the ViT's width, hidden_size the merger's output
        vision.hidden_size = hidden
    if hasattr(vision, "out_hidden_size"):
        vision.out_hidden_size = hidden
    if hasattr(cfg, "projection_dim"):
        cfg.projection_dim = vision.projection_dim = hidden


def build_smoke(ref: str, out_dir: str | os.PathLike):
    """``--smoke``: a tiny random model of the same families as ``ref`` (2 layers, small widths) with
    ``ref``'s own processor and tokenizer, so data, template and image-token bugs surface in seconds.

    ``ref`` is a llava-hf model (local folder or hub id). For ``--model compose`` see
    ``loader.compose_llava(..., smoke=True)``."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    cfg = AutoConfig.from_pretrained(ref)
    if not hasattr(cfg, "vision_config") or not hasattr(cfg, "text_config"):
        from llavatune.utils import UserError

        raise UserError(f"--model {ref}: a {cfg.model_type} model, not a vision-language (llava-hf) model; "
                        "to build a new LLaVA from it use --model compose --language_model with --vision_model")
    processor = AutoProcessor.from_pretrained(ref)
    shrink_config(cfg.vision_config, SMOKE_WIDTHS["vision"])
    shrink_config(cfg.text_config, SMOKE_WIDTHS["text"])
    fit_vision_to_text(cfg)
    model = AutoModelForImageTextToText.from_config(cfg)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor


def tiny_family(ref: str) -> str:
    """The built-in tiny model closest to ``ref`` when its files cannot be read: the family of a local folder's
    config.json, else the one its name suggests (``families.tiny_for``: 'tiny-next' for LLaVA-NeXT ("next", "v1.6"),
    'tiny-qwen2_5_vl' for Qwen2.5-VL, 'tiny-gemma3' for Gemma 3, ...), 'tiny' (LLaVA-1.5 layout) otherwise."""
    import json

    from llavatune.model.families import family, tiny_for

    cfg = Path(ref).expanduser() / "config.json"
    if cfg.is_file():
        try:
            fam = family(json.loads(cfg.read_text()).get("model_type"))
            if fam is not None and fam.tiny:
                return fam.tiny
        except (OSError, ValueError):
            pass
    return tiny_for(ref)


def build_tiny_model(name: str, texts: Iterable[str], out_dir: str | os.PathLike | None = None, seed: int = 0):
    """``--model NAME`` for a built-in tiny model: 'tiny' (LLaVA-1.5), 'tiny-next' (LLaVA-NeXT) or 'tiny-<family>'
    (``llavatune.model.tiny_families``). Saves it to ``out_dir`` when given; returns ``(model, processor)``."""
    from llavatune.model.families import TINY_MODELS

    fam = TINY_MODELS[name].name
    if fam in ("llava", "llava_next"):
        return build_tiny(texts, out_dir, seed=seed, next=fam == "llava_next")
    from llavatune.model.tiny_families import build_family

    model, processor = build_family(fam, texts, seed=seed)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor

"""``model: tiny`` — a tiny LLaVA built from the real classes, for demos, tests and smoke runs.

    llavatune train --model tiny --data DIR/data.json --output_dir RUN

Real ``CLIPVisionModel`` + ``LlamaForCausalLM`` inside ``LlavaForConditionalGeneration`` (2 layers,
small widths) with a byte-level BPE tokenizer trained by the ``tokenizers`` library on the training
data's own text, and a ``LlavaProcessor`` with a chat template. Like a real LLaVA it starts from a
pretrained-like language model and vision tower: a few seconds of warm starts on the data's text and,
separately, its images (:mod:`llavatune.model.warmup`), never on an image paired with its answer.
Everything is built locally from code, nothing is downloaded; the result is saved like any llava-hf
checkpoint, so every later step (QLoRA loading, merging, stock-transformers reload) treats it exactly as
a real model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from llavatune.data.records import IMAGE_TOKEN, Turn
from llavatune.data.templates import VICUNA_JINJA

logger = logging.getLogger("llavatune")
# build_tiny's warm starts (llavatune.model.warmup): at most this many steps (small data: about 100 passes over
# the text, 40 over the images), texts and images.
WARM_START_LM_STEPS = 300
WARM_START_RECONSTRUCTION_STEPS = 600
WARM_START_CONTRASTIVE_STEPS = 300
WARM_START_TEXTS = 20_000
WARM_START_IMAGES = 1024

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


def tiny_config_kwargs(image_size: int = 32, patch_size: int = 8, hidden_size: int = 64, vision_hidden_size: int = 64,
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


def warm_start_texts(processor, conversations: Iterable[list[Turn]] = (), texts: Iterable[str] = (),
                     template: str = "auto") -> list[str]:
    """The documents the tiny model's language model is warm-started on: each conversation rendered with
    ``template`` (what ``train --template`` renders; 'auto': the processor's chat template), answers and
    end-of-turn tokens included, with the ``<image>`` placeholders removed (the language model sees text only,
    as a real one is pretrained on text); without conversations, each text followed by the EOS token."""
    from llavatune.data.templates import get_segmenter

    tokenizer = getattr(processor, "tokenizer", processor)
    eos = tokenizer.eos_token or ""
    segmenter = get_segmenter(template, processor)
    docs = []
    for turns in conversations:
        turns = [Turn(t.role, t.value.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")) for t in turns]
        if any(t.role == "gpt" for t in turns):
            docs.append("".join(text for text, _ in segmenter(turns, eos, False)))
    if not docs:
        docs = [t.replace(IMAGE_TOKEN, "").strip() + eos for t in texts if t.replace(IMAGE_TOKEN, "").strip()]
    return docs


def _grid_pinpoints(image_size: int) -> list[list[int]]:
    """The tiny LLaVA-NeXT's "any resolution" grids: 1x2, 2x1 and 2x2 tiles of ``image_size``."""
    s = image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def tiny_llava_config(tokenizer, image_size: int, patch_size: int, hidden_size: int, vision_hidden_size: int,
                      num_layers: int, next: bool):
    """``build_tiny``'s ``LlavaConfig`` (``LlavaNextConfig`` with ``next``): the shapes of ``tiny_config_kwargs``,
    the tokenizer's vocabulary and special token ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

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
    return LlavaNextConfig(**common, image_grid_pinpoints=_grid_pinpoints(image_size)) if next else LlavaConfig(**common)


def tiny_llava_processor(tokenizer, image_size: int, patch_size: int, next: bool):
    """``build_tiny``'s ``LlavaProcessor`` (``LlavaNextProcessor`` with ``next``) around ``tokenizer``."""
    from transformers import LlavaImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    if next:
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=_grid_pinpoints(image_size),
        )
    else:
        image_processor = LlavaImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_pad=True,  # LLaVA-1.5 "pad" aspect ratio: pad to square with the mean colour, then resize
        )
    return (LlavaNextProcessor if next else LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_JINJA,
    )


def build_tiny(
    texts: Iterable[str],
    out_dir: str | os.PathLike | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    vision_hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    next: bool = False,
    conversations: Iterable[list[Turn]] | None = None,
    template: str = "auto",
    images: Sequence | None = None,
    warm_start: bool = True,
):
    """Build (and optionally save) a tiny LLaVA + processor. Returns ``(model, processor)``.

    ``next=True`` builds a tiny LLaVA-NeXT instead ("any resolution": each image is tiled on a grid chosen
    by its size, plus a base view, so its token count depends on the image's height and width).

    An honest miniature of a pretrained LLaVA (``warm_start=False``: all weights random), in a few seconds on a
    CPU (:mod:`llavatune.model.warmup`; ``train --model tiny`` passes its training records and images):

    - the language model is warm-started by next-token training on ``conversations`` rendered with
      ``template`` (``train --template``; image placeholders removed), or on ``texts`` when there are none, so
      that, like a pretrained LM, it can put a confident probability on an answer and on the end-of-turn
      token; a random head, which LoRA leaves frozen, cannot (every token stays near 1/vocabulary);
    - with ``images`` (paths or PIL images; up to :data:`WARM_START_IMAGES` of them), the vision tower is
      warm-started self-supervised on the images alone (no text, no answers) and the projector is initialised
      from their features, so that the features keep what tells the images apart and reach the LM at the
      scale of its token embeddings.

    Neither sees an image together with its answer: before the user's training the model answers from the
    text prior alone. Deterministic for a given ``seed`` and inputs.
    """
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    texts = list(texts)
    tokenizer = train_tokenizer(texts)
    config = tiny_llava_config(tokenizer, image_size, patch_size, hidden_size, vision_hidden_size, num_layers, next)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config) if next else LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = tiny_llava_processor(tokenizer, image_size, patch_size, next)
    if warm_start:
        warm_start_tiny(model, processor, warm_start_texts(processor, conversations or (), texts, template),
                        images or (), seed)
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


def _steps(n: int, batch: int, low: int, high: int, passes: int = 40) -> int:
    """Steps for about ``passes`` passes over ``n`` examples, within [low, high] (small data: few steps)."""
    return max(low, min(high, -(-passes * n // batch)))


def warm_start_tiny(model, processor, docs: Sequence[str], images: Sequence = (), seed: int = 0) -> None:
    """The warm starts of :func:`build_tiny` on a built tiny LLaVA(-NeXT): language model on ``docs``; vision
    tower and projector on ``images`` (paths or PIL images) when there are any. Logs what each did."""
    import random

    import torch

    from llavatune.data.encode import pil_image_processor
    from llavatune.data.images import open_image
    from llavatune.model.warmup import init_projector, warm_start, warm_start_vision
    from llavatune.utils import UserError

    tokenizer = processor.tokenizer
    docs = list(docs)
    if len(docs) > WARM_START_TEXTS:  # 300 steps of 16 see at most 4,800 of them; tokenizing millions would not pay
        docs = random.Random(seed).sample(docs, WARM_START_TEXTS)
    # about 100 passes over small data: enough to be sure of answers that the question determines (a higher
    # learning rate would get there in fewer steps, but measured on MNIST, lr 1e-2 cost 16 points of accuracy
    # after training: a language model that sure of its text prior is slow to start reading the image)
    stats = warm_start(model, tokenizer, docs, steps=_steps(len(docs), 16, 50, WARM_START_LM_STEPS, passes=100),
                       seed=seed)
    if stats:
        logger.info(f"tiny model: language model warm-started on {stats.examples} texts, {stats.steps} steps, "
                    f"loss {stats.first_loss:.2f} -> {stats.last_loss:.2f} ({stats.seconds:.1f}s)")
    images = list(images)
    if len(images) > WARM_START_IMAGES:
        images = random.Random(seed).sample(images, WARM_START_IMAGES)
    opened, unreadable = [], 0
    for im in images:
        try:
            opened.append(open_image(im) if isinstance(im, (str, os.PathLike)) else im.convert("RGB"))
        except UserError:  # the dataset reports (and skips) its bad images itself; the warm start just does without
            unreadable += 1
    if not opened:
        return
    pixels = pil_image_processor(processor.image_processor)(opened, return_tensors="pt")["pixel_values"]
    if pixels.ndim == 5:  # LLaVA-NeXT: (images, tiles, C, H, W); every tile is a view the tower encodes
        pixels = pixels.flatten(0, 1)
    cfg, inner = model.config, model.model
    tower = inner.vision_tower
    n_layers = cfg.vision_config.num_hidden_layers
    wanted = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
    drop_cls = cfg.vision_feature_select_strategy == "default"

    def encode(pv):
        hidden = tower(pv, output_hidden_states=True).hidden_states
        feats = torch.cat([hidden[i] for i in wanted], -1)
        return feats[:, 1:] if drop_cls else feats

    # the tower's layers past the deepest feature layer get no gradient: leave them out of the optimizer
    deepest = max(i % (n_layers + 1) for i in wanted)
    params = [p for name, p in tower.named_parameters()
              if not any(f"layers.{k}." in name for k in range(deepest, n_layers)) and "post_layernorm" not in name]
    tower.train()
    n = len(pixels)
    stats = warm_start_vision(encode, params, pixels, steps=_steps(n, 32, 10, WARM_START_CONTRASTIVE_STEPS),
                              reconstruction_steps=_steps(n, 64, 20, WARM_START_RECONSTRUCTION_STEPS), seed=seed)
    tower.eval()
    proj = inner.multi_modal_projector
    with torch.no_grad():
        feats = encode(pixels[:512])
    init_projector(proj.linear_1, proj.linear_2, proj.act, feats,
                   out_rms=float(model.get_input_embeddings().weight.detach().pow(2).mean().sqrt()))
    logger.info(f"tiny model: vision tower warm-started on {stats.examples} images (no text), {stats.steps} steps, "
                f"reconstruction error {stats.first_loss:.2f} -> {stats.last_loss:.2f} ({stats.seconds:.1f}s)"
                + (f"; {unreadable} unreadable images left out" if unreadable else ""))


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


def tiny_processor(name: str, texts: Iterable[str], seed: int = 0):
    """The processor of built-in tiny model ``name`` with its tokenizer trained on ``texts``, as ``train --model NAME``
    builds it (no warm start: ``check --model tiny-<family>`` counts tokens, it needs no trained weights)."""
    from llavatune.model.families import TINY_MODELS

    fam = TINY_MODELS[name].name
    if fam in ("llava", "llava_next"):
        return build_tiny(list(texts), None, seed=seed, next=fam == "llava_next", warm_start=False)[1]
    from llavatune.model.tiny_families import build_family

    return build_family(fam, list(texts), seed=seed)[1]


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

"""Tiny models of today's VLM families (``--model tiny-<family>``), built from each family's real classes.

    llavatune train --model tiny-qwen2_5_vl --data DIR/data.json --output_dir RUN

Each is the family's own ``...ForConditionalGeneration`` with a small config (2 layers, widths 32-64), its real
image processor and processor class with small image sizes (so a 32 x 32 image takes 4-16 tokens), a byte-level BPE
tokenizer trained by the ``tokenizers`` library on the run's own text with the family's special tokens (ChatML's
``<|im_start|>``/``<|im_end|>``, ``<|vision_start|>``/``<|image_pad|>``, Gemma's ``<start_of_turn>``/``<end_of_turn>``,
``<start_of_image>``/``<image_soft_token>``, ...), and the chat template the family's released checkpoints ship
(``model/chat_templates``). Saved like a hub checkpoint, so every later step (QLoRA loading, merging, stock
``AutoModelForImageTextToText`` / ``AutoProcessor`` reload) treats it as a real model. ``llava`` and ``llava_next``
(``tiny``, ``tiny-next``) are built by ``model.tiny.build_tiny``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Callable, Iterable

from llavatune.model.tiny import TEMPLATE_TEXT

IMAGE_SIZE = 32  # pixels: the shapes set's images; every tiny image processor resizes to this scale
PATCH = 8
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# Turn markers of each family's template, so that the vocabulary covers them whatever the data says.
CHATML_TEXT = "system user assistant You are a helpful assistant. "
GEMMA_TEXT = "user model "


def chat_template(name: str) -> str:
    """A released checkpoint's chat template, shipped in ``llavatune/model/chat_templates`` (see its README)."""
    return (resources.files("llavatune") / "model" / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def bpe_tokenizer(texts: Iterable[str], specials: list[str], vocab_size: int = 2000, bos: str | None = None,
                  add_bos: bool = False, **tokens):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` whose special tokens are ``specials`` (ids
    0, 1, ... in that order); ``tokens``: its eos/pad/unk token and named extra special tokens (``image_token``, ...).
    ``add_bos``: the tokenizer puts ``bos`` in front of what it encodes (Gemma's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) + [TEMPLATE_TEXT], trainer=trainer)
    if add_bos and bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    standard = {k: tokens.pop(k) for k in ("eos_token", "pad_token", "unk_token") if k in tokens}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, extra_special_tokens=tokens or None,
                                   padding_side="right", **standard)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


# ---------------------------------------------------------------------------------------------- Qwen-VL

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer(texts: Iterable[str], template: str):
    tok = bpe_tokenizer(list(texts) + [CHATML_TEXT], QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        image_token="<|image_pad|>", video_token="<|video_pad|>",
                        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    tok.chat_template = chat_template(template)
    return tok


def _qwen_processor(family: str, tokenizer):
    """Qwen2VLImageProcessor with 8-pixel patches merged 2 x 2 and 32 x 32 to 64 x 64 pixels per image (4-16 tokens)."""
    import transformers

    from llavatune.model.families import FAMILIES

    size = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": 2 * IMAGE_SIZE * 2 * IMAGE_SIZE}
    geometry = dict(patch_size=PATCH, merge_size=2, temporal_patch_size=2)
    image_processor = transformers.Qwen2VLImageProcessor(size=size, **geometry)
    video_cls = transformers.Qwen3VLVideoProcessor if family == "qwen3_vl" else transformers.Qwen2VLVideoProcessor
    video_processor = video_cls(size=size, **geometry)
    processor_cls = getattr(transformers, FAMILIES[family].processors[0])
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                         chat_template=tokenizer.chat_template)


def _qwen_model(family: str, tokenizer):
    import transformers

    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    eos, pad = _ids(tokenizer, "<|im_end|>", "<|endoftext|>")
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    # M-RoPE: the rotary half-dimensions split between time, height and width
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(TEXT, vocab_size=len(tokenizer), eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
                head_dim=head_dim, rope_parameters=rope)
    common = dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
                  tie_word_embeddings=False)
    grid = dict(patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=4, mlp_ratio=2, **grid)
        return transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **common))
    if family == "qwen2_5_vl":
        # window attention over 32-pixel windows in block 0, full attention in block 1 (fullatt_block_indexes)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=TEXT["hidden_size"],
                      window_size=4 * PATCH, fullatt_block_indexes=[1], **grid)
        return transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **common))
    # Qwen3-VL: learned position embeddings on an 8 x 8 grid (interpolated), DeepStack features from block 0
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=TEXT["hidden_size"],
                  num_position_embeddings=64, deepstack_visual_indexes=[0], **grid)
    text["rope_parameters"] = {**rope, "mrope_interleaved": True}
    return transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **common))


def _qwen(family: str, template: str) -> Callable[[Iterable[str]], tuple[Any, Any]]:
    def build(texts: Iterable[str]):
        tokenizer = _qwen_tokenizer(texts, template)
        model = _qwen_model(family, tokenizer)
        eos, pad = _ids(tokenizer, "<|im_end|>", "<|endoftext|>")
        _generation(model, eos=[eos, pad], pad=pad, bos=None)
        return model, _qwen_processor(family, tokenizer)

    return build


# ---------------------------------------------------------------------------------------------- Gemma 3

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"]


def _gemma3(texts: Iterable[str]):
    import transformers

    tokenizer = bpe_tokenizer(list(texts) + [GEMMA_TEXT], GEMMA_SPECIALS, bos="<bos>", add_bos=True,
                              eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", boi_token="<start_of_image>",
                              eoi_token="<end_of_image>", image_token="<image_soft_token>")
    tokenizer.chat_template = chat_template("gemma3")
    pad, eos, bos, eot, boi, eoi, soft = _ids(tokenizer, "<pad>", "<eos>", "<bos>", "<end_of_turn>", "<start_of_image>",
                                              "<end_of_image>", "<image_soft_token>")
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    text = dict(TEXT, vocab_size=len(tokenizer), head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=64,
                layer_types=["sliding_attention", "full_attention"], pad_token_id=pad, eos_token_id=[eos, eot],
                bos_token_id=bos)
    # SigLIP without its pooling head (as in the released model): 4 x 4 patches ...
    vision = dict(VISION, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    tokens = 4  # ... average-pooled to 2 x 2 soft tokens per image (mm_tokens_per_image)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                                       boi_token_index=boi, eoi_token_index=eoi, image_token_index=soft)
    model = transformers.Gemma3ForConditionalGeneration(config)
    # transformers initialises the projection to zeros (a pretrained checkpoint overwrites it): the image would reach
    # the language model as nothing at all, and the projector's norm would get no gradient. Draw it instead.
    import torch

    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=VISION["hidden_size"] ** -0.5)
    _generation(model, eos=[eos, eot], pad=pad, bos=bos)
    image_processor = transformers.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=tokenizer.chat_template, image_seq_length=tokens)
    return model, processor


# ---------------------------------------------------------------------------------------------- PaliGemma

def _paligemma(texts: Iterable[str]):
    import transformers

    # Gemma's tokenizer without a chat template; PaliGemmaProcessor adds its <loc....>/<seg...> tokens and writes the
    # BOS itself, after the image tokens ("<image>" * n + "<bos>" + prefix + "\n")
    tokenizer = bpe_tokenizer(list(texts), ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos="<bos>",
                              eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", image_token="<image>")
    n_tokens = (IMAGE_SIZE // PATCH) ** 2
    image_processor = transformers.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                        image_seq_length=n_tokens)
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer
    pad, eos, bos, image = _ids(tokenizer, "<pad>", "<eos>", "<bos>", "<image>")
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    # (2 key/value heads, not PaliGemma's 1: bitsandbytes' CPU 4-bit kernel needs 32-multiple output features)
    text = dict(TEXT, model_type="gemma", vocab_size=len(tokenizer), head_dim=head_dim,
                pad_token_id=pad, eos_token_id=eos, bos_token_id=bos)
    vision = dict(VISION, model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH,
                  vision_use_head=False)
    config = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image,
                                          vocab_size=len(tokenizer), projection_dim=TEXT["hidden_size"],
                                          hidden_size=TEXT["hidden_size"])
    model = transformers.PaliGemmaForConditionalGeneration(config)
    _generation(model, eos=[eos], pad=pad, bos=bos)
    return model, processor


# ---------------------------------------------------------------------------------------------- LLaVA-OneVision

def _llava_onevision(texts: Iterable[str]):
    import transformers

    tokenizer = bpe_tokenizer(list(texts) + [CHATML_TEXT], ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                                                            "<video>"],
                              eos_token="<|im_end|>", pad_token="<|endoftext|>", image_token="<image>",
                              video_token="<video>")
    tokenizer.chat_template = chat_template("llava_onevision")
    eos, pad, image, video = _ids(tokenizer, "<|im_end|>", "<|endoftext|>", "<image>", "<video>")
    s = IMAGE_SIZE
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    text = dict(TEXT, model_type="qwen2", vocab_size=len(tokenizer), eos_token_id=eos, pad_token_id=pad,
                bos_token_id=None)
    vision = dict(VISION, model_type="siglip_vision_model", image_size=s, patch_size=PATCH, vision_use_head=False)
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=image, video_token_index=video,
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9")
    model = transformers.LlavaOnevisionForConditionalGeneration(config)
    _generation(model, eos=[eos], pad=pad, bos=None)
    image_processor = transformers.LlavaOnevisionImageProcessor(size={"height": s, "width": s},
                                                                image_grid_pinpoints=pinpoints)
    video_processor = transformers.LlavaOnevisionVideoProcessor(size={"height": s, "width": s})
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(s // PATCH) ** 2, vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template, vision_aspect_ratio="anyres_max_9")
    return model, processor


# ---------------------------------------------------------------------------------------------- Idefics3 / SmolVLM

ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _idefics3(family: str):
    """Idefics3 / SmolVLM: the image split into 32-pixel crops (up to 2 x 2 of a 64-pixel image) plus a global view,
    each crop's 4 x 4 patches pixel-shuffled into 4 tokens between <fake_token_around_image> and its <row_i_col_j>
    (or <global-img>) tag; Llama text model; turns end with <end_of_utterance>."""

    def build(texts: Iterable[str]):
        import transformers

        smol = family == "smolvlm"
        bos = "<|im_start|>" if smol else "<|begin_of_text|>"  # the templates write it first
        specials = [bos, "<|end_of_text|>", "<|finetune_right_pad_id|>", "<fake_token_around_image>", "<image>",
                    "<end_of_utterance>", "<global-img>", *ROW_COL]
        tokenizer = bpe_tokenizer(list(texts) + ["User: Assistant:"], specials, bos=bos, add_bos=not smol,
                                  eos_token="<end_of_utterance>", pad_token="<|finetune_right_pad_id|>")
        tokenizer.chat_template = chat_template(family)
        sizes = dict(size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE})
        seq = (IMAGE_SIZE // PATCH) ** 2 // 4  # scale_factor 2: 4 patches per token
        if smol:
            processor = transformers.SmolVLMProcessor(
                image_processor=transformers.SmolVLMImageProcessor(**sizes), tokenizer=tokenizer,
                video_processor=transformers.SmolVLMVideoProcessor(**sizes), image_seq_len=seq,
                chat_template=tokenizer.chat_template)
        else:
            processor = transformers.Idefics3Processor(image_processor=transformers.Idefics3ImageProcessor(**sizes),
                                                       tokenizer=tokenizer, image_seq_len=seq,
                                                       chat_template=tokenizer.chat_template)
        tokenizer = processor.tokenizer
        image, eou, pad, bos_id = _ids(tokenizer, "<image>", "<end_of_utterance>", "<|finetune_right_pad_id|>", bos)
        text = dict(TEXT, model_type="llama", vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=eou,
                    bos_token_id=bos_id)
        vision = dict(VISION, image_size=IMAGE_SIZE, patch_size=PATCH)
        config_cls = transformers.SmolVLMConfig if smol else transformers.Idefics3Config
        model_cls = (transformers.SmolVLMForConditionalGeneration if smol
                     else transformers.Idefics3ForConditionalGeneration)
        model = model_cls(config_cls(vision_config=vision, text_config=text, scale_factor=2, image_token_id=image))
        _generation(model, eos=[eou], pad=pad, bos=bos_id)
        return model, processor

    return build


# ---------------------------------------------------------------------------------------------- InternVL

def _internvl(texts: Iterable[str]):
    """InternVL: the image cut into up to 4 tiles of 32 pixels plus a thumbnail (GotOcr2ImageProcessor's
    crop_to_patches, which InternVLProcessor turns on), each tile's 4 x 4 patches pixel-shuffled (downsample_ratio
    0.5) into 4 <IMG_CONTEXT> tokens, all of an image's between <img> and </img>; Qwen2 text model, ChatML turns."""
    import transformers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tokenizer = bpe_tokenizer(list(texts) + [CHATML_TEXT], specials, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", start_image_token="<img>", end_image_token="</img>",
                              context_image_token="<IMG_CONTEXT>", video_token="<video>")
    tokenizer.chat_template = chat_template("internvl")
    seq = (IMAGE_SIZE // PATCH) ** 2 // 4
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = transformers.GotOcr2ImageProcessor(size=size, max_patches=4)
    video_processor = transformers.InternVLVideoProcessor(size=size)
    processor = transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                               video_processor=video_processor, image_seq_length=seq,
                                               chat_template=tokenizer.chat_template)
    eos, pad, context = _ids(tokenizer, "<|im_end|>", "<|endoftext|>", "<IMG_CONTEXT>")
    text = dict(TEXT, model_type="qwen2", vocab_size=len(tokenizer), eos_token_id=eos, pad_token_id=pad,
                bos_token_id=None, tie_word_embeddings=False)
    vision = dict(VISION, image_size=IMAGE_SIZE, patch_size=PATCH)
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=context,
                                         image_seq_length=seq, downsample_ratio=0.5, tie_word_embeddings=False)
    model = transformers.InternVLForConditionalGeneration(config)
    _generation(model, eos=[eos], pad=pad, bos=None)
    return model, processor


# ---------------------------------------------------------------------------------------------- Mistral 3

MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
# the default system prompt Mistral-Small-3.1's template writes (with today's date), so that it tokenizes compactly
MISTRAL_TEXT = ("You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup "
                "headquartered in Paris. Your knowledge base was last updated on 2023-10-01. The current date is "
                "When you're not sure about some information, you say that you don't have the information and don't "
                "make up anything. If the user's question is not clear, ambiguous, or does not provide enough context "
                "for you to accurately answer the question, you do not try to answer it right away and you rather ask "
                "the user to clarify their request (e.g. \"What are some good restaurants around me?\" => \"Where are "
                "you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")")


def _mistral3(texts: Iterable[str]):
    """Mistral 3 (Mistral-Small-3.1): Pixtral vision tower on the image at its own size (longest edge up to 64
    pixels, sides rounded up to 16), 8-pixel patches merged 2 x 2 by the projector's patch merger, one [IMG] per
    merged patch, [IMG_BREAK] after each row and [IMG_END] last; Mistral text model, [INST] ... [/INST] turns ending
    with </s>."""
    import transformers

    tokenizer = bpe_tokenizer(list(texts) + [MISTRAL_TEXT], MISTRAL_SPECIALS, bos="<s>", add_bos=True,
                              eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = chat_template("mistral3")
    # the image processor's own patch size is the tower's; PixtralProcessor resizes to patch x merge (16) itself
    image_processor = transformers.PixtralImageProcessor(size={"longest_edge": 2 * IMAGE_SIZE},
                                                         patch_size={"height": PATCH, "width": PATCH})
    processor = transformers.PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                              spatial_merge_size=2, chat_template=tokenizer.chat_template)
    unk, bos, eos, image, pad = _ids(tokenizer, "<unk>", "<s>", "</s>", "[IMG]", "<pad>")
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    text = dict(TEXT, model_type="mistral", vocab_size=len(tokenizer), head_dim=head_dim, sliding_window=None,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    vision = dict(VISION, model_type="pixtral", image_size=2 * IMAGE_SIZE, patch_size=PATCH,
                  head_dim=VISION["hidden_size"] // VISION["num_attention_heads"])
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_index=image,
                                         spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    model = transformers.Mistral3ForConditionalGeneration(config)
    _generation(model, eos=[eos], pad=pad, bos=bos)
    return model, processor


# ---------------------------------------------------------------------------------------------- Mllama

MLLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>"]
# the header the template writes for text-only conversations, so that it tokenizes compactly
MLLAMA_TEXT = "system user assistant Cutting Knowledge Date: December 2023 Today Date: "


def _mllama(texts: Iterable[str]):
    """Mllama (Llama 3.2 Vision): one <|image|> token per image in the text; the image, cut into up to 4 tiles of
    32 pixels (aspect_ratio_ids / aspect_ratio_mask), enters through a cross-attention layer of the language model,
    each token attending to the tiles its cross_attention_mask names; Llama 3 turns ending with <|eot_id|>."""
    import transformers

    tokenizer = bpe_tokenizer(list(texts) + [MLLAMA_TEXT], MLLAMA_SPECIALS, bos="<|begin_of_text|>", add_bos=True,
                              eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>", image_token="<|image|>")
    tokenizer.chat_template = chat_template("mllama")
    image_processor = transformers.MllamaImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                        max_image_tiles=4)
    processor = transformers.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=tokenizer.chat_template)
    bos, eot, end, pad, image = _ids(tokenizer, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",
                                     "<|finetune_right_pad_id|>", "<|image|>")
    # layer 0 self-attention, layer 1 cross-attention to the image (the released model: every 5th layer)
    text = dict(TEXT, vocab_size=len(tokenizer), cross_attention_layers=[1], bos_token_id=bos,
                eos_token_id=[end, eot], pad_token_id=pad)
    text.pop("max_position_embeddings")
    vision = dict(hidden_size=VISION["hidden_size"], intermediate_size=VISION["intermediate_size"],
                  num_hidden_layers=2, num_global_layers=1, attention_heads=VISION["num_attention_heads"],
                  image_size=IMAGE_SIZE, patch_size=PATCH, max_num_tiles=4, intermediate_layers_indices=[0],
                  vision_output_dim=2 * VISION["hidden_size"])
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=image)
    model = transformers.MllamaForConditionalGeneration(config)
    # transformers initialises the cross-attention layers' tanh gates to zero (a pretrained checkpoint overwrites
    # them): the image would reach the language model as nothing at all, and the projector would get no gradient.
    import torch

    for name, p in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            torch.nn.init.constant_(p, 1.0)
    _generation(model, eos=[end, eot], pad=pad, bos=bos)
    return model, processor


def _generation(model, eos: list[int], pad: int, bos: int | None) -> None:
    """Generation settings as the released checkpoints' generation_config.json has them: stop at the end of a turn."""
    gen = model.generation_config
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.pad_token_id = pad
    gen.bos_token_id = bos


BUILDERS: dict[str, Callable[[Iterable[str]], tuple[Any, Any]]] = {
    "qwen2_vl": _qwen("qwen2_vl", "qwen2_vl"),
    "qwen2_5_vl": _qwen("qwen2_5_vl", "qwen2_vl"),
    "qwen3_vl": _qwen("qwen3_vl", "qwen3_vl"),
    "gemma3": _gemma3,
    "paligemma": _paligemma,
    "llava_onevision": _llava_onevision,
    "idefics3": _idefics3("idefics3"),
    "smolvlm": _idefics3("smolvlm"),
    "internvl": _internvl,
    "mistral3": _mistral3,
    "mllama": _mllama,
}


def build_family(family: str, texts: Iterable[str], seed: int = 0):
    """The tiny random model and processor of ``family`` (a key of ``BUILDERS``). Deterministic for a ``seed``."""
    import torch

    torch.manual_seed(seed)
    return BUILDERS[family](list(texts))

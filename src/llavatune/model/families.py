"""The model families llavatune trains, in one table: where each keeps its parts and what its inputs look like.

Every place that depends on the architecture reads it from here instead of testing ``model_type``:

- loading and freezing (``loader.apply_method``, ``loader.quantization_kwargs``): the module paths of the vision tower,
  the projector (connector, merger) and the language model, under the model's inner ``model``;
- ``--stage pretrain``: what stage 1 trains (``stage1``), or why the family has no separate projector stage;
- LoRA: the default targets (every linear layer under ``language_model``; never the vision tower unless
  ``--train_vision lora``); the projector trains fully, saved inside the adapter (PEFT ``modules_to_save``);
- per-module learning rates (``--projector_lr``, ``--vision_lr``) and the parameter summary (``parameter_group``);
- prompts (``data.encode.Encoder``): how an image placeholder becomes tokens (``expansion``), what the family's chat
  template writes for an image (``placeholder``), the extra tensors its forward needs (``image_inputs`` from the image
  processor, ``token_types`` built from the token ids) and how the collator batches them (``collate``), and the
  end-of-turn tokens that are supervised and stop generation;
- ``--model tiny-<family>`` (``model.tiny``), ``--smoke`` (``tiny_for``), ``plan`` and ``check --model``.

Adding a family: one :class:`Family` entry (and, where its inputs are unusual, a collate rule in
``data.encode.COLLATE_RULES`` or a template in ``data.templates``), plus a tiny builder in ``model.tiny``. An entry with
``supported=False`` makes every command refuse the family with one line (``require``) instead of a traceback.

Torch-free: ``check``, ``plan`` and ``--help`` import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llavatune.utils import UserError


@dataclass(frozen=True)
class Family:
    name: str
    """transformers' model_type of the family (the key of ``FAMILIES``)."""
    model_types: tuple[str, ...]
    """config.model_type values that belong to the family."""
    processors: tuple[str, ...]
    """Processor class names (what AutoProcessor builds for it)."""
    vision: tuple[str, ...]
    """Module paths of the vision tower under the model's inner ``model``."""
    projector: tuple[str, ...]
    """Module paths of the projector / connector / merger (under the inner ``model``): trained by stage 1, trained fully
    next to LoRA adapters (and saved inside them), never quantized."""
    language_model: str
    """Module path of the decoder under the inner ``model``: LoRA's default targets are its linear layers."""
    stage1: str
    """What ``--stage pretrain`` trains, in words (the projector paths above)."""
    placeholder: str
    """What the family's chat template writes for one image part; named templates' ``<image>`` becomes this."""
    end_of_turn: tuple[str, ...]
    """Tokens that end an assistant turn: supervised after each answer and used as generation stop tokens (those the
    tokenizer knows; its EOS token always stops generation too)."""
    expansion: str = "count"
    """How each placeholder becomes tokens. 'count': ``n`` copies of the image token, ``n`` from the processor's
    patch geometry (LLaVA-style; each text chunk between images tokenized on its own, as the original LLaVA code does).
    'processor': the processor's own replacement text for an image of that size (begin/end markers, grid-dependent
    counts, row/column tokens), the whole prompt then tokenized in one go, as the processor does."""
    image_inputs: tuple[str, ...] = ("pixel_values",)
    """Image-processor outputs the model's forward takes (everything else it returns is dropped)."""
    token_types: str | None = None
    """A per-token tensor the forward needs, built from the token ids: its name ('mm_token_type_ids',
    'token_type_ids'), or None."""
    token_type_rule: str = "image"
    """How ``token_types`` is built: 'image' (1 on the processor's image tokens, as its create_mm_token_type_ids
    does), 'prefix_lm' (0 on the prompt up to the first answer, 1 from there: PaliGemma's prefix-LM attention) or
    'cross_attention' (Mllama's cross_attention_mask: per token, the tiles of the images it attends to)."""
    collate: dict[str, str] = field(default_factory=dict)
    """Collate rule per input key (``data.encode.COLLATE_RULES``) where the default ('cat': concatenate per-image
    tensors over the batch; per-token tensors are padded like input_ids) does not fit."""
    template: str | None = None
    """Named template used by ``--template auto`` when the model has no chat template (None: vicuna_v1)."""
    tiny: str | None = None
    """``--model`` name of the built-in tiny model of the family."""
    hub_examples: tuple[str, ...] = ()
    """Example hub ids (docs, ``plan``)."""
    hub_pattern: str = ""
    """Regex (case-insensitive) on a hub id that identifies the family when its config cannot be read (--smoke
    offline picks ``tiny`` by it)."""
    shared_prefix: bool = False
    """Generation may prefill a shared image prefix once for several questions (infer/generate.py): image features
    spliced into token positions, causal attention, 1-D positions from the attention mask."""
    zero3: bool = True
    """DeepSpeed ZeRO-3 works with the family."""
    supported: bool = True
    """False: known, but not trained yet; ``status`` says why, and commands refuse it with that line."""
    status: str = ""
    """What was tested (supported families) or what is missing (the others)."""
    pip_extras: tuple[str, ...] = ()
    """Packages its processor imports beyond llavatune's dependencies (the ``llavatune[<family>]`` extra)."""

    def modules(self, model: Any, part: str) -> list[Any]:
        """The modules of ``part`` ('vision', 'projector', 'language_model') of a transformers model (or PEFT wrapper)."""
        inner = inner_model(model)
        paths = {"vision": self.vision, "projector": self.projector, "language_model": (self.language_model,)}[part]
        return [get_path(inner, p) for p in paths]

    def parameter_group(self, name: str, lora: bool = True) -> str:
        """'lora', 'projector', 'vision' or 'llm' for a parameter name (with or without PEFT's prefixes); with
        ``lora=False`` a LoRA parameter counts where its layer is (``--vision_lr`` applies to the vision tower's
        adapters too)."""
        if lora and "lora_" in name:
            return "lora"
        dotted = f".{name}."
        if any(f".{p}." in dotted for p in self.projector):
            return "projector"
        if any(f".{p}." in dotted for p in self.vision):
            return "vision"
        return "llm"


def inner_model(model: Any) -> Any:
    """The ``...Model`` inside a ``...ForConditionalGeneration`` (PEFT and DDP wrappers removed)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.model


def get_path(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


_LLAVA_STATUS = "LoRA, QLoRA, full, ZeRO-2/3, eval, merge and stock reload tested on the tiny model"
_QWEN_VISION = dict(
    vision=("visual",), projector=("visual.merger",), language_model="language_model",
    stage1="the vision-language merger (visual.merger) that maps 2x2 patch groups into the LLM; the ViT stays frozen",
    placeholder="<|vision_start|><|image_pad|><|vision_end|>", end_of_turn=("<|im_end|>",), expansion="processor",
    image_inputs=("pixel_values", "image_grid_thw"), token_types="mm_token_type_ids",
)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family(
        "llava", ("llava",), ("LlavaProcessor",), vision=("vision_tower",), projector=("multi_modal_projector",),
        language_model="language_model", stage1="the projector (multi_modal_projector), on captions (LLaVA stage 1)",
        placeholder="<image>", end_of_turn=("</s>",), tiny="tiny", shared_prefix=True,
        hub_examples=("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"), hub_pattern=r"llava",
        status=_LLAVA_STATUS,
    ),
    Family(
        "llava_next", ("llava_next",), ("LlavaNextProcessor",), vision=("vision_tower",),
        projector=("multi_modal_projector",), language_model="language_model",
        stage1="the projector (multi_modal_projector), on captions", placeholder="<image>", end_of_turn=("</s>",),
        image_inputs=("pixel_values", "image_sizes"), collate={"pixel_values": "pad_cat"}, tiny="tiny-next",
        shared_prefix=True, hub_examples=("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf"),
        hub_pattern=r"llava.*(next|v?1\.6)", status=_LLAVA_STATUS,
    ),
    Family(
        "llava_onevision", ("llava_onevision",), ("LlavaOnevisionProcessor",), vision=("vision_tower",),
        projector=("multi_modal_projector",), language_model="language_model",
        stage1="the projector (multi_modal_projector), on captions", placeholder="<image>",
        end_of_turn=("<|im_end|>",), image_inputs=("pixel_values", "image_sizes"), collate={"pixel_values": "pad_cat"},
        tiny="tiny-llava_onevision",
        hub_examples=("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
        hub_pattern=r"onevision", status="LoRA, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "paligemma", ("paligemma",), ("PaliGemmaProcessor",), vision=("vision_tower",),
        projector=("multi_modal_projector",), language_model="language_model",
        stage1="the projector (multi_modal_projector, one linear layer), on captions", placeholder="<image>",
        end_of_turn=("<eos>",), template="paligemma", token_types="token_type_ids", token_type_rule="prefix_lm",
        tiny="tiny-paligemma", hub_examples=("google/paligemma-3b-pt-224", "google/paligemma2-3b-pt-224"),
        hub_pattern=r"paligemma", status="LoRA, QLoRA, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "qwen2_vl", ("qwen2_vl",), ("Qwen2VLProcessor",), **_QWEN_VISION, tiny="tiny-qwen2_vl",
        hub_examples=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"), hub_pattern=r"qwen2-vl|qwen2_vl",
        status="LoRA, QLoRA, full, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLProcessor",), **_QWEN_VISION, tiny="tiny-qwen2_5_vl",
        hub_examples=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-72B-Instruct"),
        hub_pattern=r"qwen2\.5-vl|qwen2_5_vl",
        status="LoRA, QLoRA, full, ZeRO-2/3 (2 CPU ranks), eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "qwen3_vl", ("qwen3_vl",), ("Qwen3VLProcessor",),
        **{**_QWEN_VISION, "projector": ("visual.merger", "visual.deepstack_merger_list"),
           "stage1": "the vision-language mergers (visual.merger and the DeepStack mergers visual.deepstack_merger_list "
                     "that feed ViT features into early LLM layers); the ViT stays frozen"},
        tiny="tiny-qwen3_vl", hub_examples=("Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
        hub_pattern=r"qwen3-vl|qwen3_vl", status="LoRA, QLoRA, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "gemma3", ("gemma3",), ("Gemma3Processor",), vision=("vision_tower",), projector=("multi_modal_projector",),
        language_model="language_model",
        stage1="the projector (multi_modal_projector: pooling, norm and projection of SigLIP features)",
        placeholder="<start_of_image>", end_of_turn=("<end_of_turn>",), expansion="processor",
        token_types="token_type_ids", tiny="tiny-gemma3",
        hub_examples=("google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it"),
        hub_pattern=r"gemma-3|gemma3", status="LoRA, QLoRA, full, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "idefics3", ("idefics3",), ("Idefics3Processor",), vision=("vision_model",), projector=("connector",),
        language_model="text_model", stage1="the connector (pixel shuffle + linear modality projection)",
        placeholder="<image>", end_of_turn=("<end_of_utterance>",), expansion="processor",
        image_inputs=("pixel_values", "pixel_attention_mask"),
        collate={"pixel_values": "pad_cat", "pixel_attention_mask": "pad_cat"}, tiny="tiny-idefics3",
        hub_examples=("HuggingFaceM4/Idefics3-8B-Llama3",), hub_pattern=r"idefics3",
        status="LoRA, QLoRA, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "smolvlm", ("smolvlm",), ("SmolVLMProcessor",), vision=("vision_model",), projector=("connector",),
        language_model="text_model", stage1="the connector (pixel shuffle + linear modality projection)",
        placeholder="<image>", end_of_turn=("<end_of_utterance>",), expansion="processor",
        image_inputs=("pixel_values", "pixel_attention_mask"),
        collate={"pixel_values": "pad_cat", "pixel_attention_mask": "pad_cat"}, tiny="tiny-smolvlm",
        hub_examples=("HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
        hub_pattern=r"smolvlm", pip_extras=("num2words",),
        status="LoRA, QLoRA, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "internvl", ("internvl",), ("InternVLProcessor",), vision=("vision_tower",), projector=("multi_modal_projector",),
        language_model="language_model", stage1="the projector (multi_modal_projector: pixel shuffle + MLP)",
        placeholder="<IMG_CONTEXT>", end_of_turn=("<|im_end|>",), expansion="processor", tiny="tiny-internvl",
        hub_examples=("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-8B-hf"), hub_pattern=r"internvl",
        status="LoRA, QLoRA, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "mistral3", ("mistral3",), ("PixtralProcessor",), vision=("vision_tower",), projector=("multi_modal_projector",),
        language_model="language_model", stage1="the projector (multi_modal_projector, with its patch merger)",
        placeholder="[IMG]", end_of_turn=("</s>",), expansion="processor", image_inputs=("pixel_values", "image_sizes"),
        collate={"pixel_values": "pad_cat"}, tiny="tiny-mistral3",
        hub_examples=("mistralai/Mistral-Small-3.1-24B-Instruct-2503",), hub_pattern=r"mistral-small-3|mistral3",
        status="LoRA, QLoRA, eval, merge and stock reload tested on the tiny model",
    ),
    Family(
        "mllama", ("mllama",), ("MllamaProcessor",), vision=("vision_model",), projector=("multi_modal_projector",),
        language_model="language_model",
        stage1="the projector (multi_modal_projector) only; the cross-attention layers that read the image live in the "
               "language model and train with it in stage 2",
        placeholder="<|image|>", end_of_turn=("<|eot_id|>",), expansion="processor",
        image_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"),
        token_types="cross_attention_mask", token_type_rule="cross_attention",
        collate={"pixel_values": "pad_cat_per_sample", "aspect_ratio_ids": "pad_cat_per_sample",
                 "aspect_ratio_mask": "pad_cat_per_sample"}, tiny="tiny-mllama",
        hub_examples=("meta-llama/Llama-3.2-11B-Vision-Instruct",), hub_pattern=r"llama-3\.2-.*vision|mllama",
        zero3=False,  # no get_image_features for the blank-image hook that keeps ZeRO-3 ranks in step
        status="LoRA, QLoRA, eval, merge and stock reload tested on the tiny model",
    ),
]}

_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
_BY_PROCESSOR = {p: f for f in FAMILIES.values() for p in f.processors}
TINY_MODELS = {f.tiny: f for f in FAMILIES.values() if f.tiny}


def supported_names() -> str:
    return ", ".join(f.name for f in FAMILIES.values() if f.supported)


def family(model_type: str | None) -> Family | None:
    """The family of a config's ``model_type`` (None when unknown)."""
    return _BY_MODEL_TYPE.get(model_type or "")


def family_of_processor(processor: Any) -> Family | None:
    """The family of a processor object by its class (None for a bare tokenizer or an unknown processor)."""
    for cls in type(processor).__mro__:
        if cls.__name__ in _BY_PROCESSOR:
            return _BY_PROCESSOR[cls.__name__]
    return None


def require(model_type: str | None, where: str = "--model") -> Family:
    """The supported family of ``model_type``; a one-line ``UserError`` for a known-but-unsupported or unknown one."""
    fam = family(model_type)
    if fam is None:
        raise UserError(f"{where}: model type {model_type!r} is not a vision-language family llavatune knows; "
                        f"supported: {supported_names()}")
    if not fam.supported:
        raise UserError(f"{where}: {fam.name} is {fam.status}; supported now: {supported_names()}")
    return fam


def check_folder(ref: str, what: str = "--model") -> Family | None:
    """For a local model folder with a config.json: its family, refused with one line when the table marks it as not
    yet supported. None for anything else (a hub id, a folder without config.json, a model type the table does not
    know, such as a plain language model for ``--model compose``: checked when loaded). Reads only the JSON."""
    import json
    from pathlib import Path

    cfg = Path(str(ref)).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    fam = family(model_type)
    return require(model_type, f"{what} {ref}") if fam is not None else None


def tiny_for(ref: str) -> str:
    """The built-in tiny model of the family a hub id or folder name suggests ('tiny' for plain LLaVA and anything
    unrecognised): how ``--smoke`` offline picks a miniature of a recipe's model."""
    text = str(ref).lower()
    for fam in FAMILIES.values():  # plain llava's pattern matches every LLaVA variant: it is the fallback
        if fam.name != "llava" and fam.tiny and fam.hub_pattern and re.search(fam.hub_pattern, text):
            return fam.tiny
    return "tiny"

"""Model shapes for the memory planner, read from a config only (never weights).

``load_spec(model)`` accepts ``tiny`` (the built-in tiny LLaVA), a local model directory (its ``config.json``), a
llavatune run or adapter checkpoint (its ``base_config.json``), a ``config.json`` file, or a hub id: one the shipped
table knows (``plan.hub_configs``: the models the recipes and docs name, each family's common sizes) is answered
offline; for any other, ``transformers.AutoConfig.from_pretrained`` fetches ``config.json`` only, after one quick
request (``llavatune.model.refs``) has made sure the hub can serve it. ``--model compose`` joins the shapes of
``--vision_model`` and ``--language_model`` as ``train --model compose`` does.

Parameter counts are closed-form (``ModelSpec.count``) for LLaVA and LLaVA-NeXT (Llama-style decoders: Llama,
Vicuna, Mistral, Qwen2, ...; CLIP / SigLIP vision towers); for the other families (Qwen-VL, Gemma 3, PaliGemma,
SmolVLM, InternVL, Mistral 3, Llama 3.2 Vision, ...) they are counted on transformers' own modules built on the meta
device (no memory, no weights). ``tests/test_plan.py`` checks both against the real modules and the published sizes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavatune.data.reader import load_json
from llavatune.model.tiny import tiny_config_kwargs
from llavatune.utils import UserError

# The tiny model of ``llavatune.model.tiny.build_tiny`` (its default arguments). The tokenizer is trained on
# the run's own text, so its vocabulary is at most 2000 tokens; the planner uses that upper bound.
_tiny = tiny_config_kwargs()
TINY = {
    "model_type": "llava",
    "text_config": {"model_type": "llama", "vocab_size": 2000, **_tiny["text_config"]},
    "vision_config": {"model_type": "clip_vision_model", **_tiny["vision_config"]},
    "vision_feature_select_strategy": _tiny["vision_feature_select_strategy"],
    "vision_feature_layer": _tiny["vision_feature_layer"],
}


@dataclass
class ModelSpec:
    """The shapes that memory depends on. Names follow transformers' Llama / CLIP configs."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # vision tower (0 layers: a text-only model)
    vision_type: str = ""
    v_hidden: int = 0
    v_intermediate: int = 0
    v_layers: int = 0
    image_size: int = 0
    patch_size: int = 0
    channels: int = 3
    image_tokens: int = 0
    """LLM positions one image takes: (image_size / patch)^2, +1 with the 'full' strategy, x tiles for NeXT."""
    projector_in: int = 0
    projector_bias: bool = True
    image_newline: int = 0
    """LLaVA-NeXT's learned newline embedding (``model.image_newline``: hidden values), grouped with the LLM."""
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] | None = None
    """Parameter counts by group, counted on the real modules (families without a closed form); None: closed form."""
    vision_matmul: int | None = None
    """With ``counts``: the vision tower's linear/conv parameters (see ``vision_matmul_params``)."""

    # ------------------------------------------------------------------ parameter counts
    def llm_linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the linear layers of ONE decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]  # fmt: skip

    def count(self) -> dict[str, int]:
        """Parameters by group: llm_linear (quantized by QLoRA), llm_other (norms, biases), embed, lm_head,
        vision, projector."""
        if self.counts is not None:
            return dict(self.counts)
        lin = sum(a * b for _, a, b in self.llm_linears()) * self.layers
        bias = 0
        if self.attention_bias:
            bias += (self.heads + 2 * self.kv_heads) * self.head_dim + self.hidden
        if self.mlp_bias:
            bias += 2 * self.intermediate + self.hidden
        other = (2 * self.layers + 1) * self.hidden + bias * self.layers
        embed = self.vocab * self.hidden
        lm_head = 0 if self.tied_embeddings else self.vocab * self.hidden
        vh, p = self.v_hidden, self.patch_size
        vision = 0
        if self.v_layers:
            patches = (self.image_size // p) ** 2
            per_layer = self._vision_linear_per_layer() + 4 * vh  # + two layer norms
            if self.vision_type.startswith("siglip"):
                vision = self.channels * p * p * vh + vh + patches * vh + self.v_layers * per_layer + 2 * vh
            else:  # CLIP: class embedding, position embeddings incl. CLS, pre- and post-layernorm
                vision = self.channels * p * p * vh + vh + (patches + 1) * vh + 4 * vh + self.v_layers * per_layer
        projector = 0
        if self.projector_in:
            b = 1 if self.projector_bias else 0
            projector = self.projector_in * self.hidden + b * self.hidden + self.hidden * self.hidden + b * self.hidden
        # image_newline sits on the model beside the LLM; the family table (and so training) groups it with the LLM
        return {"llm_linear": lin, "llm_other": other + self.image_newline, "embed": embed, "lm_head": lm_head,
                "vision": vision, "projector": projector}  # fmt: skip

    def vision_matmul_params(self) -> int:
        """Vision-tower parameters held by linear and conv layers (patch embedding, attention, MLP): the part
        of the frozen tower QLoRA keeps in 16 bit under autocast; the rest (norms, position embeddings) is
        upcast to fp32 by PEFT."""
        if self.vision_matmul is not None:
            return self.vision_matmul
        if not self.v_layers:
            return 0
        return self.channels * self.patch_size**2 * self.v_hidden + self.v_layers * self._vision_linear_per_layer()

    def _vision_linear_per_layer(self) -> int:
        """q, k, v, out projections and the two MLP layers of one vision encoder layer, with biases."""
        vh, vi = self.v_hidden, self.v_intermediate
        return 4 * (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh)

    def total_params(self) -> int:
        return sum(self.count().values())

    def lora_params(self, r: int) -> int:
        """LoRA A (r x in) + B (out x r) on every linear layer of the LLM (llavatune's default targets)."""
        return self.layers * sum(r * (a + b) for _, a, b in self.llm_linears())

    def largest_linear(self) -> int:
        return max(a * b for _, a, b in self.llm_linears())


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


CLOSED_FORM = ("llava", "llava_next")  # model types whose parameters ModelSpec.count computes in closed form
# Module-path parts that name a family's projector and vision tower (checked in this order), for counting on modules
PROJECTOR_PARTS = ("multi_modal_projector", "visual.merger", "visual.deepstack_merger_list", "connector")
VISION_PARTS = ("vision_tower", "visual", "vision_model")


def spec_from_config(cfg: Any, name: str = "model") -> ModelSpec:
    """A ``ModelSpec`` from a transformers config object or its ``to_dict()``."""
    text = _get(cfg, "text_config") or cfg
    vision = _get(cfg, "vision_config")
    spec = _text_spec(text, name)
    mtype = _get(cfg, "model_type") or "llava"
    if vision is not None and mtype not in CLOSED_FORM:
        spec.notes = [n for n in spec.notes if not n.startswith("language model type")]
        _counted_family(spec, cfg, mtype, vision)
    elif vision is not None:
        _llava_vision(spec, cfg, mtype, vision)
    return spec


def _text_spec(text: Any, name: str) -> ModelSpec:
    hidden = _get(text, "hidden_size")
    if hidden is None:
        raise UserError(f"{name}: the config has no hidden_size; not a decoder language model the planner understands")
    heads = _get(text, "num_attention_heads")
    head_dim = _get(text, "head_dim") or hidden // heads
    spec = ModelSpec(
        name=name,
        hidden=hidden,
        intermediate=_get(text, "intermediate_size") or 4 * hidden,
        layers=_get(text, "num_hidden_layers"),
        heads=heads,
        kv_heads=_get(text, "num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab=_get(text, "vocab_size"),
        tied_embeddings=bool(_get(text, "tie_word_embeddings", False)),
        attention_bias=bool(_get(text, "attention_bias", False)) or _get(text, "model_type") == "qwen2",
        mlp_bias=bool(_get(text, "mlp_bias", False)),
    )
    ttype = _get(text, "model_type") or "?"
    if ttype not in ("llama", "mistral", "qwen2", "qwen3", "vicuna"):
        spec.notes.append(f"language model type '{ttype}' is counted as a Llama-style decoder (approximate)")
    return spec


def _llava_vision(spec: ModelSpec, cfg: Any, mtype: str, vision: Any) -> None:
    """The vision tower and projector of a LLaVA / LLaVA-NeXT config, in closed form."""
    vtype = _get(vision, "model_type") or "clip_vision_model"
    spec.vision_type = vtype
    spec.v_hidden = _get(vision, "hidden_size")
    spec.v_intermediate = _get(vision, "intermediate_size")
    spec.v_layers = _get(vision, "num_hidden_layers")
    spec.image_size = _get(vision, "image_size")
    spec.patch_size = _get(vision, "patch_size")
    spec.channels = _get(vision, "num_channels") or 3
    n = (spec.image_size // spec.patch_size) ** 2
    strategy = _get(cfg, "vision_feature_select_strategy", "default")
    if strategy == "full" and not vtype.startswith("siglip"):
        n += 1
    if mtype == "llava_next":
        # anyres: the base image plus up to 4 tiles (a 2x2 grid of image_grid_pinpoints) and newline tokens
        side = spec.image_size // spec.patch_size
        n = 5 * n + 2 * side
        spec.image_newline = spec.hidden
        spec.notes.append("LLaVA-NeXT anyres counted as base image + 2x2 tiles (the largest common grid)")
    spec.image_tokens = n
    layer = _get(cfg, "vision_feature_layer", -2)
    spec.projector_in = spec.v_hidden * (len(layer) if isinstance(layer, (list, tuple)) else 1)
    spec.projector_bias = bool(_get(cfg, "multimodal_projector_bias", True))
    if not (vtype.startswith("clip") or vtype.startswith("siglip")):
        spec.notes.append(f"vision tower type '{vtype}' is counted as a CLIP-style ViT (approximate)")


# The image every family's token count is given for: a COCO photo (OK-VQA, VQAv2), 640 x 480 (height, width)
TYPICAL_IMAGE = (480, 640)


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize (transformers' ``qwen2_vl`` image processing): each side rounded to a multiple of ``factor``
    (patch x merge), the area kept within [min_pixels, max_pixels]."""
    import math

    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _image_tokens(mtype: str, cfg: Any, vision: Any) -> tuple[int, str | None]:
    """LLM positions one image takes in the family, and the assumption behind the number when it depends on the
    image (``plan --image-tokens N`` sets it for your images)."""
    patch = _side(_get(vision, "patch_size") or 14)
    size = _side(_get(vision, "image_size") or 224)
    if mtype in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        merge = int(_get(vision, "spatial_merge_size") or 2)
        h, w = smart_resize(*TYPICAL_IMAGE, patch * merge, 56 * 56, 16384 * 28 * 28)
        n = (h // patch) * (w // patch) // (merge * merge)
        return n, (f"dynamic resolution: counted for a {TYPICAL_IMAGE[1]}x{TYPICAL_IMAGE[0]} photo (resized to {w}x{h}: "
                   f"{n} tokens)")
    if mtype == "gemma3":
        # "\n\n<start_of_image>" + the soft tokens + "<end_of_image>\n\n"
        return int(_get(cfg, "mm_tokens_per_image") or 256) + 4, None
    if mtype in ("idefics3", "smolvlm"):
        # the image resized to 4 crops on its longest side, split into crops of the tower's size, plus a global view;
        # each crop's tokens between <fake_token_around_image> and its <row_i_col_j> tag, a newline per row
        scale = int(_get(cfg, "scale_factor") or 2)
        per_crop = (size // patch) ** 2 // (scale * scale)
        h, w = TYPICAL_IMAGE
        rows, cols = -(-round(4 * size * h / max(h, w)) // size), -(-round(4 * size * w / max(h, w)) // size)
        n = (rows * cols + 1) * (per_crop + 2) + rows
        return n, (f"image splitting: counted for a {w}x{h} photo ({rows}x{cols} crops + a global view, "
                   f"{per_crop} tokens each)")
    if mtype == "internvl":
        n = int((size // patch) ** 2 * float(_get(cfg, "downsample_ratio") or 0.5) ** 2)
        return n, f"dynamic tiling: counted for one {size}x{size} tile ({n} tokens; up to 12 tiles + a thumbnail)"
    if mtype == "mistral3":
        merge = int(_get(cfg, "spatial_merge_size") or 2)
        side = size // (patch * merge)
        return side * side + side, f"counted for the largest image ({size}x{size} px: {side * side + side} tokens)"
    if mtype == "mllama":
        return 1, "cross-attention: an image is one token in the text; its features enter through cross-attention"
    return (size // patch) ** 2, None


def _counted_family(spec: ModelSpec, cfg: Any, mtype: str, vision: Any) -> None:
    """Parameter counts of a family without a closed form, from transformers' own modules on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(**copy.deepcopy(cfg)) if isinstance(cfg, dict) else cfg
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{spec.name}: transformers cannot build a '{mtype}' model from this config ({e})") from None
    from llavatune.model.families import family

    fam = family(mtype)  # the family table says which modules are its projector and vision tower
    counts = dict.fromkeys(("llm_linear", "llm_other", "embed", "lm_head", "vision", "projector"), 0)
    matmul = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    vision_matmul = 0
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            full = f".{mname}."
            kind = fam.parameter_group(f"{mname}.{pname}") if fam is not None else None
            if kind == "projector" or (fam is None and any(f".{part}." in full for part in PROJECTOR_PARTS)):
                group = "projector"
            elif kind == "vision" or (fam is None and any(f".{part}." in full for part in VISION_PARTS)):
                group = "vision"
                vision_matmul += p.numel() if isinstance(module, matmul) else 0
            elif mname.startswith("lm_head"):
                group = "lm_head"
            elif isinstance(module, torch.nn.Embedding):
                group = "embed"
            elif isinstance(module, torch.nn.Linear) and pname == "weight":
                group = "llm_linear"
            else:
                group = "llm_other"
            counts[group] += p.numel()
    spec.counts, spec.vision_matmul = counts, vision_matmul
    spec.tied_embeddings = counts["lm_head"] == 0
    spec.vision_type = _get(vision, "model_type") or mtype
    spec.v_hidden = int(_get(vision, "hidden_size") or _get(vision, "embed_dim") or 0)
    spec.v_layers = int(_get(vision, "num_hidden_layers") or _get(vision, "depth") or 0)
    spec.image_size = _side(_get(vision, "image_size") or 0)
    spec.patch_size = _side(_get(vision, "patch_size") or 0)
    spec.projector_in = spec.v_hidden
    spec.image_tokens, note = _image_tokens(mtype, cfg, vision)
    if note:
        spec.notes.append(f"{note}; --image-tokens N sets it for your images")
    spec.notes.append(f"'{mtype}': parameters counted on transformers' modules; activations with a Llama-style "
                      "decoder layer (approximate)")


def load_config(model: str, vision_model: str | None = None, language_model: str | None = None,
                vision_feature_layer: int = -2, vision_feature_select_strategy: str = "default") -> tuple[Any, str]:
    """The config (dict or transformers config) for ``model`` and a display name. Never reads weights.

    ``compose``: the LLaVA that ``train --model compose`` builds from ``vision_model`` and ``language_model``."""
    if model == "tiny":
        return TINY, "tiny (built-in, vocabulary <= 2000)"
    if model == "compose":
        if not (vision_model and language_model):
            raise UserError("--model compose needs --vision_model and --language_model (as train's)")
        vision = _as_dict(load_config(vision_model)[0], "--vision_model", vision_model)
        text = _as_dict(load_config(language_model)[0], "--language_model", language_model)
        composed = {"model_type": "llava", "vision_config": vision.get("vision_config") or vision,
                    "text_config": text.get("text_config") or text, "vision_feature_layer": vision_feature_layer,
                    "vision_feature_select_strategy": vision_feature_select_strategy}
        return _auto_config(composed), f"compose ({vision_model} + {language_model})"
    from llavatune.model.refs import looks_local, resolve_model
    from llavatune.plan.hub_configs import hub_config

    shipped = None if looks_local(model) else hub_config(model)
    if shipped is not None:  # the shapes are shipped: no download, no request
        return _auto_config(shipped), model
    ref = resolve_model(model, "--model", files_ok=True)
    p = Path(ref)
    if looks_local(model) and p.is_file():
        if p.suffix != ".json":
            raise UserError(f"--model {model}: a file, but not a config.json; pass a model folder or its config.json")
        raw = load_json(p)
        # a hand-written or pruned LLaVA config.json may omit keys: complete those with transformers' defaults
        return (_auto_config(raw) if raw.get("model_type") in ("llava", "llava_next") else raw), str(p)
    if p.is_dir():
        for fname in ("config.json", "base_config.json"):
            if (p / fname).is_file():
                return _auto_config(load_json(p / fname)), str(p)
        raise UserError(f"--model: {p} holds no config.json (or base_config.json of a llavatune checkpoint)")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model), model
    except Exception as e:  # offline, gated, typo
        raise UserError(f"--model: could not read the config of {model!r} from the hub ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); pass a local directory or config.json") from None


def _as_dict(cfg: Any, flag: str, ref: str) -> dict:
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if "hidden_size" not in data and not data.get("vision_config") and not data.get("text_config"):
        raise UserError(f"{flag} {ref}: its config has no model shapes the planner understands")
    return data


def _auto_config(raw: dict) -> Any:
    """Complete a config.json's dict with transformers' defaults (llava-hf configs omit default values)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(**raw)
    except Exception:
        return raw


def load_spec(model: str, **compose: Any) -> ModelSpec:
    """The shapes of ``model`` (see :func:`load_config`; ``compose``: its keyword arguments for ``--model compose``)."""
    return spec_from_config(*load_config(model, **compose))

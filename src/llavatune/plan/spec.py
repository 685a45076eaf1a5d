"""Model shapes for the memory planner, read from a config only (never weights).

``load_spec(model)`` accepts ``tiny`` (the built-in tiny LLaVA), a local llava-hf directory (its
``config.json``), a llavatune run or adapter checkpoint (its ``base_config.json``), a ``config.json`` file, or
a hub id (``transformers.AutoConfig.from_pretrained`` fetches ``config.json`` only). Parameter counts are
closed-form (``ModelSpec.count``) for Llama-style decoders (Llama, Vicuna, Mistral, Qwen2, ...) and CLIP /
SigLIP vision towers; ``tests/test_plan.py`` checks them against the real modules built on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    qkv_bias_only: bool = False
    """Attention biases on q, k, v but not o (Qwen2)."""
    norms_per_layer: int = 2
    """Hidden-size norms per decoder layer (Gemma 2/3: 4)."""
    qk_norm: bool = False
    """Per-head q/k norms (Qwen3, Gemma 3)."""
    family: str = "llava"
    vision_params: int | None = None
    """The vision tower's parameters when it is not a CLIP/SigLIP ViT (Qwen-VL), counted in closed form elsewhere."""
    vision_linear: int | None = None
    """Of ``vision_params``, those held by linear/conv layers."""
    projector_params: int | None = None
    """The projector's parameters when it is not LLaVA's two-layer MLP (Qwen-VL mergers, Gemma 3, PaliGemma)."""
    extra_other: int = 0
    """Other parameters of the model outside the vision tower and projector (LLaVA-NeXT's image_newline)."""
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ parameter counts
    def llm_linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the linear layers of ONE decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]  # fmt: skip

    def count(self) -> dict[str, int]:
        """Parameters by group: llm_linear (quantized by QLoRA), llm_other (norms, biases), embed, lm_head,
        vision, projector."""
        lin = sum(a * b for _, a, b in self.llm_linears()) * self.layers
        bias = 0
        if self.attention_bias:
            bias += (self.heads + 2 * self.kv_heads) * self.head_dim + (0 if self.qkv_bias_only else self.hidden)
        if self.mlp_bias:
            bias += 2 * self.intermediate + self.hidden
        norms = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        other = norms * self.layers + self.hidden + bias * self.layers + self.extra_other
        embed = self.vocab * self.hidden
        lm_head = 0 if self.tied_embeddings else self.vocab * self.hidden
        vh, p = self.v_hidden, self.patch_size
        vision = 0
        if self.v_layers:
            patches = (self.image_size // p) ** 2
            per_layer = self._vision_linear_per_layer() + 4 * vh  # + two layer norms
            if self.vision_type.startswith(SIGLIP_LIKE):
                vision = self.channels * p * p * vh + vh + patches * vh + self.v_layers * per_layer + 2 * vh
            else:  # CLIP: class embedding, position embeddings incl. CLS, pre- and post-layernorm
                vision = self.channels * p * p * vh + vh + (patches + 1) * vh + 4 * vh + self.v_layers * per_layer
        if self.vision_params is not None:
            vision = self.vision_params
        projector = 0
        if self.projector_params is not None:
            projector = self.projector_params
        elif self.projector_in:
            b = 1 if self.projector_bias else 0
            projector = self.projector_in * self.hidden + b * self.hidden + self.hidden * self.hidden + b * self.hidden
        return {"llm_linear": lin, "llm_other": other, "embed": embed, "lm_head": lm_head,
                "vision": vision, "projector": projector}  # fmt: skip

    def vision_matmul_params(self) -> int:
        """Vision-tower parameters held by linear and conv layers (patch embedding, attention, MLP): the part
        of the frozen tower QLoRA keeps in 16 bit under autocast; the rest (norms, position embeddings) is
        upcast to fp32 by PEFT."""
        if self.vision_linear is not None:
            return self.vision_linear
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


def spec_from_config(cfg: Any, name: str = "model") -> ModelSpec:
    """A ``ModelSpec`` from a transformers config object or its ``to_dict()``."""
    text = _get(cfg, "text_config") or cfg
    vision = _get(cfg, "vision_config")
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
        attention_bias=bool(_get(text, "attention_bias", False)) or _get(text, "model_type") in QKV_BIAS,
        mlp_bias=bool(_get(text, "mlp_bias", False)),
    )
    ttype = _get(text, "model_type") or "?"
    spec.qkv_bias_only = ttype in QKV_BIAS
    spec.norms_per_layer = 4 if ttype in ("gemma2", "gemma3_text") else 2
    spec.qk_norm = ttype in ("qwen3", "qwen3_vl_text", "gemma3_text")
    if ttype in ("gemma", "gemma2", "gemma3_text") and _get(text, "tie_word_embeddings") is None:
        spec.tied_embeddings = True  # Gemma ties its head to the embeddings by default
    if ttype not in LLAMA_STYLE:
        spec.notes.append(f"language model type '{ttype}' is counted as a Llama-style decoder (approximate)")
    if vision is not None and (_get(cfg, "model_type") or "llava") not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
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
        if strategy == "full" and not vtype.startswith(SIGLIP_LIKE):
            n += 1
        mtype = _get(cfg, "model_type") or "llava"
        if mtype == "llava_next":
            # anyres: the base image plus up to 4 tiles (a 2x2 grid of image_grid_pinpoints) and newline tokens
            side = spec.image_size // spec.patch_size
            n = 5 * n + 2 * side
            spec.notes.append("LLaVA-NeXT anyres counted as base image + 2x2 tiles (the largest common grid)")
        spec.image_tokens = n
        layer = _get(cfg, "vision_feature_layer", -2)
        spec.projector_in = spec.v_hidden * (len(layer) if isinstance(layer, (list, tuple)) else 1)
        spec.projector_bias = bool(_get(cfg, "multimodal_projector_bias", True))
        if not vtype.startswith(("clip",) + SIGLIP_LIKE):
            spec.notes.append(f"vision tower type '{vtype}' is counted as a CLIP-style ViT (approximate)")
    _family_shapes(spec, cfg)
    return spec


# Language models counted exactly by the Llama-style formula (with the flags set above)
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "vicuna", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text",
               "gemma", "gemma2", "gemma3_text")
QKV_BIAS = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")
# Vision towers counted by the SigLIP formula (no CLS token, no pre-layernorm)
SIGLIP_LIKE = ("siglip", "idefics3_vision", "smolvlm_vision")
# The image every family's token count is given for: a COCO photo (OK-VQA, VQAv2), 640 x 480
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


def _qwen_vision(spec: ModelSpec, cfg: Any, vision: Any, mtype: str) -> None:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the ViT, its 2 x 2 patch merger(s), and the tokens of a typical image."""
    E = _get(vision, "embed_dim") if mtype == "qwen2_vl" else _get(vision, "hidden_size")
    depth, p = _get(vision, "depth"), _get(vision, "patch_size")
    m, t = _get(vision, "spatial_merge_size") or 2, _get(vision, "temporal_patch_size") or 2
    out = spec.hidden if mtype == "qwen2_vl" else _get(vision, "out_hidden_size") or spec.hidden
    inter = (_get(vision, "mlp_ratio") or 4) * E if mtype == "qwen2_vl" else _get(vision, "intermediate_size")
    attn = 3 * E * E + 3 * E + E * E + E  # qkv and proj, with biases
    if mtype == "qwen2_5_vl":  # SwiGLU MLP with biases, RMSNorms
        mlp, norms, embed = 3 * E * inter + 2 * inter + E, 2 * E, 3 * t * p * p * E
        merger_norm = E
    else:  # GELU MLP (fc1, fc2) with biases, LayerNorms
        mlp, norms = 2 * E * inter + inter + E, 4 * E
        embed = 3 * t * p * p * E + (E if mtype == "qwen3_vl" else 0)
        merger_norm = 2 * E
    Em = E * m * m
    merger = merger_norm + Em * Em + Em + Em * out + out
    linear = embed + depth * (attn + mlp)
    vision_total = embed + depth * (attn + mlp + norms)
    if mtype == "qwen3_vl":
        vision_total += _get(vision, "num_position_embeddings") * E
        deep = len(_get(vision, "deepstack_visual_indexes") or ())
        merger += deep * (2 * Em + Em * Em + Em + Em * out + out)  # DeepStack mergers norm after the 2x2 shuffle
    spec.vision_type, spec.v_hidden, spec.v_intermediate, spec.v_layers = mtype + "_vision", E, inter, depth
    spec.patch_size, spec.image_size = p, 0
    spec.vision_params, spec.vision_linear, spec.projector_params = vision_total, linear, merger
    spec.projector_in = Em
    h, w = smart_resize(*TYPICAL_IMAGE, p * m, 56 * 56, 16384 * 28 * 28)
    spec.image_tokens = (h // p) * (w // p) // (m * m)
    spec.notes.append(f"{spec.image_tokens} image tokens for a {TYPICAL_IMAGE[1]} x {TYPICAL_IMAGE[0]} image "
                      f"(resized to {w} x {h}; Qwen-VL's count follows each image's size)")


def _family_shapes(spec: ModelSpec, cfg: Any) -> None:
    """Vision tower, projector and image tokens of the families that are not LLaVA's CLIP + MLP."""
    mtype = _get(cfg, "model_type") or "llava"
    spec.family = mtype
    vision = _get(cfg, "vision_config")
    if vision is None:
        return
    if mtype in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        _qwen_vision(spec, cfg, vision, mtype)
        spec.notes = [n for n in spec.notes if "CLIP-style" not in n]
    elif mtype == "gemma3":
        # SigLIP, then average pooling to mm_tokens_per_image, a norm and one projection matrix (no bias)
        spec.projector_params = spec.v_hidden * spec.hidden + spec.v_hidden
        n = _get(cfg, "mm_tokens_per_image") or 256
        spec.image_tokens = n + 4  # "\n\n" <start_of_image> ... <end_of_image> "\n\n"
    elif mtype == "paligemma":
        spec.projector_params = spec.v_hidden * spec.hidden + spec.hidden
    elif mtype in ("idefics3", "smolvlm"):
        # the connector: pixel shuffle (scale_factor^2 patches per token) and one linear layer without bias
        scale = _get(cfg, "scale_factor") or 2
        spec.projector_params = spec.v_hidden * scale * scale * spec.hidden
        spec.projector_in = spec.v_hidden * scale * scale
        # the image resized to 4 crops' width on its longest side, split into crops of the tower's size, + a global view
        per_crop = (spec.image_size // spec.patch_size) ** 2 // (scale * scale)
        side = 4 * spec.image_size
        h, w = TYPICAL_IMAGE
        rows, cols = (-(-round(side * h / max(h, w)) // spec.image_size), -(-round(side * w / max(h, w)) // spec.image_size))
        spec.image_tokens = (rows * cols + 1) * (per_crop + 2) + rows
        spec.notes.append(f"{spec.image_tokens} image tokens for a {w} x {h} image ({rows} x {cols} crops + a global "
                          "view; the processor's split follows each image's size and its longest_edge setting)")
    elif mtype == "llava_next":
        spec.extra_other = spec.hidden  # image_newline
    elif mtype == "llava_onevision":
        spec.extra_other = spec.hidden  # image_newline
        side = spec.image_size // spec.patch_size
        spec.image_tokens = 5 * side * side + 2 * side
        spec.notes.append("LLaVA-OneVision anyres counted as base image + 2x2 tiles")


def load_config(model: str) -> tuple[Any, str]:
    """The config (dict or transformers config) for ``model`` and a display name. Never reads weights."""
    if model == "tiny":
        return TINY, "tiny (built-in, vocabulary <= 2000)"
    from llavatune.model.refs import hub_available, looks_local, resolve_model
    from llavatune.plan.hub_configs import hub_config

    pinned = None if looks_local(model) else hub_config(model)
    if pinned is not None and not hub_available(model):
        # no network (or HF_HUB_OFFLINE=1) and not cached: the published shapes llavatune pins for this id
        return _auto_config(pinned), f"{model} (config.json values pinned in llavatune: the hub is not reachable)"
    ref = resolve_model(model, "--model", files_ok=True)
    p = Path(ref)
    if looks_local(model) and p.is_file():
        if p.suffix != ".json":
            raise UserError(f"--model {model}: a file, but not a config.json; pass a model folder or its config.json")
        raw = json.loads(p.read_text(encoding="utf-8"))
        # a hand-written or pruned LLaVA config.json may omit keys: complete those with transformers' defaults
        return (_auto_config(raw) if raw.get("model_type") in ("llava", "llava_next") else raw), str(p)
    if p.is_dir():
        for fname in ("config.json", "base_config.json"):
            if (p / fname).is_file():
                return _auto_config(json.loads((p / fname).read_text(encoding="utf-8"))), str(p)
        raise UserError(f"--model: {p} holds no config.json (or base_config.json of a llavatune checkpoint)")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model), model
    except Exception as e:  # offline, gated, typo
        raise UserError(f"--model: could not read the config of {model!r} from the hub ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); pass a local directory or config.json") from None


def _auto_config(raw: dict) -> Any:
    """Complete a config.json's dict with transformers' defaults (llava-hf configs omit default values)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(**raw)
    except Exception:
        return raw


def load_spec(model: str) -> ModelSpec:
    return spec_from_config(*load_config(model))

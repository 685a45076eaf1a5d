"""Build, load and wrap vision-language models for training and inference.

Where each family keeps its vision tower, projector and language model comes from the family table
(``llavatune.model.families``); nothing here tests a model type.

- ``base_source``: turn ``--model`` (tiny / compose / hub id / local dir) into a model directory or id.
- ``load_base``: ``AutoModelForImageTextToText`` (LLaVA, LLaVA-NeXT, Qwen2.5-VL, Gemma 3, ...) + ``AutoProcessor``,
  optionally quantized with bitsandbytes (vision tower, projector and lm_head are never quantized). A family the
  table marks as not yet supported, or an unknown model type, is refused with one line.
- ``apply_method``: freeze/unfreeze per stage and wrap with PEFT LoRA; the projector trains fully via
  ``modules_to_save`` so it is saved *inside* the adapter (no separate ``non_lora_trainables.bin`` to lose:
  LLaVA #740, #733, #1597).
- ``load_checkpoint``: any llavatune checkpoint (adapter, intermediate, merged) or llava-hf model for
  eval/predict/merge.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from llavatune.data.reader import load_json
from llavatune.files import META_FILE
from llavatune.model.bnb import is_4bit_param, is_quantized_layer
from llavatune.model.families import FAMILIES, Family, check_folder, require
from llavatune.model.refs import _first_line, is_hub_id, looks_local, resolve_model
from llavatune.quiet import peft_wrapping
from llavatune.utils import UserError

logger = logging.getLogger("llavatune")
PROJECTOR = "multi_modal_projector"  # LLaVA's names (benchmarks and older code); families.py has every family's
VISION = "vision_tower"


def resolve_dtype(name: str, use_cpu: bool = False) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and not use_cpu and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_model_ref(ref: str, what: str = "--model") -> str:
    """``ref`` resolved by :func:`llavatune.model.refs.resolve_model`: an existing local folder, or a hub id the hub
    (or the local cache) can serve; anything else is a one-line ``UserError`` before transformers is called."""
    return resolve_model(ref, what)


def compose_llava(
    vision_model: str,
    language_model: str,
    out_dir: str | os.PathLike,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    trust_remote_code: bool = False,
    smoke: bool = False,
) -> None:
    """Compose a new llava-hf model from a vision encoder and a causal LM, with a fresh projector.

    Adds ``<image>`` (and a pad token if missing) to the tokenizer, resizes the embeddings, builds the
    matching ``LlavaProcessor`` and saves everything to ``out_dir`` — stage 1's starting point.
    ``smoke``: the same composition with both configs shrunk to a tiny random model (``train --smoke``): the
    real tokenizer, image processor and families, no weights read.
    """
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from llavatune.data.records import IMAGE_TOKEN
    from llavatune.data.templates import VICUNA_JINJA

    vision_model = check_model_ref(vision_model, "--vision_model")
    language_model = check_model_ref(language_model, "--language_model")
    tok = AutoTokenizer.from_pretrained(language_model, trust_remote_code=trust_remote_code)
    added = tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    vcfg = AutoConfig.from_pretrained(vision_model, trust_remote_code=trust_remote_code)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    if smoke:
        from llavatune.model.tiny import SMOKE_WIDTHS, shrink_config

        lcfg = AutoConfig.from_pretrained(language_model, trust_remote_code=trust_remote_code)
        shrink_config(vcfg, SMOKE_WIDTHS["vision"])
        shrink_config(lcfg, SMOKE_WIDTHS["text"])
        lm = AutoModelForCausalLM.from_config(lcfg, trust_remote_code=trust_remote_code)
    else:
        lm = AutoModelForCausalLM.from_pretrained(language_model, trust_remote_code=trust_remote_code)
    if added:
        lm.resize_token_embeddings(len(tok))
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=lm.config,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="linear" if projector == "linear" else "gelu",
    )
    model = LlavaForConditionalGeneration(cfg)
    if not smoke:
        # CLIPVisionModel / SiglipVisionModel.from_pretrained also reads the vision half of a full CLIP/SigLIP.
        vision = type(model.model.vision_tower).from_pretrained(vision_model, trust_remote_code=trust_remote_code)
        model.model.vision_tower.load_state_dict(vision.state_dict())
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    ip = AutoImageProcessor.from_pretrained(vision_model)
    patch = vcfg.patch_size
    extra = 1 if "clip" in vcfg.model_type else 0
    processor = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=extra,
        chat_template=tok.chat_template or VICUNA_JINJA,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def projector_state(path: str | os.PathLike, fam: Family | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Projector weights from a stage-1 output dir or safetensors file: ``{projector path: {key: tensor}}``, keys
    relative to each of the family's projector modules (``fam``: LLaVA's ``multi_modal_projector`` by default)."""
    from safetensors.torch import load_file

    fam = fam or FAMILIES["llava"]
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if not files:
        raise UserError(f"--pretrained_projector: no .safetensors weights found at {p}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            for proj in fam.projector:
                m = re.search(rf"(?:^|\.){re.escape(proj)}\.(?:modules_to_save\.default\.)?(.+)$", k)
                if m:
                    out.setdefault(proj, {})[m.group(1)] = v
                    break
    if not out:
        raise UserError(f"--pretrained_projector: {p} holds no {', '.join(fam.projector)} weights")
    return out


def load_projector(model, path: str | os.PathLike) -> None:
    """Load a stage-1 output's projector weights into ``model`` (``--pretrained_projector``)."""
    fam = model_family(model)
    state = projector_state(path, fam)
    for proj, module in zip(fam.projector, fam.modules(model, "projector")):
        if proj not in state:
            raise UserError(f"--pretrained_projector: {path} holds no {proj} weights")
        module.load_state_dict(state[proj])


def model_family(model) -> Family:
    """The (supported) family of a loaded model."""
    config = getattr(model, "module", model).config
    return require(getattr(config, "model_type", None))


def load_base(
    ref: str,
    dtype: torch.dtype,
    quantization: dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: Any = None,
    what: str = "--model",
):
    """Load a llava-hf model and its processor from a hub id or local dir (``what``: the flag it came from)."""
    from transformers import AutoProcessor

    ref = check_model_ref(ref, what)
    model = load_model(ref, dtype, quantization, trust_remote_code, attn_implementation, device_map, what)
    processor = AutoProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
    return model, processor


def load_model(
    ref: str,
    dtype: torch.dtype,
    quantization: dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: Any = None,
    what: str = "--model",
):
    """The model half of ``load_base`` (also for a bare weights directory, which has no processor)."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    ref = check_model_ref(ref, what)
    check_family(ref, what, trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
        kwargs["device_map"] = device_map if device_map is not None else _kbit_device_map()
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForImageTextToText.from_pretrained(ref, **kwargs)


def check_family(ref: str, what: str = "--model", trust_remote_code: bool = False) -> Family:
    """Refuse, with one line, a model whose family llavatune does not train (yet) before its weights are read."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{what} {ref}: cannot read its config.json ({_first_line(e)})") from None
    return require(getattr(cfg, "model_type", None), f"{what} {ref}")


def _kbit_device_map():
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def quantization_kwargs(bits: int, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                        fam: Family | None = None) -> dict:
    """bitsandbytes settings that quantize the language model only: the family's vision tower and projector (and
    lm_head) are never quantized, as in LLaVA's QLoRA recipe (``fam``: LLaVA's module names by default)."""
    fam = fam or FAMILIES["llava"]
    # transformers matches these from the start of the module path (up to a module boundary) or as a suffix, so the
    # ".*" makes them match "model.multi_modal_projector.linear_2" and "model.visual.blocks.0.attn.qkv" too.
    skip = [f".*{re.escape(p)}" for p in dict.fromkeys(fam.vision + fam.projector)] + ["lm_head"]
    if bits == 8:
        return {"load_in_8bit": True, "llm_int8_skip_modules": skip}
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "llm_int8_skip_modules": skip,
    }


def linear_module_names(model: torch.nn.Module, under: str) -> list[str]:
    """Leaf names of the linear layers (plain or bitsandbytes) inside submodules whose path contains ``under``."""
    names = set()
    for name, mod in model.named_modules():
        if f".{under}." in f".{name}." and _is_linear(mod):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def projector_paths(model, fam: Family) -> list[str]:
    """The projector's module paths for PEFT's ``modules_to_save``: a ``ModuleList`` (Qwen3-VL's DeepStack mergers)
    is listed by its members, since a wrapped list cannot be indexed."""
    out = []
    for path, module in zip(fam.projector, fam.modules(model, "projector")):
        if isinstance(module, torch.nn.ModuleList):
            out += [f"{path}.{i}" for i in range(len(module))]
        else:
            out.append(path)
    return out


def vision_linear_names(model, fam: Family) -> list[str]:
    """Full names of the linear layers inside the family's vision tower."""
    prefixes = tuple(f".{v}." for v in fam.vision)
    return sorted(n for n, m in model.named_modules() if any(p in f".{n}." for p in prefixes) and _is_linear(m))


def _is_linear(mod) -> bool:
    return isinstance(mod, torch.nn.Linear) or is_quantized_layer(mod)


def apply_method(model, stage: str, method: str, margs: Any, gradient_checkpointing: bool = False,
                 autocast: bool | str | None = None):
    """Freeze/unfreeze for the stage and method; wrap with LoRA when asked. Returns the model to train.

    ``autocast``: the autocast dtype training runs under (``"bf16"`` for ``--bf16``, ``"fp16"`` for ``--fp16``;
    ``True`` means bf16); QLoRA then keeps frozen, unquantized weights in their loaded 16-bit dtype (see
    ``_keep_frozen_weights_16bit``)."""
    fam = model_family(model)
    model.requires_grad_(False)
    projectors = fam.modules(model, "projector")
    if stage == "pretrain":  # stage 1: the projector (connector, merger) only; what that is comes from the table
        for m in projectors:
            m.requires_grad_(True)
        return model
    if method == "full":
        for m in fam.modules(model, "language_model") + projectors:
            m.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        if margs.train_vision == "full":
            for m in fam.modules(model, "vision"):
                m.requires_grad_(True)
        elif margs.train_vision == "lora":
            raise UserError("--train_vision lora needs --method lora or qlora")
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    loaded_dtypes = {}
    if method == "qlora":
        loaded_dtypes = {id(p): p.dtype for p in model.parameters()}
        with peft_wrapping():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    if margs.lora_target_modules:
        names = [n.strip() for n in margs.lora_target_modules.split(",") if n.strip()]
    else:
        names = linear_module_names(model, fam.language_model)
    target = rf".*{re.escape(fam.language_model)}.*\.({'|'.join(map(re.escape, names))})$"
    saved = projector_paths(model, fam)
    if margs.train_vision == "lora":
        # every linear layer of the vision tower outside the projector (Qwen-VL's merger sits inside ``visual``)
        vnames = [n for n in vision_linear_names(model, fam) if not any(f".{p}." in f".{n}." for p in saved)]
        target = rf"({target})|({'|'.join(map(re.escape, vnames))})"
    modules_to_save = list(saved)
    if margs.train_vision == "full":
        vision = list(fam.vision)
        modules_to_save = vision + [p for p in saved if not any(p.startswith(v + ".") for v in vision)]
    if getattr(margs, "lora_modules_to_save", None):
        modules_to_save += [m.strip() for m in margs.lora_modules_to_save.split(",") if m.strip()]
    lcfg = LoraConfig(
        r=margs.lora_r,
        lora_alpha=margs.lora_alpha,
        lora_dropout=margs.lora_dropout,
        target_modules=target,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    with peft_wrapping():
        model = get_peft_model(model, lcfg)
    if method == "qlora" and autocast:
        _keep_frozen_weights_16bit(model, loaded_dtypes, everything=autocast in (True, "bf16"))
    return model


def _keep_frozen_weights_16bit(model: torch.nn.Module, loaded_dtypes: dict[int, torch.dtype],
                               everything: bool = True) -> None:
    """Undo PEFT's fp32 upcast of the frozen, unquantized weights that autocast does not need in fp32.

    ``prepare_model_for_kbit_training`` upcasts every unquantized parameter to fp32 (for fp16 training's sake).
    Frozen weights go back to the 16-bit dtype they were loaded in:

    - ``nn.Linear``/``nn.Conv2d`` weights (vision tower, lm_head, the projector's frozen original), always under
      autocast: the layer casts an fp32 weight to 16 bit before the matmul, and the weight holds the 16-bit
      value it was loaded with, so the numbers are exactly the same (for LLaVA-1.5-7B ~0.8 GiB less).
    - with ``everything`` (bf16 autocast): also embeddings and norms. Their outputs set the residual stream's
      dtype -- fp32 embeddings start an fp32 stream, and fp32 norm weights give fp32 inputs to the 4-bit
      layers, whose outputs keep their input's dtype -- so with them in fp32 every hidden state, and every
      tensor kept for backward along it, is twice the bf16 LoRA run's. Back in bf16, the frozen part of the
      model computes as in the bf16 LoRA run, the 4-bit LLM linears being the only difference; compared with
      PEFT's fp32 stream the numbers move by bf16 rounding (a test bounds it). (LLaVA's and the QLoRA paper's
      code keep the norms fp32 and so an fp32 stream.) Not for fp16, whose range is why PEFT upcasts.

    Trainable weights (LoRA, the projector copy) stay fp32. Without ``everything``, a frozen weight shared with
    a module outside the rule (a lm_head tied to the embeddings) stays fp32. Without autocast nothing changes:
    an fp32 input would meet a 16-bit weight.
    """
    matmul = (torch.nn.Linear, torch.nn.Conv2d)

    def castable(m: torch.nn.Module) -> bool:  # exact types: bitsandbytes' Linear4bit subclasses nn.Linear
        return everything or type(m) in matmul

    elsewhere = {id(p) for m in model.modules() if not castable(m) for p in m.parameters(recurse=False)}
    for m in model.modules():
        if not castable(m):
            continue
        for p in m.parameters(recurse=False):
            was = loaded_dtypes.get(id(p))
            if (not p.requires_grad and p.dtype == torch.float32 and was in (torch.bfloat16, torch.float16)
                    and id(p) not in elsewhere):
                p.data = p.data.to(was)


def parameter_summary(model: torch.nn.Module) -> str:
    """Parameters per group (LoRA, projector, vision tower, LLM), labelled with the family's module names."""
    fam = model_family(model)
    labels = {"lora": "lora", "projector": fam.projector[0], "vision": fam.vision[0], "llm": "llm"}
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        # ZeRO-3 leaves each rank an empty placeholder; ds_numel is the full parameter's size
        n = getattr(p, "ds_numel", p.numel()) * (2 if is_4bit_param(p) else 1)
        g = groups.setdefault(labels[fam.parameter_group(name)], [0, 0])
        g[0] += n
        if p.requires_grad:
            g[1] += n
    total = sum(g[0] for g in groups.values())
    train = sum(g[1] for g in groups.values())
    lines = [f"trainable parameters: {train:,} of {total:,} ({100 * train / max(total, 1):.2f} %)"]
    for k, (n, t) in groups.items():
        lines.append(f"  {k:<22} {n:>14,} params, {t:>14,} trainable")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def write_meta(ckpt_dir: str | os.PathLike, meta: dict) -> None:
    from llavatune.utils import atomic_write_json

    meta = dict(meta)
    base = meta.get("base_model")
    if base and os.path.isabs(base):
        meta["base_model_relative"] = os.path.relpath(base, ckpt_dir)
    atomic_write_json(Path(ckpt_dir) / META_FILE, meta)


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    p = Path(ckpt_dir) / META_FILE
    return load_json(p) if p.is_file() else {}


def adapter_base(ckpt: str | os.PathLike, base_model: str | None = None) -> str:
    """The base model an adapter checkpoint loads onto: ``base_model`` (``--base_model``) when given, else the one
    it recorded (``llavatune_checkpoint.json``, then PEFT's ``adapter_config.json``); a one-line ``UserError`` when
    none of them can be found."""
    if base_model:
        return base_model
    ckpt = Path(ckpt)
    try:
        adapter_cfg = json.loads((ckpt / "adapter_config.json").read_text())
    except (OSError, ValueError):
        adapter_cfg = {}
    return _resolve_base(ckpt, read_meta(ckpt), adapter_cfg)


def _resolve_base(ckpt: Path, meta: dict, adapter_cfg: dict) -> str:
    candidates = []
    if meta.get("base_model_relative"):
        candidates.append(str((ckpt / meta["base_model_relative"]).resolve()))
    if meta.get("base_model"):
        candidates.append(meta["base_model"])
    if adapter_cfg.get("base_model_name_or_path"):
        candidates.append(adapter_cfg["base_model_name_or_path"])
    for c in candidates:
        if os.path.isdir(c) or is_hub_id(c):
            return c
    raise UserError(
        f"{ckpt}: the adapter's base model cannot be found (looked for {', '.join(candidates) or 'nothing recorded'}); "
        "pass --base_model PATH_OR_HUB_ID"
    )


def load_checkpoint(
    path: str | os.PathLike,
    dtype: str = "auto",
    base_model: str | None = None,
    merge: bool = False,
    quantized: bool | None = None,
    trust_remote_code: bool = False,
    device_map: Any = None,
):
    """Load any checkpoint kind for inference. Returns ``(model, processor, info)``; ``device_map``: where the weights
    are loaded (default: the CPU; a QLoRA base goes where bitsandbytes puts it).

    ``info`` = {"kind": "adapter" | "full", "base_model": ..., "method": ...}.
    """
    from transformers import AutoProcessor

    ref = resolve_model(str(path), "--model")
    if not looks_local(str(path)):
        model, processor = load_base(ref, resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                                     device_map=device_map)
        return model.eval(), processor, {"kind": "full", "base_model": ref}
    p = Path(ref)
    if not p.is_dir():
        raise UserError(f"--model {path}: is a file, not a model folder")
    check_folder(p, "--model")  # a family llavatune does not train (yet): that line, not a list of missing files
    meta = read_meta(p)
    adapter_cfg_path = p / "adapter_config.json"
    if adapter_cfg_path.is_file():
        from peft import PeftModel

        adapter_cfg = load_json(adapter_cfg_path)
        base = base_model or _resolve_base(p, meta, adapter_cfg)
        base_what = "--base_model" if base_model else f"{p}: its base model (--base_model overrides it)"
        want_q = meta.get("method") == "qlora" if quantized is None else quantized
        quant = None
        torch_dtype = resolve_dtype(dtype)
        if want_q and not merge:
            q = meta.get("quantization") or {}
            fam = check_family(check_model_ref(base, base_what), base_what, trust_remote_code)
            quant = quantization_kwargs(q.get("bits", 4), q.get("quant_type", "nf4"), q.get("double_quant", True),
                                        torch_dtype, fam)
        model, processor = load_base(base, torch_dtype, quantization=quant, trust_remote_code=trust_remote_code,
                                     what=base_what, device_map=device_map)
        if (p / "tokenizer_config.json").is_file() or (p / "processor_config.json").is_file():
            processor = AutoProcessor.from_pretrained(p, trust_remote_code=trust_remote_code)
        if not any(p.glob("adapter_model.*")):
            raise UserError(f"{p}: adapter_config.json found but no adapter_model.safetensors; the checkpoint is incomplete")
        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(p))
        if merge:
            model = model.merge_and_unload()
        return model.eval(), processor, {"kind": "adapter", "base_model": base, **meta}
    if not (p / "config.json").is_file():
        raise UserError(f"{p}: no config.json or adapter_config.json; not a model or checkpoint directory (pass a "
                        "training output or checkpoint-N folder, a merged model, or a llava-hf model)")
    missing = [] if any(p.glob("*.safetensors")) else ["model weights (*.safetensors)"]
    if not ((p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()):
        missing.append("tokenizer files")
    if not ((p / "processor_config.json").is_file() or (p / "preprocessor_config.json").is_file()):
        missing.append("image processor files (processor_config.json or preprocessor_config.json)")
    if missing:
        raise UserError(f"{p}: missing {', '.join(missing)}; copy them from the model it was trained from, or "
                        "re-export it with 'llavatune merge'")
    model, processor = load_base(str(p), resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                                 device_map=device_map)
    return model.eval(), processor, {"kind": "full", "base_model": str(p), **meta}

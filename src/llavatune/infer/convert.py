"""``llavatune convert --from-original PATH --out DIR`` — original LLaVA checkpoints to llava-hf format.

    llavatune convert --from-original liuhaotian/llava-v1.5-7b --out llava-v1.5-7b-hf
    llavatune convert --from-original checkpoints/llava-v1.5-13b-task-lora \\
        --base_model lmsys/vicuna-13b-v1.5 --out llava-13b-task-hf

Reads what haotian-liu/LLaVA writes:

- a full model (``LlavaLlamaForCausalLM``): ``model.embed_tokens``, ``model.layers.*``, ``model.norm``,
  ``lm_head``, ``model.mm_projector.{0,2}.*`` (``mlp2x_gelu``) or ``model.mm_projector.*`` (``linear``), and
  optionally ``model.vision_tower.vision_tower.vision_model.*``; ``mm_*`` fields in ``config.json``;
- its LoRA output: ``adapter_config.json`` + ``adapter_model.{safetensors,bin}`` (LoRA on the language model)
  and ``non_lora_trainables.bin`` (the projector), applied to ``--base_model`` (the base LLM) and merged.

Vision-tower weights come from ``--vision_tower`` when given (replacing any copies in the checkpoint, which
the original code never reads: it loads CLIP from ``mm_vision_tower`` at run time), else from the checkpoint,
else from ``mm_vision_tower``; that model also supplies the vision config and image processor. Every original
tensor is mapped to exactly one llava-hf tensor with its shape checked; anything left over or missing is an
error. Weights are read only from safetensors or with ``torch.load(weights_only=True)``. ``--dtype auto`` keeps
every tensor's dtype: the language model and projector as saved (float16 for the releases) and CLIP as its
source holds it (float32 for OpenAI's CLIP, as the original runs it).

The result behaves like the original everywhere (tested on a checkpoint in the original layout):

- the chat template renders the original ``conv_templates[--template].get_prompt()`` text, with the template's
  system prompt unless the messages start with a system message;
- the tokenizer is the SentencePiece ``tokenizer.model`` read the way the original (slow, legacy) Llama tokenizer
  reads it, so the stock processor's ids equal the original ``tokenizer_image_token`` ids: each piece of text
  between special tokens gets its own ``▁`` prefix, so the text after ``<image>`` starts with ``▁``;
- the image processor pads to square with the mean colour (``image_aspect_ratio: pad``) and resizes like the
  original ``CLIPImageProcessor``; its PIL backend (which llavatune uses; in transformers
  ``AutoProcessor.from_pretrained(path, backend="pil")``) gives the original pixels exactly.

The mapping (the same as transformers' ``convert_llava_weights_to_hf.py``, written for current
transformers module names):

=============================================  ==============================================
original                                       llava-hf
=============================================  ==============================================
``model.embed_tokens / layers / norm``         ``model.language_model.*``
``lm_head``                                    ``lm_head``
``model.mm_projector.0`` / ``.2``              ``model.multi_modal_projector.linear_1`` / ``linear_2``
``model.mm_projector`` (linear)                ``linear_1``; ``linear_2`` = identity, act = linear
``model.vision_tower.vision_tower.*``          ``model.vision_tower.*``
=============================================  ==============================================

``mm_vision_select_layer`` -> ``vision_feature_layer``; ``mm_vision_select_feature`` patch/cls_patch ->
``vision_feature_select_strategy`` default/full; ``image_aspect_ratio: pad`` -> ``do_pad`` in the image
processor. ``<image>`` (and ``<pad>`` when the tokenizer has none) are added to the tokenizer; new
embedding rows get the mean embedding.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llavatune.config import check_choice, config, parse_config
from llavatune.data.reader import load_json
from llavatune.data.templates import ChatTemplateName
from llavatune.utils import UserError, atomic_write_json

logger = logging.getLogger("llavatune")

SUPPORTED_ARCHS = ("LlavaLlamaForCausalLM",)
# Buffers some older transformers versions saved with the weights: not parameters, recomputed on load.
DROPPED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")
LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pretraining_tp", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
WEIGHT_FILES_SKIPPED = ("non_lora_trainables.bin", "mm_projector.bin", "training_args.bin", "optimizer.pt",
                        "scheduler.pt", "rng_state.pth")


# ----------------------------------------------------------------------------------------------------
# Reading weights


def _local_dir(ref: str, what: str, patterns: list[str] | None = None) -> Path:
    from llavatune.model.refs import looks_local, resolve_model

    resolved = resolve_model(ref, what)  # a local folder, or a hub id the hub (or the cache) can serve: one line if not
    if looks_local(ref):
        return Path(resolved)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as e:  # offline, gated, missing repo
        raise UserError(f"{what}: {ref} is not a local folder and could not be downloaded "
                        f"({type(e).__name__}); download it and pass its local path") from None


def _torch_load(path: Path) -> dict:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
        raise UserError(f"{path}: cannot be read with torch.load(weights_only=True) ({str(e).splitlines()[0]}); "
                        "re-save it as a plain state dict or as safetensors") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return obj


def read_weights(folder: Path, names: list[str] | None = None) -> dict:
    """All tensors of a checkpoint folder (``*.safetensors`` preferred, else ``pytorch_model*.bin``)."""
    from safetensors.torch import load_file

    if names is not None:
        files = [folder / n for n in names if (folder / n).is_file()]
    else:
        files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("adapter_model"))
        if not files:
            files = sorted(f for f in folder.glob("*.bin")
                           if f.name not in WEIGHT_FILES_SKIPPED and not f.name.startswith("adapter_model"))
    state: dict = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else _torch_load(f)
        dup = set(part) & set(state)
        if dup:
            raise UserError(f"{f}: tensor {sorted(dup)[0]} is also in another weights file")
        state.update(part)
    return state


# ----------------------------------------------------------------------------------------------------
# Key mapping


@dataclass
class ConversionReport:
    """What became of every tensor: ``mapped`` original -> llava-hf key; the rest named by origin."""

    mapped: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # non-parameter buffers (rotary inv_freq, position_ids)
    synthesized: dict[str, str] = field(default_factory=dict)  # llava-hf key -> where its value came from
    lora_merged: list[str] = field(default_factory=list)  # original keys that received a LoRA delta
    resized: dict[str, tuple[int, int]] = field(default_factory=dict)  # embedding rows before -> after
    replaced: list[str] = field(default_factory=list)  # checkpoint tensors superseded by --vision_tower

    def summary(self) -> str:
        parts = [f"{len(self.mapped)} tensors mapped"]
        if self.lora_merged:
            parts.append(f"LoRA merged into {len(self.lora_merged)}")
        if self.synthesized:
            parts.append(f"{len(self.synthesized)} from elsewhere ({', '.join(sorted(set(self.synthesized.values())))})")
        if self.dropped:
            parts.append(f"{len(self.dropped)} buffers dropped")
        if self.replaced:
            parts.append(f"{len(self.replaced)} vision tensors of the checkpoint replaced by --vision_tower")
        if self.resized:
            k, (a, b) = next(iter(self.resized.items()))
            parts.append(f"vocabulary {a} -> {b}")
        return ", ".join(parts)


def _candidates(key: str) -> list[str]:
    """llava-hf names an original key may have (module names differ slightly across transformers versions)."""
    if m := re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", key):
        return [f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"]
    if m := re.fullmatch(r"model\.mm_projector\.(weight|bias)", key):
        return [f"model.multi_modal_projector.linear_1.{m.group(1)}"]
    if key.startswith("model.vision_tower.vision_tower."):
        rest = key[len("model.vision_tower.vision_tower."):]
        out = [f"model.vision_tower.{rest}"]
        if rest.startswith("vision_model."):
            out.append(f"model.vision_tower.{rest[len('vision_model.'):]}")
        return out
    if re.match(r"model\.(embed_tokens|layers|norm)\.", key):
        return [f"model.language_model.{key[len('model.'):]}"]
    if key.startswith("lm_head."):
        return [key]
    return []


def map_state_dict(state: dict, expected: dict[str, tuple], report: ConversionReport) -> dict:
    """Original -> llava-hf keys. ``expected`` maps llava-hf key -> shape. Raises on unknown/clashing keys."""
    out: dict = {}
    unknown = []
    for key in sorted(state):
        if key.endswith(DROPPED_SUFFIXES):
            report.dropped.append(key)
            continue
        target = next((c for c in _candidates(key) if c in expected), None)
        if target is None:
            unknown.append(key)
            continue
        if target in out:
            first = next(k for k, v in report.mapped.items() if v == target)
            raise UserError(f"original tensors {first} and {key} both map to {target}")
        out[target] = state[key]
        report.mapped[key] = target
    if unknown:
        raise UserError(f"{len(unknown)} original tensor(s) have no llava-hf counterpart, e.g. {', '.join(unknown[:3])}; "
                        "this is not a LLaVA-1.5-style checkpoint (LLaVA-NeXT/1.6 and mm_use_im_start_end "
                        "models are not supported)")
    return out


# ----------------------------------------------------------------------------------------------------
# LoRA


def merge_original_lora(state: dict, folder: Path, report: ConversionReport) -> None:
    """Add the original repo's LoRA deltas (PEFT format, keys ``base_model.model.<module>.lora_A/B.weight``)
    to the base LLM weights in ``state``, in float32."""
    cfg_path = folder / "adapter_config.json"
    acfg = load_json(cfg_path)
    if acfg.get("peft_type", "LORA") != "LORA" or acfg.get("use_dora"):
        raise UserError(f"{cfg_path}: only plain LoRA adapters can be converted (found "
                        f"{'DoRA' if acfg.get('use_dora') else acfg.get('peft_type')})")
    names = ["adapter_model.safetensors"] if (folder / "adapter_model.safetensors").is_file() else ["adapter_model.bin"]
    adapter = read_weights(folder, names)
    if not adapter:
        raise UserError(f"{folder}: adapter_config.json found but no adapter_model.safetensors or adapter_model.bin")
    alpha = float(acfg.get("lora_alpha", 8))
    alpha_pattern = acfg.get("alpha_pattern") or {}
    rslora = bool(acfg.get("use_rslora"))
    fan_in_fan_out = bool(acfg.get("fan_in_fan_out"))
    modules = {}
    for k in adapter:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", k)
        if not m:
            raise UserError(f"{folder}: adapter tensor {k} is not a LoRA A/B matrix (lora_embedding, bias and "
                            "modules_to_save entries are not supported)")
        modules.setdefault(m.group(1), {})[m.group(2)] = adapter[k]
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{folder}: LoRA for {module} lacks its lora_{'B' if 'A' in ab else 'A'} matrix")
        wkey = f"{module}.weight"
        if wkey not in state:
            raise UserError(f"{folder}: LoRA targets {module}, which the base model does not have")
        r = ab["A"].shape[0]
        a = next((v for p, v in alpha_pattern.items() if re.fullmatch(rf"(.*\.)?({p})", module)), alpha)
        scale = float(a) / (math.sqrt(r) if rslora else r)
        delta = ab["B"].float() @ ab["A"].float() * scale
        if fan_in_fan_out:
            delta = delta.T
        w = state[wkey]
        if tuple(delta.shape) != tuple(w.shape):
            raise UserError(f"{folder}: LoRA for {module} has shape {tuple(delta.shape)}, the weight {tuple(w.shape)}")
        state[wkey] = (w.float() + delta).to(w.dtype)
        report.lora_merged.append(wkey)


def non_lora_trainables(folder: Path) -> dict:
    """``non_lora_trainables.bin`` (projector etc.) with the PEFT prefix stripped to original model keys."""
    path = folder / "non_lora_trainables.bin"
    if not path.is_file():
        raise UserError(f"{folder}: a LoRA output of the original LLaVA code needs non_lora_trainables.bin (it holds "
                        "the projector); copy it from the training output folder")
    out = {}
    for k, v in _torch_load(path).items():
        for prefix in ("base_model.model.", "base_model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------
# Conversion


@config
class ConvertConfig:
    from_original: Optional[str] = None
    """Original haotian-liu/LLaVA checkpoint: a full model folder (or hub id such as liuhaotian/llava-v1.5-7b), or a
    LoRA output folder (adapter_config.json + adapter_model + non_lora_trainables.bin)."""
    out: Optional[str] = None
    """Folder for the llava-hf model (must not exist unless --overwrite)."""
    base_model: Optional[str] = None
    """LoRA outputs: the base language model the adapter was trained on (default: adapter_config.json's
    base_model_name_or_path, e.g. lmsys/vicuna-7b-v1.5)."""
    vision_tower: Optional[str] = None
    """Vision encoder folder or hub id (default: the checkpoint's mm_vision_tower); supplies the vision config, the
    image processor and the vision weights (given explicitly, it replaces any vision weights in the checkpoint;
    otherwise those are used when present)."""
    dtype: str = "auto"
    """Dtype of the converted weights: auto (each tensor as its source holds it: the LLM as saved, CLIP as its
    checkpoint holds it, float32 for OpenAI's), float16, bfloat16 or float32 (everything)."""
    template: ChatTemplateName = "vicuna_v1"
    """Conversation template the model was trained with (LLaVA-1.5: vicuna_v1; LLaVA-Llama-2: llava_llama_2); the
    saved chat template renders it and llavatune predict/chat/eval use it."""
    overwrite: bool = False
    """Replace an existing --out folder."""

    def __post_init__(self):
        check_choice("dtype", self.dtype, ["auto", "float16", "bfloat16", "float32"])


def _read_original_config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.is_file():
        raise UserError(f"{folder}: no config.json; an original LLaVA checkpoint folder holds config.json with mm_* fields")
    cfg = load_json(p)
    archs = cfg.get("architectures") or []
    if "mm_vision_tower" not in cfg and "mm_projector_type" not in cfg:
        raise UserError(f"{p}: no mm_vision_tower / mm_projector_type fields; not an original LLaVA checkpoint "
                        "(for llava-hf models there is nothing to convert)")
    if archs and not set(archs) & set(SUPPORTED_ARCHS):
        raise UserError(f"{p}: architecture {archs[0]} is not supported; only {', '.join(SUPPORTED_ARCHS)}")
    if cfg.get("mm_use_im_start_end"):
        raise UserError(f"{p}: mm_use_im_start_end=true models (image start/end tokens) have no llava-hf equivalent")
    if cfg.get("image_aspect_ratio") == "anyres" or str(cfg.get("mm_patch_merge_type", "flat")).startswith("spatial"):
        raise UserError(f"{p}: a LLaVA-NeXT (1.6, anyres) checkpoint; convert it with transformers' "
                        "convert_llava_next_weights_to_hf.py")
    ptype = cfg.get("mm_projector_type", "linear")
    if ptype not in ("mlp2x_gelu", "linear"):
        raise UserError(f"{p}: mm_projector_type {ptype!r} has no llava-hf equivalent (supported: mlp2x_gelu, linear)")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise UserError(f"{p}: mm_vision_select_feature {feature!r} is not supported (patch or cls_patch)")
    return cfg


def _vision_parts(ref: str, need_weights: bool):
    """(vision config, image processor, vision weights or None) from a CLIP/SigLIP folder or hub id."""
    from transformers import AutoConfig, AutoImageProcessor

    patterns = ["*.json", "*.txt"] + (["*.safetensors"] if need_weights else [])
    folder = _local_dir(ref, "--vision_tower (mm_vision_tower)", patterns)
    try:
        vcfg = AutoConfig.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"vision tower {ref}: cannot read its config/preprocessor_config.json ({str(e).splitlines()[0]}); "
                        "pass --vision_tower with the CLIP model the checkpoint was trained with") from None
    vcfg = getattr(vcfg, "vision_config", vcfg)
    weights = None
    if need_weights:
        import torch
        from transformers import AutoModel

        with torch.device("meta"):  # only to learn the class: no weights are materialised
            cls = type(AutoModel.from_config(vcfg))
        vision = cls.from_pretrained(folder, dtype="auto")  # as saved (the original loads OpenAI's CLIP in fp32)
        weights = vision.state_dict()
    return vcfg, image_processor, weights


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def sentencepiece_tokenizer(folder: Path):
    """The original code's tokenizer, as a fast tokenizer, from a SentencePiece ``tokenizer.model``.

    The original loads it as the slow ``LlamaTokenizer`` and ``tokenizer_image_token`` tokenizes the text on each
    side of ``<image>`` separately, so every chunk gets SentencePiece's ``▁`` prefix. Read *legacy* (transformers'
    SentencePiece conversion with ``legacy=True``: each piece of text between special tokens is encoded as
    SentencePiece encodes it alone), a single stock tokenizer call gives the same ids for the whole prompt. The
    ``tokenizer_class`` saved is ``PreTrainedTokenizerFast`` so that loaders use this ``tokenizer.json`` as is
    (transformers 5 rebuilds a ``LlamaTokenizer``'s pipeline from its settings and would drop the legacy prefix).
    """
    path = folder / "tokenizer.model"
    try:
        import google.protobuf  # noqa: F401  (SentencePiece model protos)
        import sentencepiece  # noqa: F401
    except ImportError as e:
        raise UserError(f"{path}: reading a SentencePiece tokenizer needs the {e.name or 'sentencepiece'} package; "
                        "pip install sentencepiece protobuf (both are llavatune dependencies)") from None
    from tokenizers import processors
    from transformers import AddedToken, PreTrainedTokenizerFast
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cfg_path = folder / "tokenizer_config.json"
    tcfg = load_json(cfg_path) if cfg_path.is_file() else {}
    try:
        native = TokenizersBackend.convert_to_native_format(vocab_file=str(path), legacy=True)
        backend = native["tokenizer_object"]
    except Exception as e:  # a corrupt or non-SentencePiece file
        raise UserError(f"{path}: cannot be read as a SentencePiece model ({type(e).__name__}: {e})") from None
    names = {k: _token_content(tcfg.get(k)) or native.get(k) for k in ("bos_token", "eos_token", "unk_token")}
    pad = _token_content(tcfg.get("pad_token"))
    specials = [("<s>" if names["bos_token"] is None else names["bos_token"], tcfg.get("add_bos_token", True)),
                (names["eos_token"], tcfg.get("add_eos_token", False))]
    ids = {t: backend.token_to_id(t) for t, _ in specials if t is not None}
    bos, eos = (t if add and ids.get(t) is not None else None for t, add in specials)
    single = " ".join(x for x in (bos, "$A", eos) if x)
    pair = " ".join(x for x in (bos, "$A", eos, bos, "$B", eos) if x)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, ids[t]) for t in {bos, eos} if t])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in names.items() if v is not None},
        pad_token=pad if pad is not None and backend.token_to_id(pad) is not None else None,
        model_max_length=int(tcfg.get("model_max_length") or 0) or None, clean_up_tokenization_spaces=False,
    )
    # tokens the original training added after the SentencePiece vocabulary (e.g. "[PAD]"), at their ids
    added = sorted((int(i), t) for i, t in (tcfg.get("added_tokens_decoder") or {}).items() if int(i) >= len(tok))
    for i, t in added:
        content = _token_content(t)
        if i != len(tok) or content is None:
            raise UserError(f"{cfg_path}: added token {t!r} has id {i}, but the next free id is {len(tok)}; the "
                            "tokenizer files do not fit together")
        tok.add_tokens(AddedToken(content, special=bool(isinstance(t, dict) and t.get("special", True)),
                                  normalized=False), special_tokens=True)
    if pad is not None and tok.pad_token is None and pad in tok.get_vocab():
        tok.pad_token = pad
    tok.legacy = True
    return tok


def load_original_tokenizer(dirs: list[Path]):
    """The tokenizer of the first folder that has one: ``tokenizer.model`` (what the original code reads) first."""
    from transformers import AutoTokenizer, LlamaConfig

    for d in dirs:
        if (d / "tokenizer.model").is_file():
            return sentencepiece_tokenizer(d)
        try:
            # config= keeps AutoTokenizer from reading the original config.json (model_type llava_llama / llava)
            return AutoTokenizer.from_pretrained(d, config=LlamaConfig())
        except (OSError, ValueError, TypeError):
            continue
    raise UserError(f"no tokenizer files (tokenizer.model, tokenizer.json) in {' or '.join(map(str, dirs))}; copy "
                    "the base LLM's tokenizer files into the checkpoint folder")


def _mean_rows(w, n_new: int):
    import torch

    mean = w.float().mean(dim=0, keepdim=True).to(w.dtype)
    return torch.cat([w, mean.expand(n_new, -1)], dim=0)


def vision_dtypes(hf: dict) -> set:
    return {v.dtype for k, v in hf.items() if k.startswith("model.vision_tower.") and v.is_floating_point()}


def _warn_if_vision_differs(ckpt: dict, tower: dict, ref: str) -> None:
    """The checkpoint's vision tensors are normally copies of the frozen tower; say so when they are not."""
    def name(k: str) -> str:
        return k.removeprefix("model.vision_tower.vision_tower.").removeprefix("vision_model.")

    theirs = {name(k): v for k, v in tower.items()}
    differ = [k for k, v in ckpt.items() if name(k) in theirs and not theirs[name(k)].to(v.dtype).equal(v)
              and not k.endswith(DROPPED_SUFFIXES)]
    if differ:
        logger.warning(f"{len(differ)} vision tensors of the checkpoint (e.g. {differ[0]}) differ from --vision_tower "
                       f"{ref} (a fine-tuned vision tower?); using --vision_tower as asked")


def _original_state(cfg: ConvertConfig, src: Path, report: ConversionReport) -> tuple[dict, list[Path]]:
    """Step 1: the original-layout state dict (for a LoRA output: the base LLM + the merged deltas + the non-LoRA
    trainables) and the folders to look for the tokenizer in."""
    tok_dirs = [src]
    if (src / "adapter_config.json").is_file():
        base_ref = cfg.base_model or load_json(src / "adapter_config.json").get("base_model_name_or_path")
        if not base_ref:
            raise UserError(f"{src}: the adapter does not record its base model; pass --base_model")
        try:
            base_dir = _local_dir(base_ref, "--base_model", ["*.json", "*.safetensors", "*.model", "*.txt"])
        except UserError as e:
            raise UserError(f"{e} (the base language model of the LoRA adapter; pass --base_model PATH)") from None
        state = read_weights(base_dir)
        if not state:
            raise UserError(f"--base_model: no *.safetensors or pytorch_model*.bin weights in {base_dir}")
        merge_original_lora(state, src, report)
        state.update(non_lora_trainables(src))
        tok_dirs.append(base_dir)
    else:
        state = read_weights(src)
        if not state:
            raise UserError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")
    if not any(k.startswith("model.mm_projector") for k in state):
        raise UserError(f"{src}: no model.mm_projector weights; for a LoRA output non_lora_trainables.bin must hold them")
    if "model.image_newline" in state:
        raise UserError(f"{src}: holds model.image_newline, a LLaVA-NeXT (1.6) checkpoint; not supported")
    return state, tok_dirs


def _target_dtype(cfg: ConvertConfig, state: dict):
    """The dtype of the language model and projector: as saved (``--dtype auto``: the most common floating dtype
    outside the vision tower, read before any vision tensor is swapped in), else ``--dtype``."""
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    floats = [v.dtype for k, v in state.items() if v.is_floating_point() and not k.startswith("model.vision_tower.")]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _vision_tower(cfg: ConvertConfig, ocfg: dict, state: dict, src: Path, report: ConversionReport):
    """Step 2a: the vision tower's config, image processor and (when they replace or stand in for the checkpoint's
    copies) weights. ``--vision_tower`` weights replace the checkpoint's (often float16) copies of the frozen
    tower, which are removed from ``state``."""
    vision_in_ckpt = sorted(k for k in state if k.startswith("model.vision_tower."))
    vt_ref = cfg.vision_tower or ocfg.get("mm_vision_tower")
    if not vt_ref:
        raise UserError(f"{src}/config.json: no mm_vision_tower; pass --vision_tower")
    vcfg, clip_ip, vision_weights = _vision_parts(vt_ref, need_weights=bool(cfg.vision_tower) or not vision_in_ckpt)
    if ocfg.get("mm_hidden_size") and ocfg["mm_hidden_size"] != vcfg.hidden_size:
        raise UserError(f"mm_hidden_size {ocfg['mm_hidden_size']} differs from the vision tower's hidden size "
                        f"{vcfg.hidden_size}; pass the right --vision_tower")
    if vision_weights is not None and vision_in_ckpt:
        replaced = {k: state.pop(k) for k in vision_in_ckpt}
        report.replaced = vision_in_ckpt
        _warn_if_vision_differs(replaced, vision_weights, cfg.vision_tower)
    return vt_ref, vcfg, clip_ip, vision_weights


def _tokenizer(tok_dirs: list[Path]):
    """Step 2b: the original SentencePiece tokenizer with ``<image>`` (and a pad token when it has none) added."""
    from transformers import AddedToken

    from llavatune.data.records import IMAGE_TOKEN

    tokenizer = load_original_tokenizer(tok_dirs)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def _llava_config(ocfg: dict, vcfg, tokenizer, vocab: int):
    """Step 2c: the llava-hf config from the original's ``config.json`` (``mm_*`` fields) and the vision config."""
    from transformers import LlamaConfig, LlavaConfig

    from llavatune.data.records import IMAGE_TOKEN

    text_kwargs = {k: ocfg[k] for k in LLAMA_KEYS if ocfg.get(k) is not None}
    text_kwargs.update(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    rope = dict(ocfg.get("rope_scaling") or {})
    rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type") or "default"
    rope["rope_theta"] = float(ocfg.get("rope_theta") or 10000.0)
    text_kwargs["rope_parameters"] = rope
    linear = ocfg.get("mm_projector_type", "linear") == "linear"
    strategy = "full" if ocfg.get("mm_vision_select_feature", "patch") == "cls_patch" else "default"
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    return LlavaConfig(
        vision_config=vcfg,
        text_config=LlamaConfig(**text_kwargs),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_patches + (1 if strategy == "full" and "clip" in vcfg.model_type else 0),
        vision_feature_layer=int(ocfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="linear" if linear else "gelu",
        tie_word_embeddings=bool(ocfg.get("tie_word_embeddings", False)),
    )


def _hf_state(state: dict, expected: dict[str, tuple], lcfg, vt_ref: str, vision_weights: dict | None,
              n_rows: int, vocab: int, report: ConversionReport) -> dict:
    """Step 3: the llava-hf state dict: mapped, with what the original does not hold filled in (new embedding rows,
    vision weights, the identity second layer of a linear projector, a tied lm_head), every shape checked and
    nothing missing."""
    import torch

    if n_rows < vocab:
        report.resized["model.embed_tokens.weight"] = (n_rows, vocab)
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in state:
                state[k] = _mean_rows(state[k], vocab - n_rows)
    hf = map_state_dict(state, expected, report)
    if vision_weights is not None:
        for k, v in vision_weights.items():
            key = next((c for c in (f"model.vision_tower.{k}", f"model.vision_tower.vision_model.{k}") if c in expected), None)
            if key is None or key in hf:
                raise UserError(f"vision tower {vt_ref}: tensor {k} has no place in the llava-hf vision tower")
            hf[key] = v
            report.synthesized[key] = f"vision tower {vt_ref}"
    proj2 = "model.multi_modal_projector.linear_2"
    if lcfg.projector_hidden_act == "linear":
        hidden = lcfg.text_config.hidden_size
        hf[f"{proj2}.weight"] = torch.eye(hidden)
        hf[f"{proj2}.bias"] = torch.zeros(hidden)
        report.synthesized[f"{proj2}.weight"] = report.synthesized[f"{proj2}.bias"] = "identity (linear projector)"
    if "lm_head.weight" in expected and "lm_head.weight" not in hf and lcfg.tie_word_embeddings:
        hf["lm_head.weight"] = hf["model.language_model.embed_tokens.weight"]
        report.synthesized["lm_head.weight"] = "tied to embed_tokens"
    missing = sorted(set(expected) - set(hf))
    if missing:
        raise UserError(f"{len(missing)} llava-hf tensor(s) have no source, e.g. {', '.join(missing[:3])}; the checkpoint "
                        "is incomplete (for a LoRA output, check --base_model and non_lora_trainables.bin)")
    for k, shape in expected.items():
        if tuple(hf[k].shape) != shape:
            src_key = next((o for o, t in report.mapped.items() if t == k), k)
            raise UserError(f"{src_key}: shape {tuple(hf[k].shape)} does not fit {k} {shape} (check mm_vision_tower, "
                            "mm_projector_type and the config)")
    return hf


def _processor(ocfg: dict, vcfg, clip_ip, tokenizer, strategy: str, template: str):
    """Step 4: the vision tower's image processor (padded to square when the original padded) and the tokenizer,
    with the template's chat template."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    from llavatune.data.templates import chat_template

    ip_kwargs = {k: v for k, v in clip_ip.to_dict().items()
                 if k in ("size", "crop_size", "image_mean", "image_std", "resample", "do_resize", "do_center_crop",
                          "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")}
    return LlavaProcessor(
        image_processor=LlavaImageProcessor(**ip_kwargs, do_pad=ocfg.get("image_aspect_ratio") == "pad"),
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if "clip" in vcfg.model_type else 0,
        chat_template=chat_template(template),
    )


def _finish_saved_files(out: Path, tokenizer, hf: dict, dtype, keep_vision_dtype: bool) -> None:
    """What ``save_pretrained`` writes differently from what stock transformers should read back."""
    if keep_vision_dtype and vision_dtypes(hf) - {dtype}:
        # save_pretrained records the first parameter's dtype (the vision tower's); stock from_pretrained(dtype="auto")
        # should load the language model as saved (a 7B in float16, not float32)
        saved = json.loads((out / "config.json").read_text())
        saved["dtype"] = saved.setdefault("text_config", {})["dtype"] = str(dtype).removeprefix("torch.")
        atomic_write_json(out / "config.json", saved)
    tok_cfg = out / "tokenizer_config.json"
    if getattr(tokenizer, "legacy", False) and tok_cfg.is_file():
        # the SentencePiece tokenizer: name the generic class (transformers 5 writes its internal TokenizersBackend)
        saved = json.loads(tok_cfg.read_text())
        if saved.get("tokenizer_class") == "TokenizersBackend":
            saved["tokenizer_class"] = "PreTrainedTokenizerFast"
            atomic_write_json(tok_cfg, saved)


def convert(cfg: ConvertConfig) -> tuple[Path, ConversionReport]:
    """Convert ``cfg.from_original`` into a llava-hf model in ``cfg.out``: read the original state dict (1), the
    vision tower, tokenizer and config (2), map and check every tensor (3), build the processor (4), save."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    from llavatune.data.templates import canonical
    from llavatune.infer.merge import check_out_dir, save_model

    if not cfg.from_original or not cfg.out:
        raise UserError("--from-original and --out are required")
    check_out_dir(cfg.out, cfg.overwrite, cfg.from_original)
    src = _local_dir(cfg.from_original, "--from-original", ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])
    ocfg = _read_original_config(src)
    report = ConversionReport()

    state, tok_dirs = _original_state(cfg, src, report)
    dtype = _target_dtype(cfg, state)
    vt_ref, vcfg, clip_ip, vision_weights = _vision_tower(cfg, ocfg, state, src, report)
    tokenizer = _tokenizer(tok_dirs)
    n_rows = state["model.embed_tokens.weight"].shape[0]
    vocab = max(n_rows, len(tokenizer))
    lcfg = _llava_config(ocfg, vcfg, tokenizer, vocab)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(lcfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    hf = _hf_state(state, expected, lcfg, vt_ref, vision_weights, n_rows, vocab, report)
    # --dtype auto: the vision tower keeps its source's dtype (the original runs OpenAI's CLIP in float32)
    keep = cfg.dtype == "auto"
    hf = {k: (v.to(dtype) if v.is_floating_point() and not (keep and k.startswith("model.vision_tower.")) else v)
          .contiguous() for k, v in hf.items()}
    model.load_state_dict(hf, strict=True, assign=True)
    lcfg.dtype = dtype
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)

    processor = _processor(ocfg, vcfg, clip_ip, tokenizer, lcfg.vision_feature_select_strategy, cfg.template)
    meta = {"method": "converted", "converted_from": str(cfg.from_original), "template": canonical(cfg.template),
            "max_length": int(ocfg.get("max_position_embeddings") or 4096)}
    out = save_model(cfg.out, model, processor, meta, config={"convert": cfg})
    _finish_saved_files(out, tokenizer, hf, dtype, keep)
    logger.info(f"converted {cfg.from_original}: {report.summary()}")
    return out, report


def main(argv: list[str], prog: str) -> int:
    (cfg,) = parse_config([ConvertConfig], argv, prog=prog, description=__doc__.split("\n\n")[0])
    out, report = convert(cfg)
    print(f"wrote {out} ({report.summary()})")
    return 0

"""``llavatune merge --model CKPT --out DIR`` — fold a LoRA/QLoRA adapter into its base model.

    llavatune merge --model runs/okvqa --out merged/okvqa-7b
    llavatune merge --model runs/okvqa-qlora/checkpoint-500 --out merged/okvqa-qlora --dtype float16

Writes a standalone llava-hf checkpoint that stock ``transformers`` loads on its own
(``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor.from_pretrained``): safetensors
weights, ``config.json``, ``generation_config.json``, processor + tokenizer files and the chat template.

A QLoRA adapter is merged into the base model reloaded in 16/32-bit, never into a dequantized 4-bit copy
(which would bake the quantization error into every weight). The output is written to a temporary folder
next to ``DIR`` and renamed into place only when complete; an existing ``DIR`` is refused unless
``--overwrite``. A full-weights checkpoint is re-exported as is (nothing to merge).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from llavatune.config import config, parse_config, save_resolved
from llavatune.files import CONFIG_FILE, META_FILE
from llavatune.infer.options import LoadOptions
from llavatune.utils import UserError, atomic_write_json, check_output_dir, write_output_marker

logger = logging.getLogger("llavatune")


def check_out_dir(out: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """Refuse an existing ``out`` (unless ``overwrite``) and an ``out`` that is, or is inside, ``source``."""
    out = Path(out)
    if not str(out):
        raise UserError("--out is required")
    if source is not None and Path(source).exists():
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise UserError(f"--out: {out} is inside the source checkpoint {source}; choose a folder outside it")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out: {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"--out: {out} exists; pass --overwrite to replace it")
        # --overwrite replaces only an earlier merge/convert output, never a folder of other files
        check_output_dir(out, overwrite=overwrite, kind="merge", inputs={"--model": source}, flag="--out")
    return out


def write_atomically(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temp folder next to ``out``, then swap it into place.

    On any error the temp folder is removed and an existing ``out`` is left untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_model(out: str | os.PathLike, model, processor, meta: dict, config: dict | None = None) -> Path:
    """Write ``model``, ``processor``, the llavatune metadata file and the resolved command configuration
    (``config``: ``{section: dataclass}``, as ``llavatune_config.yaml``) into ``out`` (via :func:`write_atomically`)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / META_FILE, meta)
        write_output_marker(tmp, "merge")
        if config:
            save_resolved(tmp / CONFIG_FILE, config)

    return write_atomically(out, write)


def _base_dtype(ckpt: Path, base_model: str | None) -> str:
    """The dtype the adapter's base model was saved in (so a 7B fp16 base merges into fp16), else 'auto'."""
    from llavatune.model.loader import adapter_base

    try:
        base = adapter_base(ckpt, base_model)
        cfg = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError, UserError):
        return "auto"
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return name if name in ("float16", "bfloat16", "float32") else "auto"


def _check_unquantized(model) -> None:
    from llavatune.model.bnb import quantized_parts

    bad = quantized_parts(model)
    if bad or getattr(model.config, "quantization_config", None):
        raise RuntimeError(f"merge: the base model was loaded quantized ({', '.join(bad) or 'quantization_config'}); "
                           "refusing to write a requantized merge")


@config
class MergeConfig(LoadOptions):
    out: Optional[str] = None
    """Folder for the standalone llava-hf model (must not exist unless --overwrite)."""
    overwrite: bool = False
    """Replace an existing --out folder."""


def merge(cfg: MergeConfig) -> Path:
    from llavatune.model.loader import load_checkpoint

    if not cfg.model or not cfg.out:
        raise UserError("--model and --out are required")
    out = check_out_dir(cfg.out, cfg.overwrite, cfg.model)
    src = Path(cfg.model)
    dtype = cfg.dtype
    if dtype == "auto" and (src / "adapter_config.json").is_file():
        dtype = _base_dtype(src, cfg.base_model)
    device_map = None  # --device auto / cpu: the merge runs on the CPU (a GPU only when asked: it must hold the model)
    if cfg.device not in ("auto", "cpu"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: no CUDA GPU is available here; use --device cpu")
        device_map = {"": cfg.device}
    # merge=True: QLoRA adapters get their base loaded unquantized, then PEFT's merge_and_unload.
    model, processor, info = load_checkpoint(cfg.model, dtype=dtype, base_model=cfg.base_model, merge=True,
                                             quantized=False, device_map=device_map)
    _check_unquantized(model)
    if info.get("kind") != "adapter":
        logger.info(f"{cfg.model} holds full weights: nothing to merge, re-exporting it")
    tok = getattr(processor, "tokenizer", processor)
    gen = model.generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, name, None) is None and getattr(tok, name, None) is not None:
            setattr(gen, name, getattr(tok, name))
    template = cfg.template or info.get("template", "auto")
    if template not in ("auto", None):
        logger.warning(f"the checkpoint was trained with --template {template}; stock transformers' "
                       "apply_chat_template renders the model's own chat template, which may differ. "
                       "llavatune predict/chat/eval keep using the training template (recorded in the output)")
    # info holds the checkpoint's llavatune metadata (read by load_checkpoint) for a local folder, none for a hub id
    meta = {k: v for k, v in info.items() if k in ("stage", "template", "max_length")}
    if cfg.template:
        meta["template"] = cfg.template
    meta.update({"method": "merged", "merged_from": str(src.resolve()) if src.exists() else str(src),
                 "source_method": info.get("method", info.get("kind"))})
    save_model(out, model, processor, meta, config={"merge": cfg})
    logger.info(f"merged model written to {out}")
    return out


def main(argv: list[str], prog: str) -> int:
    (cfg,) = parse_config([MergeConfig], argv, prog=prog, description=__doc__.split("\n\n")[0])
    out = merge(cfg)
    print(f"wrote {out}")
    return 0

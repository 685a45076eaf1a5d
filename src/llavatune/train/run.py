"""``llavatune train [CONFIG.yaml] [--flag value ...]`` — the training recipe, top to bottom.

    llavatune train --model tiny --data DIR/data.json --val_data VALDIR/data.json --output_dir RUN --num_train_epochs 3
    llavatune train configs/llava15_7b_okvqa_qlora.yaml
    torchrun --nproc_per_node 2 -m llavatune.cli train configs/... --zero zero2

Stage 1 (``--stage pretrain``) trains the projector on captions; stage 2 (``--stage finetune``) trains
projector + LLM (LoRA, QLoRA or full) with the vision tower frozen. Output: ``OUTPUT_DIR`` holds the final
weights (adapter or full), processor, ``llavatune_config.yaml``, ``metrics.jsonl`` and ``checkpoint-N``
folders, each loadable on its own.

Before step 1, and before anything is written: the data goes through the same validation as ``llavatune check``
(records with problems are skipped and listed, up to ``--max_bad_records``; a wrong file is refused), every image
is verified once (in parallel; verdicts remembered in ``image_checks.json``), and ``OUTPUT_DIR`` is compared with
the run recorded there (``llavatune_run.json``: a fingerprint of data, model, method and the result-changing
options): the same run resumes from its latest checkpoint, or says it is finished; a different one is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from llavatune._compat import deepspeed_zero3_init_disabled
from llavatune.config import ConfigError, parse_config, save_resolved
from llavatune.data.encode import Encoder, LlavaDataset
from llavatune.data.records import (
    Record,
    Validation,
    collect_texts,
    image_root,
    normalize_image_placement,
    validate_data,
)
from llavatune.data.show import first_sample
from llavatune.files import (
    BASE_MODEL_DIR,
    CONFIG_FILE,
    IMAGE_CHECKS_FILE,
    METRICS_FILE,
    RUN_FILE,  # the run's fingerprint and status ("running" / "finished")
    SKIPPED_FILE,
)
from llavatune.train.train_config import DataArgs, EvalArgs, LlavaTrainingArguments, MethodArgs, ModelArgs
from llavatune.utils import (
    UserError,
    atomic_write_json,
    atomic_write_jsonl,
    check_output_dir,
    finish_distributed,
    output_kind,
    prepare_output_dir,
    resolve_under,
)
from llavatune.zero import deepspeed_config, zero_settings

logger = logging.getLogger("llavatune")
SECTIONS = (ModelArgs, DataArgs, MethodArgs, EvalArgs, LlavaTrainingArguments)


def validate(margs: ModelArgs, dargs: DataArgs, mthd: MethodArgs, eargs: EvalArgs,
             targs: LlavaTrainingArguments) -> None:
    """Reject incompatible options before anything heavy runs."""
    if not dargs.data:
        raise ConfigError("--data: training data is required (a LLaVA-format .json/.jsonl)")
    if not targs.output_dir:
        raise ConfigError("--output_dir: required")
    for name in ("data", "val_data"):
        value = getattr(dargs, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"--{name}: {value} does not exist")
    if margs.model == "compose" and not (margs.vision_model and margs.language_model):
        raise ConfigError("--model compose needs --vision_model and --language_model")
    from llavatune.model.families import TINY_MODELS

    if (margs.model.startswith("tiny") and "/" not in margs.model and margs.model not in TINY_MODELS
            and not Path(margs.model).exists()):  # 'tinyllava/...' is a hub id
        raise ConfigError(f"--model {margs.model}: no such built-in tiny model; choose one of {', '.join(TINY_MODELS)}")
    if mthd.zero:
        deepspeed_config(mthd.zero)  # an unknown name fails here, before anything is set up
    fam = check_model_refs(margs, mthd.smoke)
    refuse_zero3(fam, mthd.zero)
    if mthd.method == "qlora" and mthd.stage == "finetune":
        if zero_settings(mthd.zero)[0] == 3:
            raise ConfigError("--method qlora with --zero zero3: use zero2 (ZeRO-3 cannot shard bitsandbytes weights)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--method qlora needs bitsandbytes: pip install 'llavatune[qlora]'") from None
    if mthd.stage == "pretrain" and mthd.method != "lora":
        logger.info("stage pretrain trains the projector only; --method is ignored")
    if dargs.max_length < 16:
        raise ConfigError(f"--max_length: {dargs.max_length} is too small")
    if eargs.early_stopping_patience is not None and not dargs.val_data:
        raise ConfigError("--early_stopping_patience needs --val_data")
    if targs.metric_for_best_model and not dargs.val_data:
        raise ConfigError("--metric_for_best_model needs --val_data")


def check_model_refs(margs: ModelArgs, smoke: bool):
    """Fail before anything is written when a model reference cannot be used (``llavatune.model.refs``): a local
    path that does not exist ("no such folder"), or a hub id the hub cannot serve. With ``--smoke`` an unreachable
    hub is no error: ``build_smoke_base`` falls back to the tiny model. Returns ``--model``'s family when it is
    known from config.json alone (a built-in tiny model, a local folder's or a hub model's), else None."""
    from llavatune.model.families import TINY_MODELS, check_folder
    from llavatune.model.refs import hub_available, looks_local, resolve_model

    fam = TINY_MODELS.get(margs.model)

    refs = [("--vision_model", margs.vision_model), ("--language_model", margs.language_model)]
    if margs.model not in TINY_MODELS and margs.model != "compose":
        refs = [("--model", margs.model)]
    elif margs.model != "compose":
        refs = []
    for what, ref in refs:
        if ref and smoke and not looks_local(ref):
            hub_available(ref, what)  # an unknown or gated repository is an error; an unreachable hub is not
        elif ref:
            resolve_model(ref, what)
            if what == "--model":
                # a family llavatune does not train (yet): one line, before anything is written (a hub model's
                # config.json is fetched now, not after the run folder exists)
                if looks_local(ref):
                    fam = check_folder(ref, what)
                else:
                    from llavatune.model.loader import check_family

                    fam = check_family(ref, what, margs.trust_remote_code)
    if margs.pretrained_projector and not Path(margs.pretrained_projector).expanduser().exists():
        raise UserError(f"--pretrained_projector {margs.pretrained_projector}: no such file or folder")
    return fam


def refuse_zero3(fam, zero: str | None) -> None:
    """ZeRO-3 for a family that cannot run it here: text-only batches under ZeRO-3 run the vision tower on a blank
    image through get_image_features, which the family's model does not have (Mllama's image enters through
    cross-attention)."""
    if zero and "zero3" in str(zero) and fam is not None and not fam.zero3:
        raise ConfigError(f"--zero {zero}: {fam.name} does not run under ZeRO-3 here; use --zero zero2")


# ----------------------------------------------------------------------------------------------------
# Launchers, CPU-only machines and --smoke


def launched() -> bool:
    """Started by a launcher (torchrun, accelerate launch, deepspeed): they set LOCAL_RANK / WORLD_SIZE."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def _say(message: str) -> None:
    """Log once per job (rank 0), also before torch.distributed is up."""
    if (os.environ.get("RANK") or "0") == "0":
        logger.info(message)


def device_options(values: dict) -> None:
    """What ``TrainingArguments``' constructor depends on, decided on the raw options (``parse_config``'s adjust).

    Without a GPU: several processes train data-parallel on CPU (``use_cpu`` makes accelerate join them with gloo;
    otherwise every rank believes it is alone and trains on all the data), and ``--smoke`` turns bf16/fp16 autocast
    off (``TrainingArguments`` refuses it without a GPU). One log line for each change."""
    import torch

    if torch.cuda.is_available():
        return
    if world_size() > 1 and not values.get("use_cpu"):
        values["use_cpu"] = True
        _say(f"no GPU: the {world_size()} processes train data-parallel on CPU (gloo backend), each on its share of "
             "the data")
    for flag in ("bf16", "fp16"):
        if not values.get(flag):
            continue
        if values.get("smoke"):
            values[flag] = False
            _say(f"--smoke: --{flag} turned off (no {flag} autocast without a GPU)")
        elif not values.get("use_cpu"):
            raise ConfigError(f"--{flag}: this machine has no GPU; pass --{flag} false to train in fp32 on the CPU"
                              + (", --use_cpu true for CPU bf16 autocast" if flag == "bf16" else "")
                              + ", or --smoke for a 3-step check of the recipe")


def smoke_options(mthd: MethodArgs, eargs: EvalArgs, targs: LlavaTrainingArguments, val_data: str | None):
    """``--smoke``: 3 steps, nothing saved or evaluated, and off what one process without evaluation cannot do.

    Returns ``(mthd, eargs, training-argument changes)``; logs one line per option turned off."""
    changes = dict(max_steps=3, save_strategy="no", eval_strategy="no", load_best_model_at_end=False,
                   metric_for_best_model=None)
    if mthd.zero and not launched():
        _say(f"--smoke without a launcher: DeepSpeed (--zero {mthd.zero}) turned off; launch with torchrun or "
             "deepspeed to smoke-test it too")
        mthd = dataclasses.replace(mthd, zero=None)
    if eargs.early_stopping_patience is not None:
        _say("--smoke: early stopping (--early_stopping_patience) turned off: a smoke run does not evaluate")
        eargs = dataclasses.replace(eargs, early_stopping_patience=None)
    if targs.metric_for_best_model or targs.load_best_model_at_end:
        _say("--smoke: best-checkpoint selection (--metric_for_best_model / --load_best_model_at_end) turned off: "
             "a smoke run does not evaluate")
    if val_data:
        _say("--smoke: no evaluation; the validation data is read, encoded and self-checked like the training data")
    return mthd, eargs, changes


def one_process_world() -> None:
    """``--zero`` in a plain ``llavatune train`` (no launcher): DeepSpeed needs a process group even for one process
    and would otherwise look for MPI (``mpi4py``). Set what torchrun sets for a world of one."""
    import socket

    if launched():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    logger.info("--zero without a launcher: DeepSpeed runs as a world of one process (launch with torchrun, "
                "accelerate launch or deepspeed for several)")


def build_base(margs: ModelArgs, mthd: MethodArgs, base_dir: Path, texts: list[str],
               records: list[Record] = (), roots: list[Path] = (), template: str = "auto") -> None:
    """Write the starting model for --model tiny[-FAMILY], --model compose or --smoke into ``base_dir``.

    The tiny model is warm-started on the training ``records`` (text rendered with ``template``, the one training
    uses: 'plain' in stage 1; images, under ``roots``, on their own): see ``llavatune.model.tiny.build_tiny``."""
    from llavatune.model import loader
    from llavatune.model.families import TINY_MODELS
    from llavatune.model.tiny import build_tiny, build_tiny_model

    if margs.model in ("tiny", "tiny-next"):
        images = []
        for r, root in zip(records, roots):
            for p in r.images:
                try:
                    images.append(resolve_under(root, p))
                except UserError:  # an escaping path: the dataset reports it; the warm start does without
                    pass
        build_tiny(texts, base_dir, next=margs.model == "tiny-next", conversations=[r.conversations for r in records],
                   template=template, images=images)
    elif margs.model in TINY_MODELS:
        build_tiny_model(margs.model, texts, base_dir)
    elif mthd.smoke:
        build_smoke_base(margs, base_dir, texts, template)
    else:
        loader.compose_llava(
            margs.vision_model, margs.language_model, base_dir, margs.projector,
            margs.vision_feature_layer, margs.vision_feature_select_strategy, margs.trust_remote_code,
        )


def build_smoke_base(margs: ModelArgs, base_dir: Path, texts: list[str], template: str) -> None:
    """``--smoke``'s model: tiny and random, of the same families as the configured one.

    With the real files at hand (a local folder, or the hub / its cache) it keeps the real processor, tokenizer and
    chat template (``build_smoke``; for ``compose`` the language model's tokenizer and the vision model's image
    processor). When the hub cannot be reached (or ``HF_HUB_OFFLINE=1``) and nothing is cached, it falls back to the
    built-in tiny model of the family (``tiny_family``: 'tiny-next' for LLaVA-NeXT, 'tiny-qwen2_5_vl' for Qwen2.5-VL,
    ..., else 'tiny') with the configured template, and says so. A reference the hub does not know (a typo) is an error, never a fallback."""
    from llavatune.model import loader
    from llavatune.model.refs import hub_available, looks_local
    from llavatune.model.tiny import build_smoke, build_tiny_model, tiny_family

    if margs.model == "compose":
        refs = [("--vision_model", margs.vision_model), ("--language_model", margs.language_model)]
    else:
        refs = [("--model", margs.model)]
    missing = [ref for what, ref in refs if not (looks_local(ref) or hub_available(ref, what))]
    if not missing:
        if margs.model == "compose":
            loader.compose_llava(margs.vision_model, margs.language_model, base_dir, margs.projector,
                                 margs.vision_feature_layer, margs.vision_feature_select_strategy,
                                 margs.trust_remote_code, smoke=True)
        else:
            build_smoke(margs.model, base_dir)
        logger.info(f"--smoke: a tiny random model with the processor and tokenizer of {' + '.join(r for _, r in refs)}")
        return
    family = "tiny" if margs.model == "compose" else tiny_family(margs.model)
    why = "HF_HUB_OFFLINE=1" if _offline() else "the Hugging Face hub cannot be reached"
    logger.info(f"--smoke offline ({why}; not cached: {', '.join(missing)}): using the built-in '{family}' model with "
                f"--template {template} instead of the real processor and tokenizer; run --smoke with network to check "
                "those too")
    build_tiny_model(family, texts, base_dir)


def _offline() -> bool:
    from llavatune.model.refs import offline

    return offline()


def blank_image_inputs(encoder: Encoder) -> dict | None:
    """The family's image inputs for one blank image: what ZeRO-3's text-only batches run the vision tower on
    (``LlavaTrainer._install_blank_image_hooks``)."""
    if encoder.image_processor is None:
        return None
    from PIL import Image

    return encoder.pixel_inputs([Image.new("RGB", (64, 64))])


def load_split(path: str, image_folder: str | None, name: str = "train", max_bad_records: float = 0.0,
               **validate_kwargs) -> tuple[list[Record], list[Path], Validation]:
    """The usable records of a data file (validated as ``llavatune check`` does; see :func:`validate_data`), one
    image root per record, and the validation (what was skipped and why). Refuses the file past
    ``max_bad_records``."""
    v = validate_data(path, image_folder, purpose="train", **validate_kwargs)
    records = [normalize_image_placement(r) for r in v.accept(max_bad_records)]
    for line in v.skip_report(name):
        logger.warning(line)
    root = image_root(path, image_folder)
    return records, [root] * len(records), v


# ---------------------------------------------------------------------------------- the run directory

# Options whose change makes a different run (results differ): a run dir holding another combination is refused.
_FINGERPRINT_OPTIONS = {
    "model": ("model", "vision_model", "language_model", "projector", "vision_feature_layer",
              "vision_feature_select_strategy", "dtype"),
    "data": ("image_folder", "template", "max_length", "truncation", "max_train_samples", "max_bad_records",
             "max_pixels"),
    "method": ("stage", "method", "bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
               "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "train_vision",
               "projector_lr", "vision_lr", "smoke"),
    "training": ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
                 "weight_decay", "seed", "data_seed", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "max_grad_norm", "bf16", "fp16", "label_smoothing_factor", "train_sampling_strategy", "world_size"),
}


def _file_identity(path: str | os.PathLike) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": os.path.realpath(path), "size": os.path.getsize(path), "sha256": h.hexdigest()}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_fingerprint(margs: ModelArgs, dargs: DataArgs, mthd: MethodArgs,
                    targs: LlavaTrainingArguments) -> dict[str, Any]:
    """What defines a run: the data files' identity (content hash), the model, the method and every option that
    changes the result. Logging, saving, evaluation and resume options are not part of it."""
    fp: dict[str, Any] = {"data": _file_identity(dargs.data)}
    if dargs.val_data:
        fp["val_data"] = _file_identity(dargs.val_data)
    sections = {"model": margs, "data": dargs, "method": mthd, "training": targs}
    for section, names in _FINGERPRINT_OPTIONS.items():
        for name in names:
            value = getattr(sections[section], name, None)
            if name in ("image_folder", "model", "vision_model", "language_model") and value and Path(value).exists():
                value = os.path.realpath(value)
            fp[name] = _plain(value)
    if margs.pretrained_projector:
        p = Path(margs.pretrained_projector)
        fp["pretrained_projector"] = _file_identity(p) if p.is_file() else os.path.realpath(p)
    return fp


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (data files compare by content, not by path)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            if not (isinstance(a, dict) and isinstance(b, dict) and a.get("sha256") == b.get("sha256")):
                where = (b or a or {}).get("path") if isinstance(b or a, dict) else b
                out.append(f"--{key} {where} has different content" if a and b else f"--{key} {a!r} -> {b!r}")
        elif a != b:
            out.append(f"--{key} {a!r} -> {b!r}")
    return out


@dataclasses.dataclass
class RunDir:
    """What to do with ``--output_dir``: start fresh, resume from a checkpoint, or nothing (finished)."""

    path: Path
    resume_from: str | None = None
    finished: bool = False
    existing: bool = False  # the folder holds this run already (resume, or restart before its first checkpoint)
    step: int | None = None


def _read_run_file(d: Path) -> dict[str, Any] | None:
    f = d / RUN_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"--output_dir {d}: {RUN_FILE} is unreadable; pass --overwrite to replace the run or choose "
                        "a new --output_dir") from None
    return data if isinstance(data, dict) else None


def _checkpoint_step(ckpt: str) -> int:
    state = Path(ckpt) / "trainer_state.json"
    try:
        return int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(Path(ckpt).name.rsplit("-", 1)[-1]) if Path(ckpt).name.rsplit("-", 1)[-1].isdigit() else 0


def run_dir_plan(out: Path, fingerprint: dict[str, Any], mthd: MethodArgs, inputs: dict[str, Any]) -> RunDir:
    """Decide, before anything is written, what this invocation does with ``out`` (see :class:`RunDir`).

    Refuses: a different run recorded in ``out`` (naming what changed), a folder that is not a llavatune run,
    ``--overwrite`` of anything but a llavatune run or of a folder holding an input, ``--resume`` with nothing to
    resume.
    """
    from llavatune.train.llava_trainer import latest_checkpoint

    explicit = mthd.resume if mthd.resume not in (None, "auto") else None
    if explicit is not None and not Path(explicit).is_dir():
        raise UserError(f"--resume: {explicit} is not a checkpoint directory")
    if mthd.overwrite:
        check_output_dir(out, overwrite=True, kind="train", inputs=inputs)
        return RunDir(out)
    if explicit is not None:  # resuming another folder's checkpoint: it must be the same run
        src = _read_run_file(Path(explicit).parent)
        if src is not None and fingerprint_changes(src.get("fingerprint") or {}, fingerprint):
            raise UserError(f"--resume {explicit}: that checkpoint belongs to a different run "
                            f"({'; '.join(fingerprint_changes(src.get('fingerprint') or {}, fingerprint))})")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is a file, not a folder")
    if not (out.is_dir() and any(out.iterdir())):
        if mthd.resume == "auto":
            raise UserError(f"--resume: {out} holds no run to resume (no checkpoint-N folder)")
        return RunDir(out, resume_from=explicit)
    state = _read_run_file(out)
    if state is None:
        if output_kind(out) == "train" and mthd.resume is not None:
            ckpt = explicit or latest_checkpoint(out)
            if ckpt is None:
                raise UserError(f"--resume: no checkpoint-N folder in {out}")
            logger.warning(f"{out} records no run fingerprint (an older llavatune made it); resuming {ckpt} as asked")
            return RunDir(out, resume_from=ckpt, existing=True)
        if output_kind(out) == "train":
            raise UserError(
                f"--output_dir {out}: holds a llavatune run made by an older version, without the record of what it "
                "trained; pass --resume to continue it as it is, --overwrite to replace it, or choose a new --output_dir"
            )
        check_output_dir(out, overwrite=False, kind="train")  # raises: not empty and not ours
    changes = fingerprint_changes(state.get("fingerprint") or {}, fingerprint)
    if changes:
        raise UserError(
            f"--output_dir {out}: holds a different run ({'; '.join(changes)}); pass --overwrite to replace it, or "
            "choose a new --output_dir"
        )
    if state.get("status") == "finished":
        return RunDir(out, finished=True, existing=True, step=state.get("global_step"))
    ckpt = explicit or latest_checkpoint(out)
    if ckpt is None and mthd.resume == "auto":
        raise UserError(f"--resume: no checkpoint-N folder in {out} to resume from")
    return RunDir(out, resume_from=ckpt, existing=True)


def write_run_state(out: Path, fingerprint: dict[str, Any], status: str, step: int | None = None) -> None:
    state = {"status": status, "global_step": step, "fingerprint": fingerprint}
    atomic_write_json(out / RUN_FILE, state)


def _inputs(margs: ModelArgs, dargs: DataArgs, mthd: MethodArgs) -> dict[str, Any]:
    """Every input a train run reads, for the output-directory guard."""
    found = {"--data": dargs.data, "--val_data": dargs.val_data, "--image_folder": dargs.image_folder,
             "--pretrained_projector": margs.pretrained_projector}
    for name in ("model", "vision_model", "language_model"):
        value = getattr(margs, name)
        if value and Path(value).exists():
            found[f"--{name}"] = value
    roots = [image_root(p, dargs.image_folder) for p in (dargs.data, dargs.val_data) if p]
    found["the image folder"] = [str(r) for r in roots]
    return {k: v for k, v in found.items() if v}


def validate_training_data(dargs: DataArgs, out: Path, workers_flag: str = "--image_workers"):
    """Validate (and verify the images of) the training and validation data, before step 1 and before the output
    directory is touched. Returns ``(train records, roots, val records, roots, validations, verdict cache)``."""
    from llavatune.data.images import VerdictCache

    cache = VerdictCache(out / IMAGE_CHECKS_FILE, dargs.max_pixels)
    kw = dict(max_bad_records=dargs.max_bad_records, max_pixels=dargs.max_pixels, workers=dargs.image_workers,
              cache=cache, workers_flag=workers_flag)
    train_records, train_roots, tv = load_split(dargs.data, dargs.image_folder, "train data", **kw)
    if dargs.max_train_samples:
        train_records, train_roots = train_records[: dargs.max_train_samples], train_roots[: dargs.max_train_samples]
    val_records, val_roots, vv = ([], [], None)
    if dargs.val_data:
        val_records, val_roots, vv = load_split(dargs.val_data, dargs.image_folder, "validation data", **kw)
    return train_records, train_roots, val_records, val_roots, [x for x in (tv, vv) if x is not None], cache


def write_validation_files(out: Path, validations: list[Validation], cache) -> None:
    """``skipped_records.jsonl`` (every skipped record with its reasons: nothing is dropped silently) and the
    remembered image verdicts."""
    rows = [{"data": str(v.data), **e.reject_row()} for v in validations for e in v.bad]
    if rows or (out / SKIPPED_FILE).exists():
        atomic_write_jsonl(out / SKIPPED_FILE, rows)
    cache.save(out / IMAGE_CHECKS_FILE)


def say_device(targs: LlavaTrainingArguments) -> None:
    """One line when a single process trains on the CPU without being asked to: DeepSpeed's own "unable to detect"
    line is dropped (``llavatune.quiet``), and a GPU machine with a broken CUDA setup would otherwise train on the
    CPU without a word."""
    import torch

    if not torch.cuda.is_available() and world_size() == 1 and not targs.use_cpu:
        _say("no GPU found (torch.cuda.is_available() is False): training on the CPU")


def train_with_one_line_errors(trainer, resume_from: str | None) -> None:
    """``trainer.train``, with a llavatune error raised inside a DataLoader worker process shown as the same one
    line it is in the main process: torch re-raises it as ``Caught UserError in DataLoader worker process N`` plus
    the worker's whole traceback (torch/utils/_utils.py ``ExceptionWrapper.reraise``)."""
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except UserError as e:
        text = str(e)
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            head, sep, message = last.partition(": ")
            raise UserError(message if sep and "." in head else last) from None
        raise


# ---------------------------------------------------------------------------------- the recipe, step by step


@dataclasses.dataclass(frozen=True)
class Job:
    """One training job's options once resolved (:func:`resolve_arguments`), as every later step reads them."""

    margs: ModelArgs
    dargs: DataArgs
    mthd: MethodArgs
    eargs: EvalArgs
    targs: LlavaTrainingArguments

    @property
    def out(self) -> Path:
        return Path(self.targs.output_dir)

    @property
    def template(self) -> str:
        """The template training renders with: 'plain' in stage 1 (captions), ``--template`` in stage 2."""
        return "plain" if self.mthd.stage == "pretrain" else self.dargs.template


@dataclasses.dataclass
class TrainData:
    """The usable records of the training and validation data, one image root per record, and how many records of
    each split validation already skipped (the datasets' reports count them)."""

    train_records: list[Record]
    train_roots: list[Path]
    val_records: list[Record]
    val_roots: list[Path]
    n_prior: dict[str, int]


@dataclasses.dataclass
class LoadedModel:
    """The model ready to train (method applied), its processor, and what the run's metadata records of it."""

    model: Any
    processor: Any
    base_ref: str
    quant: dict | None


def resolve_arguments(margs: ModelArgs, dargs: DataArgs, mthd: MethodArgs, eargs: EvalArgs,
                      targs: LlavaTrainingArguments) -> Job:
    """Apply ``--smoke``, validate the options, and settle the training arguments that depend on them. Done before
    the model loads: with ZeRO-3 the DeepSpeed config must exist when from_pretrained runs, so the weights are
    partitioned as they load."""
    import torch

    smoke_changes = {}
    if mthd.smoke:
        mthd, eargs, smoke_changes = smoke_options(mthd, eargs, targs, dargs.val_data)
    validate(margs, dargs, mthd, eargs, targs)

    changes = {}
    if not dargs.val_data and targs.eval_strategy != "no":
        changes["eval_strategy"] = "no"
    if not torch.cuda.is_available() and world_size() > 1 and not targs.use_cpu:
        changes["use_cpu"] = True  # data-parallel on CPU (gloo); see device_options, which main() applies earlier
    if mthd.zero:
        changes["deepspeed"] = deepspeed_config(mthd.zero)
        one_process_world()
        if not torch.cuda.is_available():
            # accelerate sets up DeepSpeed's world only through a GPU backend; on CPU-only machines it needs
            # use_cpu to pick gloo (else every rank believes it is alone and no data is sharded).
            changes["use_cpu"] = True
    if dargs.val_data and targs.eval_strategy != "no" and not mthd.smoke:
        # Best checkpoint by the task metric, restored at the end (HF needs a metric and matching strategies).
        gen = eargs.generation_eval and mthd.stage == "finetune"
        metric = targs.metric_for_best_model or ("vqa_accuracy" if gen else "loss")
        changes["metric_for_best_model"] = metric
        if targs.greater_is_better is None or not targs.metric_for_best_model:
            changes["greater_is_better"] = "loss" not in metric
        if targs.load_best_model_at_end is None:
            changes["load_best_model_at_end"] = targs.save_strategy == targs.eval_strategy
    changes.update(smoke_changes)
    if targs.report_to and "tensorboard" in targs.report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed (pip install 'llavatune[tensorboard]'); logging to metrics.jsonl only")
            changes["report_to"] = [r for r in targs.report_to if r != "tensorboard"] or "none"
    if changes:
        try:
            targs = dataclasses.replace(targs, **changes)
        except ValueError as e:  # TrainingArguments' own consistency checks
            raise ConfigError(str(e)) from None
    return Job(margs, dargs, mthd, eargs, targs)


def resolve_run_dir(job: Job) -> tuple[RunDir, dict[str, Any]]:
    """What this invocation does with ``--output_dir``, decided before anything is written: the same run resumes or
    is finished, another is refused (:func:`run_dir_plan`). Returns the decision and the run's fingerprint."""
    fingerprint = run_fingerprint(job.margs, job.dargs, job.mthd, job.targs)
    plan = run_dir_plan(job.out, fingerprint, job.mthd, _inputs(job.margs, job.dargs, job.mthd))
    if plan.finished:
        logger.info(f"{job.out} holds this run, finished (step {plan.step}); nothing to do. Pass --overwrite to train "
                    "it again, or choose a new --output_dir")
    elif plan.resume_from:
        logger.info(f"resuming from {plan.resume_from}")
    elif plan.existing:
        logger.info(f"{job.out} holds this run, stopped before its first checkpoint: starting it again")
    return plan, fingerprint


def read_data(job: Job, plan: RunDir, fingerprint: dict[str, Any]) -> TrainData:
    """The dataset records, validated as 'llavatune check' does, and every image verified, before anything is
    written (rank 0 first; the other ranks then reuse its remembered image verdicts); then rank 0 prepares the
    output directory and records the run as running."""
    dargs, mthd, targs, out = job.dargs, job.mthd, job.targs, job.out
    with targs.main_process_first(desc="validate data"):
        train_records, train_roots, val_records, val_roots, validations, cache = validate_training_data(dargs, out)
        if targs.process_index == 0:
            images = [str(f) for v in validations for f in v.image_files] if mthd.overwrite else []
            prepare_output_dir(out, overwrite=mthd.overwrite, resume=plan.existing or plan.resume_from is not None,
                               kind="train", inputs={**_inputs(job.margs, dargs, mthd), "an image of the data": images})
            write_run_state(out, fingerprint, "running")
            write_validation_files(out, validations, cache)
    n_prior = {"train": len(validations[0].bad), "validation": len(validations[1].bad) if dargs.val_data else 0}
    return TrainData(train_records, train_roots, val_records, val_roots, n_prior)


def base_model_ref(job: Job, data: TrainData) -> str:
    """``--model`` as a llava-hf directory or hub id: the built-in tiny models, ``compose`` and ``--smoke`` are
    written into ``OUTPUT_DIR/base_model`` first (by rank 0; resuming reuses the very same base and tokenizer)."""
    from llavatune.model.families import TINY_MODELS

    margs, mthd, targs = job.margs, job.mthd, job.targs
    if not (margs.model in TINY_MODELS or margs.model == "compose" or mthd.smoke):
        return margs.model
    base_dir = job.out / BASE_MODEL_DIR
    with targs.main_process_first(desc="build base model"):
        if targs.process_index == 0 and not (base_dir / "config.json").is_file():
            with deepspeed_zero3_init_disabled():
                texts = collect_texts(data.train_records + data.val_records)
                build_base(margs, mthd, base_dir, texts, data.train_records, data.train_roots, job.template)
    return str(base_dir.resolve())


def load_model(job: Job, data: TrainData) -> LoadedModel:
    """Turn ``--model`` into a llava-hf directory or hub id, load it (quantized for QLoRA), load a stage-1
    projector if given, and apply the method (LoRA / QLoRA / full; the projector only in stage 1)."""
    import torch

    from llavatune.model import loader

    margs, mthd, targs = job.margs, job.mthd, job.targs
    base_ref = base_model_ref(job, data)
    dtype = loader.resolve_dtype(margs.dtype, targs.use_cpu)
    quant = None
    fam = loader.check_family(loader.check_model_ref(base_ref), "--model", margs.trust_remote_code)
    refuse_zero3(fam, mthd.zero)  # validate() did this for --model; a compose or --smoke base is known only now
    if mthd.stage == "finetune" and mthd.method == "qlora":
        cdtype = dtype if mthd.bnb_4bit_compute_dtype == "auto" else loader.resolve_dtype(mthd.bnb_4bit_compute_dtype)
        quant = loader.quantization_kwargs(mthd.bits, mthd.bnb_4bit_quant_type, mthd.bnb_4bit_use_double_quant, cdtype,
                                           fam)
    if targs.deepspeed and torch.distributed.is_initialized():
        # accelerate's CPU (gloo) path starts torch.distributed itself; DeepSpeed's own comm layer must wrap
        # that group too, or ZeRO-3's zero.Init sizes its partitions for a world of one.
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    from transformers import set_seed

    # the LoRA (and any new) weights are drawn when the model is wrapped, before the Trainer seeds: seed here, so
    # the same --seed gives the same run even after other work in the process (a second train, a benchmark)
    set_seed(targs.seed)
    model, processor = loader.load_base(
        base_ref, dtype, quantization=quant, trust_remote_code=margs.trust_remote_code,
        attn_implementation=margs.attn_implementation,
    )
    if margs.pretrained_projector:
        loader.load_projector(model, margs.pretrained_projector)
        logger.info(f"loaded stage-1 projector ({', '.join(fam.projector)}) from {margs.pretrained_projector}")
    if mthd.stage == "pretrain":
        logger.info(f"stage pretrain ({fam.name}): trains {fam.stage1}")
    model = loader.apply_method(model, mthd.stage, mthd.method, mthd, targs.gradient_checkpointing or False,
                                autocast="bf16" if targs.bf16 else "fp16" if targs.fp16 else None)
    logger.info(loader.parameter_summary(model))
    return LoadedModel(model, processor, base_ref, quant)


def build_datasets(job: Job, data: TrainData, processor) -> tuple[Encoder, LlavaDataset, LlavaDataset | None]:
    """Tokenize, mask and self-check before any training step: a split with no usable sample, or with more masking
    failures than ``--max_masking_failures``, is refused. Rank 0 shows the first sample as the model sees it."""
    dargs = job.dargs
    encoder = Encoder(processor, template=job.template, max_length=dargs.max_length, truncation=dargs.truncation)
    train_ds = LlavaDataset(data.train_records, encoder, data.train_roots, name="train",
                            prior_skipped=data.n_prior["train"])
    val_ds = (LlavaDataset(data.val_records, encoder, data.val_roots, name="validation",
                           prior_skipped=data.n_prior["validation"])
              if data.val_records else None)
    for ds in (train_ds, val_ds):
        if ds is None:
            continue
        logger.info(ds.report())
        if len(ds) == 0:
            raise UserError(f"{ds.name}: no usable samples ({ds.report()})")
        bad = len(ds.masking_problems) / len(ds)
        if bad > dargs.max_masking_failures:
            ref, why = ds.masking_problems[0]
            raise UserError(
                f"{ds.name}: masking self-check failed on {len(ds.masking_problems)}/{len(ds)} samples (e.g. {ref}: "
                f"{why}); training would learn from the wrong tokens. Check --template against the model"
            )
    if job.targs.process_index == 0:
        logger.info(first_sample(train_ds))  # what the model sees (llavatune check DATA --model M --show N shows more)
    return encoder, train_ds, val_ds


def write_config(job: Job) -> None:
    """``OUTPUT_DIR/llavatune_config.yaml``: the options as resolved, which ``llavatune train`` reads back (rank 0)."""
    if job.targs.process_index == 0:
        save_resolved(job.out / CONFIG_FILE, {"model": job.margs, "data": job.dargs, "method": job.mthd,
                                              "eval": job.eargs, "training": job.targs})


def run_meta(job: Job, loaded: LoadedModel) -> dict[str, Any]:
    """What every checkpoint and the final weights record of how they were trained (``llavatune_checkpoint.json``)."""
    mthd = job.mthd
    meta = {
        "base_model": loaded.base_ref,
        "stage": mthd.stage,
        "method": mthd.method if mthd.stage == "finetune" else "projector",
        "template": job.template,
        "max_length": job.dargs.max_length,
    }
    if loaded.quant:
        meta["quantization"] = {"bits": mthd.bits, "quant_type": mthd.bnb_4bit_quant_type,
                                "double_quant": mthd.bnb_4bit_use_double_quant}
    return meta


def generation_eval_hook(job: Job, data: TrainData, encoder: Encoder):
    """The VQA-accuracy evaluation run inside every evaluation of stage 2 (``--generation_eval``), or None."""
    eargs, mthd, targs = job.eargs, job.mthd, job.targs
    if not (data.val_records and eargs.generation_eval and mthd.stage == "finetune"):
        return None
    from llavatune.eval.evaluate import EvalSet, make_generation_eval
    from llavatune.infer.generate import parse_stop

    val_records = data.val_records
    subset = val_records[: eargs.eval_max_samples] if eargs.eval_max_samples else val_records
    eset = EvalSet.from_records(subset, data.val_roots[0], max_questions=eargs.eval_max_samples)
    zero3 = bool(targs.deepspeed) and "zero3" in str(mthd.zero)
    return make_generation_eval(
        encoder, eset, targs.per_device_eval_batch_size, eargs.eval_max_new_tokens, parse_stop(eargs.eval_stop),
        job.out, shown=eargs.eval_predictions_shown, synced_gpus=zero3, share_prefix=eargs.share_image_prefix,
    )


def build_trainer(job: Job, data: TrainData, loaded: LoadedModel, meta: dict[str, Any],
                  datasets: tuple[Encoder, LlavaDataset, LlavaDataset | None], extra_callbacks=()):
    """Wire evaluation and callbacks (self-contained checkpoints, ``metrics.jsonl``, early stopping) into the
    ``LlavaTrainer``."""
    from llavatune.train.llava_trainer import CheckpointCallback, LlavaTrainer, MetricsJsonlCallback

    mthd, eargs, out = job.mthd, job.eargs, job.out
    encoder, train_ds, val_ds = datasets
    callbacks = [
        CheckpointCallback(loaded.processor, meta, out / CONFIG_FILE, loaded.model.config),
        MetricsJsonlCallback(out / METRICS_FILE),
    ]
    callbacks += list(extra_callbacks)
    if eargs.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=eargs.early_stopping_patience))
    return LlavaTrainer(
        model=loaded.model,
        args=job.targs,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=encoder.collator(),
        processing_class=loaded.processor,
        callbacks=callbacks,
        projector_lr=mthd.projector_lr,
        vision_lr=mthd.vision_lr,
        lengths=train_ds.lengths,
        generation_eval=generation_eval_hook(job, data, encoder),
        overfit_patience=eargs.overfit_patience,
        blank_image_inputs=blank_image_inputs(encoder) if mthd.zero and "zero3" in str(mthd.zero) else None,
    )


def finish(job: Job, trainer, loaded: LoadedModel, meta: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Final weights (adapter or full model) and everything needed to load them alone, the run recorded as
    finished, and the run report (a report problem never fails training)."""
    from llavatune.model import loader
    from llavatune.train.llava_trainer import finish_checkpoint

    out = job.out
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    finish_checkpoint(out, loaded.processor, meta, out / CONFIG_FILE, loaded.model.config)
    write_run_state(out, fingerprint, "finished", trainer.state.global_step)
    logger.info(f"done: weights, processor and config in {out}")
    try:  # run report (report.html / report.md)
        from llavatune.report import write_report

        logger.info(f"report: {write_report(out, params=loader.parameter_summary(loaded.model))}")
    except Exception as e:  # noqa: BLE001
        logger.warning(f"run report not written ({type(e).__name__}: {e}); retry with 'llavatune report {out}'")


def train(margs: ModelArgs, dargs: DataArgs, mthd: MethodArgs, eargs: EvalArgs,
          targs: LlavaTrainingArguments, extra_callbacks: tuple = ()):
    """Run one training job; returns the ``LlavaTrainer`` (its ``model`` is the trained model), or None when
    ``--output_dir`` holds this run, finished."""
    job = resolve_arguments(margs, dargs, mthd, eargs, targs)
    plan, fingerprint = resolve_run_dir(job)
    if plan.finished:
        return None
    data = read_data(job, plan, fingerprint)
    loaded = load_model(job, data)
    datasets = build_datasets(job, data, loaded.processor)
    write_config(job)
    meta = run_meta(job, loaded)
    trainer = build_trainer(job, data, loaded, meta, datasets, extra_callbacks)
    say_device(job.targs)
    train_with_one_line_errors(trainer, plan.resume_from)
    finish(job, trainer, loaded, meta, fingerprint)
    return trainer


def main(argv: list[str], prog: str) -> int:
    margs, dargs, mthd, eargs, targs = parse_config(SECTIONS, argv, prog=prog, description=__doc__.split("\n\n")[0],
                                                    adjust=device_options)
    train(margs, dargs, mthd, eargs, targs)
    finish_distributed()
    return 0

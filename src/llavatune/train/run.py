"""``llavatune train [CONFIG.yaml] [--flag value ...]`` — the training recipe, top to bottom.

    llavatune train --model tiny --data DIR/data.json --val_data VALDIR/data.json --output_dir RUN --num_train_epochs 3
    llavatune train configs/llava15_7b_okvqa_qlora.yaml
    torchrun --nproc_per_node 2 -m llavatune.cli train configs/... --zero zero2

Stage 1 (``--stage pretrain``) trains the projector on captions; stage 2 (``--stage finetune``) trains
projector + LLM (LoRA, QLoRA or full) with the vision tower frozen. Output: ``OUTPUT_DIR`` holds the final
weights (adapter or full), processor, ``llavatune_config.yaml``, ``metrics.jsonl`` and ``checkpoint-N``
folders, each loadable on its own.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from llavatune.config import ConfigError, parse_config, save_resolved
from llavatune.data.encode import Encoder, LlavaCollator, LlavaDataset
from llavatune.data.records import Record, image_root, load_records, normalize_image_placement
from llavatune.data.show import first_sample
from llavatune.train.train_config import DataArgs, EvalArgs, LlavaTrainingArguments, MethodArgs, ModelArgs
from llavatune.utils import UserError, finish_distributed, prepare_output_dir, resolve_under

logger = logging.getLogger("llavatune")
CONFIG_FILE = "llavatune_config.yaml"
SECTIONS = (ModelArgs, DataArgs, MethodArgs, EvalArgs, LlavaTrainingArguments)


def deepspeed_config(zero: str) -> str:
    """Short name (zero2, zero3, zero3_offload) of a shipped config, or a path to a user's JSON."""
    if Path(zero).is_file():
        return str(Path(zero).resolve())
    shipped = resources.files("llavatune") / "configs" / "deepspeed" / f"{zero}.json"
    if not shipped.is_file():
        raise ConfigError(f"--zero: {zero!r} is neither zero2, zero3, zero3_offload nor an existing JSON file")
    return str(shipped)


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
    if mthd.method == "qlora" and mthd.stage == "finetune":
        if mthd.zero and "zero3" in mthd.zero:
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


@contextmanager
def zero3_init_disabled():
    """Build a model on one rank without DeepSpeed's ``zero.Init`` (which expects every rank to take part).

    Only used for writing the tiny/composed base to disk on the main process; loading for training then
    runs on all ranks with ZeRO-3 partitioning as usual.
    """
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def build_base(margs: ModelArgs, mthd: MethodArgs, base_dir: Path, texts: list[str],
               records: list[Record] = (), roots: list[Path] = (), template: str = "auto") -> None:
    """Write the starting llava-hf model for --model tiny, --model compose or --smoke into ``base_dir``.

    The tiny model is warm-started on the training ``records`` (text rendered with ``template``; images,
    under ``roots``, on their own): see ``llavatune.model.tiny.build_tiny``."""
    from llavatune.model import loader
    from llavatune.model.tiny import build_smoke, build_tiny

    if margs.model in ("tiny", "tiny-next"):
        images = []
        for r, root in zip(records, roots):
            for p in r.images:
                try:
                    images.append(resolve_under(root, p))
                except UserError:  # an escaping path: the dataset reports it; the warm start does without
                    pass
        build_tiny(texts, base_dir, next=margs.model == "tiny-next", conversations=[r.conversations for r in records],
                   template="plain" if mthd.stage == "pretrain" else template, images=images)
    elif mthd.smoke:
        build_smoke(margs.language_model if margs.model == "compose" else margs.model, base_dir)
    else:
        loader.compose_llava(
            margs.vision_model, margs.language_model, base_dir, margs.projector,
            margs.vision_feature_layer, margs.vision_feature_select_strategy, margs.trust_remote_code,
        )


def load_split(path: str, image_folder: str | None) -> tuple[list[Record], list[Path]]:
    records = [normalize_image_placement(r) for r in load_records(path)]
    root = image_root(path, image_folder)
    return records, [root] * len(records)


def train(margs: ModelArgs, dargs: DataArgs, mthd: MethodArgs, eargs: EvalArgs,
          targs: LlavaTrainingArguments, extra_callbacks: tuple = ()):
    """Run one training job; returns the ``LlavaTrainer`` (its ``model`` is the trained model)."""
    import torch

    from llavatune.model import loader
    from llavatune.train.llava_trainer import (
        CheckpointCallback,
        LlavaTrainer,
        MetricsJsonlCallback,
        finish_checkpoint,
        latest_checkpoint,
    )

    validate(margs, dargs, mthd, eargs, targs)

    # Training arguments that depend on the options above. Set before the model loads: with ZeRO-3 the
    # DeepSpeed config must exist when from_pretrained runs so the weights are partitioned as they load.
    changes = {}
    if not dargs.val_data and targs.eval_strategy != "no":
        changes["eval_strategy"] = "no"
    if mthd.zero:
        changes["deepspeed"] = deepspeed_config(mthd.zero)
        if not torch.cuda.is_available():
            # accelerate sets up DeepSpeed's world only through a GPU backend; on CPU-only machines it needs
            # use_cpu to pick gloo (else every rank believes it is alone and no data is sharded).
            changes["use_cpu"] = True
    if dargs.val_data and targs.eval_strategy != "no":
        # Best checkpoint by the task metric, restored at the end (HF needs a metric and matching strategies).
        gen = eargs.generation_eval and mthd.stage == "finetune"
        metric = targs.metric_for_best_model or ("vqa_accuracy" if gen else "loss")
        changes["metric_for_best_model"] = metric
        if targs.greater_is_better is None or not targs.metric_for_best_model:
            changes["greater_is_better"] = "loss" not in metric
        if targs.load_best_model_at_end is None:
            changes["load_best_model_at_end"] = targs.save_strategy == targs.eval_strategy
    if mthd.smoke:
        changes.update(max_steps=3, save_strategy="no", eval_strategy="no", load_best_model_at_end=False)
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

    # Output directory: refuse to clobber, resume when asked (or when checkpoints are there)
    out = Path(targs.output_dir)
    resume_from = None
    if mthd.resume and mthd.resume != "auto":
        resume_from = mthd.resume
    elif not mthd.overwrite and (mthd.resume == "auto" or latest_checkpoint(out)):
        resume_from = latest_checkpoint(out)
        if mthd.resume == "auto" and resume_from is None:
            raise UserError(f"--resume auto: no checkpoint-N folder in {out}")
    if resume_from and not Path(resume_from).is_dir():
        raise UserError(f"--resume: {resume_from} is not a checkpoint directory")
    if out.is_dir() and any(out.iterdir()) and not (mthd.overwrite or resume_from):
        prepare_output_dir(out)  # raises the "exists and is not empty" error, on every rank alike
    with targs.main_process_first(desc="output directory"):
        if targs.process_index == 0:
            prepare_output_dir(out, overwrite=mthd.overwrite, resume=resume_from is not None)
    if resume_from:
        logger.info(f"resuming from {resume_from}")

    # Dataset records
    train_records, train_roots = load_split(dargs.data, dargs.image_folder)
    if dargs.max_train_samples:
        train_records, train_roots = train_records[: dargs.max_train_samples], train_roots[: dargs.max_train_samples]
    val_records, val_roots = load_split(dargs.val_data, dargs.image_folder) if dargs.val_data else ([], [])

    # Model: turn --model into a llava-hf directory or hub id, then load (quantized for QLoRA)
    base_dir = out / "base_model"
    texts = loader.collect_texts(train_records + val_records)
    if margs.model in ("tiny", "tiny-next", "compose") or mthd.smoke:
        with targs.main_process_first(desc="build base model"):
            # resuming reuses the very same base (and tokenizer)
            if targs.process_index == 0 and not (base_dir / "config.json").is_file():
                with zero3_init_disabled():
                    build_base(margs, mthd, base_dir, texts, train_records, train_roots, dargs.template)
        base_ref = str(base_dir.resolve())
    else:
        base_ref = margs.model
    dtype = loader.resolve_dtype(margs.dtype, targs.use_cpu)
    quant = None
    if mthd.stage == "finetune" and mthd.method == "qlora":
        cdtype = dtype if mthd.bnb_4bit_compute_dtype == "auto" else loader.resolve_dtype(mthd.bnb_4bit_compute_dtype)
        quant = loader.quantization_kwargs(mthd.bits, mthd.bnb_4bit_quant_type, mthd.bnb_4bit_use_double_quant, cdtype)
    if targs.deepspeed and torch.distributed.is_initialized():
        # accelerate's CPU (gloo) path starts torch.distributed itself; DeepSpeed's own comm layer must wrap
        # that group too, or ZeRO-3's zero.Init sizes its partitions for a world of one.
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    model, processor = loader.load_base(
        base_ref, dtype, quantization=quant, trust_remote_code=margs.trust_remote_code,
        attn_implementation=margs.attn_implementation,
    )
    if margs.pretrained_projector:
        state = loader.projector_state(margs.pretrained_projector)
        model.model.multi_modal_projector.load_state_dict(state)
        logger.info(f"loaded stage-1 projector from {margs.pretrained_projector}")
    model = loader.apply_method(model, mthd.stage, mthd.method, mthd, targs.gradient_checkpointing or False,
                                autocast=bool(targs.bf16 or targs.fp16))
    logger.info(loader.parameter_summary(model))

    # Tokenize, mask and self-check before any training step
    template = "plain" if mthd.stage == "pretrain" else dargs.template
    encoder = Encoder(processor, template=template, max_length=dargs.max_length, truncation=dargs.truncation)
    train_ds = LlavaDataset(train_records, encoder, train_roots, name="train")
    val_ds = LlavaDataset(val_records, encoder, val_roots, name="validation") if val_records else None
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
    logger.info(first_sample(train_ds))  # what the model sees (llavatune check DATA --model M --show N shows more)

    config_path = out / CONFIG_FILE
    if targs.process_index == 0:
        save_resolved(config_path, {"model": margs, "data": dargs, "method": mthd, "eval": eargs, "training": targs})
    meta = {
        "base_model": base_ref,
        "stage": mthd.stage,
        "method": mthd.method if mthd.stage == "finetune" else "projector",
        "template": template,
        "max_length": dargs.max_length,
    }
    if quant:
        meta["quantization"] = {"bits": mthd.bits, "quant_type": mthd.bnb_4bit_quant_type,
                                "double_quant": mthd.bnb_4bit_use_double_quant}

    generation_eval = None
    if val_ds is not None and eargs.generation_eval and mthd.stage == "finetune":
        from llavatune.eval.evaluate import EvalSet, make_generation_eval
        from llavatune.infer.generate import parse_stop

        subset = val_records[: eargs.eval_max_samples] if eargs.eval_max_samples else val_records
        eset = EvalSet.from_records(subset, val_roots[0])
        zero3 = bool(targs.deepspeed) and "zero3" in str(mthd.zero)
        stop = parse_stop(eargs.eval_stop)
        generation_eval = make_generation_eval(
            encoder, eset, targs.per_device_eval_batch_size, eargs.eval_max_new_tokens, stop, out,
            step_fn=lambda: trainer.state.global_step, shown=eargs.eval_predictions_shown, synced_gpus=zero3,
        )
    callbacks = [
        CheckpointCallback(processor, meta, config_path, model.config),
        MetricsJsonlCallback(out / "metrics.jsonl"),
    ]
    callbacks += list(extra_callbacks)
    if eargs.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=eargs.early_stopping_patience))

    trainer = LlavaTrainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=LlavaCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=callbacks,
        projector_lr=mthd.projector_lr,
        vision_lr=mthd.vision_lr,
        lengths=train_ds.lengths,
        generation_eval=generation_eval,
        overfit_patience=eargs.overfit_patience,
    )
    trainer.train(resume_from_checkpoint=resume_from)

    # Final weights (adapter or full model) + everything needed to load them alone
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        finish_checkpoint(out, processor, meta, config_path, model.config)
        logger.info(f"done: weights, processor and config in {out}")
        try:  # run report (report.html / report.md); a report problem never fails training
            from llavatune.report import write_report

            logger.info(f"report: {write_report(out, params=loader.parameter_summary(model))}")
        except Exception as e:  # noqa: BLE001
            logger.warning(f"run report not written ({type(e).__name__}: {e}); retry with 'llavatune report {out}'")
    return trainer


def main(argv: list[str], prog: str) -> int:
    margs, dargs, mthd, eargs, targs = parse_config(SECTIONS, argv, prog=prog, description=__doc__.split("\n\n")[0])
    train(margs, dargs, mthd, eargs, targs)
    finish_distributed()
    return 0

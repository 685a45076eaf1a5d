"""``LlavaTrainer``: HF ``Trainer`` with per-module learning rates, image-aware length grouping, and
self-contained checkpoints.

Everything else (loop, mixed precision, accumulation, DeepSpeed, resume) is the stock Trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from llavatune.files import BASE_CONFIG_FILE, METRICS_FILE
from llavatune.model.loader import model_family, write_meta
from llavatune.model.loss import supervised_lm_loss, supervised_positions
from llavatune.utils import atomic_write_text

logger = logging.getLogger("llavatune")


def _sum_floats(obj) -> torch.Tensor:
    """The sum of every floating-point tensor in a model output (tensors, lists, tuples, ModelOutputs)."""
    parts: list[torch.Tensor] = []

    def walk(x):
        if torch.is_tensor(x):
            if x.is_floating_point():
                parts.append(x.float().sum())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return torch.stack([p.to(parts[0].device) for p in parts]).sum() if parts else torch.zeros(())


class LlavaTrainer(Trainer):
    """``Trainer`` + per-module learning rates, image-aware length grouping, generation-based metrics, and
    logits computed only where a label is (``supervised_positions``; same loss, less memory and compute).

    ``generation_eval(model, global_step) -> {"vqa_accuracy": ..., ...}`` runs inside every evaluation, so its
    metrics arrive with ``eval_loss`` in the same log record: TensorBoard/W&B, ``metrics.jsonl``, best-checkpoint
    selection (``metric_for_best_model``) and early stopping all see them. It gets the global step from the trainer
    (the step its ``eval_predictions/step-N.jsonl`` is named after).
    """

    def __init__(self, *args, projector_lr: float | None = None, vision_lr: float | None = None,
                 lengths: list[int] | None = None, generation_eval=None, overfit_patience: int = 2,
                 blank_image_inputs: dict[str, torch.Tensor] | None = None, **kwargs):
        from llavatune.train.train_config import pin_memory_possible

        targs = kwargs.get("args")
        if targs is not None and targs.dataloader_pin_memory and not pin_memory_possible():
            # set here, after the run's config was saved with the user's value (a GPU rerun of it pins again)
            targs.dataloader_pin_memory = False
        self.projector_lr = projector_lr
        self.blank_image_inputs = blank_image_inputs
        self.vision_lr = vision_lr
        self.lengths = lengths
        self.generation_eval = generation_eval
        self.overfit_patience = overfit_patience
        self._eval_history: list[tuple[int, float, float | None]] = []  # (step, eval_loss, mean train loss)
        self._blank_hooks: list = []
        # The Trainer's own hook for a custom loss: it pops the labels, counts supervised tokens across the
        # accumulated batch (num_items_in_batch) and scales for accumulation and devices as for the model's loss
        kwargs.setdefault("compute_loss_func", supervised_lm_loss)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.is_deepspeed_enabled and self.accelerator.deepspeed_plugin.zero_stage == 3 and not self._blank_hooks:
            self._install_blank_image_hooks(model)
        if self.compute_loss_func is supervised_lm_loss and inputs.get("labels") is not None:
            inputs = {**inputs, "logits_to_keep": supervised_positions(inputs["labels"])}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _install_blank_image_hooks(self, model) -> None:
        """Under ZeRO-3, a forward pass whose batch has no image still runs the vision tower and projector (on a
        blank image, with zero weight in the loss), so every rank gathers the same parameters in the same order.
        Mixed text-only / image batches across ranks would otherwise hang the run (DeepSpeed #7170, LLaVA #1746).
        Hooks, not a separate call, so the extra work happens inside the DeepSpeed engine's forward. The blank image's
        inputs are the family's own (``blank_image_inputs``: what its image processor makes of a blank image), fed to
        the model's ``get_image_features``, which every family has."""
        if not self.blank_image_inputs:
            return
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        inner = base.model
        state: dict[str, bool] = {}

        def before(module, args, kwargs):
            state["need"] = module.training and kwargs.get("pixel_values") is None

        def after_embed(module, args, output):
            # The models embed the tokens, *then* run the vision tower: keep that order on every rank. The blank
            # features enter the token embeddings (times zero), like real image features, so the backward pass
            # also visits the LLM, then the projector, in the same order everywhere.
            if state.pop("need", False):
                dtype = next(p.dtype for p in inner.parameters() if p.dtype.is_floating_point)
                blank = {k: v.to(output.device, dtype=dtype if v.is_floating_point() else None)
                         for k, v in self.blank_image_inputs.items()}
                return output + 0.0 * _sum_floats(inner.get_image_features(**blank)).to(output.dtype)
            return output

        self._blank_hooks = [
            inner.register_forward_pre_hook(before, with_kwargs=True),
            inner.get_input_embeddings().register_forward_hook(after_embed),
        ]

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if metric_key_prefix != "eval":
            return output
        if self.generation_eval is not None:
            # generate() reaches the inner model's forward, not the one accelerate wrapped in autocast: enter it
            # here, so generation runs in the training precision (QLoRA's 16-bit frozen weights need it)
            with self.accelerator.autocast():
                metrics = self.generation_eval(self.model, self.state.global_step)
            for k, v in metrics.items():
                output.metrics[f"{metric_key_prefix}_{k}"] = v
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_overfitting"] = float(self._overfitting(loss))
        return output

    def _overfitting(self, eval_loss: float) -> bool:
        """Validation loss rose ``overfit_patience`` evaluations in a row while training loss fell."""
        last_step = self._eval_history[-1][0] if self._eval_history else -1
        recent = [h["loss"] for h in self.state.log_history if "loss" in h and h.get("step", 0) > last_step]
        train_loss = sum(recent) / len(recent) if recent else None
        self._eval_history.append((self.state.global_step, eval_loss, train_loss))
        k = self.overfit_patience
        if len(self._eval_history) <= k:
            return False
        window = self._eval_history[-(k + 1):]
        val_up = all(b[1] > a[1] for a, b in zip(window, window[1:]))
        trains = [w[2] for w in window]
        train_down = None not in trains and all(b < a for a, b in zip(trains, trains[1:]))
        if val_up and train_down:
            logger.warning(
                f"overfitting: validation loss rose for {k} evaluations in a row "
                f"({' -> '.join(f'{w[1]:.4f}' for w in window)}) while training loss fell; "
                "consider fewer epochs, a lower learning rate, or --early_stopping_patience"
            )
            return True
        return False

    def create_optimizer(self, model=None):
        """AdamW (or ``--optim``) with separate learning rates for projector and vision tower."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        base_lr = self.args.learning_rate
        fam = model_family(opt_model)  # which parameters are projector / vision tower: the family table says
        groups: dict[tuple[str, bool], dict[str, Any]] = {}
        for name, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            part = fam.parameter_group(name, lora=False)
            if part == "projector" and self.projector_lr is not None:
                key, lr = "projector", self.projector_lr
            elif part == "vision" and self.vision_lr is not None:
                key, lr = "vision", self.vision_lr
            else:
                key, lr = "default", base_lr
            g = groups.setdefault(
                (key, name in decay),
                {"params": [], "lr": lr, "weight_decay": self.args.weight_decay if name in decay else 0.0},
            )
            g["params"].append(p)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(list(groups.values()), lr=base_lr, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        # Group by the real sequence length, image tokens included, without loading any image.
        if self.args.train_sampling_strategy == "group_by_length" and self.lengths is not None:
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=self.lengths,
            )
        return super()._get_train_sampler(train_dataset)


class CheckpointCallback(TrainerCallback):
    """Make every ``checkpoint-N`` self-contained: processor + tokenizer, model config, run config, metadata.

    Without these, intermediate checkpoints cannot be evaluated or merged on their own (LLaVA #729, #844,
    #1245). The projector is already inside the adapter (PEFT ``modules_to_save``) or the full weights.
    """

    def __init__(self, processor, meta: dict, config_path: Path, model_config):
        self.processor = processor
        self.meta = meta
        self.config_path = config_path
        self.model_config = model_config

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            finish_checkpoint(ckpt, self.processor, self.meta, self.config_path, self.model_config)


def finish_checkpoint(ckpt: Path, processor, meta: dict, config_path: Path | None, model_config) -> None:
    processor.save_pretrained(ckpt)
    if not (ckpt / "config.json").exists():
        # adapter checkpoints: keep the base model's config for reference (loading goes through the adapter)
        model_config.to_json_file(str(ckpt / BASE_CONFIG_FILE))
    if config_path is not None and config_path.exists() and config_path.parent.resolve() != ckpt.resolve():
        shutil.copy2(config_path, ckpt / config_path.name)
    write_meta(ckpt, meta)


class MetricsJsonlCallback(TrainerCallback):
    """Append every log (loss, lr, eval metrics) as one JSON line to ``OUTPUT_DIR/metrics.jsonl``.

    When training begins, rows past the step it begins at are dropped (atomically): after a resume from
    ``checkpoint-N`` the steps between N and the interruption are logged again, and must appear once, not twice;
    a fresh start in a run folder keeps nothing of an earlier attempt.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                row = json.loads(line)
                step = int(row.get("step", 0)) if isinstance(row, dict) else None
            except (ValueError, TypeError):
                step = None  # a torn last line from the interrupted run
            if step is not None and step <= state.global_step and "train_runtime" not in row:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
        if dropped:
            atomic_write_text(self.path, "".join(kept))
            logger.info(f"{METRICS_FILE}: dropped {dropped} row(s) logged after step {state.global_step} by the "
                        "interrupted attempt (they are logged again as training continues)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    p = Path(output_dir)
    return get_last_checkpoint(str(p)) if p.is_dir() else None

"""Options of ``llavatune train``: model, data, method, and HF ``TrainingArguments`` (with LLaVA defaults).

Every field is a flag (``--lora_r 64``) and a YAML key (``lora_r: 64``); docstrings are the help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import TrainingArguments

from llavatune.config import ConfigError, config
from llavatune.data.images import MAX_PIXELS
from llavatune.data.records import MAX_BAD_RECORDS
from llavatune.data.templates import TemplateName


@config
class ModelArgs:
    model: str = "tiny"
    """What to train: a hub id or local folder of a supported family (llava-hf/llava-1.5-7b-hf,
    llava-hf/llava-v1.6-mistral-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct, google/gemma-3-4b-it, ...; docs/models.md lists
    them), a built-in tiny model ('tiny' LLaVA-1.5, warm-started on the data's text and images like a pretrained one;
    'tiny-next'; 'tiny-<family>' for the other families, e.g. 'tiny-qwen2_5_vl', 'tiny-gemma3': docs/models.md), or
    'compose' to build a new LLaVA from --vision_model and --language_model."""
    vision_model: Optional[str] = None
    """With --model compose: the vision encoder (CLIP or SigLIP; hub id or local path), e.g.
    openai/clip-vit-large-patch14-336."""
    language_model: Optional[str] = None
    """With --model compose: the causal LM (hub id or local path), e.g. lmsys/vicuna-7b-v1.5."""
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    """With --model compose: projector type. 'linear' is stored as llava-hf's two-layer projector with an identity
    activation, so stock transformers still loads it."""
    vision_feature_layer: int = -2
    """With --model compose: which vision-tower layer feeds the projector (LLaVA-1.5 uses -2)."""
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    """With --model compose: 'default' drops the CLS token (LLaVA-1.5), 'full' keeps it."""
    pretrained_projector: Optional[str] = None
    """A stage-1 output (directory or .safetensors file) whose projector weights (the family's: multi_modal_projector,
    Qwen-VL's visual.merger, ...) are loaded before training: the usual start of stage 2 on a composed model."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype. 'auto': bfloat16 on a GPU that supports it, else float32 (CPU)."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off by default; turn on only for repositories you trust."""
    attn_implementation: Optional[str] = None
    """Attention kernel passed to from_pretrained (sdpa, eager, flash_attention_2). Default: transformers' choice."""


@config
class DataArgs:
    data: Optional[str] = None
    """Training data: LLaVA-format .json/.jsonl (or messages format). Image paths resolve relative to this file's
    folder unless --image_folder is given."""
    val_data: Optional[str] = None
    """Validation data (same formats), used for validation loss and VQA accuracy between epochs."""
    image_folder: Optional[str] = None
    """Folder that image paths are relative to (default: the folder of each data file)."""
    template: TemplateName = "auto"
    """Prompt template. 'auto': the processor's chat template if it has one (Qwen-VL, Gemma 3, LLaVA-OneVision, ...),
    else the family's own format (paligemma), else vicuna_v1. The others render the original LLaVA conv_templates byte
    for byte (vicuna_v1 = v1: LLaVA-1.5; chatml is not an original LLaVA template: ChatML with newlines; paligemma:
    images, <bos>, question, newline). Stage 'pretrain' always uses 'plain'. 'llavatune check DATA --model M --show 3' prints the
    rendered samples."""
    max_length: int = 2048
    """Maximum tokens per sample, image tokens included."""
    truncation: Literal["drop", "truncate"] = "drop"
    """Over-length samples: 'drop' them (counted and reported) or 'truncate' their text tail (never through image
    tokens)."""
    max_train_samples: Optional[int] = None
    """Use only the first N training samples (quick experiments)."""
    max_masking_failures: float = 0.05
    """Abort before training if more than this fraction of samples fail the masking self-check (labels that do not
    decode back to the answer text)."""
    max_bad_records: float = MAX_BAD_RECORDS
    """Records with problems (the errors 'llavatune check' reports: bad images, malformed turns, duplicate ids,
    empty answers, placeholder/image mismatches) are skipped and listed, in the log and in OUTPUT_DIR/
    skipped_records.jsonl, up to this fraction of a data file; past it the file is refused before training. A file
    that is itself wrong (not JSON, not a list, not UTF-8, empty) is always refused."""
    max_pixels: int = MAX_PIXELS
    """Images with more pixels than this are bad records (decompression-bomb guard; Pillow's own limit)."""
    image_workers: Optional[int] = None
    """Processes that verify the images before step 1 (default: one per available CPU core). Verdicts are remembered
    in OUTPUT_DIR/image_checks.json per file, size and modification time."""

    def __post_init__(self):
        if not 0 <= self.max_bad_records <= 1:
            raise ConfigError(f"--max_bad_records: a fraction in [0, 1], got {self.max_bad_records}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max_pixels: must be at least 1, got {self.max_pixels}")
        if self.image_workers is not None and self.image_workers < 1:
            raise ConfigError(f"--image_workers: must be at least 1, got {self.image_workers}")


@config
class MethodArgs:
    stage: Literal["pretrain", "finetune"] = "finetune"
    """'pretrain' (stage 1): train the projector only on captions, with the 'plain' template. 'finetune' (stage 2):
    train projector + LLM, vision tower frozen unless --train_vision says otherwise."""
    method: Literal["lora", "qlora", "full"] = "lora"
    """How the LLM is trained in stage 'finetune': LoRA adapters, QLoRA (LLM quantized with bitsandbytes, LoRA on
    top), or full fine-tuning."""
    bits: Literal[4, 8] = 4
    """With --method qlora: quantize the LLM to 4-bit NF4 (default) or 8-bit."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """With --method qlora: 4-bit quantization type."""
    bnb_4bit_use_double_quant: bool = True
    """With --method qlora: quantize the quantization constants too (saves ~0.4 bits/param)."""
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """With --method qlora: dtype of the matmuls on dequantized weights ('auto': the training precision)."""
    lora_r: int = 128
    """LoRA rank (LLaVA-1.5 task LoRA: 128)."""
    lora_alpha: int = 256
    """LoRA alpha (LLaVA-1.5 task LoRA: 256)."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: Optional[str] = None
    """Comma-separated module names to adapt. Default: every linear layer of the LLM (not the vision tower, not the
    projector, not lm_head)."""
    lora_modules_to_save: Optional[str] = None
    """Comma-separated modules trained fully (not LoRA) next to the adapter and saved inside it, e.g. 'lm_head' or
    'embed_tokens,lm_head' when tokens were added. The projector is always among them."""
    train_vision: Literal["frozen", "full", "lora"] = "frozen"
    """Vision tower in stage 'finetune': frozen (LLaVA default), trained fully, or with LoRA."""
    projector_lr: Optional[float] = None
    """Learning rate of the projector (default: --learning_rate). LLaVA's task LoRA recipe uses 2e-5."""
    vision_lr: Optional[float] = None
    """Learning rate of the vision tower when it trains (default: --learning_rate)."""
    zero: Optional[str] = None
    """DeepSpeed: 'zero2', 'zero3', 'zero3_offload' (configs shipped with llavatune) or a path to a DeepSpeed JSON.
    Launch with torchrun / accelerate launch / deepspeed for several GPUs."""
    smoke: bool = False
    """Smoke test: swap in a tiny model of the same families and run a few steps end to end, to catch data and
    config bugs before renting a GPU."""
    overwrite: bool = False
    """Replace --output_dir when it holds an earlier llavatune run (never a folder of other files, never one that
    holds an input)."""
    resume: Optional[str] = field(default=None, metadata={"nargs": "?", "const": "auto"})
    """Resume training: bare --resume (or 'auto') continues from the latest checkpoint in --output_dir, or give a
    checkpoint directory. Without it, re-running the same command into its --output_dir resumes automatically, says
    'finished' when the run is complete, and refuses when the data, model, method or a training option that changes
    the result differs from the run recorded there."""

    def __post_init__(self):
        if self.resume is True:  # YAML "resume: true"
            self.resume = "auto"
        elif self.resume is False or self.resume == "":
            self.resume = None
        if self.resume is not None and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: choose one")
        if self.lora_r <= 0:
            raise ConfigError(f"--lora_r: must be positive, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout: must be in [0, 1), got {self.lora_dropout}")


@config
class EvalArgs:
    generation_eval: bool = True
    """At every evaluation, also generate answers on the validation set and compute VQA accuracy (or exact match),
    not only the teacher-forced validation loss."""
    eval_max_samples: Optional[int] = 200
    """Generate on at most this many validation questions (a fixed subset, the first N; each question of a grouped
    record counts) per evaluation; 0 for all."""
    eval_max_new_tokens: int = 16
    """Maximum tokens generated per validation answer."""
    eval_stop: Optional[str] = None
    """Comma-separated stop strings for validation answers."""
    share_image_prefix: bool = True
    """Validation answers: prefill the prompt up to and including the image tokens once per image and reuse its KV
    cache for all the image's questions (same greedy answers as without; 'false' turns it off)."""
    early_stopping_patience: Optional[int] = None
    """Stop when --metric_for_best_model has not improved for this many evaluations (default: never stop early)."""
    overfit_patience: int = 2
    """Warn about overfitting when validation loss rises for this many evaluations in a row while training loss
    falls."""
    eval_predictions_shown: int = 3
    """Sample predictions printed at each evaluation."""


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    """HF TrainingArguments with LLaVA-recipe defaults (stage-2 LoRA: lr 2e-4, cosine, warmup 3 %, no decay)."""

    output_dir: Optional[str] = field(default=None, metadata={"help": "Where checkpoints, logs and reports go."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (LLaVA LoRA: 2e-4)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Warmup: steps (int) or a fraction of all steps in [0, 1) (LLaVA: 0.03)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (LLaVA: 0)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: epoch, steps or no."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate (needs --val_data)."})
    report_to: Optional[str] = field(
        default="tensorboard", metadata={"help": "tensorboard (default), wandb, all or none."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all dataset columns (required)."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "random, sequential or group_by_length (lengths count image tokens)."},
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Workers that load and preprocess images."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    load_best_model_at_end: Optional[bool] = field(
        default=None,
        metadata={"help": "Restore the best checkpoint (by --metric_for_best_model) at the end. Default: yes when "
                          "there is --val_data."},
    )
    metric_for_best_model: Optional[str] = field(
        default=None,
        metadata={"help": "Metric that picks the best checkpoint: vqa_accuracy (default with --generation_eval), "
                          "exact_match, token_f1 or loss."},
    )
    dataloader_pin_memory: bool = field(
        default=True, metadata={"help": "Pin batches in page-locked memory for faster copies to the GPU (not used "
                                        "without an accelerator, where torch would ignore it with a warning; the "
                                        "saved config keeps your value)."}
    )

    def __post_init__(self):
        # --gradient_checkpointing (the recipes' and plan's name) is transformers 5's activation_checkpointing: set the
        # new name, so TrainingArguments does not warn that the old one is deprecated (it mirrors it back itself)
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new, False) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        super().__post_init__()

    def to_dict(self) -> dict:
        """As saved in ``llavatune_config.yaml``: the options under the names llavatune's flags use (only
        ``gradient_checkpointing``: a saved ``activation_checkpointing`` would override a later
        ``--gradient_checkpointing`` flag on the saved file)."""
        d = super().to_dict()
        for new in ("activation_checkpointing", "activation_checkpointing_kwargs"):
            d.pop(new, None)
        return d


def pin_memory_possible() -> bool:
    """Whether pinned memory means anything here (an accelerator to copy to); torch warns every epoch otherwise."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; before it, CUDA is what pins
    return accelerator.is_available() if accelerator else torch.cuda.is_available()

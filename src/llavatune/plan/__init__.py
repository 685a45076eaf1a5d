"""``llavatune plan``: will this training run fit? Peak GPU memory per device, from the model config alone.

    llavatune plan configs/llava15_7b_okvqa_qlora.yaml --gpu-mem 24        # a training recipe, as train reads it
    llavatune plan --model llava-hf/llava-1.5-7b-hf --method qlora --batch 16 --max-length 2048
    llavatune plan --model llava-hf/llava-1.5-13b-hf --method full --zero zero3 --gpus 8 --gradient-checkpointing
    llavatune plan --model RUN_DIR/base_model --method lora --gpu-mem 24

Reads only the config, never weights: the shipped shapes of the models the recipes and docs name and of each
family's common sizes (offline), a local directory's config.json, a run's base_config.json, or config.json from
the hub. Given a training recipe (the YAML ``llavatune train`` reads), it takes the options that decide memory
(model, method, stage, zero, per_device_train_batch_size, max_length, gradient_checkpointing, bf16/fp16, LoRA rank
and dropout, ...) under train's names and lists the ones it ignores. Prints the breakdown (weights, optimizer
states, gradients, activations, logits, overheads), whether the peak fits ``--gpu-mem``, and what to change, each
suggestion re-estimated. The formulas and their validation against measured training steps are in docs/memory.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Literal, Optional, Sequence

from llavatune.config import ConfigError, config, parse_config
from llavatune.plan.estimate import Estimate, GiB, Settings, estimate, fmt_count
from llavatune.plan.spec import ModelSpec, load_spec

logger = logging.getLogger("llavatune")

__all__ = ["PlanArgs", "Settings", "Estimate", "ModelSpec", "estimate", "load_spec", "plan", "suggestions", "main"]


@config
class PlanArgs:
    model: str = "tiny"
    """'tiny', a hub id (the models the recipes and docs name, and each family's common sizes, are known offline;
    for others config.json is fetched, never the weights), a local model directory (or a run / checkpoint directory,
    or a config.json), or 'compose' with --vision_model and --language_model, as in 'llavatune train'."""
    vision_model: Optional[str] = None
    """With --model compose: the vision encoder, as train's --vision_model."""
    language_model: Optional[str] = None
    """With --model compose: the causal LM, as train's --language_model."""
    vision_feature_layer: int = -2
    """With --model compose: the vision-tower layer that feeds the projector, as train's."""
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    """With --model compose: 'default' drops the CLS token, 'full' keeps it, as train's."""
    stage: Literal["pretrain", "finetune"] = "finetune"
    """As 'llavatune train --stage': 'pretrain' trains the projector only; 'finetune' trains with --method."""
    method: Literal["lora", "qlora", "full"] = "lora"
    """Training method, as in 'llavatune train --method'."""
    zero: Optional[str] = None
    """DeepSpeed ZeRO, as 'llavatune train --zero': zero2 (optimizer states and gradients sharded over the GPUs), zero3
    (+ weights), zero3_offload (+ optimizer states and weights in CPU memory), or a DeepSpeed JSON file (its
    zero_optimization stage and offload settings). Default: no DeepSpeed."""
    batch: int = 16
    """Micro-batch per GPU ('llavatune train --per_device_train_batch_size'; a recipe's value is used)."""
    max_length: int = 2048
    """Tokens per sample, image tokens included (every sample is assumed padded to this length: the worst case)."""
    gpus: int = 1
    """GPUs the ZeRO states are sharded over."""
    gpu_mem: float = 80.0
    """Memory of one GPU in GiB (an '80 GB' A100/H100 has about 79 usable)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (--gradient_checkpointing of 'llavatune train')."""
    lora_r: int = 128
    """LoRA rank (adapters on every linear layer of the LLM)."""
    lora_dropout: float = 0.05
    """LoRA dropout (its masks are activations too)."""
    bnb_4bit_use_double_quant: bool = True
    """QLoRA: quantize the 4-bit blocks' scales too, as 'llavatune train' does by default."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision (bf16/fp16: 16-bit weights and autocast; a recipe's bf16 / fp16 set it)."""
    device: Literal["cuda", "cpu"] = "cuda"
    """'cuda' adds the CUDA context and allocator fragmentation; 'cpu' leaves them out (validation on CPU)."""
    padding_mask: bool = True
    """Batches contain padding, so attention gets a mask (materialized per layer by SDPA). Off: equal lengths."""
    images: int = 1
    """Images per sample."""
    image_tokens: Optional[int] = None
    """LLM positions one image takes (default: the model's, at its usual image size; families with dynamic
    resolution or tiling say what they assumed)."""
    supervised_tokens: Optional[int] = None
    """Tokens per sample the loss is computed on (the answers and end-of-turn tokens; llavatune computes logits
    only there). Default: every text token, the worst case; a short-answer VQA sample has about 5."""
    json: Optional[str] = None
    """Also write the estimate (and the suggestions) as JSON to this file ('-' for stdout only)."""

    def __post_init__(self):
        from llavatune.zero import zero_settings

        self.zero = self.zero or None
        stage, _ = zero_settings(self.zero)
        if self.supervised_tokens is not None and self.supervised_tokens <= 0:
            raise ConfigError(f"--supervised-tokens: must be positive, got {self.supervised_tokens}")
        for name in ("batch", "max_length", "gpus", "lora_r", "images"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        if self.image_tokens is not None and self.image_tokens <= 0:
            raise ConfigError(f"--image-tokens: must be positive, got {self.image_tokens}")
        if self.gpu_mem <= 0:
            raise ConfigError(f"--gpu-mem: must be positive, got {self.gpu_mem}")
        if self.method == "qlora" and self.stage == "finetune" and stage == 3:
            raise ConfigError("--method qlora with --zero zero3: use zero2 (ZeRO-3 cannot shard bitsandbytes weights)")

    def settings(self) -> Settings:
        """The estimate's settings: the model-independent options, ``--zero`` as its stage and offload."""
        from llavatune.zero import zero_settings

        stage, offload = zero_settings(self.zero)
        method = "projector" if self.stage == "pretrain" else self.method
        return Settings(method=method, zero=stage, offload=offload, batch=self.batch, max_length=self.max_length,
                        gpus=self.gpus, gradient_checkpointing=self.gradient_checkpointing, lora_r=self.lora_r,
                        lora_dropout=self.lora_dropout, dtype=self.dtype, device=self.device,
                        padding_mask=self.padding_mask, images_per_sample=self.images,
                        double_quant=self.bnb_4bit_use_double_quant, supervised_tokens=self.supervised_tokens)

    def spec(self) -> ModelSpec:
        spec = load_spec(self.model, vision_model=self.vision_model, language_model=self.language_model,
                         vision_feature_layer=self.vision_feature_layer,
                         vision_feature_select_strategy=self.vision_feature_select_strategy)
        if self.image_tokens:
            spec.image_tokens = self.image_tokens
        return spec


# How a training recipe's options map onto plan's (the rest of plan's options have train's names already), and
# train options that decide memory in a way plan does not model, which it names in its note.
RECIPE_OPTIONS = {"per_device_train_batch_size": "batch"}
RECIPE_PRECISION = ("bf16", "fp16")


def recipe_values(values: dict[str, Any]) -> dict[str, Any]:
    """The plan options in a YAML file: its own, or those of a training recipe (``llavatune train``'s YAML) that
    decide memory, under plan's names; the recipe's other options are ignored and listed (one log line). A key that
    is neither a plan nor a train option is left in, for the usual unknown-option error."""
    plan_fields = {f.name for f in dataclasses.fields(PlanArgs)}
    if set(values) <= plan_fields:
        return values
    from llavatune.train import train_config as tc  # imports transformers: only for a training recipe

    sections = (tc.ModelArgs, tc.DataArgs, tc.MethodArgs, tc.EvalArgs, tc.LlavaTrainingArguments)
    train_fields = {f.name for dt in sections for f in dataclasses.fields(dt) if f.init}
    out: dict[str, Any] = {}
    used: list[str] = []
    ignored: list[str] = []
    precision = next((k for k in RECIPE_PRECISION if values.get(k)), None)
    for key, value in values.items():
        if key == "dtype":  # train's weights dtype; bf16 / fp16 (autocast) decide when given
            mapped = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(value, value)
            if mapped in ("bf16", "fp16", "fp32") and not precision:
                out["dtype"] = mapped
                used.append(key)
            else:
                ignored.append(key)
        elif key in plan_fields and key in train_fields:
            out[key] = value
            used.append(key)
        elif key in RECIPE_OPTIONS:
            out[RECIPE_OPTIONS[key]] = value
            used.append(f"{key} (--{RECIPE_OPTIONS[key]})")
        elif key in RECIPE_PRECISION:
            if key == precision:
                out["dtype"] = key
            used.append(key)
        elif key == "bits" and value == 8:
            ignored.append(key)
            logger.warning("plan: bits 8 (8-bit QLoRA) is estimated as 4-bit NF4: the weights need about 1 byte "
                           "instead of 0.52 per LLM linear weight")
        elif key in train_fields:
            ignored.append(key)
        else:
            out[key] = value  # not an option of either command: parse_config names it
    logger.info(f"plan: reading a training recipe: uses {', '.join(used) or 'nothing'}; ignores (they do not change "
                f"the memory estimate) {', '.join(ignored) or 'nothing'}")
    return out


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB / 2:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB"


@dataclasses.dataclass
class Suggestion:
    change: str
    estimate: Estimate
    fits: bool


def _flags(s: Settings, base: Settings) -> str:
    """The command-line change that turns ``base`` into ``s`` (in plan's options, as the user types them)."""
    out = []
    if (s.zero, s.offload) != (base.zero, base.offload):
        out.append(f"--zero {_zero_name(s.zero, s.offload)}")
    options = {"images_per_sample": "images", "double_quant": "bnb_4bit_use_double_quant"}
    for f in dataclasses.fields(s):
        a, b = getattr(s, f.name), getattr(base, f.name)
        if a == b or f.name in ("zero", "offload"):
            continue
        flag = "--" + options.get(f.name, f.name).replace("_", "-")
        if isinstance(a, bool):
            out.append(flag if a else "--no-" + flag[2:])
        else:
            out.append(f"{flag} {a}")
    return " ".join(out)


def _zero_name(stage: int, offload: bool) -> str:
    """The --zero name of a ZeRO stage (what suggestions propose: the shipped configs)."""
    return {(2, False): "zero2", (3, False): "zero3", (3, True): "zero3_offload"}.get((stage, offload), f"stage{stage}")


def _largest(spec: ModelSpec, s: Settings, limit: float, field: str, hi: int, lo_bound: int = 1) -> int | None:
    """The largest value of ``field`` in [lo_bound, hi] whose estimate fits ``limit`` bytes (None: none fits)."""
    if estimate(spec, s.replace(**{field: lo_bound})).peak > limit:
        return None
    lo = lo_bound
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(spec, s.replace(**{field: mid})).peak <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def suggestions(spec: ModelSpec, s: Settings, gpu_mem_gib: float) -> list[Suggestion]:
    """Concrete alternatives to ``s``, each re-estimated, in order of how little they give up: checkpointing
    (costs ~30 % speed, nothing else), a smaller micro-batch (keep the effective batch with gradient
    accumulation), a shorter max length (drops or truncates long samples), a cheaper method, DeepSpeed ZeRO /
    offload / more GPUs. When the run fits already: the largest batch that fits, and whether checkpointing
    can be turned off."""
    limit = gpu_mem_gib * GiB
    base = estimate(spec, s)
    out: list[Suggestion] = []

    def add(c: Settings) -> None:
        change = _flags(c, s)
        if change and change not in {o.change for o in out}:
            e = estimate(spec, c)
            out.append(Suggestion(change, e, e.peak <= limit))

    if base.peak <= limit:
        best = _largest(spec, s, limit, "batch", hi=max(2, s.batch * 8), lo_bound=s.batch)
        if best and best > s.batch:
            add(s.replace(batch=best))
        if s.gradient_checkpointing and estimate(spec, s.replace(gradient_checkpointing=False)).peak <= limit:
            add(s.replace(gradient_checkpointing=False))
        return out
    gc = s.replace(gradient_checkpointing=True)
    if not s.gradient_checkpointing:
        add(gc)
    for c in ([s, gc] if not s.gradient_checkpointing else [s]):
        b = _largest(spec, c, limit, "batch", hi=max(1, s.batch - 1))
        if b:
            add(c.replace(batch=b))
    min_len = spec.image_tokens * s.images_per_sample + 64
    if s.max_length > min_len:
        for c in ([s, gc] if not s.gradient_checkpointing else [s]):
            n = _largest(spec, c, limit, "max_length", hi=s.max_length - 1, lo_bound=min_len)
            if n:
                add(c.replace(max_length=n // 64 * 64 if n >= 128 else n))
    for m in {"full": ["lora", "qlora"], "lora": ["qlora"], "qlora": [], "projector": []}[s.method]:
        zero = 2 if (m == "qlora" and s.zero == 3) else s.zero
        c = s.replace(method=m, zero=zero, offload=s.offload and zero == 3)
        add(c)
        if not s.gradient_checkpointing:  # QLoRA keeps fp32 activations: it pays off with checkpointing
            add(c.replace(gradient_checkpointing=True))
            b = _largest(spec, c.replace(gradient_checkpointing=True), limit, "batch", hi=max(1, s.batch - 1))
            if b:
                add(c.replace(gradient_checkpointing=True, batch=b))
    if s.dtype == "fp32":
        add(s.replace(dtype="bf16"))
    if s.gpus > 1:
        for z in (2, 3):
            if s.zero < z and not (z == 3 and s.method == "qlora"):
                add(s.replace(zero=z, offload=False))
    if s.zero == 3 and not s.offload:
        add(s.replace(offload=True))
    if s.method not in ("qlora", "projector") and s.zero != 3:
        add(s.replace(zero=3, gpus=max(8, s.gpus)))
    # fitting ones first; within each group keep the order above (least given up first)
    useful = [o for o in out if o.estimate.peak < base.peak * 0.995]
    return sorted(useful, key=lambda o: not o.fits)


def render(args: PlanArgs, spec: ModelSpec, est: Estimate, sugg: list[Suggestion]) -> str:
    s = est.settings
    c = est.params
    limit = args.gpu_mem * GiB
    zero = (f"ZeRO-{s.zero}{' + offload' if s.offload else ''} (--zero {args.zero}) on {s.gpus} GPU(s)" if s.zero
            else "no DeepSpeed, 1 GPU")
    img = f"{spec.image_tokens} image tokens per image" if spec.image_tokens else "no vision tower"
    gc = "gradient checkpointing" if s.gradient_checkpointing else "no gradient checkpointing"
    lines = [
        f"model     {spec.name}",
        f"run       {_method_text(s)}, {zero}, batch {s.batch} x "
        f"{s.max_length} tokens ({img}), {s.dtype}, {gc}",
        f"params    {fmt_count(sum(c.values()))} total: LLM {fmt_count(c['llm_linear'] + c['llm_other'] + c['embed'] + c['lm_head'])}"
        f", vision {fmt_count(c['vision'])}, projector {fmt_count(c['projector'])}; trainable {fmt_count(est.trainable)}",
        "",
    ]
    w = max(len(i.name) for i in est.items)
    lines.append(f"{'component':<{w}}  {'memory':>11}  {'when':<15}  how")
    for i in est.items:
        lines.append(f"{i.name:<{w}}  {fmt_bytes(i.bytes):>11}  {i.phase:<15}  {i.detail}")
    ph = est.phases
    lines.append("")
    over = f" + overheads {fmt_bytes(ph['overhead'])}" if ph.get("overhead") else ""
    lines.append(f"peak per GPU: {fmt_bytes(est.peak)} = resident {fmt_bytes(ph['resident'])}{over} + max(backward "
                 f"start {fmt_bytes(ph['backward start'])}, end of backward {fmt_bytes(ph['end of backward'])})")
    if s.device == "cpu":
        lines.append("(--device cpu: no CUDA context or allocator fragmentation; for validation against CPU runs)")
    if est.cpu_bytes:
        lines.append(f"CPU memory for offloaded states: {fmt_bytes(est.cpu_bytes)} per process")
    fits = est.peak <= limit
    verdict = "FITS" if fits else "DOES NOT FIT"
    lines.append(f"{verdict} in {args.gpu_mem:g} GiB ({fmt_bytes(abs(limit - est.peak))} "
                 f"{'headroom' if fits else 'short'})")
    for n in est.notes:
        lines.append(f"note: {n}")
    if spec.image_tokens and spec.image_tokens >= s.max_length:
        # train drops (or, with --truncation truncate, cannot keep) a sample whose image alone fills the sequence
        lines.append(f"warning: one image takes {spec.image_tokens} tokens, not less than --max-length {s.max_length}: "
                     f"training would drop every image sample; raise --max-length (or shrink the images the "
                     f"processor makes, e.g. its longest_edge)")
    if sugg:
        lines.append("")
        lines.append("what to change (each re-estimated):" if not fits else "options:")
        sw = max(len(x.change) for x in sugg)
        for x in sugg[:8]:
            lines.append(f"  {x.change:<{sw}}  {fmt_bytes(x.estimate.peak):>11}  {'fits' if x.fits else 'does not fit'}")
        if not fits and any("--batch" in x.change for x in sugg):
            lines.append("  (with a smaller --batch, --gradient_accumulation_steps keeps the effective batch)")
    elif not fits:
        lines.append("nothing single fits: combine changes, use more GPUs with --zero zero3, or a smaller model")
    return "\n".join(lines)


def _method_text(s: Settings) -> str:
    if s.method == "projector":
        return "stage pretrain (projector only)"
    return s.method + (f" r={s.lora_r}" if s.method != "full" else "")


def plan(args: PlanArgs) -> tuple[Estimate, list[Suggestion], str]:
    spec = args.spec()
    s = args.settings()
    est = estimate(spec, s)
    sugg = suggestions(spec, s, args.gpu_mem)
    return est, sugg, render(args, spec, est, sugg)


def main(argv: Sequence[str], prog: str) -> int:
    (args,) = parse_config([PlanArgs], argv, prog=prog, description=__doc__.split("\n\n")[0],
                           translate=recipe_values)
    est, sugg, text = plan(args)
    if args.json != "-":
        print(text)
    if args.json:
        data = {**est.to_dict(), "fits": est.peak <= args.gpu_mem * GiB, "gpu_mem_gib": args.gpu_mem,
                "suggestions": [{"change": x.change, "peak_gib": round(x.estimate.peak / GiB, 3), "fits": x.fits}
                                for x in sugg]}
        if args.json == "-":
            print(json.dumps(data, indent=2))
        else:
            from llavatune.utils import atomic_write_json

            atomic_write_json(args.json, data)
    return 0

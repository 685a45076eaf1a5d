"""``llavatune plan``: will this training run fit? Peak GPU memory per device, from the model config alone.

    llavatune plan --model llava-hf/llava-1.5-7b-hf --method qlora --batch 16 --max-length 2048
    llavatune plan --model llava-hf/llava-1.5-13b-hf --method full --zero 3 --gpus 8 --gradient-checkpointing
    llavatune plan --model RUN_DIR/base_model --method lora --gpu-mem 24

Reads only the config (a local directory's config.json, a run's base_config.json, or config.json from the
hub), never weights. Prints the breakdown (weights, optimizer states, gradients, activations, logits,
overheads), whether the peak fits ``--gpu-mem``, and what to change, each suggestion re-estimated. The
formulas and their validation against measured training steps are in docs/memory.md.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal, Optional, Sequence

from llavatune.config import ConfigError, check_choice, config, parse_config
from llavatune.plan.estimate import Estimate, GiB, Settings, estimate, fmt_count
from llavatune.plan.spec import ModelSpec, load_spec

__all__ = ["PlanArgs", "Settings", "Estimate", "ModelSpec", "estimate", "load_spec", "plan", "suggestions", "main"]


@config
class PlanArgs:
    model: str = "tiny"
    """'tiny', a local llava-hf directory (or a run / checkpoint directory, or a config.json), or a hub id whose
    config.json is fetched (never the weights)."""
    method: Literal["lora", "qlora", "full"] = "lora"
    """Training method, as in 'llavatune train --method'."""
    zero: int = 0
    """DeepSpeed ZeRO stage: 0 (no DeepSpeed), 1 (shard optimizer states), 2 (+ gradients), 3 (+ weights)."""
    batch: int = 16
    """Micro-batch per GPU (--per_device_train_batch_size)."""
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
    offload: bool = False
    """With --zero: offload optimizer states (and, with ZeRO-3, weights) to CPU memory."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision (bf16/fp16: 16-bit weights and autocast)."""
    device: Literal["cuda", "cpu"] = "cuda"
    """'cuda' adds the CUDA context and allocator fragmentation; 'cpu' leaves them out (validation on CPU)."""
    padding_mask: bool = True
    """Batches contain padding, so attention gets a mask (materialized per layer by SDPA). Off: equal lengths."""
    images: int = 1
    """Images per sample."""
    supervised_tokens: Optional[int] = None
    """Tokens per sample the loss is computed on (the answers and end-of-turn tokens; llavatune computes logits
    only there). Default: every text token, the worst case; a short-answer VQA sample has about 5."""
    json: Optional[str] = None
    """Also write the estimate (and the suggestions) as JSON to this file ('-' for stdout only)."""

    def __post_init__(self):
        check_choice("zero", self.zero, (0, 1, 2, 3))
        if self.supervised_tokens is not None and self.supervised_tokens <= 0:
            raise ConfigError(f"--supervised-tokens: must be positive, got {self.supervised_tokens}")
        for name in ("batch", "max_length", "gpus", "lora_r"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        if self.gpu_mem <= 0:
            raise ConfigError(f"--gpu-mem: must be positive, got {self.gpu_mem}")
        if self.offload and not self.zero:
            raise ConfigError("--offload needs --zero 1, 2 or 3 (offloading is a DeepSpeed ZeRO feature)")
        if self.method == "qlora" and self.zero == 3:
            raise ConfigError("--method qlora with --zero 3: use --zero 2 (ZeRO-3 cannot shard bitsandbytes weights)")

    def settings(self) -> Settings:
        """The estimate's settings: every ``Settings`` field that has a flag here (``double_quant`` has none)."""
        names = {f.name: _option(f.name) for f in dataclasses.fields(Settings)}
        return Settings(**{k: getattr(self, opt) for k, opt in names.items() if hasattr(self, opt)})


# Settings fields whose option has another name
_OPTION_NAMES = {"images_per_sample": "images"}


def _option(field_name: str) -> str:
    return _OPTION_NAMES.get(field_name, field_name)


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
    """The command-line change that turns ``base`` into ``s``."""
    out = []
    for f in dataclasses.fields(s):
        a, b = getattr(s, f.name), getattr(base, f.name)
        if a == b:
            continue
        flag = "--" + _option(f.name).replace("_", "-")
        if isinstance(a, bool):
            out.append(flag if a else "--no-" + flag[2:])
        else:
            out.append(f"{flag} {a}")
    return " ".join(out)


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
    for m in {"full": ["lora", "qlora"], "lora": ["qlora"], "qlora": []}[s.method]:
        zero = 2 if (m == "qlora" and s.zero == 3) else s.zero
        c = s.replace(method=m, zero=zero, offload=s.offload and zero > 0)
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
                add(s.replace(zero=z))
    if s.zero and not s.offload:
        add(s.replace(offload=True))
    if s.method != "qlora" and s.zero != 3:
        add(s.replace(zero=3, gpus=max(8, s.gpus)))
    # fitting ones first; within each group keep the order above (least given up first)
    useful = [o for o in out if o.estimate.peak < base.peak * 0.995]
    return sorted(useful, key=lambda o: not o.fits)


def render(args: PlanArgs, spec: ModelSpec, est: Estimate, sugg: list[Suggestion]) -> str:
    s = est.settings
    c = est.params
    limit = args.gpu_mem * GiB
    zero = f"ZeRO-{s.zero}{' + offload' if s.offload else ''} on {s.gpus} GPU(s)" if s.zero else "no DeepSpeed, 1 GPU"
    img = f"{spec.image_tokens} image tokens per image" if spec.image_tokens else "no vision tower"
    gc = "gradient checkpointing" if s.gradient_checkpointing else "no gradient checkpointing"
    lines = [
        f"model     {spec.name}",
        f"run       {s.method}{f' r={s.lora_r}' if s.method != 'full' else ''}, {zero}, batch {s.batch} x "
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
    if sugg:
        lines.append("")
        lines.append("what to change (each re-estimated):" if not fits else "options:")
        sw = max(len(x.change) for x in sugg)
        for x in sugg[:8]:
            lines.append(f"  {x.change:<{sw}}  {fmt_bytes(x.estimate.peak):>11}  {'fits' if x.fits else 'does not fit'}")
        if not fits and any("--batch" in x.change for x in sugg):
            lines.append("  (with a smaller --batch, --gradient_accumulation_steps keeps the effective batch)")
    elif not fits:
        lines.append("nothing single fits: combine changes, use more GPUs with --zero 3, or a smaller model")
    return "\n".join(lines)


def plan(args: PlanArgs) -> tuple[Estimate, list[Suggestion], str]:
    spec = load_spec(args.model)
    s = args.settings()
    est = estimate(spec, s)
    sugg = suggestions(spec, s, args.gpu_mem)
    return est, sugg, render(args, spec, est, sugg)


def _negations(argv: Sequence[str]) -> list[str]:
    """``--no-offload`` / ``--no-gradient-checkpointing`` for every boolean flag, whatever its default."""
    bools = {f.name for f in dataclasses.fields(PlanArgs) if f.type in ("bool", bool)}
    out = []
    for a in argv:
        name = a[5:].replace("-", "_") if a.startswith("--no-") or a.startswith("--no_") else None
        if name in bools:
            out += [f"--{name}", "false"]
        else:
            out.append(a)
    return out


def main(argv: Sequence[str], prog: str) -> int:
    (args,) = parse_config([PlanArgs], _negations(argv), prog=prog, description=__doc__.split("\n\n")[0])
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

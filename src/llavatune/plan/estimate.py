"""Peak memory per device of one training step, from the model's shapes (``ModelSpec``) and the run settings.

The formulas follow what ``llavatune train`` actually does with transformers + PEFT + bitsandbytes (see
docs/memory.md for the derivation and the validation against measured steps):

- **weights**: every parameter in the training dtype (2 bytes bf16/fp16, 4 fp32). QLoRA stores the LLM's
  linear layers in 4-bit NF4: 0.5 byte/param + one absmax per 64 weights (fp32, or 8-bit + a second-level
  fp32 constant per 256 blocks with double quantization). Everything else (vision tower, projector,
  embeddings, lm_head, norms) is not quantized, and ``peft.prepare_model_for_kbit_training`` upcasts it to
  fp32; llavatune casts the frozen ones back to 16 bit (``loader._keep_frozen_weights_16bit``): under bf16
  all of them, under fp16 the linear/conv weights (vision tower, lm_head, the projector's frozen original). LoRA adapters
  are fp32 (PEFT's ``autocast_adapter_dtype``); the projector is trained through ``modules_to_save``, i.e. a
  second, trainable copy.
- **gradients + AdamW** (torch fused AdamW, HF's default): per trainable parameter a gradient and two
  moments in the parameter's own dtype. Under DeepSpeed the model is cast to bf16 and ZeRO keeps an fp32
  master copy + two fp32 moments (12 bytes) per trainable parameter: ZeRO-1 shards those over the GPUs,
  ZeRO-2 also the gradients, ZeRO-3 also the weights; offload moves the sharded optimizer (and, for ZeRO-3,
  the weights) to CPU memory.
- **activations** (tensors saved for backward, per token of B x L, per decoder layer): see ``layer_bytes``.
  With gradient checkpointing a layer keeps only its input and one layer is recomputed at a time.
- **logits**: lm_head output, upcast to fp32 for the loss, at the supervised positions only (llavatune passes
  them as ``logits_to_keep``; ``supervised_tokens`` per sample, by default every text token: the worst case);
  at the start of backward the saved log-softmax, the NLL gradient and the log-softmax gradient coexist:
  12 bytes x B x supervised tokens x vocab.
- **overhead** (``--device cuda`` only): CUDA context + cuBLAS workspaces, NCCL buffers with several GPUs,
  and the caching allocator's fragmentation as a fraction of the dynamic (per-step) memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llavatune.plan.spec import ModelSpec

GiB = 1024**3
BLOCK = 64  # bitsandbytes 4-bit blocksize (absmax per 64 weights)
# CUDA-side constants, not measurable on CPU: documented in docs/memory.md and shown as their own rows.
CUDA_CONTEXT = 1.0 * GiB  # CUDA context, kernels, cuBLAS/cuDNN workspaces (torch 2.x, H100/A100: 0.5-1 GiB)
NCCL_BUFFERS = 0.5 * GiB  # communicator buffers per process when training on several GPUs
FRAGMENTATION = 0.10  # caching-allocator slack as a fraction of per-step (dynamic) memory


@dataclass
class Settings:
    """What the estimate depends on besides the model (the ``plan`` flags, minus the model)."""

    method: str = "lora"
    zero: int = 0
    batch: int = 16
    max_length: int = 2048
    gpus: int = 1
    gradient_checkpointing: bool = False
    lora_r: int = 128
    lora_dropout: float = 0.05
    offload: bool = False
    dtype: str = "bf16"
    device: str = "cuda"
    padding_mask: bool = True
    images_per_sample: int = 1
    double_quant: bool = True
    supervised_tokens: int | None = None

    def replace(self, **kw) -> Settings:
        return dataclasses.replace(self, **kw)


@dataclass
class Item:
    name: str
    bytes: float
    detail: str = ""
    phase: str = "resident"
    """'resident' (all step long), 'overhead' (CUDA), 'backward start' or 'end of backward' (the peak takes the
    larger of those two)."""


@dataclass
class Estimate:
    settings: Settings
    items: list[Item]
    peak: float
    params: dict[str, int]
    trainable: int
    cpu_bytes: float = 0.0
    """Host memory the offloaded states need (per process)."""
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def row(self, name: str) -> float:
        return sum(i.bytes for i in self.items if i.name == name)

    def to_dict(self) -> dict:
        return {
            "settings": dataclasses.asdict(self.settings),
            "peak_bytes": round(self.peak),
            "peak_gib": round(self.peak / GiB, 3),
            "items": [{"name": i.name, "phase": i.phase, "bytes": round(i.bytes), "gib": round(i.bytes / GiB, 3),
                       "detail": i.detail} for i in self.items],
            "phases_gib": {k: round(v / GiB, 3) for k, v in self.phases.items()},
            "params": self.params,
            "trainable_params": self.trainable,
            "cpu_offload_gib": round(self.cpu_bytes / GiB, 3),
            "notes": self.notes,
        }


def fmt_count(n: float) -> str:
    """7.06B, 340.8M, 22.66K."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def supervised_tokens(spec: ModelSpec, s: Settings) -> int:
    """Tokens per sample with logits (the loss's): ``s.supervised_tokens``, by default every text token."""
    text = max(1, s.max_length - (s.images_per_sample * spec.image_tokens if spec.image_tokens else 0))
    return min(s.supervised_tokens, s.max_length) if s.supervised_tokens else text


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype in ("fp32", "float32") else 2


def _element_bytes(s: Settings) -> tuple[int, int]:
    """Bytes per element of (matmul operands, residual stream / element-wise tensors). Autocast makes
    matmul operands 16-bit; the stream stays fp32 in fp32 training and under fp16 QLoRA without DeepSpeed (PEFT's
    upcast embeddings and norms make it fp32; under bf16 llavatune casts them back, DeepSpeed casts the whole
    model to 16 bit)."""
    amp = s.dtype != "fp32"
    fp32_stream = not amp or (s.method == "qlora" and s.zero == 0 and s.dtype != "bf16")
    return (2 if amp else 4), (4 if fp32_stream else 2)


def layer_bytes(spec: ModelSpec, s: Settings) -> dict[str, float]:
    """Bytes saved for backward by ONE decoder layer, per token (B x L of them), split by part.

    Llama block = RMSNorm -> q/k/v -> RoPE -> SDPA -> o -> RMSNorm -> gate/up -> SiLU*up -> down. Which
    tensors autograd keeps (measured with ``torch.autograd.graph.saved_tensors_hooks``, docs/memory.md):

    - RMSNorm upcasts its input to fp32 and keeps it (4h bytes) + the rsqrt (4); with a trainable weight
      (full FT) also the normalized tensor in the stream dtype.
    - frozen linear layers (LoRA, QLoRA) keep nothing: their weight gets no gradient. Trainable ones (full)
      keep their input, shared by q/k/v and by gate/up.
    - a LoRA branch keeps its dropout mask (1 byte on CUDA, a float tensor on CPU) and the dropped input cast
      to the compute dtype, for each of the 7 adapted layers separately, plus the rank-r intermediate.
    - SDPA (flash / memory-efficient kernels: no L x L matrix) keeps q, k, v, the output and an fp32
      log-sum-exp per head. With padding in the batch, transformers passes a mask: k/v are expanded to all
      heads (repeat_kv) and SDPA materializes an additive B x 1 x L x L mask in every layer.
    - the MLP keeps gate output, SiLU output and up output in the stream dtype (fp32 under fp16 QLoRA: the
      upcast norms make the residual stream fp32 and bitsandbytes returns the input's dtype).
    """
    e_c, e_s = _element_bytes(s)
    mask = 0 if s.lora_dropout == 0 else (1 if s.device == "cuda" else 4)
    h, i = spec.hidden, spec.intermediate
    q_dim = spec.heads * spec.head_dim
    kv_heads = spec.heads if s.padding_mask else spec.kv_heads
    parts: dict[str, float] = {}
    parts["attention"] = e_c * (2 * q_dim + 2 * kv_heads * spec.head_dim) + 4 * spec.heads
    if s.padding_mask:
        parts["attention mask"] = e_c * s.max_length
    parts["mlp"] = 3 * i * e_s
    if s.method == "full":
        parts["norms"] = 2 * (4 * h + 4 + e_s * h)
        parts["linear inputs"] = e_c * (2 * h + i)
    else:
        parts["norms"] = 2 * (4 * h + 4)
    if s.method in ("lora", "qlora"):
        lora_in = sum(a for _, a, _ in spec.llm_linears())
        parts["lora"] = (mask + e_c) * lora_in + 7 * s.lora_r * e_c
    return parts


METHODS = ("lora", "qlora", "full", "projector")  # "projector": stage 1 (--stage pretrain), the projector only


@dataclass
class _Weights:
    """What the weights part of the estimate found: bytes and rows, the trainable count and its bytes."""

    weights: float
    detail: str
    trainable: int
    train_bytes: float
    train_detail: str
    lora: int = 0


def _weights(spec: ModelSpec, s: Settings, counts: dict[str, int]) -> _Weights:
    """Weights in memory (before any ZeRO-3 sharding), and the trainable parameters with the bytes of one gradient."""
    total = sum(counts.values())
    ds, amp, w = s.zero > 0, s.dtype != "fp32", _dtype_bytes(s.dtype)
    proj = counts["projector"]
    if s.method == "qlora":
        qb = 0.5 + (1 / BLOCK + 4 / (BLOCK * 256) if s.double_quant else 4 / BLOCK)
        other_b = 2 if (ds and amp) else 4
        # frozen weights kept in 16 bit under autocast: all of them under bf16, the linear/conv ones under fp16
        # (DeepSpeed casts everything to bf16 anyway)
        if amp and not ds and s.dtype == "bf16":
            kept16 = total - counts["llm_linear"]
        elif amp and not ds:
            kept16 = spec.vision_matmul_params() + counts["lm_head"] + counts["projector"]
        else:
            kept16 = 0
        other = total - counts["llm_linear"] - kept16
        weights = counts["llm_linear"] * qb + other * other_b + kept16 * 2
        detail = (f"{fmt_count(counts['llm_linear'])} LLM linear x {qb:.3f} bytes (NF4)"
                  + (f" + {fmt_count(other)} other x {other_b} bytes" if other else "")
                  + (f" + {fmt_count(kept16)} frozen {'unquantized' if s.dtype == 'bf16' else 'linear/conv'} x 2 bytes"
                     if kept16 else ""))
    else:
        weights = total * w
        detail = f"{fmt_count(total)} params x {w} bytes"
    if s.method == "full":
        trainable = counts["llm_linear"] + counts["llm_other"] + counts["embed"] + counts["lm_head"] + proj
        return _Weights(weights, detail, trainable, trainable * w, f"{fmt_count(trainable)} trainable x {w} bytes")
    if s.method == "projector":  # stage 1: the projector itself trains (no adapter, no copy)
        return _Weights(weights, detail, proj, proj * w, f"projector {fmt_count(proj)} x {w} bytes")
    lora = spec.lora_params(s.lora_r)
    lora_b = 2 if (ds and amp) else 4  # PEFT keeps adapters in fp32; DeepSpeed casts the module to bf16
    proj_b = 2 if (ds and amp) else (4 if s.method == "qlora" else w)
    weights += lora * lora_b + proj * proj_b  # adapters + the trainable copy of the projector
    detail += f" + LoRA r={s.lora_r} {fmt_count(lora)} x {lora_b} bytes + projector copy {fmt_count(proj)} x {proj_b} bytes"
    return _Weights(weights, detail, lora + proj, lora * lora_b + proj * proj_b,
                    f"LoRA {fmt_count(lora)} x {lora_b} bytes + projector {fmt_count(proj)} x {proj_b} bytes", lora)


def _weight_items(spec: ModelSpec, s: Settings, counts: dict[str, int], wt: _Weights, notes: list[str]) -> list[Item]:
    """The resident weights row: sharded (plus the gathered working set) under ZeRO-3, or all of them."""
    if s.zero != 3:
        return [Item("weights", wt.weights, wt.detail)]
    if s.method == "qlora":
        notes.append("QLoRA with ZeRO-3 is not supported by llavatune (bitsandbytes weights cannot be sharded); "
                     "use ZeRO-2")
    n = max(1, s.gpus)
    layer = sum(a * b for _, a, b in spec.llm_linears())
    live = 2 * (2 * layer + max(counts["embed"], counts["lm_head"]))
    if s.offload:
        return [Item("weights", live, "ZeRO-3 offload: weights in CPU memory; gathered working set "
                                      "(2 layers + embeddings, bf16) on the GPU")]
    return [Item("weights", wt.weights / n + live,
                 f"({wt.detail}) / {n} GPUs + gathered working set (2 layers + embeddings, bf16)")]


def _optimizer_items(spec: ModelSpec, s: Settings, wt: _Weights) -> tuple[list[Item], list[Item], float]:
    """Gradients and optimizer states: ``(resident rows, end-of-backward rows, CPU bytes of offloaded states)``."""
    trainable = wt.trainable
    if s.zero == 0:
        return ([Item("optimizer states", 2 * wt.train_bytes, "AdamW exp_avg + exp_avg_sq in the parameter dtype")],
                [Item("gradients", wt.train_bytes, wt.train_detail + " (freed between steps)")], 0.0)
    n = max(1, s.gpus)
    g = 2 if s.dtype != "fp32" else 4
    grads = trainable * g / (n if s.zero >= 2 else 1)
    bucket = 2 * min(spec.hidden**2, trainable) * g  # reduce bucket ('auto' = hidden^2), double-buffered
    opt = 12 * trainable / n
    cpu_bytes = 0.0
    if s.offload:
        cpu_bytes += opt + 4 * trainable / n
        rows = [Item("gradients", bucket + (0 if s.zero >= 2 else grads),
                     "ZeRO-Offload: gradient partitions are copied to CPU; reduce buckets stay"),
                Item("optimizer states", 0.0, f"offloaded: {opt / GiB:.2f} GiB of CPU memory per process")]
    else:
        rows = [Item("gradients", grads + bucket, f"{fmt_count(trainable)} x {g} bytes"
                     + (f" / {n} GPUs" if s.zero >= 2 else "") + " + reduce buckets"),
                Item("optimizer states", opt, f"fp32 master + 2 moments: 12 bytes x {fmt_count(trainable)} / {n}")]
    if s.zero == 3 and s.offload:
        cpu_bytes += wt.weights / n
    return rows, [], cpu_bytes


def _backward_items(spec: ModelSpec, s: Settings, counts: dict[str, int], wt: _Weights) -> list[Item]:
    """What the start of backward holds: saved activations, the logits buffers (or one recomputed layer with
    checkpointing), autocast's 16-bit weight copies, QLoRA's dequantized weight."""
    e_c, e_s = _element_bytes(s)
    tokens = s.batch * s.max_length
    parts = layer_bytes(spec, s)
    per_layer = sum(parts.values())
    tail = 4 * spec.hidden + 4 + ((e_s + e_c) * spec.hidden if s.method == "full" else 0)
    n_img = s.images_per_sample if spec.image_tokens else 0
    proj_act = s.batch * n_img * spec.image_tokens * (spec.projector_in + 2 * spec.hidden) * e_c
    sup = supervised_tokens(spec, s)
    logits = 12 * spec.vocab * s.batch * sup
    logits_detail = (f"12 bytes x {s.batch} x {sup} supervised tokens x vocab {spec.vocab:,}: fp32 log-softmax + 2 grads"
                     + ("" if s.supervised_tokens else " (every text token: --supervised-tokens for your answers)"))
    out: list[Item] = []
    if s.gradient_checkpointing:
        kept = spec.layers * e_s * spec.hidden * tokens + (s.batch * s.max_length**2 if s.padding_mask else 0)
        kept += tail * tokens + proj_act
        # one layer recomputed, plus the gradients flowing through it (MLP intermediates, hidden states)
        work = (3 * spec.intermediate + 2 * spec.hidden) * e_s
        recompute = (per_layer + work) * tokens
        out.append(Item("activations", kept, f"checkpointing: {spec.layers} layer inputs x {e_s} bytes x hidden "
                                             f"x {tokens:,} tokens (+ mask, head, projector)"))
        if recompute > logits:
            out.append(Item("recomputed layer", recompute,
                            f"one layer at {per_layer / 1024:.1f} KiB/token + its gradients "
                            f"{work / 1024:.1f} KiB/token (the logits buffers are gone by then)"))
        else:
            out.append(Item("logits", logits, logits_detail + " (one recomputed layer is smaller)"))
    else:
        act = (per_layer * spec.layers + tail) * tokens + proj_act
        out.append(Item("activations", act, f"{spec.layers} layers x {per_layer / 1024:.1f} KiB/token ("
                        + ", ".join(f"{k} {v / 1024:.2f}" for k, v in parts.items()) + f") x {tokens:,} tokens"))
        out.append(Item("logits", logits, logits_detail))
    if s.dtype != "fp32" and s.zero == 0:
        # autocast caches the 16-bit copy of every fp32 weight a matmul needs for backward: the fp32 LoRA
        # adapters (and, under QLoRA, the upcast trainable projector, and under fp16 a tied lm_head: it shares
        # the embedding's fp32 weight, so it is not cast back to 16 bit)
        fp32_w = wt.lora + (counts["projector"] if s.method == "qlora" else 0)
        if s.method == "qlora" and not counts["lm_head"] and s.dtype != "bf16":
            fp32_w += counts["embed"]
        if fp32_w:
            out.append(Item("autocast weight copies", 2 * fp32_w,
                            f"{fmt_count(fp32_w)} fp32 weights cast to 16 bit and kept for backward"))
    if s.method == "qlora":
        out.append(Item("dequantized weight", 2 * spec.largest_linear() * e_c,
                        "bitsandbytes dequantizes one linear layer at a time (forward + backward)"))
    return out


def _overhead_items(s: Settings, dynamic: float) -> list[Item]:
    if s.device != "cuda":
        return []
    out = [Item("allocator fragmentation", FRAGMENTATION * dynamic,
                f"{FRAGMENTATION:.0%} of the per-step memory (caching allocator)"),
           Item("CUDA context", CUDA_CONTEXT, "context, kernels, cuBLAS workspace")]
    if s.zero and s.gpus > 1:
        out.append(Item("NCCL buffers", NCCL_BUFFERS, "communication buffers"))
    return out


def estimate(spec: ModelSpec, s: Settings) -> Estimate:
    """Peak memory per device. ``peak = resident + max(backward start, end of backward) [+ CUDA overheads]``:

    - resident: weights, optimizer states, (DeepSpeed) gradient partitions and buckets;
    - backward start: all saved activations + the logits buffers (+ one dequantized weight under QLoRA);
    - end of backward: the gradients (``zero_grad(set_to_none=True)`` frees them between steps, so they
      never coexist with a full set of activations).
    """
    if s.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {s.method!r}")
    if s.zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {s.zero!r}")
    notes: list[str] = []
    counts = spec.count()
    wt = _weights(spec, s, counts)
    resident = _weight_items(spec, s, counts, wt, notes)
    optimizer, end, cpu_bytes = _optimizer_items(spec, s, wt)
    resident += optimizer
    backward = _backward_items(spec, s, counts, wt)
    b_sum = sum(i.bytes for i in backward)
    e_sum = sum(i.bytes for i in end)
    dynamic = max(b_sum, e_sum)
    overhead = _overhead_items(s, dynamic)
    peak = sum(i.bytes for i in resident + overhead) + dynamic
    n_img = s.images_per_sample if spec.image_tokens else 0
    if spec.image_tokens and n_img and spec.image_tokens * n_img >= s.max_length:
        notes.append(f"--max-length {s.max_length} leaves no room for text: the image alone takes "
                     f"{spec.image_tokens * n_img} tokens")
    for phase, rows in (("resident", resident), ("backward start", backward), ("end of backward", end),
                        ("overhead", overhead)):
        for i in rows:
            i.phase = phase
    phases = {"resident": sum(i.bytes for i in resident), "overhead": sum(i.bytes for i in overhead),
              "backward start": b_sum, "end of backward": e_sum}
    return Estimate(s, resident + backward + end + overhead, peak, counts, wt.trainable, cpu_bytes,
                    notes + list(spec.notes), phases)

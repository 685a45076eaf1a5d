"""Measure the peak memory of real training steps on CPU, to validate ``llavatune plan --device cpu``.

    python -m llavatune.plan.measure MODEL_DIR --method lora --dtype fp32 --batch 2 --length 512

Runs in a fresh process (call ``measure_in_subprocess``): loads the model the way ``llavatune train`` does
(``loader.load_base`` + ``loader.apply_method``), builds one synthetic LLaVA batch (image tokens + text, the
last sample padded), then runs ``steps`` optimizer steps (forward under bf16 autocast when ``--dtype bf16``,
backward, gradient clipping, fused AdamW, ``zero_grad(set_to_none=True)``) exactly like HF ``Trainer``.

Peak = the kernel's high-water mark of resident memory (``VmHWM``), reset right before the measured steps
(``/proc/self/clear_refs``), minus the resident memory before the model was loaded. PyTorch's CPU allocator
has no cache, so resident memory follows live tensors closely; what CPU cannot show is the CUDA caching
allocator (fragmentation, context), which the estimate's ``--device cpu`` mode leaves out as well.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` value in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _warm_up(torch) -> None:
    """Run each kind of kernel once so that code pages and one-time buffers are resident before the baseline."""
    lin = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(lin.parameters(), fused=True)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 8, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
            q = lin(x).view(2, 8, 4, 16).transpose(1, 2)
            mask = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
            a = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            y = torch.nn.functional.dropout(torch.nn.functional.silu(a), 0.1)
            loss = torch.nn.functional.cross_entropy(y.reshape(-1, 16).float(), torch.zeros(64, dtype=torch.long))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def image_tokens(model) -> int:
    cfg = model.config
    if cfg.model_type != "llava":  # the synthetic batch is LLaVA-1.5's: one fixed-size image, spliced tokens
        raise SystemExit(f"plan.measure builds LLaVA-1.5 batches; {cfg.model_type} models are not measured by it")
    vc = cfg.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)


def make_batch(model, batch: int, length: int, padding: bool = True, seed: int = 0) -> dict[str, Any]:
    """``batch`` samples of ``length`` tokens: BOS, the image tokens of one image, random text; the last
    sample padded over its final 10 % when ``padding`` (so transformers builds an attention mask)."""
    import torch

    cfg = model.config
    vc = cfg.vision_config
    n_img = image_tokens(model)
    if length < n_img + 2:
        raise ValueError(f"length {length} cannot hold the {n_img} image tokens")
    image_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    vocab = cfg.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[ids == image_id] = 5
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = image_id
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    attn = torch.ones(batch, length, dtype=torch.long)
    if padding and batch > 0:
        pad = max(1, length // 10)
        ids[-1, -pad:] = 0
        labels[-1, -pad:] = -100
        attn[-1, -pad:] = 0
    pixels = torch.randn(batch, vc.num_channels, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "pixel_values": pixels}


def measure(model_dir: str, method: str = "lora", dtype: str = "fp32", batch: int = 2, length: int = 512,
            steps: int = 3, lora_r: int = 8, lora_dropout: float = 0.05, gradient_checkpointing: bool = False,
            padding: bool = True, saved_tensors: bool = True) -> dict[str, Any]:
    """Peak resident memory of ``steps`` training steps (bytes), measured in this process."""
    import torch

    from llavatune.model import loader
    from llavatune.model.loss import forward_loss

    torch.manual_seed(0)
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def build():
        quant = loader.quantization_kwargs(4, "nf4", True, tdtype) if method == "qlora" else None
        model = loader.load_model(str(model_dir), tdtype, quantization=quant, attn_implementation="sdpa",
                                  device_map={"": "cpu"} if quant else None)
        margs = argparse.Namespace(lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout,
                                   lora_target_modules=None, train_vision="frozen")
        model = loader.apply_method(model, "finetune", method, margs, gradient_checkpointing, autocast=dtype == "bf16")
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)

    def step(model, params, opt, inputs) -> float:
        with amp:  # the Trainer's loss: logits only at supervised positions; outputs dropped before backward
            loss = forward_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # Warm-up: the same load and a short step, then everything freed. Module imports, kernel code pages and
    # one-time buffers are resident before the baseline is taken, so the baseline holds none of the model.
    _warm_up(torch)
    model, params, opt = build()
    step(model, params, opt, make_batch(model, 1, min(length, image_tokens(model) + 32), padding))
    del model, params, opt
    trim_heap()
    base = proc_status("VmRSS")
    t0 = time.time()
    model, params, opt = build()
    inputs = make_batch(model, batch, length, padding)
    trim_heap()
    loaded = proc_status("VmRSS")
    load_s = time.time() - t0

    t1 = time.time()
    peaks, losses = [], []
    can_reset = reset_peak()
    for _ in range(steps):
        losses.append(step(model, params, opt, inputs))
        peaks.append(proc_status("VmHWM"))
        trim_heap()
        reset_peak()
    step_s = (time.time() - t1) / max(1, steps)
    with_states = proc_status("VmRSS")
    result: dict[str, Any] = {
        "model_dir": str(model_dir), "method": method, "dtype": dtype, "batch": batch, "length": length,
        "lora_r": lora_r, "gradient_checkpointing": gradient_checkpointing, "padding": padding, "steps": steps,
        "baseline_rss": base, "loaded_bytes": loaded - base, "after_steps_bytes": with_states - base,
        "step_peaks_bytes": [p - base for p in peaks], "peak_bytes": max(peaks) - base,
        "peak_reset_supported": can_reset, "losses": losses, "load_s": round(load_s, 2), "step_s": round(step_s, 2),
        "trainable_params": sum(p.numel() for p in params),
    }  # fmt: skip
    if saved_tensors:
        result["saved_tensor_bytes"] = _saved_bytes(model, inputs, amp)
    return result


def _saved_bytes(model, inputs, amp) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward (the activations)."""
    import torch

    from llavatune.model.loss import forward_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        with contextlib.suppress(Exception):
            key = t.untyped_storage().data_ptr()
            if key not in params:
                seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with amp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss(model, inputs)
    del loss
    return sum(seen.values())


def measure_in_subprocess(model_dir: str | os.PathLike, timeout: float = 1800, **kw) -> dict[str, Any]:
    """``measure`` in a fresh Python process (a clean high-water mark), returning its JSON result."""
    cmd = [sys.executable, "-m", "llavatune.plan.measure", str(model_dir)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            cmd += [flag] if v else ["--no-" + k.replace("_", "-")]
        else:
            cmd += [flag, str(v)]
    # A fixed mmap threshold: every tensor above 128 KiB gets its own mapping, returned to the OS when freed.
    # Without it glibc raises the threshold after the first large free and later tensors fragment its heap,
    # so resident memory would measure the C allocator's policy instead of the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llavatune.plan.measure", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--padding", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--saved-tensors", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args(argv)
    if not Path(a.model_dir).is_dir():
        ap.error(f"{a.model_dir} is not a directory")
    res = measure(a.model_dir, a.method, a.dtype, a.batch, a.length, a.steps, a.lora_r, a.lora_dropout,
                  a.gradient_checkpointing, a.padding, a.saved_tensors)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Memory: one QLoRA training step against one bf16 LoRA step, through ``llavatune train``.

    python benchmarks/qlora_memory.py [--device cpu|cuda] [--lora-r 16] [--repeats 1]

A ~1B-parameter LLaVA with random weights (Llama: hidden 2048, 16 layers, intermediate 5632, vocab 32000;
CLIP ViT-B/16 at 224 px; ``LlavaForConditionalGeneration(config)`` saved once in bf16 under --work; on
``--device cuda`` a LLaVA-1.5-7B-shaped one) is trained for one optimizer step by ``llavatune.train.run.train``
-- the recipe's loading (QLoRA: NF4 + double quantization through bitsandbytes, vision tower, projector and
lm_head kept unquantized), LoRA wrapping, bf16 autocast, gradient checkpointing and fused AdamW as in the
shipped ``configs/llava15_7b_okvqa_{lora,qlora}.yaml`` -- once per variant, each in a fresh process:

- ``lora``:  ``--method lora  --dtype bfloat16 --bf16 true``  (weights stored in bf16)
- ``qlora``: ``--method qlora --dtype bfloat16 --bf16 true``  (LLM linear layers in 4 bit, compute in bf16)

How memory is measured (CPU): the kernel's high-water mark of the process's resident memory (``VmHWM``) is
reset (``/proc/self/clear_refs``) when the step begins and read when it ends (a Trainer callback), and the
process's resident memory before the model was loaded (after imports and a small warm-up that pages in
library code) is subtracted: what remains is the memory the training step needs (weights, activations,
gradients, optimizer states and transient buffers), not the Python/torch runtime, which is the same for both
and not what QLoRA is about. Loading is left out of the step peak on purpose -- it is reported separately
(``load_peak``: the whole process's ``ru_maxrss`` minus the same baseline), because with bitsandbytes on CPU
each bf16 tensor is read before it is quantized. glibc's mmap threshold is fixed at 128 KiB so that freed
tensors leave resident memory (else the C allocator's heap, not live tensors, sets the number). On CUDA:
``torch.cuda.max_memory_allocated`` over the step (reset when it begins), the figure PyTorch's allocator
reports.

Goal: QLoRA step peak <= 0.48x the bf16 LoRA step peak (issue 16; 0.40x before). Results go to
``benchmarks/results/qlora_memory[_cuda].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

GOAL = 0.48
VARIANTS = ("lora", "qlora")
# Reference variants (--what-if), what llavatune did before:
# - QLoRA as PEFT's prepare_model_for_kbit_training leaves it: every unquantized weight upcast to fp32;
# - frozen linear/conv weights (vision tower, lm_head) back in bf16, embeddings and norms fp32 (so an fp32
#   residual stream): the same numbers as PEFT's to the last bit.
WHAT_IF = "qlora_peft_fp32_upcast"
WHAT_IF_MATMUL = "qlora_frozen_matmul_16bit_only"
REFERENCES = (WHAT_IF, WHAT_IF_MATMUL)


# ----------------------------------------------------------------------------------------------------------------
# child process: one variant, one step


# RSS probes shared with `llavatune plan --measure` (same method: VmRSS / VmHWM, peak reset via clear_refs)
from llavatune.plan.measure import proc_status, reset_peak, trim_heap  # noqa: E402


def _warm_up() -> None:
    """Page in the kernels a step uses (matmul, attention, autocast, fused AdamW) before the baseline."""
    import torch

    lin = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(lin.parameters(), fused=True)
    x = torch.randn(2, 8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = lin(x).view(2, 8, 4, 16).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        loss = torch.nn.functional.cross_entropy(a.reshape(-1, 16).float(), torch.zeros(64, dtype=torch.long))
    loss.backward()
    opt.step()


def child(a) -> dict[str, Any]:
    import torch

    C.quiet()
    C.set_threads(a.threads)
    cuda = a.device == "cuda"
    import bitsandbytes  # noqa: F401  (imported before the baseline in both variants)
    import peft  # noqa: F401
    from transformers import TrainerCallback

    from llavatune.config import parse_config
    from llavatune.train.run import SECTIONS, train

    _warm_up()
    trim_heap()
    baseline = proc_status("VmRSS")
    baseline_file = proc_status("RssFile")
    marks: dict[str, Any] = {"baseline_rss": baseline}

    class StepMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step:
                return
            trim_heap()
            marks["before_step_rss"] = proc_status("VmRSS")
            marks["before_step_rss_file"] = proc_status("RssFile")  # file-backed pages (mapped weights, libraries)
            marks["peak_reset"] = reset_peak()
            if cuda:
                torch.cuda.synchronize()
                marks["before_step_vram"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            marks["t_step"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step != 1:
                return
            if cuda:
                torch.cuda.synchronize()
                marks["step_peak_vram"] = torch.cuda.max_memory_allocated()
            marks["step_peak_rss"] = proc_status("VmHWM")
            marks["step_seconds"] = time.perf_counter() - marks["t_step"]
            m = model
            marks["trainable_params"] = sum(p.numel() for p in m.parameters() if p.requires_grad)
            marks["param_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
            marks["param_bytes_by_dtype"] = {}
            for p in m.parameters():
                key = str(p.dtype).replace("torch.", "")
                marks["param_bytes_by_dtype"][key] = marks["param_bytes_by_dtype"].get(key, 0) + p.numel() * p.element_size()

    if a.variant in REFERENCES:
        _reference(a.variant)
    argv = ["--model", a.model, "--data", a.data, "--output_dir", a.out, "--overwrite", "true",
            "--method", "qlora" if a.variant in REFERENCES else a.variant, "--dtype", "bfloat16", "--bf16", "true", "--max_steps", "1",
            "--per_device_train_batch_size", str(a.batch_size), "--gradient_checkpointing", str(a.gradient_checkpointing),
            "--lora_r", str(a.lora_r), "--lora_alpha", str(2 * a.lora_r), "--lora_dropout", "0.05",
            "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--logging_steps", "1", "--train_sampling_strategy", "sequential", "--use_cpu", str(not cuda).lower()]
    t = time.perf_counter()
    trainer = train(*parse_config(SECTIONS, argv), extra_callbacks=(StepMemory(),))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ru_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": a.variant,
        "step_peak_bytes": marks["step_peak_rss"] - baseline,
        "before_step_bytes": marks["before_step_rss"] - baseline,
        "before_step_file_backed_bytes": marks["before_step_rss_file"] - baseline_file,
        "load_peak_bytes": ru_max - baseline,
        "baseline_rss_bytes": baseline,
        "peak_reset_supported": marks["peak_reset"],
        "step_peak_vram_bytes": marks.get("step_peak_vram"),
        "before_step_vram_bytes": marks.get("before_step_vram"),
        "param_bytes": marks["param_bytes"],
        "param_bytes_by_dtype": marks["param_bytes_by_dtype"],
        "trainable_params": marks["trainable_params"],
        "loss": losses[-1] if losses else None,
        "step_seconds": marks["step_seconds"],
        "seconds_total": time.perf_counter() - t,
    }


def _reference(variant: str) -> None:
    """For a reference variant: what llavatune's cast of frozen weights back to bf16 did before (or nothing)."""
    from llavatune.model import loader

    keep = loader._keep_frozen_weights_16bit
    if variant == WHAT_IF:
        loader._keep_frozen_weights_16bit = lambda *args, **kwargs: None
    else:
        loader._keep_frozen_weights_16bit = lambda model, dtypes, everything=True: keep(model, dtypes, everything=False)


# ----------------------------------------------------------------------------------------------------------------
# parent


def run_variant(a, variant: str, model: Path, data: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--model-dir", str(model),
           "--data-json", str(data), "--out-dir", str(out), "--device", a.device, "--lora-r", str(a.lora_r),
           "--batch-size", str(a.batch_size), "--threads", str(a.threads),
           "--gradient-checkpointing" if a.gradient_checkpointing else "--no-gradient-checkpointing"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{variant}: the measuring process failed ({proc.returncode})")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def mib(x: float | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every LLM linear layer (alpha = 2r)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="as in the shipped 7B recipes (default: on)")
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per variant (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: one per core)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llavatune-bench")
    ap.add_argument("--results", type=Path, default=None)
    # internal: the measuring child process
    ap.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=True,
                    help=f"also measure {WHAT_IF} (QLoRA with every unquantized weight in fp32, as PEFT leaves it) and "
                         f"{WHAT_IF_MATMUL} (frozen linear/conv weights in bf16, embeddings and norms fp32): what "
                         "llavatune did before")
    ap.add_argument("--child", choices=VARIANTS + REFERENCES, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data-json", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        ns = argparse.Namespace(variant=a.child, model=a.model_dir, data=a.data_json, out=a.out_dir, device=a.device,
                                lora_r=a.lora_r, batch_size=a.batch_size, threads=a.threads,
                                gradient_checkpointing=a.gradient_checkpointing)
        print("RESULT " + json.dumps(child(ns)), flush=True)
        return 0

    C.quiet()
    cuda = a.device == "cuda"
    t0 = time.perf_counter()
    data = C.shapes_data(a.work, n_images=8, questions_per_image=1)
    model = C.build_model(a.work, "7b" if cuda else "1b", data)
    n_params = C.model_params(model)
    mp = C.matmul_params(model)
    quantizable = mp["llm"] - mp["hidden"] * _vocab(model)  # the LLM's decoder linear layers
    # 4-bit NF4 with double quantization: 0.5 byte + ~0.127 bit of constants per weight; the rest stays 16-bit
    floor = (0.516 * quantizable + 2 * (n_params - quantizable)) / (2 * n_params)
    print(f"model: {model.name}, {n_params / 1e9:.2f}B parameters; batch {a.batch_size}, LoRA r={a.lora_r}, "
          f"gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}", flush=True)
    variants = VARIANTS + (REFERENCES if a.what_if else ())
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    key = "step_peak_vram_bytes" if cuda else "step_peak_bytes"
    before = "before_step_vram_bytes" if cuda else "before_step_bytes"
    with tempfile.TemporaryDirectory(prefix="qlora_memory-") as tmp:
        for rep in range(a.repeats):
            for v in (variants if rep % 2 == 0 else variants[::-1]):
                r = run_variant(a, v, model, data, Path(tmp) / f"{v}-{rep}")
                runs[v].append(r)
                print(f"  {v}: step peak {mib(r[key])} MiB (weights etc. resident before the step "
                      f"{mib(r[before])}"
                      f" MiB), parameters {mib(r['param_bytes'])} MiB {({k: mib(b) for k, b in r['param_bytes_by_dtype'].items()})}, "
                      f"load peak {mib(r['load_peak_bytes'])} MiB, step {r['step_seconds']:.1f}s, loss {r['loss']}",
                      flush=True)
    med = {v: {k: C.median(r[k] for r in runs[v]) for k in (key, before, "load_peak_bytes", "param_bytes")}
           for v in variants}
    ratio = med["qlora"][key] / med["lora"][key]
    load_ratio = med["qlora"]["load_peak_bytes"] / med["lora"]["load_peak_bytes"]
    print(f"floor: the LLM's linear layers are {100 * quantizable / n_params:.0f} % of the parameters, so 4-bit "
          f"weights + 16-bit rest are {floor:.2f}x the bf16 weights before any activation, gradient or optimizer state")
    print(f"QLoRA step peak {mib(med['qlora'][key])} MiB vs bf16 LoRA {mib(med['lora'][key])} MiB: {ratio:.2f}x "
          f"(goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'}); whole process incl. loading: {load_ratio:.2f}x")
    if a.what_if:
        for v in REFERENCES:
            print(f"reference {v}: {med[v][key] / med['lora'][key]:.2f}x the bf16 LoRA step")
    result = {
        "benchmark": "peak memory of one QLoRA step vs one bf16 LoRA step (llavatune train, fresh process each)",
        "command": "python benchmarks/qlora_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": a.device,
        "goal": f"QLoRA step peak <= {GOAL}x bf16 LoRA step peak",
        "ratio": round(ratio, 3),
        "goal_met": ratio <= GOAL,
        "ratio_including_loading": round(load_ratio, 3),
        "weights_only_floor_ratio": round(floor, 3),
        "quantizable_share": round(quantizable / n_params, 3),
        "peft_fp32_upcast_ratio": round(med[WHAT_IF][key] / med["lora"][key], 3) if a.what_if else None,
        "frozen_matmul_16bit_only_ratio": round(med[WHAT_IF_MATMUL][key] / med["lora"][key], 3) if a.what_if else None,
        "measure": ("torch.cuda.max_memory_allocated over the step" if cuda else
                    "VmHWM reset at step begin, read at step end, minus VmRSS before the model loaded (after imports "
                    "and a warm-up); MALLOC_MMAP_THRESHOLD_=131072"),
        "median_mib": {v: {k: mib(x) for k, x in m.items()} for v, m in med.items()},
        "setup": {"model": model.name, "parameters": n_params, "batch_size": a.batch_size, "lora_r": a.lora_r,
                  "lora_alpha": 2 * a.lora_r, "gradient_checkpointing": a.gradient_checkpointing, "dtype": "bfloat16",
                  "bf16_autocast": True, "repeats": a.repeats, "torch_threads": a.threads},
        "runs": runs,
        "machine": C.machine(a.device),
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    C.write_result("qlora_memory" + ("_cuda" if cuda else ""), result, a.results)
    return 0


def _vocab(model: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).text_config.vocab_size


if __name__ == "__main__":
    raise SystemExit(main())

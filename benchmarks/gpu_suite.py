"""Every GPU measurement llavatune needs, in one command that fits a short GPU window (~8 minutes on an H100/H200).

    pip install -e ".[bench]"        # TRL for the peer side, bitsandbytes for QLoRA
    python benchmarks/gpu_suite.py --out benchmarks/results/gpu.json
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu-dry.json    # tiny shapes on CPU: the same code paths

A LLaVA-1.5-7B-shaped model with random bf16 weights (CLIP ViT-L/14 at 336 px -> 576 image tokens, a
Llama-2-7B/Vicuna-7B LLM; built once under ``--work``), then, in this order, each section written to ``--out``
as soon as it is done (a window that closes early still leaves the finished sections):

1. ``train_lora``: LoRA r128 (alpha 256, dropout 0.05, every LLM linear, projector trained fully), bf16, batch
   ``--batch-size``, ``--steps`` steps, no gradient checkpointing: ``llavatune train`` against TRL's
   ``SFTTrainer`` with its VLM example's collator (the functions of ``train_vs_trl.py``) on the same model,
   samples, batch and precision -- tokens/s, samples/s, model FLOPs utilization, peak VRAM
   (``torch.cuda.max_memory_allocated``), final loss.
2. ``train_qlora``: the same with the LLM's linear layers in 4-bit NF4 (double quantization; vision tower,
   projector and lm_head unquantized) on both sides.
3. ``eval_vqav2``: generation on VQAv2-layout questions (5 per image): ``llavatune eval`` with shared image
   prefixes, the unshared batched path, and a batch-1 ``model_vqa_loader``-style loop (the functions of
   ``eval_vs_batch1.py``) -- samples/s, MFU, VRAM, how many answers agree.
4. ``eval_okvqa``: the same on OK-VQA-layout questions (one per image: nothing to share).

Sections that would not finish within ``--budget`` seconds (estimated from the ones before) are skipped and
marked so. ``--dry-run`` runs everything with ``build_tiny``'s shapes on the CPU in well under a minute (the test
suite does), so a GPU window is never lost to a typo; without TRL installed its sides are skipped and marked.
Evaluation runs in bf16 on the GPU (``--eval-dtype float32`` for answers comparable across batch shapes: bf16
kernels round differently per batch size, and random weights leave near-ties).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common as C

SECTIONS = ("train_lora", "train_qlora", "eval_vqav2", "eval_okvqa")


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def train_section(a, method: str, base: Path, data: Path, tmp: Path) -> dict[str, Any]:
    """llavatune vs TRL for one method, ``--train-repeats`` interleaved pairs."""
    import torch
    import train_vs_trl as T

    cuda = a.device == "cuda"
    ns = SimpleNamespace(device=a.device, steps=a.steps, warmup=a.warmup, batch_size=a.batch_size, lora_r=a.lora_r,
                         seed=0, threads=a.threads, data_pass=False, method=method)
    sides = ["llavatune"] + (["trl"] if importlib.util.find_spec("trl") else [])
    peak = C.peak_flops(a.device, a.peak_tflops)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for rep in range(a.train_repeats):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            _free(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            fn = T.run_llavatune if side == "llavatune" else T.run_trl
            r = fn(ns, base, data, tmp / f"{method}-{side}-{rep}")
            if cuda:
                r["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
            fpt = T.model_flops_per_token(base, r["log"].tokens[-1] / (a.steps * a.batch_size))
            s = T.summarize(r, a.warmup, a.batch_size, fpt, peak)
            s.pop("losses", None)
            runs[side].append(s)
            print(f"  [{method}] {side:>9}: {s['tokens_per_s']:.0f} tokens/s, {s['samples_per_s']:.2f} samples/s"
                  + (f", MFU {100 * s['mfu']:.1f} %" if s.get("mfu") else "")
                  + (f", peak VRAM {s['peak_vram_gib']:.1f} GiB" if s.get("peak_vram_gib") else "")
                  + f", loss {s['final_loss']:.4f}", flush=True)
            del r
            shutil.rmtree(tmp / f"{method}-{side}-{rep}", ignore_errors=True)
    out: dict[str, Any] = {"method": method, "lora_r": a.lora_r, "batch_size": a.batch_size, "steps": a.steps,
                           "precision": "bf16" if cuda else "fp32",
                           "median": {side: {k: C.median(r[k] for r in rs) for k in rs[0]
                                             if isinstance(rs[0][k], (int, float))} for side, rs in runs.items()},
                           "runs": runs}
    if "trl" in runs:
        out["ratio_tokens_per_s_llavatune_vs_trl"] = round(C.median(
            ll["tokens_per_s"] / t["tokens_per_s"] for ll, t in zip(runs["llavatune"], runs["trl"])), 3)
        if cuda:
            out["ratio_peak_vram_llavatune_vs_trl"] = round(C.median(
                ll["peak_vram_gib"] / t["peak_vram_gib"] for ll, t in zip(runs["llavatune"], runs["trl"])), 3)
    else:
        out["trl"] = "skipped: TRL is not installed (pip install -e '.[bench]')"
    return out


def eval_section(a, case: str, base: Path, pred) -> dict[str, Any]:
    import eval_vs_batch1 as E

    ns = SimpleNamespace(device=a.device, samples=a.eval_samples, questions_per_image=5, batch_size=a.eval_batch_size,
                         max_new_tokens=a.max_new_tokens, repeats=a.eval_repeats, dtype=a.eval_dtype,
                         peak_tflops=a.peak_tflops, work=a.work, image_size=a.image_size, e2e=a.eval_end_to_end)
    r = E.run_case(ns, case, base, pred, a.threads)
    r.pop("sides_detail", None)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=C.RESULTS / "gpu.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: check every code path in seconds")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--budget", type=float, default=None, help="seconds (default: 480 on a GPU, none for --dry-run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: 16; dry run 3)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the throughput window (default 4; 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default: 4; dry run 2)")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank, alpha 2r (default: 128; dry run 8)")
    ap.add_argument("--train-repeats", type=int, default=1, help="interleaved llavatune/TRL pairs per method")
    ap.add_argument("--eval-samples", type=int, default=None, help="questions per eval case (default 64; dry run 10)")
    ap.add_argument("--eval-end-to-end", action=argparse.BooleanOptionalAction, default=None,
                    help="also run 'llavatune eval' end to end per case (loads the model again; default: dry run only)")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--eval-repeats", type=int, default=None, help="default 2; dry run 1")
    ap.add_argument("--eval-dtype", choices=["bfloat16", "float32"], default=None,
                    help="default: bfloat16 on the GPU, float32 on the CPU")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 16; dry run 3")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (dry run)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU peak bf16 TFLOP/s for MFU (default: by name)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llavatune-bench")
    a = ap.parse_args(argv)
    dry = a.dry_run
    a.device = "cpu" if dry else "cuda"
    a.steps = a.steps or (3 if dry else 16)
    a.warmup = a.warmup or (1 if dry else 4)
    a.batch_size = a.batch_size or (2 if dry else 4)
    a.lora_r = a.lora_r or (8 if dry else 128)
    a.eval_samples = a.eval_samples or (10 if dry else 64)
    a.eval_end_to_end = dry if a.eval_end_to_end is None else a.eval_end_to_end
    a.eval_repeats = a.eval_repeats or (1 if dry else 2)
    a.eval_dtype = a.eval_dtype or ("float32" if dry else "bfloat16")
    a.max_new_tokens = a.max_new_tokens or (3 if dry else 16)
    budget = a.budget if a.budget is not None else (None if dry else 480.0)
    if a.warmup >= a.steps:
        ap.error("--warmup must be smaller than --steps")
    C.quiet()
    import torch

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("no CUDA GPU is visible; --dry-run checks the suite on the CPU")
    C.set_threads(a.threads)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "GPU suite: LoRA / QLoRA training vs TRL, eval vs the batch-1 loop, shared image prefixes",
        "command": "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dry_run": dry, "device": a.device, "sections": {}, "skipped": {},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }

    def save() -> None:
        result["machine"] = C.machine(a.device)
        result["seconds_total"] = round(time.perf_counter() - t0, 1)
        C.write_result("gpu", result, a.out)

    img = a.image_size = 32 if dry else 224  # the processor resizes to the model's 336 px
    data = C.shapes_data(a.work, n_images=max(8, -(-a.steps * a.batch_size // 3)), questions_per_image=3,
                         image_size=img)
    base = C.build_model(a.work, "tiny" if dry else "7b", data)
    result["model"] = {"name": base.name, "parameters": C.model_params(base)}
    print(f"model {base.name}: {result['model']['parameters'] / 1e9:.2f}B parameters; setup "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    C.shapes_data(a.work, n_images=a.eval_samples, questions_per_image=1, split="val", image_size=img)
    C.shapes_data(a.work, n_images=-(-a.eval_samples // 5), questions_per_image=5, split="val", image_size=img,
                  layout="vqav2")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    took: dict[str, float] = {}
    pred = None
    try:
        for name in a.only:
            elapsed = time.perf_counter() - t0
            guess = max(took.values()) if took else 0.0
            if budget is not None and elapsed + guess > budget:
                result["skipped"][name] = (f"budget: {elapsed:.0f}s used, this section would take ~{guess:.0f}s of "
                                           f"the {budget:.0f}s")
                print(f"skipping {name}: {result['skipped'][name]}", flush=True)
                save()
                continue
            print(f"== {name}", flush=True)
            t = time.perf_counter()
            try:
                if name.startswith("train_"):
                    if pred is not None:
                        pred = None
                        _free(cuda)
                    result["sections"][name] = train_section(a, name.split("_", 1)[1], base, data, tmp)
                else:
                    if pred is None:
                        from llavatune.infer.predict import load_predictor

                        _free(cuda)
                        pred = load_predictor(str(base), dtype=a.eval_dtype, device=a.device)
                    result["sections"][name] = eval_section(a, name.split("_", 1)[1], base, pred)
            except Exception as e:  # noqa: BLE001 - keep the window's other sections; the error is recorded
                result["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
                if dry:
                    raise
            took[name] = time.perf_counter() - t
            result["sections"].get(name, {})["seconds"] = round(took[name], 1)
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save()
    summary(result)
    failed = [k for k, v in result["sections"].items() if "error" in v]
    return 1 if failed else 0


def summary(result: dict[str, Any]) -> None:
    s = result["sections"]
    for m in ("train_lora", "train_qlora"):
        if m in s and "median" in s[m]:
            line = ", ".join(f"{side} {v['tokens_per_s']:.0f} tokens/s" + (f" MFU {100 * v['mfu']:.1f} %" if v.get("mfu")
                                                                            else "")
                             + (f" {v['peak_vram_gib']:.1f} GiB" if v.get("peak_vram_gib") else "")
                             for side, v in s[m]["median"].items())
            print(f"{m}: {line}")
    for c in ("eval_okvqa", "eval_vqav2"):
        if c in s and "ratio_shared_vs_batch1" in s[c]:
            print(f"{c}: shared {s[c]['ratio_shared_vs_batch1']:.2f}x the batch-1 loop, "
                  f"{s[c]['ratio_shared_vs_unshared']:.2f}x unshared; answers equal to batch-1: "
                  f"{s[c]['identical_answers']}")
    if result["skipped"]:
        print(f"skipped: {', '.join(result['skipped'])}")


if __name__ == "__main__":
    raise SystemExit(main())

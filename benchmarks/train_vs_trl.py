"""Training throughput: ``llavatune train`` against TRL's ``SFTTrainer`` as TRL's VLM example uses it.

    python benchmarks/train_vs_trl.py [--device cpu|cuda] [--steps 8] [--repeats 3] [--batch-size 8]

Both sides train the same saved LLaVA (real ``CLIPVisionModel`` + ``LlamaForCausalLM`` classes, built once by
``llavatune.model.tiny.build_tiny`` at 224 px / 16 px patches = 196 image tokens, ~20M parameters; on
``--device cuda`` a LLaVA-1.5-7B-shaped model with random bf16 weights) on the same ``steps x batch``
samples of the synthetic OK-VQA-layout shapes set (drawn at 224 px, converted by ``llavatune prepare okvqa``:
LLaVA-1.5's short-answer prompt), with the same LoRA (every linear layer of the LLM, projector trained fully
via ``modules_to_save``), optimizer, learning-rate schedule, seed, batch size, precision (fp32 on CPU, bf16
on CUDA), no gradient checkpointing, in one process, alternating which side goes first:

- **llavatune**: ``llavatune.train.run.train`` (what ``llavatune train`` runs) with its defaults: tokenized
  once up front with answer-only labels, images decoded lazily in the dataset, dynamic padding,
  length-grouped batches.
- **TRL**: ``SFTTrainer`` with the collator of TRL's ``examples/scripts/sft_vlm.py``:
  ``processor.apply_chat_template`` + ``processor(images=..., text=..., padding=True)`` per batch, labels =
  input_ids with pad and image tokens set to -100 (so the system prompt and question are supervised too),
  ``skip_prepare_dataset``, a ``datasets`` dataset whose ``images`` column decodes the same JPEG files.
  ``gradient_checkpointing`` is turned off (TRL's default is on) so both sides do the same work.

Throughput is measured from the end of step ``--warmup`` to the end of the last step (per-step callbacks,
CUDA synchronized): samples/s and tokens/s (non-padding tokens, image tokens included, from the Trainer's
``num_input_tokens_seen``). The ratio is the median over ``--repeats`` interleaved pairs. Final losses are
reported for both; they are not comparable numbers: llavatune's is the mean over answer tokens, TRL's over
every non-image token. ``--device cuda`` adds model FLOPs utilization and peak VRAM.

Whole job (``--whole-process``, on by default): what a user waits for. Each side also runs as its own fresh
``python`` process (``--repeats`` interleaved pairs) that imports its libraries, loads the model and data, trains
the same steps and saves a checkpoint a user can load (llavatune: the output folder as ``llavatune train``
leaves it -- adapter with projector, processor, config, report; TRL: ``trainer.save_model`` + the processor);
measured from the launch of the process to the moment the checkpoint is saved (the child prints a wall-clock
timestamp after saving), and the step window inside that process. Results go to
``benchmarks/results/train_vs_trl[_cuda].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

GOAL = 1.25


class StepLog:
    """Trainer callback: wall/CPU clock, tokens seen and loss at the end of every step; trainable-weight digest
    when training begins (to check both sides start from the same weights)."""

    def __new__(cls, cuda: bool):
        from transformers import TrainerCallback

        class _StepLog(TrainerCallback):
            def __init__(self):
                self.cuda = cuda
                self.wall: list[float] = []
                self.cpu: list[float] = []
                self.tokens: list[int] = []
                self.losses: list[float] = []
                self.digest: dict[str, float] = {}

            def on_train_begin(self, args, state, control, model=None, **kw):

                if model is not None:
                    for n, p in model.named_parameters():
                        if p.requires_grad and "lora_B" not in n:  # lora_B starts at zero
                            self.digest[n.replace(".modules_to_save.default", "")] = float(p.detach().double().sum())

            def on_step_end(self, args, state, control, **kw):
                if self.cuda:
                    import torch

                    torch.cuda.synchronize()
                self.wall.append(time.perf_counter())
                self.cpu.append(time.process_time())
                self.tokens.append(int(state.num_input_tokens_seen))

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

        return _StepLog()


def bf16(a) -> bool:
    """bf16 weights and autocast: on CUDA, and for QLoRA everywhere (TRL casts QLoRA's trainable weights to bf16,
    which needs autocast even on a CPU)."""
    return a.device == "cuda" or getattr(a, "method", "lora") == "qlora"


def common_args(a) -> dict[str, Any]:
    """TrainingArguments both sides get (llavatune's recipe defaults, spelled out for TRL)."""
    cuda = a.device == "cuda"
    return dict(
        per_device_train_batch_size=a.batch_size, max_steps=a.steps, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=0.03, weight_decay=0.0, optim="adamw_torch_fused", seed=a.seed, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, gradient_checkpointing=False,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding", bf16=bf16(a), use_cpu=not cuda,
    )


def run_llavatune(a, base: Path, data: Path, out: Path) -> dict[str, Any]:
    """``llavatune.train.run.train``; it saves the final adapter, processor and config into ``out`` itself."""
    from llavatune.config import parse_config
    from llavatune.train.run import SECTIONS, train

    argv = ["--model", str(base), "--data", str(data), "--output_dir", str(out), "--overwrite", "true",
            "--max_train_samples", str(a.steps * a.batch_size), "--dtype", "bfloat16" if bf16(a) else "float32",
            "--method", getattr(a, "method", "lora"), "--lora_r", str(a.lora_r), "--lora_alpha", str(2 * a.lora_r),
            "--lora_dropout", "0.05"]
    targs = common_args(a)
    tokens_seen = targs.pop("include_num_input_tokens_seen")  # a str option the bool-typed flag cannot take
    for k, v in targs.items():
        argv += [f"--{k}", str(v)]
    *sections, targs = parse_config(SECTIONS, argv)
    targs = dataclasses.replace(targs, include_num_input_tokens_seen=tokens_seen)
    log = StepLog(a.device == "cuda")
    t = time.perf_counter()
    trainer = train(*sections, targs, extra_callbacks=(log,))
    total = time.perf_counter() - t
    out = {"log": log, "seconds_total": total, "data_path": data_pass(trainer) if a.data_pass else None}
    del trainer
    return out


def trl_rows(data: Path, n: int) -> list[dict[str, Any]]:
    """The same records in the "messages" + "images" layout of TRL's VLM example datasets."""
    from llavatune.data.records import load_records, normalize_image_placement

    return [{"messages": C.chat_messages(r.conversations), "images": [str(data.parent / p) for p in r.images]}
            for r in [normalize_image_placement(r) for r in load_records(str(data))][:n]]


def run_trl(a, base: Path, data: Path, out: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    from llavatune.model import loader

    cuda = a.device == "cuda"
    t = time.perf_counter()
    dtype = torch.bfloat16 if bf16(a) else torch.float32
    processor = AutoProcessor.from_pretrained(base)
    if getattr(a, "method", "lora") == "qlora":  # the same 4-bit layout as llavatune's (loader.quantization_kwargs)
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(**loader.quantization_kwargs(4, "nf4", True, dtype))
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, quantization_config=quant,
                                                            device_map={"": 0} if cuda else {"": "cpu"})
    else:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
    # --- the collator of TRL's examples/scripts/sft_vlm.py ---
    def collate_fn(examples):
        texts = [processor.apply_chat_template(example["messages"], tokenize=False) for example in examples]
        images = [example["images"] for example in examples]
        if isinstance(model, LlavaForConditionalGeneration):
            images = [image[0] for image in images]
        batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[labels == processor.tokenizer.pad_token_id] = -100
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        labels[labels == image_token_id] = -100
        batch["labels"] = labels
        return batch
    # ---
    ds = datasets.Dataset.from_list(trl_rows(data, a.steps * a.batch_size))
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    names = loader.linear_module_names(model, "language_model")
    peft_config = LoraConfig(  # what llavatune's apply_method builds
        r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.05,
        target_modules=rf".*language_model.*\.({'|'.join(names)})$", modules_to_save=[loader.PROJECTOR],
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(output_dir=str(out), remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                     max_length=None, **common_args(a))
    log = StepLog(cuda)
    torch.manual_seed(a.seed)  # the LoRA init draws from the same RNG state as llavatune's (see run())
    trainer = SFTTrainer(model=model, args=args, data_collator=collate_fn, train_dataset=ds,
                         processing_class=processor, peft_config=peft_config, callbacks=[log])
    trainer.train()
    if getattr(a, "save", False):  # a loadable checkpoint, as a user's TRL script ends
        trainer.save_model(str(out))
        processor.save_pretrained(str(out))
    total = time.perf_counter() - t
    out = {"log": log, "seconds_total": total, "data_path": data_pass(trainer) if a.data_pass else None}
    del trainer
    return out


def data_pass(trainer) -> dict[str, float]:
    """One pass over the trainer's own training dataloader without the model: milliseconds per batch (image
    decoding, preprocessing, tokenization where it happens, collation) and the share of padding tokens."""
    times, padded, real = [], 0, 0
    it = iter(trainer.get_train_dataloader())
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        times.append(time.perf_counter() - t)
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    return {"ms_per_batch": 1000 * C.median(times), "padding_fraction": 1 - real / padded, "batches": len(times)}


def same_inputs(base: Path, data: Path, n: int) -> str:
    """How many of the n samples get identical ``input_ids`` and ``pixel_values`` from llavatune's dataset and
    from the TRL example's collator (run one sample at a time, so padding does not enter)."""
    import datasets
    import torch
    from transformers import AutoProcessor

    from llavatune.data.encode import Encoder, LlavaDataset
    from llavatune.train.run import load_split

    processor = AutoProcessor.from_pretrained(base)
    records, roots = load_split(str(data), None)
    ds = LlavaDataset(records[:n], Encoder(processor), roots[:n])
    rows = datasets.Dataset.from_list(trl_rows(data, n)).cast_column("images", datasets.Sequence(datasets.Image()))
    same = 0
    for i in range(n):
        ours, ex = ds[i], rows[i]
        text = processor.apply_chat_template(ex["messages"], tokenize=False)
        theirs = processor(images=[ex["images"][0]], text=[text], return_tensors="pt")
        same += bool(torch.equal(ours["input_ids"], theirs["input_ids"][0])
                     and torch.equal(ours["pixel_values"], theirs["pixel_values"]))
    return f"{same}/{n}"


def summarize(r: dict[str, Any], warmup: int, batch: int, flops_per_token: float | None = None,
              peak: float | None = None) -> dict[str, Any]:
    log = r["log"]
    w0, w1 = log.wall[warmup - 1], log.wall[-1]
    c0, c1 = log.cpu[warmup - 1], log.cpu[-1]
    steps = len(log.wall) - warmup
    tokens = log.tokens[-1] - log.tokens[warmup - 1]
    out = {
        "samples_per_s": steps * batch / (w1 - w0),
        "tokens_per_s": tokens / (w1 - w0),
        "samples_per_cpu_s": steps * batch / (c1 - c0),
        "seconds_per_step": (w1 - w0) / steps,
        "measured_steps": steps,
        "tokens_per_sample": tokens / (steps * batch),
        "final_loss": log.losses[-1] if log.losses else None,
        "losses": [round(x, 4) for x in log.losses],
        "seconds_total_incl_setup": r["seconds_total"],
    }
    if flops_per_token and peak:
        out["mfu"] = flops_per_token * out["tokens_per_s"] / peak
    if "peak_vram_gib" in r:
        out["peak_vram_gib"] = r["peak_vram_gib"]
    return out


def model_flops_per_token(base: Path, tokens_per_sample: float) -> float:
    """Model FLOPs per (non-padding) token of a LoRA step with a frozen vision tower: LLM forward 2N + backward
    to the activations 2N (frozen weights get no weight gradient; LoRA's own small matmuls are left out),
    attention scores 4 x layers x seq x hidden forward and twice that backward, and the frozen vision tower's
    forward (2 N_vision per patch, one image per sample, spread over the sample's tokens)."""
    m = C.matmul_params(base)
    vision = 2 * m["vision"] * m["patches"] / tokens_per_sample
    return 4 * m["llm"] + 12 * m["layers"] * tokens_per_sample * m["hidden"] + vision


def child(a) -> int:
    """One side as its own process: train, save, print the wall-clock time the checkpoint was saved at."""
    C.quiet()
    C.set_threads(a.threads)
    a.data_pass = False
    a.save = True
    fn = run_llavatune if a.child == "llavatune" else run_trl
    r = fn(a, Path(a.child_model), Path(a.child_data), Path(a.child_out))
    saved = time.time()
    s = summarize(r, a.warmup, a.batch_size)
    print("RESULT " + json.dumps({"saved_at": saved, "samples_per_s": s["samples_per_s"],
                                  "step_window_seconds": s["seconds_per_step"] * s["measured_steps"],
                                  "seconds_in_train_call": r["seconds_total"],
                                  "checkpoint_files": sorted(p.name for p in Path(a.child_out).iterdir())}), flush=True)
    return 0


def whole_process(a, base: Path, data: Path, tmp: Path) -> dict[str, Any]:
    """Each side in a fresh process, from launch to saved checkpoint (``--repeats`` interleaved pairs)."""
    import os
    import subprocess

    runs: dict[str, list[dict[str, Any]]] = {"llavatune": [], "trl": []}
    for rep in range(a.repeats):
        for side in (("trl", "llavatune") if rep % 2 == 0 else ("llavatune", "trl")):
            out = tmp / f"whole-{side}-{rep}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--child-model", str(base),
                   "--child-data", str(data), "--child-out", str(out), "--device", a.device, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--batch-size", str(a.batch_size), "--lora-r", str(a.lora_r),
                   "--seed", str(a.seed), "--threads", str(a.threads)]
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
            launched = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            exited = time.time()
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"whole-process run of {side} failed ({proc.returncode})")
            line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
            r = json.loads(line[len("RESULT "):])
            r.update(launch_to_saved_seconds=r["saved_at"] - launched, launch_to_exit_seconds=exited - launched)
            del r["saved_at"]
            runs[side].append(r)
            print(f"  whole process, rep {rep + 1} {side:>9}: launch -> saved checkpoint "
                  f"{r['launch_to_saved_seconds']:.1f}s (step window {r['step_window_seconds']:.1f}s, "
                  f"{r['samples_per_s']:.2f} samples/s)", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    for rs in runs.values():
        for r in rs:  # imports, loading, data preparation, the steps before the window, saving
            r["outside_step_window_seconds"] = r["launch_to_saved_seconds"] - r["step_window_seconds"]
    pairs = [t["launch_to_saved_seconds"] / ll["launch_to_saved_seconds"] for ll, t in zip(runs["llavatune"], runs["trl"])]
    med = {side: round(C.median(r["launch_to_saved_seconds"] for r in rs), 2) for side, rs in runs.items()}
    outside = {side: round(C.median(r["outside_step_window_seconds"] for r in rs), 2) for side, rs in runs.items()}
    return {"median_launch_to_saved_seconds": med, "ratio_trl_vs_llavatune": round(C.median(pairs), 3),
            "pair_ratios": [round(x, 3) for x in pairs], "median_outside_step_window_seconds": outside, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: cpu 8, cuda 30)")
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the throughput window")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved llavatune/TRL pairs (median reported)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: cpu 8, cuda 4")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank, alpha = 2r (default: cpu 16, cuda 128)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: one per core); see _common.set_threads")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU peak bf16 TFLOP/s for MFU (default: by name)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llavatune-bench")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--whole-process", action=argparse.BooleanOptionalAction, default=True,
                    help="also time each side as a fresh process, from launch to saved checkpoint")
    ap.add_argument("--child", choices=["llavatune", "trl"], help=argparse.SUPPRESS)
    for name in ("--child-model", "--child-data", "--child-out"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    a.steps = a.steps or (30 if cuda else 8)
    a.batch_size = a.batch_size or (4 if cuda else 8)
    a.lora_r = a.lora_r or (128 if cuda else 16)
    if a.warmup < 1 or a.warmup >= a.steps:
        ap.error("--warmup must be between 1 and --steps - 1")
    if a.child:
        return child(a)
    C.quiet()
    import torch

    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    threads = C.set_threads(a.threads)

    t_start = time.perf_counter()
    data = C.shapes_data(a.work, n_images=max(64, a.steps * a.batch_size // 3 + 1), questions_per_image=3)
    base = C.build_model(a.work, "7b" if cuda else "cpu", data)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    n_params = C.model_params(base)
    print(f"model: {n_params / 1e6:.1f}M parameters (vision {cfg.vision_config.hidden_size}x"
          f"{cfg.vision_config.num_hidden_layers}, LLM {cfg.text_config.hidden_size}x{cfg.text_config.num_hidden_layers}"
          f", vocab {cfg.text_config.vocab_size}); {a.steps} steps x batch {a.batch_size}, {a.repeats} repeats, "
          f"LoRA r={a.lora_r}", flush=True)
    peak = C.peak_flops(a.device, a.peak_tflops)
    identical = same_inputs(base, data, a.steps * a.batch_size)
    print(f"identical input_ids and pixel_values per sample (llavatune dataset vs TRL example collator): {identical}",
          flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"llavatune": [], "trl": []}
    digests: dict[str, dict[str, float]] = {}
    data_paths: dict[str, dict[str, float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="train_vs_trl-"))
    try:
        for rep in range(a.repeats):
            order = ("trl", "llavatune") if rep % 2 == 0 else ("llavatune", "trl")
            for side in order:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                torch.manual_seed(a.seed)
                fn = run_llavatune if side == "llavatune" else run_trl
                a.data_pass = rep == 0  # each side's data path measured once
                r = fn(a, base, data, tmp / f"{side}-{rep}")
                if cuda:
                    r["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
                fpt = model_flops_per_token(base, (r["log"].tokens[-1] / (a.steps * a.batch_size))) if cuda else None
                s = summarize(r, a.warmup, a.batch_size, fpt, peak)
                if r["data_path"]:
                    data_paths[side] = r["data_path"]
                digests.setdefault(side, r["log"].digest)
                runs[side].append(s)
                print(f"  rep {rep + 1} {side:>9}: {s['samples_per_s']:.3f} samples/s, {s['tokens_per_s']:.0f} tokens/s,"
                      f" {s['seconds_per_step']:.2f} s/step, final loss {s['final_loss']:.4f}"
                      + (f", MFU {100 * s['mfu']:.1f} %" if "mfu" in s else "")
                      + (f", peak VRAM {s['peak_vram_gib']:.1f} GiB" if "peak_vram_gib" in s else ""), flush=True)
                del r
                gc.collect()
        whole = whole_process(a, base, data, tmp) if a.whole_process else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(side, key):
        vals = [r[key] for r in runs[side] if r.get(key) is not None]
        return C.median(vals) if vals else None

    pair_ratios = [ll["samples_per_s"] / t["samples_per_s"] for ll, t in zip(runs["llavatune"], runs["trl"])]
    ratio = C.median(pair_ratios)
    cpu_ratio = C.median(ll["samples_per_cpu_s"] / t["samples_per_cpu_s"] for ll, t in zip(runs["llavatune"], runs["trl"]))
    same_init = digests.get("llavatune") == digests.get("trl")
    summary = {side: {k: med(side, k) for k in ("samples_per_s", "tokens_per_s", "samples_per_cpu_s", "seconds_per_step",
                                                 "tokens_per_sample", "final_loss", "mfu", "peak_vram_gib")}
               for side in runs}
    print(f"medians: llavatune {summary['llavatune']['samples_per_s']:.3f} samples/s, "
          f"{summary['llavatune']['tokens_per_s']:.0f} tokens/s | TRL {summary['trl']['samples_per_s']:.3f} samples/s, "
          f"{summary['trl']['tokens_per_s']:.0f} tokens/s (per side, so machine noise does not cancel: see the pair ratio)")
    print(f"final loss: llavatune {summary['llavatune']['final_loss']:.4f} (answer tokens) | TRL "
          f"{summary['trl']['final_loss']:.4f} (every non-image, non-pad token, as in TRL's example)")
    print(f"same initial trainable weights: {same_init}")
    for side, d in data_paths.items():
        print(f"data path alone ({side}): {d['ms_per_batch']:.1f} ms per batch of {a.batch_size} "
              f"({100 * d['ms_per_batch'] / 1000 / summary[side]['seconds_per_step']:.1f} % of a step), "
              f"{100 * d['padding_fraction']:.1f} % padding tokens")
    best = max(r["samples_per_s"] for r in runs["llavatune"]) / max(r["samples_per_s"] for r in runs["trl"])
    if whole:
        m = whole["median_launch_to_saved_seconds"]
        print(f"whole job (fresh process, launch -> saved checkpoint): llavatune {m['llavatune']:.1f}s, TRL "
              f"{m['trl']:.1f}s; TRL / llavatune {whole['ratio_trl_vs_llavatune']:.2f}x (median of pairs "
              f"{whole['pair_ratios']}); outside the step window (imports, loading, data, saving): llavatune "
              f"{whole['median_outside_step_window_seconds']['llavatune']:.1f}s, TRL "
              f"{whole['median_outside_step_window_seconds']['trl']:.1f}s")
    print(f"ratio llavatune / TRL samples/s: {ratio:.2f}x (median of {len(pair_ratios)} interleaved pairs; fastest run "
          f"of each side {best:.2f}x; per CPU-second {cpu_ratio:.2f}x); goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'}")
    result = {
        "benchmark": "training throughput: llavatune train vs TRL SFTTrainer (sft_vlm.py collator), LoRA",
        "command": "python benchmarks/train_vs_trl.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": a.device,
        "goal": f"llavatune samples/s >= {GOAL}x TRL",
        "ratio_samples_per_s": round(ratio, 3),
        "ratio_tokens_per_s": round(C.median(ll["tokens_per_s"] / t["tokens_per_s"]
                                             for ll, t in zip(runs["llavatune"], runs["trl"])), 3),
        "ratio_samples_per_cpu_s": round(cpu_ratio, 3),
        "ratio_fastest_runs": round(best, 3),
        "pair_ratios": [round(x, 3) for x in pair_ratios],
        "goal_met": ratio >= GOAL,
        "median": summary,
        "whole_process": whole,
        "same_initial_trainable_weights": same_init,
        "identical_model_inputs_per_sample": identical,
        "data_path": data_paths,
        "loss_note": "llavatune supervises the answer tokens (+ end of turn) only; TRL's example collator supervises "
                     "every token except padding and image tokens (system prompt, question, answer), so its loss is "
                     "a mean over different tokens and the numbers are not comparable",
        "setup": {"model_parameters": n_params, "model": str(base.name), "batch_size": a.batch_size, "steps": a.steps,
                  "warmup_steps_excluded": a.warmup, "repeats": a.repeats, "lora_r": a.lora_r,
                  "lora_alpha": 2 * a.lora_r, "precision": "bf16" if cuda else "fp32", "gradient_checkpointing": False,
                  "dataloader_num_workers": 0, "samples": a.steps * a.batch_size, "torch_threads": threads},
        "runs": runs,
        "machine": C.machine(a.device),
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    C.write_result("train_vs_trl" + ("_cuda" if cuda else ""), result, a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

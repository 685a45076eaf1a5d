"""Image-grouped training data: the same questions, one record per image, against one record per question.

    python benchmarks/train_grouped.py [--train-images 120] [--questions-per-image 5] [--batch-size 8]
    python benchmarks/train_grouped.py --equal-budget --model small196 [--pool-images 2000] [--budget-cpu-seconds 60] [--seeds 5]

Data: the synthetic shapes set in the VQAv2 layout (``--questions-per-image`` questions per image; VQAv2 has
5.4), drawn at 224 px and converted twice by ``llavatune prepare vqav2``: as is (one record per question) and
with ``--group-by-image`` (one multi-turn record per image, ``<image>`` in the first turn only, question order
shuffled with the seed). A separate validation set (other images, another seed) is evaluated one question per
query, as ``llavatune eval`` does. Model: the CPU benchmark LLaVA (``build_tiny`` at 224 px / 16 px patches =
196 image tokens, ~20M parameters), random weights; LoRA (r 64, dropout 0) with the projector and ``lm_head``
trained fully (a random LLM has no useful output head), lr 1e-3 constant after 3 % warmup, fp32, one torch
thread, through ``llavatune.train.run.train``.

Two measurements:

1. **Wall time for the same questions**: one epoch over every question, per-question records (batch
   ``--batch-size``) against grouped records. Grouped records use ``--grouped-batch-size`` (default: the batch
   size divided by the questions per image, the adjustment docs/data.md recommends, so that an optimizer step
   sees about as many questions either way). Measured: the Trainer's ``train_runtime`` and the whole ``train``
   call (tokenizing, model loading, saving included); CPU time of this process as a cross-check on a shared
   machine. Goal: >= 3x less.
2. **Validation accuracy at equal time**: the per-question run's epoch sets the budget; the grouped data is
   trained for as many epochs as fit in it (measured from its own first epoch) and both final models are
   evaluated (VQA accuracy on the validation questions). Goal: grouped at least as good. The budget is counted
   in CPU seconds of the training loop (``--budget-clock cpu``, the default: with one torch thread that is the
   compute the run needed, which other jobs on a shared machine do not stretch as they stretch wall time);
   ``--budget-clock wall`` counts wall time instead.

3. **Validation accuracy at an equal training budget, new data** (``--equal-budget``, what the issue means by
   "equal wall time": the time grouping saves buys more questions, not more epochs): a pool of
   ``--pool-images`` images (another seed), larger than either side reaches, is converted in both layouts;
   each side makes one pass over it in its layout (the Trainer's shuffle, ``--seeds`` training seeds),
   stopped after the optimizer step that reaches ``--budget-cpu-seconds`` CPU seconds of the training loop,
   and both are scored on the same validation questions. Reported: questions seen by each side and the median
   VQA accuracy over seeds. Model: ``--model small196`` (the demo's model at 112 px:
   196 image tokens, which learns the task on a CPU), warm-started (``--init warm``: ``build_tiny``'s warm
   starts on the tokenizer's data, neither the pool nor the validation set, the miniature of the pretrained
   LLaVA that grouped fine-tuning is for).

Results go to ``benchmarks/results/train_grouped.json`` (``train_grouped_speed.json`` with ``--speed-only``,
``train_grouped_budget.json`` with ``--equal-budget``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

GOAL_SPEEDUP = 3.0


def train_once(a, base: Path, data: Path, out: Path, batch: int, epochs: float, budget: float | None = None,
               seed: int | None = None) -> dict[str, Any]:
    """One ``llavatune train`` run; ``budget``: stop after the optimizer step that reaches this many CPU seconds of
    the training loop (the learning rate is constant after warmup, so stopping early is the same run as an epoch
    over exactly the records it reached)."""
    from llavatune.config import parse_config
    from llavatune.train.run import SECTIONS, train

    argv = ["--model", str(base), "--data", str(data), "--output_dir", str(out), "--overwrite", "true",
            "--dtype", "float32", "--use_cpu", "true", "--method", "lora", "--lora_r", "64", "--lora_alpha", "64",
            "--lora_dropout", "0", "--lora_modules_to_save", "lm_head", "--learning_rate", str(a.lr),
            "--projector_lr", str(a.lr), "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "0.03",
            "--per_device_train_batch_size", str(batch), "--num_train_epochs", str(epochs),
            "--seed", str(a.seed if seed is None else seed),
            "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "5",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    from transformers import TrainerCallback

    loop: dict[str, float] = {}

    class LoopClock(TrainerCallback):  # CPU seconds of the training loop alone (what train_runtime is in wall time)
        def on_train_begin(self, args, state, control, **kw):
            loop["begin"] = time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if budget is not None and time.process_time() - loop["begin"] >= budget:
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kw):
            loop["end"] = time.process_time()

    load_before = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    trainer = train(*parse_config(SECTIONS, argv), extra_callbacks=(LoopClock(),))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    log = trainer.state.log_history
    runtime = next(h["train_runtime"] for h in log if "train_runtime" in h)
    losses = [h["loss"] for h in log if "loss" in h]
    r = {"train_runtime": round(runtime, 2), "train_loop_cpu_seconds": round(loop["end"] - loop["begin"], 2),
         "train_call_seconds": round(wall, 2), "train_call_cpu_seconds": round(cpu, 2),
         "optimizer_steps": trainer.state.global_step, "epochs": epochs, "batch_size": batch,
         "samples": len(trainer.train_dataset), "final_loss": round(losses[-1], 4) if losses else None,
         "mean_loss_last_10_logs": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
         "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    del trainer
    return r


def evaluate_run(out: Path, val: Path, max_new_tokens: int, predictions: Path | None = None) -> dict[str, Any]:
    """VQA accuracy of the model in ``out`` on ``val``; ``predictions``: a folder for predictions.jsonl."""
    from llavatune.eval.evaluate import EvalConfig, evaluate

    m = evaluate(EvalConfig(model=str(out), data=str(val), max_new_tokens=max_new_tokens,
                            out=None if predictions is None else str(predictions)))
    return {k: m.get(k) for k in ("n", "vqa_accuracy", "exact_match", "by_answer_type", "samples_per_second")}


def scored_questions(predictions: Path) -> list[tuple[Any, str, str]]:
    """(question_id, question, prediction) of every scored row of ``predictions/predictions.jsonl``, sorted."""
    rows = [json.loads(x) for x in (predictions / "predictions.jsonl").read_text().splitlines() if x.strip()]
    return sorted((r.get("question_id"), r["question"], r["prediction"]) for r in rows)


def equal_budget(a, argv, base: Path, val: Path, val_grouped: Path, gbatch: int, t0: float) -> int:
    """Equal training budget over a pool larger than either side reaches: each side makes one pass over the pool
    in its layout, stopped at the same CPU-second budget; both are scored on the same validation questions."""
    flat = C.shapes_data(a.work, a.pool_images, a.questions_per_image, layout="vqav2", seed=a.pool_seed)
    grouped = C.shapes_data(a.work, a.pool_images, a.questions_per_image, layout="vqav2", group_by_image=True,
                            seed=a.pool_seed)
    n_q, n_g = len(json.loads(flat.read_text())), len(json.loads(grouped.read_text()))
    n_val = len(json.loads(val.read_text()))
    print(f"pool: {n_q} questions about {a.pool_images} images ({n_q} per-question records, {n_g} grouped); "
          f"validation {n_val} questions; model {base.name}; batch {a.batch_size} (per question) / {gbatch} "
          f"(grouped); budget {a.budget_cpu_seconds} CPU-s of the training loop; seeds {a.seeds}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="train_grouped_budget-"))
    seeds: list[dict[str, Any]] = []
    same_questions = True
    grouped_val_identical = None
    try:
        for i, seed in enumerate(range(a.seed, a.seed + a.seeds)):
            row: dict[str, Any] = {"seed": seed}
            for side in (("grouped", "per_question") if i % 2 == 0 else ("per_question", "grouped")):
                data, batch = (grouped, gbatch) if side == "grouped" else (flat, a.batch_size)
                out = tmp / f"{side}-{seed}"
                r = train_once(a, base, data, out, batch, 1, budget=a.budget_cpu_seconds, seed=seed)
                per_record = a.questions_per_image if side == "grouped" else 1
                r["records_seen"] = min(r["optimizer_steps"] * batch, r["samples"])
                r["questions_seen"] = r["records_seen"] * per_record
                r["pool_exhausted"] = r["records_seen"] >= r["samples"]
                r["validation"] = evaluate_run(out, val, a.max_new_tokens, tmp / f"eval-{side}-{seed}")
                if side == "grouped" and grouped_val_identical is None:
                    # the validation set grouped by image asks the very same questions (one per query)
                    evaluate_run(out, val_grouped, a.max_new_tokens, tmp / f"eval-grouped-val-{seed}")
                    grouped_val_identical = (scored_questions(tmp / f"eval-grouped-val-{seed}")
                                             == scored_questions(tmp / f"eval-{side}-{seed}"))
                row[side] = r
                print(f"  seed {seed}, {side.replace('_', ' ')}: {r['optimizer_steps']} steps, "
                      f"{r['questions_seen']} questions in {r['train_loop_cpu_seconds']:.0f} CPU-s "
                      f"({r['train_runtime']:.0f} s wall), loss {r['mean_loss_last_10_logs']}, VQA accuracy "
                      f"{r['validation']['vqa_accuracy']:.2f}" + (" (POOL EXHAUSTED)" if r["pool_exhausted"] else ""),
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
            qa, qb = (scored_questions(tmp / f"eval-{s}-{seed}") for s in ("per_question", "grouped"))
            row["same_validation_questions"] = [x[:2] for x in qa] == [x[:2] for x in qb]
            same_questions &= row["same_validation_questions"]
            seeds.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {side: {k: C.median(r[side][k] for r in seeds) for k in ("train_loop_cpu_seconds", "train_runtime",
                                                                    "questions_seen", "optimizer_steps")}
           for side in ("per_question", "grouped")}
    for side in med:
        med[side]["vqa_accuracy"] = C.median(r[side]["validation"]["vqa_accuracy"] for r in seeds)
        med[side]["by_answer_type"] = {t: C.median(r[side]["validation"]["by_answer_type"][t]["vqa_accuracy"]
                                                   for r in seeds)
                                       for t in seeds[0][side]["validation"]["by_answer_type"]}
    diffs = [r["grouped"]["validation"]["vqa_accuracy"] - r["per_question"]["validation"]["vqa_accuracy"] for r in seeds]
    met = med["grouped"]["vqa_accuracy"] >= med["per_question"]["vqa_accuracy"]
    ratio_q = med["grouped"]["questions_seen"] / med["per_question"]["questions_seen"]
    print(f"equal budget ({a.budget_cpu_seconds} CPU-s): grouped saw {ratio_q:.2f}x the questions; median VQA accuracy "
          f"grouped {med['grouped']['vqa_accuracy']:.2f} vs per question {med['per_question']['vqa_accuracy']:.2f} "
          f"(per-seed differences {', '.join(f'{d:+.1f}' for d in diffs)}); same validation questions: "
          f"{same_questions}; grouped validation file scores the same: {grouped_val_identical}; goal grouped >= per "
          f"question: {'met' if met else 'NOT met'}")
    C.write_result("train_grouped_budget", {
        "benchmark": "equal training budget: one pass over a VQAv2-shaped pool, grouped vs per-question records",
        "command": "python benchmarks/train_grouped.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "goal": "grouped validation VQA accuracy >= per-question at equal training time (median over seeds)",
        "goal_met": met, "median": med, "grouped_minus_per_question": diffs,
        "questions_seen_ratio": round(ratio_q, 3), "same_validation_questions": same_questions,
        "grouped_validation_file_scores_identically": grouped_val_identical, "seeds": seeds,
        "setup": {"model": base.name, "init": a.init, "pool_images": a.pool_images, "pool_questions": n_q, "pool_grouped_records": n_g,
                  "questions_per_image": a.questions_per_image, "validation_questions": n_val,
                  "validation_images": a.val_images, "batch_size_per_question": a.batch_size,
                  "batch_size_grouped": gbatch, "lr": a.lr, "budget_cpu_seconds": a.budget_cpu_seconds,
                  "torch_threads": torch_threads(), "pool_seed": a.pool_seed},
        "machine": C.machine(), "seconds_total": round(time.perf_counter() - t0, 1)}, a.results)
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["cpu", "small", "small196"], default="cpu",
                    help="cpu: the 196-image-token benchmark model; small: the demo's 16-image-token model, which "
                         "learns the task on a CPU within minutes (for the accuracy comparison); small196: the "
                         "demo's model at 112 px, 196 image tokens (the equal-budget comparison)")
    ap.add_argument("--init", choices=["warm", "random"], default=None,
                    help="the model's starting weights: warm (build_tiny's warm starts on the tokenizer's data, "
                         "neither the pool nor the validation set: a miniature of a pretrained LLaVA) or random; "
                         "default: warm with --equal-budget, random otherwise (as the recorded speed figures)")
    ap.add_argument("--train-images", type=int, default=120)
    ap.add_argument("--val-images", type=int, default=20)
    ap.add_argument("--questions-per-image", type=int, default=5, help="VQAv2 has 5.4 on average")
    ap.add_argument("--batch-size", type=int, default=8, help="per-question records per step")
    ap.add_argument("--grouped-batch-size", type=int, default=None,
                    help="grouped records per step (default: batch size / questions per image, at least 1)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--budget-epochs", type=int, default=1,
                    help="per-question epochs that set the equal-time budget (the speed comparison is one epoch each)")
    ap.add_argument("--max-epochs", type=int, default=10, help="cap on the grouped epochs at equal time")
    ap.add_argument("--budget-clock", choices=["cpu", "wall"], default="cpu",
                    help="what 'equal time' counts: CPU seconds of the training (default) or wall seconds")
    ap.add_argument("--max-new-tokens", type=int, default=6, help="validation answers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: one per core)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llavatune-bench")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--speed-pairs", type=int, default=1, help="interleaved 1-epoch pairs for the speed comparison")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the speed comparison (results: train_grouped_speed.json)")
    ap.add_argument("--equal-budget", action="store_true",
                    help="the equal-budget comparison instead: one pass over a --pool-images pool in each layout, "
                         "stopped at --budget-cpu-seconds, --seeds seeds (results: train_grouped_budget.json)")
    ap.add_argument("--pool-images", type=int, default=1200, help="images in the equal-budget pool")
    ap.add_argument("--pool-seed", type=int, default=2, help="seed of the pool's images and questions")
    ap.add_argument("--budget-cpu-seconds", type=float, default=60.0,
                    help="training-loop CPU seconds each side gets in the equal-budget comparison")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds (--seed, --seed + 1, ...) of the equal-budget runs")
    ap.add_argument("--keep-model", type=Path, default=None,
                    help="copy the equal-time grouped model (a LoRA checkpoint) here, e.g. for eval_vs_batch1.py --model")
    a = ap.parse_args(argv)
    gbatch = a.grouped_batch_size or max(1, round(a.batch_size / a.questions_per_image))
    C.quiet()
    threads = C.set_threads(a.threads)
    t0 = time.perf_counter()
    val = C.shapes_data(a.work, a.val_images, a.questions_per_image, split="val", layout="vqav2", seed=1)
    tok_json = C.shapes_data(a.work, n_images=64, questions_per_image=3)  # the benchmark model's tokenizer data
    a.init = a.init or ("warm" if a.equal_budget else "random")
    base = C.build_model(a.work, a.model, tok_json, warm_start=a.init == "warm")
    if a.equal_budget:
        val_grouped = C.shapes_data(a.work, a.val_images, a.questions_per_image, split="val", layout="vqav2", seed=1,
                                    group_by_image=True)
        return equal_budget(a, argv, base, val, val_grouped, gbatch, t0)
    flat = C.shapes_data(a.work, a.train_images, a.questions_per_image, layout="vqav2")
    grouped = C.shapes_data(a.work, a.train_images, a.questions_per_image, layout="vqav2", group_by_image=True)
    n_q = len(json.loads(flat.read_text()))
    n_g = len(json.loads(grouped.read_text()))
    print(f"data: {n_q} questions about {a.train_images} images: {n_q} per-question records, {n_g} grouped records; "
          f"validation {len(json.loads(val.read_text()))} questions; model {base.name}; batch {a.batch_size} "
          f"(per question) / {gbatch} (grouped); {threads} torch thread(s)", flush=True)
    runs: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="train_grouped-"))
    try:
        # 1. one epoch each over the same questions, --speed-pairs interleaved pairs (grouped first in the first
        # pair; the first pair's models are the ones evaluated and timed for the budget below)
        pairs = []
        for rep in range(a.speed_pairs):
            pair = {}
            for side in (("grouped", "per_question") if rep % 2 == 0 else ("per_question", "grouped")):
                data, batch = (grouped, gbatch) if side == "grouped" else (flat, a.batch_size)
                out = tmp / (("g1" if side == "grouped" else "f1") + ("" if rep == 0 else f"-{rep}"))
                pair[side] = train_once(a, base, data, out, batch, 1)
                print(f"  {side.replace('_', ' ')}, 1 epoch: {pair[side]}", flush=True)
            pairs.append(pair)
        runs["grouped_1_epoch"], runs["per_question_1_epoch"] = pairs[0]["grouped"], pairs[0]["per_question"]
        if a.speed_pairs > 1:
            runs["speed_pairs"] = pairs
        g1 = runs["grouped_1_epoch"]
        speed = {k: round(C.median(p["per_question"][k] / p["grouped"][k] for p in pairs), 3)
                 for k in ("train_runtime", "train_loop_cpu_seconds", "train_call_seconds", "train_call_cpu_seconds")}
        if a.speed_only:
            print(f"same questions: {speed['train_runtime']:.2f}x less train_runtime, "
                  f"{speed['train_loop_cpu_seconds']:.2f}x less CPU time in the training loop (medians of "
                  f"{a.speed_pairs} pairs); goal >= {GOAL_SPEEDUP}x: "
                  f"{'met' if speed['train_runtime'] >= GOAL_SPEEDUP else 'NOT met'}")
            C.write_result("train_grouped_speed", {
                "benchmark": "training wall time for the same questions: grouped vs per-question records",
                "command": "python benchmarks/train_grouped.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "goal": f">= {GOAL_SPEEDUP}x less training wall time", "speedup_same_questions": speed,
                "goal_speed_met": speed["train_runtime"] >= GOAL_SPEEDUP, "pairs": pairs,
                "setup": {"model": base.name, "questions": n_q, "grouped_records": n_g, "batch_size_per_question":
                          a.batch_size, "batch_size_grouped": gbatch, "torch_threads": threads},
                "machine": C.machine(), "seconds_total": round(time.perf_counter() - t0, 1)}, a.results)
            return 0
        # 2. equal time: as many grouped epochs as fit in the per-question run's --budget-epochs
        clock = "train_loop_cpu_seconds" if a.budget_clock == "cpu" else "train_runtime"
        E = a.budget_epochs
        if E > 1:
            runs[f"per_question_{E}_epochs"] = train_once(a, base, flat, tmp / "fE", a.batch_size, E)
            print(f"  per question, {E} epochs: {runs[f'per_question_{E}_epochs']}", flush=True)
        fE = runs[f"per_question_{E}_epoch" + ("s" if E > 1 else "")]
        k = max(1, min(a.max_epochs, math.floor(fE[clock] / g1[clock])))
        runs[f"grouped_{k}_epochs"] = train_once(a, base, grouped, tmp / "gk", gbatch, k)
        print(f"  grouped, {k} epochs: {runs[f'grouped_{k}_epochs']}", flush=True)
        names = [("per_question_1_epoch", "f1"), ("grouped_1_epoch", "g1")]
        names += [(f"per_question_{E}_epochs", "fE")] if E > 1 else []
        names += [(f"grouped_{k}_epochs", "gk")]
        acc = {name: evaluate_run(tmp / d, val, a.max_new_tokens) for name, d in names}
        if a.keep_model:
            shutil.rmtree(a.keep_model, ignore_errors=True)
            shutil.copytree(tmp / "gk", a.keep_model)
        for name, m in acc.items():
            print(f"  validation, {name}: VQA accuracy {m['vqa_accuracy']:.2f} ({m['n']} questions)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gk = runs[f"grouped_{k}_epochs"]
    base_name = f"per_question_{E}_epoch" + ("s" if E > 1 else "")
    equal_time_ratio = gk[clock] / fE[clock]
    wall_ratio = gk["train_runtime"] / fE["train_runtime"]
    better = acc[f"grouped_{k}_epochs"]["vqa_accuracy"] >= acc[base_name]["vqa_accuracy"]
    print(f"same questions: grouped trains in {100 / speed['train_runtime']:.0f} % of the per-question time "
          f"({speed['train_runtime']:.2f}x less train_runtime, {speed['train_loop_cpu_seconds']:.2f}x less CPU time "
          f"in the training loop, {speed['train_call_seconds']:.2f}x less for the whole train call); goal >= "
          f"{GOAL_SPEEDUP}x: "
          f"{'met' if speed['train_runtime'] >= GOAL_SPEEDUP else 'NOT met'}")
    print(f"equal time ({k} grouped epochs in {gk[clock]:.0f} {a.budget_clock} s = {equal_time_ratio:.2f}x the "
          f"per-question {E} epoch(s)' {fE[clock]:.0f}s; wall {wall_ratio:.2f}x): VQA accuracy grouped "
          f"{acc[f'grouped_{k}_epochs']['vqa_accuracy']:.2f} vs per question "
          f"{acc[base_name]['vqa_accuracy']:.2f}; goal grouped >= per question: "
          f"{'met' if better else 'NOT met'}")
    result = {
        "benchmark": "training on image-grouped records (prepare --group-by-image) vs one record per question",
        "command": "python benchmarks/train_grouped.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "goal": f"same questions: >= {GOAL_SPEEDUP}x less training wall time; equal time: grouped validation "
                "accuracy >= per-question",
        "speedup_same_questions": speed,
        "goal_speed_met": speed["train_runtime"] >= GOAL_SPEEDUP,
        "equal_time": {"clock": a.budget_clock, "grouped_epochs": k,
                       "time_ratio_grouped_vs_per_question": round(equal_time_ratio, 3),
                       "wall_time_ratio_grouped_vs_per_question": round(wall_ratio, 3),
                       "per_question_epochs": E,
                       "vqa_accuracy_grouped": acc[f"grouped_{k}_epochs"]["vqa_accuracy"],
                       "vqa_accuracy_per_question": acc[base_name]["vqa_accuracy"]},
        "goal_accuracy_met": better,
        "runs": runs,
        "validation": acc,
        "setup": {"train_images": a.train_images, "questions": n_q, "grouped_records": n_g,
                  "questions_per_image": a.questions_per_image, "validation_images": a.val_images,
                  "batch_size_per_question": a.batch_size, "batch_size_grouped": gbatch, "lr": a.lr,
                  "model": base.name, "budget_epochs": a.budget_epochs, "budget_clock": a.budget_clock,
                  "torch_threads": threads, "seed": a.seed},
        "machine": C.machine(),
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    C.write_result("train_grouped", result, a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

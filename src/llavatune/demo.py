"""``llavatune demo [--out DIR]`` — the whole pipeline, offline, on CPU, in a few minutes.

    llavatune demo --out demo_run

1. draws a synthetic VQA set (coloured shapes; questions about colour, shape, count, position) and writes
   it in the official OK-VQA file layout;
2. converts it with ``llavatune prepare okvqa`` (the path a user takes with the real OK-VQA);
3. builds a tiny LLaVA (real CLIP-vision + Llama classes) with a tokenizer trained on the data, warm-started
   like a pretrained one (its LM on the data's text, its vision tower on the images alone);
4. stage 1: ``llavatune train --stage pretrain`` — projector only, on captions;
5. stage 2: ``llavatune train --method lora`` from the stage-1 model, with VQA accuracy after every epoch;
6. ``llavatune eval`` on the validation split, ``llavatune merge``, and ``llavatune predict`` on one image.

Each step prints the command a user would type. The closing summary compares the final VQA accuracy with
two baselines computed on the same validation set — the best constant answer ("chance") and a blind
model that answers each question text with its most frequent training answer (no pixels) — and says
plainly whether the accuracy floor (the blind baseline plus ``--floor_points``: what only looking at the
images can add) was reached.
"""

from __future__ import annotations

import json
import shlex
import time
from collections import Counter, defaultdict
from pathlib import Path

from llavatune.config import config, parse_config
from llavatune.utils import UserError, prepare_output_dir


@config
class DemoConfig:
    out: str = "llavatune_demo"
    """Folder for everything the demo writes (data, models, reports)."""
    overwrite: bool = False
    """Replace a non-empty --out folder."""
    train_images: int = 500
    """Synthetic training images (3 questions each)."""
    val_images: int = 40
    """Synthetic validation images (3 questions each)."""
    pretrain_epochs: float = 1
    """Stage-1 (projector) epochs on the captions."""
    epochs: float = 10
    """Stage-2 (LoRA) epochs."""
    floor_points: float = 20.0
    """The demo succeeds when final VQA accuracy beats the blind question-prior baseline (the most frequent
    training answer of each question text, no pixels) by at least this many points."""
    seed: int = 0
    """Seed for data, model and training."""


def _run(argv: list[str]) -> None:
    from llavatune.cli import main

    print("\n$ llavatune " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = main(argv)
    if rc != 0:
        raise UserError(f"demo step failed: llavatune {' '.join(argv[:2])} (exit {rc})")


def baselines(train_json: Path, val_json: Path) -> dict[str, float]:
    """VQA accuracy of answering without looking: one constant answer, and the per-question-text prior."""
    from llavatune.eval.vqa_metric import vqa_score

    train = json.loads(train_json.read_text())
    val = json.loads(val_json.read_text())
    answers = Counter(r["conversations"][1]["value"] for r in train)
    constant = max(sum(vqa_score(a, r["answers"]) for r in val) for a in answers) / len(val) * 100
    prior: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        prior[r["conversations"][0]["value"]][r["conversations"][1]["value"]] += 1
    top = answers.most_common(1)[0][0]
    blind = sum(
        vqa_score(prior[r["conversations"][0]["value"]].most_common(1)[0][0] if prior[r["conversations"][0]["value"]]
                  else top, r["answers"]) for r in val
    ) / len(val) * 100
    return {"constant": round(constant, 2), "blind": round(blind, 2)}


def demo(cfg: DemoConfig) -> dict:
    from llavatune.data.records import collect_texts, load_records
    from llavatune.data.shapes import make_shapes_vqa
    from llavatune.model.tiny import build_tiny

    t0 = time.time()
    out = prepare_output_dir(cfg.out, overwrite=cfg.overwrite, kind="demo", flag="--out")
    common = ["--report_to", "none", "--seed", str(cfg.seed), "--dataloader_num_workers", "0"]

    # Dataset: synthetic shapes in the official OK-VQA layout, converted the way real OK-VQA is
    print(f"[1/7] drawing {cfg.train_images + cfg.val_images} images in the OK-VQA layout -> {out / 'okvqa'}")
    src = make_shapes_vqa(out / "okvqa", n_train_images=cfg.train_images, n_val_images=cfg.val_images,
                          questions_per_image=3, image_size=32, seed=cfg.seed)
    print("\n[2/7] converting it with llavatune prepare okvqa")
    for split in ("train", "val"):
        _run(["prepare", "okvqa", "--questions", str(src[f"{split}_questions"]), "--annotations",
              str(src[f"{split}_annotations"]), "--images", str(src["images_dir"]), "--out", str(out / "data" / split)])
    train_json, val_json = out / "data" / "train" / "data.json", out / "data" / "val" / "data.json"

    # Model: a tiny LLaVA (CLIP vision + Llama), tokenizer trained on the data's text
    print("\n[3/7] building a tiny LLaVA (CLIP-vision + Llama, 2 layers each), warm-started on the data's text and images")
    records = load_records(train_json) + load_records(src["train_captions"])
    images = sorted({train_json.parent / p for r in load_records(train_json) for p in r.images})
    # warm-started like a pretrained LLaVA: its LM on the data's text, its vision tower on the images alone
    build_tiny(collect_texts(records), out / "base", image_size=32, patch_size=8, hidden_size=128,
               vision_hidden_size=64, seed=cfg.seed, conversations=[r.conversations for r in records], images=images)

    # Stage 1: projector alignment on captions
    print("\n[4/7] stage 1: projector pretraining on captions")
    _run(["train", "--model", str(out / "base"), "--stage", "pretrain", "--data", str(src["train_captions"]),
          "--output_dir", str(out / "stage1"), "--num_train_epochs", str(cfg.pretrain_epochs),
          "--learning_rate", "3e-3", "--per_device_train_batch_size", "16", "--save_strategy", "no",
          "--train_sampling_strategy", "random", *common])

    # Stage 2: LoRA fine-tuning with VQA accuracy after every epoch
    print("\n[5/7] stage 2: LoRA fine-tuning, evaluated with VQA accuracy after every epoch")
    stage2 = out / "stage2"
    _run(["train", "--model", str(out / "stage1"), "--data", str(train_json), "--val_data", str(val_json),
          "--output_dir", str(stage2), "--method", "lora", "--lora_r", "64", "--lora_alpha", "64",
          "--lora_dropout", "0", "--learning_rate", "1e-3", "--projector_lr", "1e-3",
          # the output head trains fully next to the adapter: this demo's schedule is short
          "--lora_modules_to_save", "lm_head",
          "--num_train_epochs", str(cfg.epochs), "--per_device_train_batch_size", "16", "--save_total_limit", "2",
          "--eval_max_samples", "0", "--eval_max_new_tokens", "6", "--eval_on_start", "true", *common])

    # Evaluate, merge, answer one question
    print("\n[6/7] evaluation, merge, prediction")
    _run(["eval", "--model", str(stage2), "--data", str(val_json), "--out", str(out / "eval"), "--max_new_tokens", "6"])
    merged = out / "merged"
    _run(["merge", "--model", str(stage2), "--out", str(merged)])
    first = json.loads(val_json.read_text())[0]
    question = first["conversations"][0]["value"].replace("<image>\n", "")
    _run(["predict", "--model", str(merged), "--image", str(val_json.parent / first["image"]), "--question", question])

    return summarize(cfg, out, train_json, val_json, stage2, merged, t0)


def summarize(cfg: DemoConfig, out: Path, train_json: Path, val_json: Path, stage2: Path, merged: Path,
              t0: float) -> dict:
    """Step 7: the VQA accuracy curve and final accuracy against the two baselines, the floor reached or not, where
    everything is; written to ``demo_summary.json`` and returned."""
    from llavatune.report.data import read_metrics

    evals = read_metrics(stage2 / "metrics.jsonl")[1]
    curve = [(round(r["epoch"]), r["eval_vqa_accuracy"]) for r in evals if "eval_vqa_accuracy" in r]  # epoch 0: untrained
    final = json.loads((out / "eval" / "metrics.json").read_text())["vqa_accuracy"]
    base = baselines(train_json, val_json)
    floor = base["blind"] + cfg.floor_points
    ok = final >= floor
    minutes = (time.time() - t0) / 60
    print("\n[7/7] summary")
    print("  VQA accuracy per epoch: " + ", ".join(f"{e}: {a:.1f}" for e, a in curve))
    print(f"  final VQA accuracy {final:.1f}  |  chance (best constant answer) {base['constant']:.1f}  |  "
          f"blind question-prior baseline {base['blind']:.1f}")
    if ok:
        print(f"  PASSED: accuracy is {final - base['blind']:.1f} points above the blind baseline and "
              f"{final - base['constant']:.1f} above chance (floor: blind + {cfg.floor_points:g}).")
    else:
        print(f"  NOT REACHED: accuracy {final:.1f} is below the floor {floor:.1f} (blind + {cfg.floor_points:g}). "
              "Try more --epochs or --train_images.")
    print(f"  finished in {minutes:.1f} min. Everything is in {out}:")
    for what, path in (("data (LLaVA JSON)", out / "data"), ("stage-1 model", out / "stage1"),
                       ("stage-2 adapter + checkpoints", stage2), ("run report", stage2 / "report.html"),
                       ("eval predictions/metrics", out / "eval"), ("merged llava-hf model", merged)):
        print(f"    {what:<30} {path}")
    summary = {"vqa_accuracy": final, "per_epoch": curve, "baselines": base, "floor": floor, "passed": ok,
               "minutes": round(minutes, 2)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str], prog: str) -> int:
    (cfg,) = parse_config([DemoConfig], argv, prog=prog, description=__doc__.split("\n\n")[0])
    summary = demo(cfg)
    return 0 if summary["passed"] else 3


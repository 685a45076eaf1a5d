"""Evaluation throughput: ``llavatune eval`` (batched, shared image prefixes) against a batch-size-1 loop.

    python benchmarks/eval_vs_batch1.py [--device cpu|cuda] [--case okvqa vqav2] [--batch-size 16] [--max-new-tokens 16]

Same model (the training benchmark's ~20M-parameter LLaVA built by ``build_tiny`` at 224 px, 196 image tokens;
on ``--device cuda`` a LLaVA-1.5-7B-shaped model with random bf16 weights), loaded once by ``llavatune eval``'s
loader (``load_predictor``), greedy decoding, same ``max_new_tokens``, on two question sets of the synthetic
shapes data, converted by ``llavatune prepare``:

- ``okvqa``: OK-VQA layout, one question per image (``--samples`` questions);
- ``vqav2``: VQAv2 layout, ``--questions-per-image`` (5; VQAv2 has 5.4) questions per image, ``--samples``
  questions in all.

Three sides, alternating order in every repetition:

- **shared**: ``llavatune.infer.generate.generate`` as ``llavatune eval`` runs it by default: prompts from the
  training template, left-padded batches of ``--batch-size``, KV cache, and questions about the same image
  answered from one prefill of the image prefix (vision tower once per image). One end-to-end
  ``llavatune eval`` (``evaluate``) run is made first, and its predictions must equal these.
- **unshared**: the same with ``share_prefix=False`` (``--share_image_prefix false``): every question from its
  full prompt, length-sorted batches.
- **batch-1 loop** in the style of the official LLaVA ``llava/eval/model_vqa_loader.py``: a ``Dataset`` that
  builds each prompt and image tensor (here with the llava-hf processor: ``apply_chat_template`` +
  ``processor(images=..., text=...)``), a ``DataLoader`` with ``batch_size=1``, and one ``model.generate``
  per question (``do_sample=False, num_beams=1, use_cache=True``), answers decoded and stripped.

All three must produce identical answers (checked for every question; the script fails otherwise). Ratios are
medians of per-repetition ratios (wall time; CPU time of this process as a cross-check on a shared machine).
A prefill-only pass (``max_new_tokens=1``) shows how much of the time is the prompt. The model's weights are
random, so every answer runs the full ``--max-new-tokens`` decode steps, the part sharing does not touch; a
fine-tuned VQA model stops after 1-3 tokens (``--max-new-tokens 3`` shows that case). ``--device cuda`` adds
generated tokens/s, model FLOPs utilization and peak VRAM. Results go to
``benchmarks/results/eval_vs_batch1[_cuda].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

GOAL_BATCH1 = 4.0  # shared vs the batch-1 loop, VQAv2 layout
GOAL_SHARED = 3.0  # shared vs unshared, VQAv2 layout
SIDES = ("batch1", "unshared", "shared")


def batch1_inputs(processor, q):
    """One question's model inputs as the batch-1 loop builds them: the processor's chat template + image."""
    from llavatune.data.images import open_image

    prompt = processor.apply_chat_template(C.chat_messages(q.turns), add_generation_prompt=True)
    image = open_image(q.images[0])
    return processor(images=image, text=prompt, return_tensors="pt")


def batch1_loop(model, processor, queries, max_new_tokens: int, device: str, dtype) -> tuple[list[str], list[int]]:
    """model_vqa_loader.py's structure on a llava-hf model: Dataset -> DataLoader(batch_size=1) -> generate."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class CustomDataset(Dataset):
        def __len__(self):
            return len(queries)

        def __getitem__(self, i):
            return batch1_inputs(processor, queries[i])

    loader = DataLoader(CustomDataset(), batch_size=1, shuffle=False, num_workers=0, collate_fn=lambda b: b[0])
    answers, new_tokens = [], []
    for inputs in loader:
        inputs = inputs.to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True)
        new = out[0, inputs["input_ids"].shape[1]:]
        new_tokens.append(int(new.numel()))
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers, new_tokens


def vqa_data(work: Path, case: str, n_questions: int, per_image: int, image_size: int = 224) -> Path:
    """The validation questions of one case, converted by ``llavatune prepare``; returns data.json."""
    if case == "okvqa":
        return C.shapes_data(work, n_images=n_questions, questions_per_image=1, split="val", image_size=image_size)
    return C.shapes_data(work, n_images=-(-n_questions // per_image), questions_per_image=per_image, split="val",
                         layout="vqav2", image_size=image_size)


def run_case(a, case: str, base: Path, pred, threads: int) -> dict[str, Any]:
    import torch

    from llavatune.data.records import load_records, normalize_image_placement
    from llavatune.eval.evaluate import EvalConfig, EvalSet, evaluate
    from llavatune.infer.generate import generate

    cuda = a.device == "cuda"
    n = a.samples or (256 if cuda else {"okvqa": 48, "vqav2": 120}[case])
    data = vqa_data(a.work, case, n, a.questions_per_image, getattr(a, "image_size", 224))
    records = [normalize_image_placement(r) for r in load_records(str(data))]
    eset = EvalSet.from_records(records, data.parent, max_questions=n)
    queries = eset.queries
    images = len({tuple(map(str, q.images)) for q in queries})

    # 1. llavatune eval end to end (loads the model itself): its predictions are the reference
    e2e_preds, metrics, e2e_seconds = None, {}, None
    if getattr(a, "e2e", True):
        with tempfile.TemporaryDirectory(prefix="eval_vs_batch1-") as tmp:
            t = time.perf_counter()
            metrics = evaluate(EvalConfig(model=str(base), data=str(data), out=tmp, batch_size=a.batch_size,
                                          max_new_tokens=a.max_new_tokens, max_samples=n, dtype=a.dtype))
            e2e_seconds = time.perf_counter() - t
            e2e_preds = [json.loads(x)["prediction"]
                         for x in (Path(tmp) / "predictions.jsonl").read_text().splitlines()]
        print(f"[{case}] llavatune eval end to end (incl. loading): {len(e2e_preds)} samples in {e2e_seconds:.1f}s "
              f"(its generation: {metrics['samples_per_second']:.2f} samples/s)", flush=True)

    model, encoder, processor = pred.model, pred.encoder, pred.processor
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    prompt_ids = [encoder.prompt_ids(q.turns) for q in queries]
    prompt_lens = [len(ids) for ids in prompt_ids]
    same_prompts = sum(ids == batch1_inputs(processor, q)["input_ids"][0].tolist() for ids, q in zip(prompt_ids, queries))
    print(f"[{case}] {len(queries)} questions about {images} images, prompts {min(prompt_lens)}-{max(prompt_lens)} "
          f"tokens; llavatune and the processor build identical prompt ids for {same_prompts}/{len(queries)}; batch "
          f"{a.batch_size}, max_new_tokens {a.max_new_tokens}, {threads} torch thread(s)", flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(side: str, n_new: int):
        sync()
        t, c = time.perf_counter(), time.process_time()
        stats: dict[str, Any] = {}
        if side == "batch1":
            out, toks = batch1_loop(model, processor, queries, n_new, a.device, dtype)
        else:
            out = generate(model, encoder, queries, batch_size=a.batch_size, max_new_tokens=n_new,
                           share_prefix=side == "shared", stats=stats)
            toks = None
        sync()
        return out, toks, time.perf_counter() - t, time.process_time() - c, stats

    # 2. warm-up (a little of each), then interleaved timed repetitions, the side order rotating
    generate(model, encoder, queries[: a.batch_size], batch_size=a.batch_size, max_new_tokens=2)
    batch1_loop(model, processor, queries[:2], 2, a.device, dtype)
    wall: dict[str, list[float]] = {s: [] for s in SIDES}
    cpu: dict[str, list[float]] = {s: [] for s in SIDES}
    vram: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    new_tokens: list[int] = []
    share_stats: dict[str, Any] = {}
    for rep in range(a.repeats):
        order = SIDES[rep % 3:] + SIDES[: rep % 3]
        for side in order:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out, toks, sec, csec, stats = run(side, a.max_new_tokens)
            if toks is not None:
                new_tokens = toks
            if side == "shared":
                share_stats = stats
            if cuda:
                vram[side] = max(vram.get(side, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            answers.setdefault(side, out)
            if out != answers[side]:
                raise SystemExit(f"{case} {side}: answers changed between repetitions")
            wall[side].append(sec)
            cpu[side].append(csec)
            print(f"  [{case}] rep {rep + 1} {side:>8}: {len(queries) / sec:.2f} samples/s ({sec:.1f}s wall, "
                  f"{csec:.1f}s CPU)", flush=True)
    same = {s: sum(x == y for x, y in zip(answers[s], answers["batch1"])) for s in ("unshared", "shared")}
    same_e2e = answers["shared"] == e2e_preds if e2e_preds is not None else None
    # 3. prefill only (one generated token): what the prompt costs each side
    prefill = {s: run(s, 1)[2] for s in SIDES}

    def ratio(x: str, y: str, times=wall) -> float:
        return C.median(ty / tx for tx, ty in zip(times[x], times[y]))

    sps = {s: len(queries) / C.median(v) for s, v in wall.items()}
    gen_tokens = sum(new_tokens)
    sides: dict[str, Any] = {s: {"samples_per_s": round(sps[s], 3), "seconds": [round(x, 2) for x in wall[s]],
                                 "cpu_seconds": [round(x, 2) for x in cpu[s]],
                                 "generated_tokens_per_s": round(gen_tokens / C.median(wall[s]), 1),
                                 "prefill_only_seconds": round(prefill[s], 2)} for s in SIDES}
    peak = C.peak_flops(a.device, a.peak_tflops)
    if cuda:
        m = C.matmul_params(base)
        flops = 2 * m["llm"] * (sum(prompt_lens) + gen_tokens) + 2 * m["vision"] * m["patches"] * len(queries)
        for s in SIDES:
            sides[s]["peak_vram_gib"] = round(vram[s], 2)
            if peak:  # MFU counts the work of the unshared computation (what the answers are equal to)
                sides[s]["mfu_equivalent"] = round(flops / C.median(wall[s]) / peak, 4)
    r = {
        "questions": len(queries),
        "images": images,
        "ratio_shared_vs_unshared": round(ratio("shared", "unshared"), 3),
        "ratio_shared_vs_batch1": round(ratio("shared", "batch1"), 3),
        "ratio_unshared_vs_batch1": round(ratio("unshared", "batch1"), 3),
        "cpu_time_ratio_shared_vs_unshared": round(ratio("shared", "unshared", cpu), 3),
        "cpu_time_ratio_shared_vs_batch1": round(ratio("shared", "batch1", cpu), 3),
        "pair_ratios_shared_vs_unshared": [round(u / s_, 3) for s_, u in zip(wall["shared"], wall["unshared"])],
        "pair_ratios_shared_vs_batch1": [round(b / s_, 3) for s_, b in zip(wall["shared"], wall["batch1"])],
        "identical_answers": {f"{s}_vs_batch1": f"{same[s]}/{len(queries)}" for s in same},
        "eval_end_to_end_predictions_equal": same_e2e,
        "identical_prompt_ids": f"{same_prompts}/{len(queries)}",
        "sharing": share_stats,
        "sides": sides,
        "llavatune_eval_end_to_end": None if e2e_seconds is None else {
            "seconds_incl_loading": round(e2e_seconds, 2),
            "metrics": {k: metrics.get(k) for k in ("n", "vqa_accuracy", "generation_seconds", "samples_per_second",
                                                    "images_encoded", "prefill_tokens")}},
        "setup": {"samples": len(queries), "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens,
                  "generated_tokens": gen_tokens, "prompt_tokens": sum(prompt_lens),
                  "dtype": str(dtype).replace("torch.", ""), "repeats": a.repeats},
    }
    print(f"[{case}] samples/s: shared {sps['shared']:.2f} | unshared {sps['unshared']:.2f} | batch-1 loop "
          f"{sps['batch1']:.2f}; identical answers {same['shared']}/{len(queries)} (shared), {same['unshared']}/"
          f"{len(queries)} (unshared); llavatune eval end-to-end predictions equal: {same_e2e}")
    print(f"[{case}] shared vs unshared {r['ratio_shared_vs_unshared']:.2f}x (CPU time "
          f"{r['cpu_time_ratio_shared_vs_unshared']:.2f}x), shared vs batch-1 {r['ratio_shared_vs_batch1']:.2f}x (CPU time "
          f"{r['cpu_time_ratio_shared_vs_batch1']:.2f}x), unshared vs batch-1 {r['ratio_unshared_vs_batch1']:.2f}x; "
          f"prefill only: batch-1 {prefill['batch1']:.1f}s, unshared {prefill['unshared']:.1f}s, shared "
          f"{prefill['shared']:.1f}s", flush=True)
    r["identical"] = same["shared"] == same["unshared"] == len(queries) and same_e2e is not False
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--case", nargs="+", choices=["okvqa", "vqav2"], default=["okvqa", "vqav2"])
    ap.add_argument("--samples", type=int, default=None, help="questions per case (default: cpu 48 OK-VQA, 120 VQAv2; "
                                                              "cuda 256)")
    ap.add_argument("--questions-per-image", type=int, default=5, help="VQAv2 case (VQAv2 has 5.4 on average)")
    ap.add_argument("--batch-size", type=int, default=16, help="llavatune eval --batch_size (its default: 16)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="all sides (llavatune eval's default: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (median reported)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights dtype on both sides (float32: batched and one-by-one kernels round alike, so the "
                         "answers of random weights can be compared exactly; bf16 GPU kernels differ by batch size)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: one per core)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU peak bf16 TFLOP/s for MFU (default: by name)")
    ap.add_argument("--model", type=Path, default=None, help="a saved llava-hf model folder instead of the built one")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llavatune-bench")
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    C.quiet()
    import torch

    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    threads = C.set_threads(a.threads)
    from llavatune.infer.predict import load_predictor

    t0 = time.perf_counter()
    train_json = C.shapes_data(a.work, n_images=64, questions_per_image=3)  # the model's tokenizer is trained on it
    base = a.model or C.build_model(a.work, "7b" if cuda else "cpu", train_json)
    n_params = C.model_params(base)
    print(f"model: {base.name} ({n_params / 1e6:.1f}M parameters)", flush=True)
    pred = load_predictor(str(base), dtype=a.dtype, device=a.device)
    cases = {case: run_case(a, case, base, pred, threads) for case in a.case}
    v = cases.get("vqav2")
    goal_met = None
    if v:
        goal_met = (v["ratio_shared_vs_unshared"] >= GOAL_SHARED and v["ratio_shared_vs_batch1"] >= GOAL_BATCH1
                    and v["identical"])
        print(f"VQAv2 layout: shared {v['ratio_shared_vs_unshared']:.2f}x unshared (goal >= {GOAL_SHARED}x), "
              f"{v['ratio_shared_vs_batch1']:.2f}x the batch-1 loop (goal >= {GOAL_BATCH1}x), identical answers "
              f"{v['identical']}: {'met' if goal_met else 'NOT met'}")
    if "okvqa" in cases:
        o = cases["okvqa"]
        print(f"OK-VQA layout (one question per image, nothing to share): shared path "
              f"{o['ratio_shared_vs_unshared']:.2f}x the unshared one (goal: not slower)")
    result = {
        "benchmark": "generation throughput: llavatune eval (batched, shared image prefixes; and unshared) vs a "
                     "batch-size-1 model_vqa_loader-style loop",
        "command": "python benchmarks/eval_vs_batch1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": a.device,
        "goal": f"VQAv2 layout: shared >= {GOAL_SHARED}x unshared and >= {GOAL_BATCH1}x the batch-1 loop, identical "
                "answers; OK-VQA layout: shared not slower than unshared",
        "goal_met": goal_met,
        "cases": cases,
        "model": {"name": base.name, "parameters": n_params, "torch_threads": threads},
        "machine": C.machine(a.device),
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    C.write_result("eval_vs_batch1" + ("_cuda" if cuda else ""), result, a.results)
    return 0 if all(c["identical"] for c in cases.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

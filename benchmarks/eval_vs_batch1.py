"""Evaluation throughput: ``llavatune eval`` (batched generation) against a batch-size-1 loop.

    python benchmarks/eval_vs_batch1.py [--device cpu|cuda] [--samples 48] [--batch-size 16] [--max-new-tokens 16]

Same model (the training benchmark's ~20M-parameter LLaVA built by ``build_tiny`` at 224 px, 196 image tokens;
on ``--device cuda`` a LLaVA-1.5-7B-shaped model with random bf16 weights), loaded once by ``llavatune eval``'s
loader (``load_predictor``), same questions (the synthetic OK-VQA-layout shapes validation set, one question
per image, converted by ``llavatune prepare okvqa``), greedy decoding, same ``max_new_tokens``:

- **llavatune**: ``llavatune.infer.generate.generate`` -- what ``llavatune eval`` runs: prompts from the
  training template, sorted by length, left-padded batches of ``--batch-size``, KV cache. One end-to-end
  ``llavatune eval`` (``evaluate``) run is made first, and its predictions must equal these.
- **batch-1 loop** in the style of the official LLaVA ``llava/eval/model_vqa_loader.py``: a ``Dataset`` that
  builds each prompt and image tensor (here with the llava-hf processor: ``apply_chat_template`` +
  ``processor(images=..., text=...)``), a ``DataLoader`` with ``batch_size=1``, and one ``model.generate``
  per question (``do_sample=False, num_beams=1, use_cache=True``), answers decoded and stripped.

The two must produce identical answers (checked for every question; the script fails otherwise). Timings
alternate between the sides; the ratio is the median over ``--repeats`` pairs. A prefill-only pair
(``max_new_tokens=1``) shows how much of the time is the prompt (196 image tokens + text), which batching
cannot make cheaper on a CPU. ``--device cuda`` adds generated tokens/s, model FLOPs utilization and peak VRAM.
Results go to ``benchmarks/results/eval_vs_batch1[_cuda].json``.
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

GOAL = 4.0


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--samples", type=int, default=None, help="questions (default: cpu 48, cuda 256)")
    ap.add_argument("--batch-size", type=int, default=16, help="llavatune eval --batch_size (its default: 16)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="both sides (llavatune eval's default: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs (median reported)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights dtype on both sides (float32: batched and one-by-one kernels round alike, so the "
                         "answers of random weights can be compared exactly; bf16 GPU kernels differ by batch size)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: one per core)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU peak bf16 TFLOP/s for MFU (default: by name)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llavatune-bench")
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    a.samples = a.samples or (256 if cuda else 48)
    C.quiet()
    import torch

    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    threads = C.set_threads(a.threads)
    from llavatune.data.records import load_records, normalize_image_placement
    from llavatune.eval.evaluate import EvalConfig, EvalSet, evaluate
    from llavatune.infer.generate import generate
    from llavatune.infer.predict import load_predictor

    t0 = time.perf_counter()
    train_json = C.shapes_data(a.work, n_images=64, questions_per_image=3)  # the model's tokenizer is trained on it
    base = C.build_model(a.work, "7b" if cuda else "cpu", train_json)
    data = C.shapes_data(a.work, n_images=a.samples, questions_per_image=1, split="val")
    records = [normalize_image_placement(r) for r in load_records(str(data))][: a.samples]
    eset = EvalSet.from_records(records, data.parent)
    queries = eset.queries

    # 1. llavatune eval end to end (loads the model itself): its predictions are the reference
    with tempfile.TemporaryDirectory(prefix="eval_vs_batch1-") as tmp:
        t = time.perf_counter()
        metrics = evaluate(EvalConfig(model=str(base), data=str(data), out=tmp, batch_size=a.batch_size,
                                      max_new_tokens=a.max_new_tokens, max_samples=a.samples, dtype=a.dtype))
        e2e_seconds = time.perf_counter() - t
        e2e_preds = [json.loads(x)["prediction"] for x in (Path(tmp) / "predictions.jsonl").read_text().splitlines()]
    print(f"llavatune eval end to end (incl. loading): {len(e2e_preds)} samples in {e2e_seconds:.1f}s", flush=True)

    pred = load_predictor(str(base), dtype=a.dtype, device=a.device)
    model, encoder, processor = pred.model, pred.encoder, pred.processor
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    prompt_ids = [encoder.prompt_ids(q.turns) for q in queries]
    prompt_lens = [len(ids) for ids in prompt_ids]
    same_prompts = sum(ids == batch1_inputs(processor, q)["input_ids"][0].tolist() for ids, q in zip(prompt_ids, queries))
    n_params = C.model_params(base)
    print(f"model: {base.name} ({n_params / 1e6:.1f}M parameters); {len(queries)} questions, "
          f"prompts {min(prompt_lens)}-{max(prompt_lens)} tokens; llavatune and the processor build identical prompt "
          f"ids for {same_prompts}/{len(queries)}; batch {a.batch_size}, max_new_tokens {a.max_new_tokens}, "
          f"{threads} torch thread(s)", flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run_llavatune(n_new):
        sync()
        t = time.perf_counter()
        out = generate(model, encoder, queries, batch_size=a.batch_size, max_new_tokens=n_new)
        sync()
        return out, time.perf_counter() - t

    def run_batch1(n_new):
        sync()
        t = time.perf_counter()
        out, toks = batch1_loop(model, processor, queries, n_new, a.device, dtype)
        sync()
        return (out, toks), time.perf_counter() - t

    # 2. warm-up (one batch each), then interleaved timed pairs
    generate(model, encoder, queries[: a.batch_size], batch_size=a.batch_size, max_new_tokens=2)
    batch1_loop(model, processor, queries[:2], 2, a.device, dtype)
    runs = {"llavatune": [], "batch1": []}
    vram = {}
    answers: dict[str, list[str]] = {}
    new_tokens: list[int] = []
    for rep in range(a.repeats):
        for side in (("batch1", "llavatune") if rep % 2 == 0 else ("llavatune", "batch1")):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if side == "llavatune":
                out, sec = run_llavatune(a.max_new_tokens)
            else:
                (out, new_tokens), sec = run_batch1(a.max_new_tokens)
            if cuda:
                vram[side] = max(vram.get(side, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            answers.setdefault(side, out)
            if out != answers[side]:
                raise SystemExit(f"{side}: answers changed between repetitions")
            runs[side].append(sec)
            print(f"  rep {rep + 1} {side:>9}: {len(queries) / sec:.2f} samples/s ({sec:.1f}s)", flush=True)
    same = sum(x == y for x, y in zip(answers["llavatune"], answers["batch1"]))
    same_e2e = answers["llavatune"] == e2e_preds
    # 3. prefill only: what batching cannot remove on a CPU
    (_, s1) = run_batch1(1)
    (_, sb) = run_llavatune(1)

    pairs = [b / lt for lt, b in zip(runs["llavatune"], runs["batch1"])]
    ratio = C.median(pairs)
    sps = {k: len(queries) / C.median(v) for k, v in runs.items()}
    gen_tokens = sum(new_tokens)
    result_sides: dict[str, Any] = {k: {"samples_per_s": round(sps[k], 3), "seconds": [round(x, 2) for x in v],
                                        "generated_tokens_per_s": round(gen_tokens / C.median(v), 1)}
                                    for k, v in runs.items()}
    peak = C.peak_flops(a.device, a.peak_tflops)
    if cuda:
        m = C.matmul_params(base)
        flops = 2 * m["llm"] * (sum(prompt_lens) + gen_tokens) + 2 * m["vision"] * m["patches"] * len(queries)
        for k in runs:
            result_sides[k]["peak_vram_gib"] = round(vram[k], 2)
            if peak:
                result_sides[k]["mfu"] = round(flops / C.median(runs[k]) / peak, 4)
    print(f"llavatune {sps['llavatune']:.2f} samples/s | batch-1 loop {sps['batch1']:.2f} samples/s | generated "
          f"tokens/s {result_sides['llavatune']['generated_tokens_per_s']} vs {result_sides['batch1']['generated_tokens_per_s']}")
    print(f"identical answers: {same}/{len(queries)}; llavatune eval end-to-end predictions equal: {same_e2e}")
    print(f"prefill only (max_new_tokens=1): batch-1 {s1:.1f}s, llavatune {sb:.1f}s ({s1 / sb:.2f}x); "
          f"the prompt is {100 * sb / C.median(runs['llavatune']):.0f} % of llavatune's time")
    decode = (C.median(runs["batch1"]) - s1) / max(C.median(runs["llavatune"]) - sb, 1e-9)
    print(f"decode steps alone (total minus prefill): {decode:.1f}x faster batched")
    best = min(runs["batch1"]) / min(runs["llavatune"])
    print(f"ratio llavatune / batch-1 samples/s: {ratio:.2f}x (median of {len(pairs)} pairs; fastest run of each side "
          f"{best:.2f}x); goal >= {GOAL}x: "
          f"{'met' if ratio >= GOAL else 'NOT met'}")
    result = {
        "benchmark": "generation throughput: llavatune eval (batched) vs a batch-size-1 model_vqa_loader-style loop",
        "command": "python benchmarks/eval_vs_batch1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": a.device,
        "goal": f"llavatune samples/s >= {GOAL}x the batch-1 loop, identical answers",
        "ratio_samples_per_s": round(ratio, 3),
        "pair_ratios": [round(x, 3) for x in pairs],
        "ratio_fastest_runs": round(best, 3),
        "goal_met": ratio >= GOAL and same == len(queries),
        "identical_answers": f"{same}/{len(queries)}",
        "eval_end_to_end_predictions_equal": same_e2e,
        "identical_prompt_ids": f"{same_prompts}/{len(queries)}",
        "sides": result_sides,
        "prefill_only": {"batch1_seconds": round(s1, 2), "llavatune_seconds": round(sb, 2), "ratio": round(s1 / sb, 3),
                         "share_of_llavatune_time": round(sb / C.median(runs["llavatune"]), 3),
                         "decode_only_ratio": round(decode, 2)},
        "llavatune_eval_end_to_end": {"seconds_incl_loading": round(e2e_seconds, 2), "metrics": {
            k: metrics.get(k) for k in ("n", "vqa_accuracy", "exact_match")}},
        "setup": {"model": base.name, "parameters": n_params, "samples": len(queries),
                  "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens, "generated_tokens": gen_tokens,
                  "prompt_tokens": sum(prompt_lens), "dtype": str(dtype).replace("torch.", ""), "repeats": a.repeats,
                  "torch_threads": threads},
        "machine": C.machine(a.device),
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    C.write_result("eval_vs_batch1" + ("_cuda" if cuda else ""), result, a.results)
    if same != len(queries):
        print("answers differ:", [(i, x, y) for i, (x, y) in enumerate(zip(answers["llavatune"], answers["batch1"]))
                                  if x != y][:5])
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Figures in the docs and recipe headers that a tool produces, recomputed from the tool as it is now.

    python tests/doc_figures.py           # list every figure that differs from the tool's current output
    python tests/doc_figures.py --write   # rewrite them in place (after a change to `plan` or a new benchmark run)

``tests/test_doc_figures.py`` fails when a figure is stale, so a change to the planner (or a re-run benchmark) cannot
leave the docs behind silently. Each ``Figure`` names a file, a pattern that finds the figure (group ``fig``) in
its context exactly ``count`` times, and how to compute it:

- ``plan`` figures run ``llavatune plan`` (the library, same code as the command) on the command written next to
  the figure, or on a command given here for table rows and prose, offline: the hub ids the docs name are in
  plan's shipped table (``llavatune.plan.hub_configs``, whose values ``tests/test_plan.py`` checks), and a
  recipe path is read from the repository.
- benchmark figures read ``benchmarks/results/*.json`` (the measured numbers the docs quote).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llavatune.plan.hub_configs import hub_config  # noqa: E402

GiB = 1024**3


@lru_cache(maxsize=None)
def run_plan(command: str):
    """``(estimate, suggestions, printed text, args)`` of a ``llavatune plan ...`` command line, offline."""
    from llavatune.config import parse_config
    from llavatune.plan import PlanArgs, plan, recipe_values

    argv = shlex.split(command)
    assert argv[:2] == ["llavatune", "plan"], command
    argv = argv[2:]
    if argv and argv[0].endswith(".yaml"):
        argv[0] = str(ROOT / argv[0])
    if "--model" in argv:
        model = argv[argv.index("--model") + 1]
        assert model == "tiny" or hub_config(model) is not None, f"{model}: not in plan's shipped table"
    (args,) = parse_config([PlanArgs], argv, prog="llavatune plan", translate=recipe_values)
    return (*plan(args), args)


def peak(command: str) -> float:
    return run_plan(command)[0].peak / GiB


def plan_cmd(model: str, flags: str) -> str:
    return f"llavatune plan --model llava-hf/llava-1.5-{model}-hf --max-length 2048 {flags}"


@dataclass
class Figure:
    path: str
    pattern: str
    compute: Callable[[re.Match], str]
    count: int = 1
    what: str = ""

    def regex(self) -> re.Pattern:
        return re.compile(self.pattern, re.S)


def _gib(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f} GiB"


def recipe_memory(m: re.Match) -> str:
    """``# memory: 15.67 GiB per GPU, fits in 24 GiB, by`` + the plan command on the next line."""
    est, _, _, args = run_plan(m["cmd"])
    fits = est.peak <= args.gpu_mem * GiB
    return f"{est.peak / GiB:.2f} GiB per GPU, {'fits' if fits else 'does NOT fit'} in {args.gpu_mem:g} GiB"


def _spec7():
    from llavatune.plan.spec import load_spec

    return load_spec("llava-hf/llava-1.5-7b-hf")


def _layer_kib(method: str, part: str | None = None, dtype: str = "bf16") -> float:
    """Saved bytes per token of one LLaVA-1.5-7B decoder layer (CUDA, batch 16 x 2048), or of one part."""
    from llavatune.plan.estimate import Settings, layer_bytes

    parts = layer_bytes(_spec7(), Settings(method=method, batch=16, max_length=2048, dtype=dtype))
    return (parts[part] if part else sum(parts.values())) / 1024


def _logits_gib(supervised: int | None) -> float:
    from llavatune.plan.estimate import Settings, supervised_tokens

    s = Settings(batch=16, max_length=2048, supervised_tokens=supervised)
    return 12 * _spec7().vocab * 16 * supervised_tokens(_spec7(), s) / GiB


def _counts7() -> dict:
    return _spec7().count()


def _bench(name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())


def _budget(side: str, key: str) -> float:
    """A median of ``train_grouped.py --equal-budget`` (``benchmarks/results/train_grouped_budget.json``)."""
    return _bench("train_grouped_budget")["median"][side][key]


def _range(values: list[float], unit: str = " s") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f}{unit}" if round(lo, 1) == round(hi, 1) else f"{lo:.1f}-{hi:.1f}{unit}"


def _no_gc(method: str, extra: str = "") -> str:
    return plan_cmd("7b", f"--method {method} --batch 16 {extra}".strip())


# Rows of docs/memory.md's comparison with published LLaVA-1.5 runs: row label -> plan flags
PUBLISHED = {
    "13B full FT, ZeRO-3 × 8, batch 16 × 2048, checkpointing": ("13b", "--method full --zero zero3 --gpus 8 --batch 16 --gradient-checkpointing"),
    "7B full FT, ZeRO-3 × 8, batch 16 × 2048, checkpointing": ("7b", "--method full --zero zero3 --gpus 8 --batch 16 --gradient-checkpointing"),
    "13B task LoRA r=128, ZeRO-3 × 8, batch 16 × 2048, checkpointing": ("13b", "--method lora --zero zero3 --gpus 8 --batch 16 --gradient-checkpointing"),
    "7B LoRA r=128, 1 GPU, batch 1 × 2048, checkpointing": ("7b", "--method lora --batch 1 --gradient-checkpointing"),
    "7B QLoRA r=128, 1 GPU, batch 4 × 2048, checkpointing": ("7b", "--method qlora --batch 4 --gradient-checkpointing"),
    "13B QLoRA r=128, 1 GPU, batch 1 × 2048, checkpointing": ("13b", "--method qlora --batch 1 --gradient-checkpointing"),
}

FIGURES: list[Figure] = [
    # ---- recipe headers: "# memory: ... by" followed by the plan command that produced it
    *[Figure(f"configs/{name}.yaml", r"#   memory: (?P<fig>[^\n]*), by\n#   (?P<cmd>llavatune plan [^\n]+)",
             recipe_memory, count=n, what="recipe memory claim")
      for name, n in (("llava15_7b_okvqa_qlora", 1), ("llava15_7b_okvqa_lora", 2), ("llava15_7b_okvqa_full", 1),
                      ("qwen2_5_vl_7b_okvqa_qlora", 1), ("qwen2_5_vl_3b_okvqa_qlora_12gb", 1),
                      ("gemma3_4b_okvqa_qlora", 1), ("smolvlm_256m_okvqa_lora_8gb", 1))],
    # ---- docs/memory.md: the worked example is the command's output
    Figure("docs/memory.md", r"```text\n\$ (?P<cmd>llavatune plan [^\n]+)\n(?P<fig>.*?)\n```",
           lambda m: run_plan(m["cmd"])[2], what="worked example"),
    # the comparison with published runs
    *[Figure("docs/memory.md", rf"\| {re.escape(label)} \| [^|]+ \| (?P<fig>[\d.]+ GiB) \|",
             lambda m, model=model, flags=flags: _gib(peak(plan_cmd(model, flags))), what=label)
      for label, (model, flags) in PUBLISHED.items()],
    Figure("docs/memory.md", r"\| same without checkpointing \| – \| (?P<fig>[\d]+ / [\d]+ GiB) \|",
           lambda m: f"{peak(plan_cmd('7b', '--method full --zero zero3 --gpus 8 --batch 16')):.0f} / "
                     f"{peak(plan_cmd('13b', '--method full --zero zero3 --gpus 8 --batch 16')):.0f} GiB"),
    Figure("docs/memory.md", r"with `--max-length 1024` the 7B full fine-tuning row drops to (?P<fig>[\d.]+ GiB)",
           lambda m: _gib(peak(plan_cmd("7b", "--method full --zero zero3 --gpus 8 --batch 16 --gradient-checkpointing")
                               .replace("--max-length 2048", "--max-length 1024")))),
    # prose
    Figure("docs/memory.md", r"norms: (?P<fig>[\d.]+B parameters = [\d.]+ GiB) for LLaVA-1\.5-7B",
           lambda m: (lambda n: f"{n / 1e9:.2f}B parameters = {4 * n / GiB:.1f} GiB")(
               sum(_counts7().values()) - _counts7()["llm_linear"])),
    Figure("docs/memory.md", r"Under `--bf16` \(what the recipes use\): all of\s+them, (?P<fig>[\d.]+B) parameters for 7B",
           lambda m: f"{(sum(_counts7().values()) - _counts7()['llm_linear']) / 1e9:.2f}B"),
    Figure("docs/memory.md", r"frozen original: (?P<fig>[\d.]+B) for 7B",
           lambda m: f"{(_spec7().vision_matmul_params() + _counts7()['lm_head'] + _counts7()['projector']) / 1e9:.2f}B"),
    Figure("docs/memory.md", r"that\s+is (?P<fig>[\d.]+ KiB per token and layer with LoRA r=128 \(of which LoRA dropout [\d]+ "
                             r"KiB\), (?:the same|[\d]+ KiB) with bf16 QLoRA,\s+[\d]+ KiB) for full fine-tuning",
           lambda m: (f"{_layer_kib('lora'):.1f} KiB per token and layer with LoRA r=128 (of which LoRA dropout "
                      f"{_layer_kib('lora', 'lora'):.0f} KiB), "
                      + ("the same" if round(_layer_kib('qlora'), 1) == round(_layer_kib('lora'), 1)
                         else f"{_layer_kib('qlora'):.0f} KiB")
                      + " with bf16 QLoRA," + ("\n" if "\n" in m["fig"] else " ") + f"{_layer_kib('full'):.0f} KiB")),
    Figure("docs/memory.md", r"so the MLP activations are fp32 \((?P<fig>[\d]+ KiB) per token and layer for\s+7B\)",
           lambda m: f"{_layer_kib('qlora', dtype='fp16'):.0f} KiB"),
    Figure("docs/memory.md", r"no checkpointing:\s+(?P<fig>[\d]+ GiB vs [\d]+ GiB)\);",
           lambda m: f"{peak(_no_gc('lora')):.0f} GiB vs {peak(_no_gc('full')):.0f} GiB"),
    Figure("docs/memory.md", r"`--lora_dropout 0` takes LoRA down to (?P<fig>[\d]+ GiB)",
           lambda m: f"{peak(_no_gc('lora', '--lora-dropout 0')):.0f} GiB"),
    Figure("docs/memory.md", r"For 7B at 16 × 2048 that is (?P<fig>[\d.]+ GiB in the worst case, [\d.]+ GiB if every position\s+had "
                             r"logits, and [\d]+ MiB) for short VQA answers",
           lambda m: (f"{_logits_gib(None):.1f} GiB in the worst case, {_logits_gib(2048):.1f} GiB if every position"
                      + ("\n" if "\n" in m["fig"] else " ") + f"had logits, and {_logits_gib(8) * 1024:.0f} MiB")),
    Figure("docs/training.md", r"\(~(?P<fig>[\d.]+ GiB) of weights less for a 7B model",
           lambda m: _gib(2 * (sum(_counts7().values()) - _counts7()["llm_linear"]) / GiB)),
    # ---- timings quoted from benchmark results
    Figure("docs/data.md", r"14,000\s+questions/images in (?P<fig>[\d.-]+ s wall time \([\d.-]+ s)",
           lambda m: (f"{_range([r['seconds_wall_incl_startup'] for r in _bench('prepare_okvqa')['runs']], ' s')} "
                      f"wall time ({_range([r['seconds_in_prepare'] for r in _bench('prepare_okvqa')['runs']], ' s')}")),
    Figure("docs/benchmarks.md", r"\| `prepare_okvqa\.py` \|[^|]+\|[^|]+\| (?P<fig>[\d.-]+ s), ",
           lambda m: _range([r["seconds_wall_incl_startup"] for r in _bench("prepare_okvqa")["runs"]], " s")),
    # the equal-budget comparison of grouped training (train_grouped.py --equal-budget)
    Figure("docs/benchmarks.md", r"\| `train_grouped\.py --equal-budget` \|[^|]+\|[^|]+\| (?P<fig>\*\*[\d.]+ vs [\d.]+\*\* "
                                 r"\(medians; grouped saw [\d,]+ questions, per question [\d,]+: [\d.]+x)",
           lambda m: (f"**{_budget('grouped', 'vqa_accuracy'):.1f} vs {_budget('per_question', 'vqa_accuracy'):.1f}** "
                      f"(medians; grouped saw {_budget('grouped', 'questions_seen'):,.0f} questions, per question "
                      f"{_budget('per_question', 'questions_seen'):,.0f}: {_bench('train_grouped_budget')['questions_seen_ratio']:.2f}x")),
    Figure("docs/data.md", r"the grouped runs saw (?P<fig>[\d,]+ questions against [\d,]+ and scored [\d.]+ against [\d.]+)",
           lambda m: (f"{_budget('grouped', 'questions_seen'):,.0f} questions against "
                      f"{_budget('per_question', 'questions_seen'):,.0f} and scored {_budget('grouped', 'vqa_accuracy'):.1f} "
                      f"against {_budget('per_question', 'vqa_accuracy'):.1f}")),
    Figure("docs/benchmarks.md", r"\| \*\*median\*\* \| (?P<fig>[\d]+, [\d,]+, \*\*[\d.]+\*\* \| [\d]+, [\d,]+, \*\*[\d.]+\*\*) \|",
           lambda m: " | ".join(f"{_budget(s, 'optimizer_steps'):.0f}, {_budget(s, 'questions_seen'):,.0f}, "
                                f"**{_budget(s, 'vqa_accuracy'):.1f}**" for s in ("per_question", "grouped"))),
    # the CPU validation table quotes benchmarks/results/plan_validation.json
    *[Figure("docs/memory.md", rf"\| {re.escape(c['case'])} \| [^|]+ \| (?P<fig>[\d.]+ MiB \| [\d.]+ MiB \| [+-][\d.]+ %) \|",
             lambda m, c=c: f"{c['measured_peak_mib']:.1f} MiB | {c['estimated_peak_mib']:.1f} MiB | {c['error_pct']:+.1f} %",
             what=c["case"])
      for c in _bench("plan_validation")["cases"]],
]


def stale() -> list[tuple[Figure, str, str, str]]:
    """``(figure, file, in the doc, from the tool)`` for each figure that differs; raises if a pattern is lost."""
    out = []
    for f in FIGURES:
        text = (ROOT / f.path).read_text(encoding="utf-8")
        matches = list(f.regex().finditer(text))
        if len(matches) != f.count:
            raise AssertionError(f"{f.path}: expected {f.count} match(es) of the figure {f.what or f.pattern!r}, "
                                 f"found {len(matches)}; update tests/doc_figures.py with the doc")
        for m in matches:
            want = f.compute(m)
            if m["fig"] != want:
                out.append((f, f.path, m["fig"], want))
    return out


def write() -> int:
    n = 0
    for f in FIGURES:
        p = ROOT / f.path
        text = p.read_text(encoding="utf-8")

        def sub(m: re.Match, f=f) -> str:
            start, end = m.span("fig")
            return m.group(0)[: start - m.start()] + f.compute(m) + m.group(0)[end - m.start():]

        new = f.regex().sub(sub, text)
        if new != text:
            p.write_text(new, encoding="utf-8")
            n += 1
    return n


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite stale figures in place")
    a = ap.parse_args()
    if a.write:
        print(f"rewrote figures in {write()} place(s)")
    for f, path, have, want in stale():
        print(f"{path}: {f.what or 'figure'}:\n  doc:  {have!r}\n  tool: {want!r}")

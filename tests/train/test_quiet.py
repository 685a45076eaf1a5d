"""A real `llavatune train` run prints llavatune's lines, the Trainer's metrics and progress bars, and nothing else.

Run in a subprocess, as a user runs it, so import-time messages (bitsandbytes, DeepSpeed) are seen. QLoRA, because it
takes every path LoRA takes plus bitsandbytes' 4-bit layers; with gradient checkpointing (the QLoRA recipes') and
evaluation (generation) after the last step.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

# Exactly what may appear, line by line (stdout and stderr, tqdm's carriage-return redraws split into lines):
ALLOWED = (
    re.compile(r"\[llavatune\] .*"),  # llavatune's own lines
    re.compile(r"(  .*|sample \S+: \d+ tokens .*)"),  # ... and their continuation lines (summary table, first sample)
    re.compile(r"\{'(loss|eval_loss|train_runtime)': .*\}"),  # the Trainer's logged metrics (stdout)
    # tqdm bars (training steps, evaluation, saving/loading weights), \x1b[A: a nested bar's cursor-up
    re.compile(r"(\x1b\[A)?\s*([\w ()]+: *)?\d+%\|.*\| *\d+/\d+ \[.*\]\s*(\x1b\[A)?|\x1b\[A"),
)
# What the run printed before llavatune.quiet (and the pin_memory / detach / ds_numel fixes), each a line above
# would not let through.
BEFORE = [
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure you "
    "already `pip install kernels` and the kernels >= 0.11.1",
    "[2026-12-01 23:24:32,127] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If you "
    "have GPU or other accelerator, we were unable to detect it.",
    "/site-packages/transformers/modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing` is deprecated and "
    "will be removed in v6. Use `is_activation_checkpointing` instead.",
    "/site-packages/transformers/training_args.py:1541: FutureWarning: `gradient_checkpointing` is deprecated and will "
    "be removed in v6. Use `activation_checkpointing` instead.",
    "/site-packages/transformers/modeling_utils.py:3204: FutureWarning: `gradient_checkpointing_enable` is deprecated "
    "and will be removed in v6. Use `activation_checkpointing_enable` instead.",
    "/site-packages/torch/utils/data/dataloader.py:759: UserWarning: 'pin_memory' argument is set as true but no "
    "accelerator is found, then device pinned memory won't be used.",
    "/src/llavatune/model/tiny.py:345: UserWarning: Converting a tensor with requires_grad=True to a scalar may lead "
    "to unexpected behavior.",
    "Consider using tensor.detach() first. (Triggered internally at /pytorch/torch/csrc/autograd/generated/x.cpp:820.)",
]


def unexpected(output: str) -> list[str]:
    lines = [x for chunk in output.split("\n") for x in chunk.split("\r")]
    return [x for x in lines if x.strip() and not any(p.fullmatch(x) for p in ALLOWED)]


def test_allowed_lines_let_no_third_party_message_through():
    assert [unexpected(x) for x in BEFORE] == [[x] for x in BEFORE]
    assert unexpected("[llavatune] done: weights, processor and config in /tmp/x\n"
                      " 67%|██████▋   | 2/3 [00:00<00:00, 15.73it/s]\r100%|██████████| 3/3 [00:00<00:00, 12.34it/s]\n"
                      "Loading weights: 100%|██████████| 64/64 [00:00<00:00, 20273.05it/s]\n") == []


def test_tiny_qlora_train_prints_no_third_party_warnings(shapes, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # warnings as a user sees them (Python's default filters)
    r = subprocess.run([sys.executable, "-m", "llavatune.cli", "train", "--model", "tiny", "--method", "qlora",
                        "--data", str(shapes["train"]), "--val_data", str(shapes["val"]), "--output_dir", str(out),
                        "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--report_to", "none",
                        "--save_strategy", "no", "--gradient_checkpointing", "true"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert unexpected(r.stdout) == [], r.stdout
    assert unexpected(r.stderr) == [], r.stderr
    assert "[llavatune] trainable parameters:" in r.stderr and "{'loss': " in r.stdout
    assert "'eval_vqa_accuracy': " in r.stdout  # evaluation between steps ran (generation included)
    assert (out / "adapter_model.safetensors").is_file()


def test_filters_drop_only_the_named_messages():
    """The bitsandbytes and DeepSpeed filters drop their one message; the same loggers' other lines still pass."""
    from llavatune import quiet

    quiet.install()
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    for name, message in (
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
                                          "'kernels'. Please make sure you already `pip install kernels`"),
        ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
    ):
        log = logging.getLogger(name)
        h = Keep()
        log.addHandler(h)
        try:
            log.warning(message + " And the rest of the line.")
            log.warning("something else went wrong")
        finally:
            log.removeHandler(h)
    assert seen == ["something else went wrong"] * 2
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("default")
        quiet.install()
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "x.py", 1,
                               module="transformers.modeling_utils")
    assert len(got) == 1  # PEFT's call is silenced only around get_peft_model, not for everyone


def test_only_rank_zero_logs_info_and_warnings(monkeypatch):
    from llavatune import quiet

    def record(level):
        return logging.LogRecord("llavatune", level, __file__, 1, "train: 32 samples used", None, None)

    f = quiet.RankZeroOnly()
    monkeypatch.setenv("RANK", "1")
    assert [f.filter(record(x)) for x in (logging.INFO, logging.WARNING, logging.ERROR)] == [False, False, True]
    monkeypatch.setenv("RANK", "0")
    assert [f.filter(record(x)) for x in (logging.INFO, logging.WARNING, logging.ERROR)] == [True, True, True]
    monkeypatch.delenv("RANK")
    assert f.filter(record(logging.INFO))

"""Every recipe in configs/ parses into the train config and is headed by the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llavatune.config import parse_config
from llavatune.train.run import SECTIONS

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.stem for p in CONFIGS}
    assert {"llava15_7b_okvqa_qlora", "llava15_7b_okvqa_lora", "llava15_7b_okvqa_full", "pretrain_vicuna7b_clip336"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_parses_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "llavatune" in first and path.name in first
    # bf16 recipes are for GPUs; --use_cpu lets TrainingArguments accept them on this CPU-only machine
    model, data, method, evals, training = parse_config(SECTIONS, [str(path), "--use_cpu", "true"])
    assert training.output_dir and method.stage in ("pretrain", "finetune")
    if path.stem == "llava15_7b_okvqa_qlora":  # the reference run, as the issue specifies it
        assert (model.model, method.method, method.lora_r, method.lora_alpha) == ("llava-hf/llava-1.5-7b-hf", "qlora", 128, 256)
        assert (training.learning_rate, method.projector_lr, training.lr_scheduler_type) == (2e-4, 2e-5, "cosine")
        assert (training.warmup_steps, data.max_length, method.zero) == (0.03, 2048, "zero2")


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    from llavatune.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 8\n")
    assert main(["train", str(bad)]) == 2
    assert "lora_rank" in capsys.readouterr().err

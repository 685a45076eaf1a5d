"""Figures in the docs come from the tools: recipe headers' memory claims, docs/memory.md's worked example, tables
and prose, and the timings quoted from benchmark results (see tests/doc_figures.py for the list)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

import doc_figures

ROOT = Path(__file__).resolve().parents[1]


def test_every_figure_matches_the_tools_current_output():
    stale = doc_figures.stale()
    assert not stale, "stale figures (run: python tests/doc_figures.py --write):\n" + "\n".join(
        f"{path}: {f.what or 'figure'}: doc {have!r}, tool {want!r}" for f, path, have, want in stale)


RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_memory_claims_describe_the_recipe(recipe):
    """A header's `plan` command must estimate the recipe's own settings, not some other run."""
    text = recipe.read_text()
    cfg = yaml.safe_load(text)
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    claims = re.findall(r"#   memory: .*, by\n#   (llavatune plan [^\n]+)", header)
    if cfg.get("model", "").startswith("llava-hf/llava-1.5") and cfg.get("stage", "finetune") == "finetune":
        assert claims, f"{recipe.name}: a 7B recipe states its memory with the plan command that computes it"
    launches = {int(n) for n in re.findall(r"--nproc_per_node (\d+)", header)} | {1}
    for cmd in claims:
        flags = shlex.split(cmd)[2:]

        def value(flag, default=None, flags=flags):
            return flags[flags.index(flag) + 1] if flag in flags else default

        assert value("--model") == cfg["model"]
        assert value("--method", "lora") == cfg.get("method", "lora")
        assert int(value("--zero", 0)) == int(str(cfg.get("zero") or "zero0").removeprefix("zero")[:1] or 0)
        assert int(value("--batch", 16)) == cfg["per_device_train_batch_size"]
        assert int(value("--max-length", 2048)) == cfg.get("max_length", 2048)
        assert ("--gradient-checkpointing" in flags) == bool(cfg.get("gradient_checkpointing"))
        assert int(value("--lora-r", 128)) == cfg.get("lora_r", 128)
        assert float(value("--lora-dropout", 0.05)) == cfg.get("lora_dropout", 0.05)
        assert value("--dtype", "bf16") == ("bf16" if cfg.get("bf16") else "fp16" if cfg.get("fp16") else "fp32")
        assert int(value("--gpus", 1)) in launches, (cmd, launches)

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
    """A header's `plan` command estimates the recipe itself (plan reads the recipe as train does), on the GPU count
    it is launched with."""
    text = recipe.read_text()
    cfg = yaml.safe_load(text)
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    claims = re.findall(r"#   memory: .*, by\n#   (llavatune plan [^\n]+)", header)
    if cfg.get("model", "").startswith("llava-hf/llava-1.5") and cfg.get("stage", "finetune") == "finetune":
        assert claims, f"{recipe.name}: a 7B recipe states its memory with the plan command that computes it"
    launches = {int(n) for n in re.findall(r"--nproc_per_node (\d+)", header)} | {1}
    for cmd in claims:
        argv = shlex.split(cmd)[2:]
        assert argv[0] == f"configs/{recipe.name}", cmd
        flags = dict(zip(argv[1::2], argv[2::2]))
        assert set(flags) <= {"--gpus", "--gpu-mem"}, cmd
        assert int(flags.get("--gpus", 1)) in launches, (cmd, launches)

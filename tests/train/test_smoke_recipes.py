"""``llavatune train configs/RECIPE.yaml --smoke`` for every shipped recipe, as the README has it, on this CPU-only,
offline machine: what a CPU or a single process cannot do is turned off with one line each, and the family's
tiny model stands in for the hub model that cannot be fetched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from llavatune.cli import main
from llavatune.model.families import TINY_MODELS
from llavatune.model.tiny import tiny_family

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def workdir(shapes, tmp_path_factory) -> Path:
    """The folder layout the recipes name, relative to where the user runs them: data/okvqa/{train,val} as the
    README's prepare commands write them, and a LLaVA-Pretrain-style caption set with its image folder."""
    root = tmp_path_factory.mktemp("user")
    for split in ("train", "val"):
        shutil.copytree(Path(shapes[split]).parent, root / "data" / "okvqa" / split)
    pre = root / "data" / "llava_pretrain"
    pre.mkdir(parents=True)
    shutil.copy(shapes["captions"], pre / "blip_laion_cc_sbu_558k.json")
    (pre / "images").symlink_to(shapes["src"], target_is_directory=True)  # paths are images/train2014/...
    return root


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_smoke_runs_offline_on_cpu(recipe, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    cfg = yaml.safe_load(recipe.read_text())
    out = f"runs/smoke-{recipe.stem}"
    rc = main(["train", str(recipe), "--smoke", "--output_dir", out])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if line.startswith("[llavatune] --smoke")]
    # what was turned off, one line each
    for flag in ("bf16", "fp16"):
        assert any(f"--{flag} turned off" in s for s in said) == bool(cfg.get(flag)), said
    assert any(f"DeepSpeed (--zero {cfg.get('zero')}) turned off" in s for s in said) == bool(cfg.get("zero")), said
    assert any("early stopping" in s for s in said) == bool(cfg.get("early_stopping_patience")), said
    # the hub cannot be reached: the family's tiny model, with the recipe's template, said so
    base = json.loads((workdir / out / "base_model" / "config.json").read_text())
    if cfg["model"] in TINY_MODELS:
        assert not any("offline" in s for s in said)
    else:
        (line,) = [s for s in said if "--smoke offline" in s]
        family = tiny_family(cfg["model"])  # the recipe's family: tiny-next for v1.6, tiny-qwen2_5_vl, tiny-gemma3, ...
        assert family != "tiny" or cfg["model"].startswith("llava-hf/llava-1.5") or cfg["model"] == "compose"
        assert f"'{family}'" in line and "HF_HUB_OFFLINE=1" in line
        template = "plain" if cfg.get("stage") == "pretrain" else cfg.get("template", "auto")
        assert f"--template {template}" in line
        assert base["model_type"] == TINY_MODELS[family].name
    assert base["text_config"]["hidden_size"] == 64  # tiny
    rows = [json.loads(x) for x in (workdir / out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "train_loss" in rows[-1]
    meta = json.loads((workdir / out / "llavatune_checkpoint.json").read_text())
    assert meta["method"] == ("projector" if cfg.get("stage") == "pretrain" else cfg.get("method", "lora"))


def test_smoke_refuses_a_path_that_does_not_exist(workdir, monkeypatch, capsys):
    """--smoke falls back to the tiny model only when the hub cannot be reached, never for a typo'd path."""
    monkeypatch.chdir(workdir)
    recipe = next(p for p in CONFIGS if p.stem == "llava15_7b_okvqa_lora")
    rc = main(["train", str(recipe), "--smoke", "--output_dir", "runs/typo", "--model", "./models/llava-typo"])
    err = capsys.readouterr().err
    assert rc == 1 and "./models/llava-typo: no such folder" in err and not (workdir / "runs" / "typo").exists()

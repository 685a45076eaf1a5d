"""Every method on today's VLM families (tiny models): what LoRA targets and what stays frozen, per-module learning
rates, QLoRA (4-bit LLM, vision tower and projector unquantized) -> eval -> merge, full fine-tuning, stage 1 (only the
family's projector / merger trains), the vision tower by LoRA or fully, and ZeRO-3 on 2 CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from llavatune.cli import main as cli_main
from llavatune.config import parse_config
from llavatune.model.families import TINY_MODELS
from llavatune.train.run import SECTIONS, train

FAST = ["--report_to", "none", "--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--seed", "0", "--save_strategy", "no", "--image_workers", "1"]
NEW = ["tiny-llava_onevision", "tiny-paligemma", "tiny-qwen2_vl", "tiny-qwen2_5_vl", "tiny-qwen3_vl", "tiny-gemma3",
       "tiny-idefics3", "tiny-smolvlm", "tiny-internvl", "tiny-mistral3",
       "tiny-mllama"]
LLM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def run_train(argv):
    return train(*parse_config(SECTIONS, [str(a) for a in argv]))


def part_of(fam, key: str) -> str:
    """'projector', 'vision', 'llm' for a base-model parameter name (lm_head and embeddings are the LLM's)."""
    return fam.parameter_group(key)


def canonical(name: str) -> str | None:
    if "lora_" in name or "original_module" in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")


def changes(trainer, out: Path) -> dict[str, bool]:
    base = AutoModelForImageTextToText.from_pretrained(out / "base_model").state_dict()
    diff = {}
    for name, p in trainer.model.named_parameters():
        key = canonical(name)
        if key is None or key not in base or p.dtype == torch.uint8:
            continue
        diff[key] = not torch.equal(p.detach().float().cpu(), base[key].float())
    return diff


def by_part(fam, diff: dict[str, bool]) -> dict[str, set[bool]]:
    out: dict[str, set[bool]] = {}
    for k, v in diff.items():
        out.setdefault(part_of(fam, k), set()).add(v)
    return out


@pytest.mark.parametrize("name", NEW)
def test_lora_targets_the_llm_and_trains_the_projector_fully(shapes, tmp_path, name):
    fam = TINY_MODELS[name]
    out = tmp_path / "run"
    trainer = run_train(["--model", name, "--data", shapes["train"], "--output_dir", out, "--max_steps", "2",
                         "--projector_lr", "1e-3", *FAST])
    parts = by_part(fam, changes(trainer, out))
    assert parts["projector"] == {True}, "the projector / merger trains fully next to the adapters"
    assert parts["vision"] == {False} and parts["llm"] == {False}, parts
    lora = [n for n, _ in trainer.model.named_parameters() if "lora_A" in n]
    assert lora and all(f".{fam.language_model}." in n for n in lora), "LoRA only inside the language model"
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in lora} == LLM_LINEARS
    # --projector_lr: the projector's parameters (and only they) form the groups with that learning rate
    groups = [g for g in trainer.optimizer.param_groups if g.get("initial_lr", g["lr"]) == pytest.approx(1e-3)]
    proj = {id(p) for n, p in trainer.model.named_parameters() if p.requires_grad and part_of(fam, n) == "projector"}
    assert proj and {id(p) for g in groups for p in g["params"]} == proj
    # the adapter holds the trained projector (PEFT modules_to_save): nothing to lose beside it
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(f"{fam.projector[0]}." in k for k in saved)


QLORA = ["tiny-paligemma", "tiny-qwen2_vl", "tiny-qwen2_5_vl", "tiny-qwen3_vl", "tiny-gemma3", "tiny-idefics3",
         "tiny-smolvlm", "tiny-internvl", "tiny-mistral3", "tiny-mllama"]


@pytest.mark.parametrize("name", QLORA)
def test_qlora_quantizes_the_llm_only_then_evaluates_and_merges(shapes, tmp_path, name):
    import bitsandbytes as bnb

    fam = TINY_MODELS[name]
    out = tmp_path / "run"
    trainer = run_train(["--model", name, "--data", shapes["train"], "--output_dir", out, "--max_steps", "2",
                         "--method", "qlora", *FAST])
    four_bit = {n for n, m in trainer.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all(f".{fam.language_model}." in n for n in four_bit)
    assert {n.rsplit(".", 2)[-2] for n in four_bit} == LLM_LINEARS  # every LLM linear (".base_layer" under LoRA)
    for n, m in trainer.model.named_modules():  # vision tower, projector / merger and lm_head stay unquantized
        if part_of(fam, n) in ("vision", "projector") or "lm_head" in n:
            assert not isinstance(m, bnb.nn.Linear4bit), n
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(x == x for x in losses)
    assert cli_main(["eval", "--model", str(out), "--data", str(shapes["val"]), "--max_samples", "4",
                     "--max_new_tokens", "3"]) == 0
    merged = tmp_path / "merged"
    assert cli_main(["merge", "--model", str(out), "--out", str(merged)]) == 0
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg  # merged into the unquantized base, never a requantized copy
    model = AutoModelForImageTextToText.from_pretrained(merged)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


FULL = ["tiny-qwen2_5_vl", "tiny-gemma3", "tiny-paligemma"]


@pytest.mark.parametrize("name", FULL)
def test_full_fine_tuning_trains_llm_and_projector_not_the_vision_tower(shapes, tmp_path, name):
    fam = TINY_MODELS[name]
    out = tmp_path / "run"
    trainer = run_train(["--model", name, "--data", shapes["train"], "--output_dir", out, "--max_steps", "2",
                         "--method", "full", *FAST, "--learning_rate", "1e-3"])
    parts = by_part(fam, changes(trainer, out))
    assert True in parts["llm"] and parts["projector"] == {True} and parts["vision"] == {False}, parts
    assert any(out.glob("model*.safetensors")) and not (out / "adapter_config.json").exists()
    assert cli_main(["eval", "--model", str(out), "--data", str(shapes["val"]), "--max_samples", "2",
                     "--max_new_tokens", "2"]) == 0


STAGE1 = ["tiny-qwen2_5_vl", "tiny-qwen3_vl", "tiny-gemma3"]


@pytest.mark.parametrize("name", STAGE1)
def test_stage_pretrain_trains_the_familys_projector_only(shapes, tmp_path, name):
    fam = TINY_MODELS[name]
    out = tmp_path / "run"
    trainer = run_train(["--model", name, "--data", shapes["captions"], "--output_dir", out, "--max_steps", "2",
                         "--stage", "pretrain", *FAST])
    diff = changes(trainer, out)
    moved = {k for k, v in diff.items() if v}
    assert moved and all(part_of(fam, k) == "projector" for k in moved)
    for path in fam.projector:  # every projector module (Qwen3-VL: the merger and the DeepStack mergers) trained
        assert any(k.startswith(f"model.{path}.") for k in moved), path
    # stage 2 starts from it: --pretrained_projector loads exactly those weights
    out2 = tmp_path / "stage2"
    t2 = run_train(["--model", name, "--data", shapes["train"], "--output_dir", out2, "--max_steps", "1",
                    "--pretrained_projector", out, *FAST, "--learning_rate", "0"])
    stage1 = {canonical(n): p for n, p in trainer.model.named_parameters()}
    for n, p in t2.model.named_parameters():
        key = canonical(n)
        if key in moved and "original_module" not in n and "modules_to_save" in n:
            assert torch.equal(p.detach(), stage1[key].detach()), key


def test_vision_tower_by_lora_skips_the_merger_and_fully_trains_it(shapes, tmp_path):
    fam = TINY_MODELS["tiny-qwen2_5_vl"]
    out = tmp_path / "lora"
    trainer = run_train(["--model", "tiny-qwen2_5_vl", "--data", shapes["train"], "--output_dir", out, "--max_steps",
                         "1", "--train_vision", "lora", "--vision_lr", "1e-4", *FAST])
    lora = [n for n, _ in trainer.model.named_parameters() if "lora_A" in n]
    vision = [n for n in lora if part_of(fam, n.split(".lora_A")[0]) == "vision"]
    assert vision and not any(".merger." in n for n in lora)  # the merger trains fully, not by LoRA
    ids = {id(q) for n, q in trainer.model.named_parameters() if n in vision}
    lrs = {g.get("initial_lr", g["lr"]) for g in trainer.optimizer.param_groups if any(id(p) in ids for p in g["params"])}
    assert lrs == {1e-4}  # --vision_lr
    out = tmp_path / "full"
    trainer = run_train(["--model", "tiny-qwen2_5_vl", "--data", shapes["train"], "--output_dir", out, "--max_steps",
                         "2", "--train_vision", "full", *FAST])
    assert by_part(fam, changes(trainer, out))["vision"] == {True}


@pytest.mark.slow
def test_qwen_zero3_on_two_cpu_ranks_with_text_only_batches(shapes, tmp_path):
    """ZeRO-3 on a non-LLaVA family, launched as users do; rank 0 gets text-only batches while rank 1 gets image
    batches, so the blank-image hooks (the family's own image inputs) must keep the ranks in step."""
    image_recs = json.loads(Path(shapes["train"]).read_text())
    root = Path(shapes["train"]).parent
    recs = []
    for i in range(3):
        recs += [{"id": f"t{i}a", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]},
                 {"id": f"t{i}b", "conversations": [{"from": "human", "value": "Say no."}, {"from": "gpt", "value": "no"}]}]
        recs += [{**r, "image": str(root / r["image"])} for r in image_recs[2 * i: 2 * i + 2]]
    data = root / f"mixed_{tmp_path.name}.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29700 + os.getpid() % 1000)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llavatune.cli", "train",
           "--model", "tiny-qwen2_5_vl", "--data", str(data), "--output_dir", str(out), "--max_steps", "3",
           "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none", "--per_device_train_batch_size", "2",
           "--train_sampling_strategy", "sequential", "--save_strategy", "no", "--zero", "zero3", "--image_workers",
           "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in rows if "loss" in x]) == 3
    weights = load_file(str(out / "adapter_model.safetensors"))  # gathered, not ZeRO-3 shards
    merger = [v for k, v in weights.items() if ".merger." in k and k.endswith("weight")]
    assert merger and all(v.numel() > 0 for v in merger)


def test_zero3_is_refused_in_one_line_for_a_family_that_cannot_run_it(shapes, tmp_path, capsys):
    """Mllama has no get_image_features for the blank-image hook that keeps ZeRO-3 ranks in step: refused with one
    line naming the option and what to use, not a crash at the first text-only batch."""
    assert not TINY_MODELS["tiny-mllama"].zero3
    argv = ["train", "--model", "tiny-mllama", "--data", str(shapes["train"]), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1", "--zero", "zero3", *FAST]
    assert cli_main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--zero zero3: mllama does not run under ZeRO-3 here; use --zero zero2"), err
    assert not (tmp_path / "run").exists()  # refused before anything is written: the same command with zero2 runs

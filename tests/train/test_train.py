"""`llavatune train` end to end on the tiny model: what trains, what stays frozen, QLoRA, stages, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, TrainerCallback

from llavatune.cli import main as cli_main
from llavatune.config import parse_config
from llavatune.train.run import SECTIONS, train

FAST = ["--report_to", "none", "--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--dataloader_num_workers", "0", "--seed", "0"]


def run_train(argv: list[str], callbacks=()):
    sections = parse_config(SECTIONS, [str(a) for a in argv])
    return train(*sections, extra_callbacks=callbacks)


def base_state(out: Path) -> dict[str, torch.Tensor]:
    base = LlavaForConditionalGeneration.from_pretrained(out / "base_model")
    return {k: v.detach().clone() for k, v in base.state_dict().items()}


def canonical(name: str) -> str | None:
    """PEFT parameter name -> base model parameter name (None for LoRA/original-copy params)."""
    if "lora_" in name or "original_module" in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")


def changed(trained: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, bool]:
    out = {}
    for name, p in trained.named_parameters():
        key = canonical(name)
        if key is None or key not in before:
            continue
        if p.dtype == torch.uint8:  # 4-bit packed weights: compare dequantized
            continue
        out[key] = not torch.equal(p.detach().float().cpu(), before[key].float())
    return out


def test_lora_trains_adapter_and_projector_only(shapes, tmp_path):
    out = tmp_path / "run"
    trainer = run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", out, "--max_steps", "3",
                         "--save_strategy", "no", *FAST])
    before = base_state(out)
    diff = changed(trainer.model, before)
    projector = [k for k in diff if "multi_modal_projector" in k]
    llm = [k for k in diff if "language_model" in k or k.startswith("lm_head")]
    vision = [k for k in diff if "vision_tower" in k]
    assert projector and llm and vision
    assert all(diff[k] for k in projector), "projector must train fully alongside LoRA"
    assert not any(diff[k] for k in llm), "base LLM weights must stay frozen"
    assert not any(diff[k] for k in vision), "vision tower must stay frozen"
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero and must have moved"
    # LoRA is on every linear layer of the LLM and nowhere else
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lora_" in n for n, _ in trainer.model.named_parameters() if "vision_tower" in n or "projector" in n)
    # the final output is self-contained
    for f in ("adapter_model.safetensors", "adapter_config.json", "llavatune_checkpoint.json",
              "llavatune_config.yaml", "tokenizer.json", "processor_config.json"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "llavatune_checkpoint.json").read_text())
    assert meta["method"] == "lora" and (out / meta["base_model_relative"]).resolve() == (out / "base_model").resolve()


def test_qlora_runs_on_cpu_with_4bit_llm(shapes, tmp_path):
    import bitsandbytes as bnb

    out = tmp_path / "run"
    trainer = run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", out, "--max_steps", "2",
                         "--save_strategy", "no", "--method", "qlora", *FAST])
    model = trainer.model
    kinds = {n: type(m) for n, m in model.named_modules() if n.endswith(("q_proj.base_layer", "down_proj.base_layer"))}
    assert kinds and all(k is bnb.nn.Linear4bit for k in kinds.values())
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    # vision tower, projector and lm_head are never quantized
    for n, m in model.named_modules():
        if any(s in n for s in ("vision_tower", "multi_modal_projector", "lm_head")):
            assert not isinstance(m, bnb.nn.Linear4bit), n
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    meta = json.loads((out / "llavatune_checkpoint.json").read_text())
    assert meta["method"] == "qlora" and meta["quantization"]["quant_type"] == "nf4"


def test_qlora_under_autocast_keeps_frozen_weights_16bit(shapes, tmp_path):
    """PEFT's kbit preparation upcasts every unquantized weight to fp32. Under autocast llavatune casts the frozen
    linear/conv ones (vision tower, lm_head) back: the same loss and gradients to the last bit. Under bf16 it
    also casts the frozen embeddings back (norms stay fp32), as LLaVA's and the QLoRA paper's code do: the
    residual stream becomes bf16 as in a bf16 LoRA run, and loss and gradients move by bf16 rounding only."""
    import argparse

    from llavatune.model import loader

    out = tmp_path / "run"
    trainer = run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", out, "--max_steps", "1",
                         "--save_strategy", "no", "--method", "qlora", "--dtype", "bfloat16", "--bf16", "true", "--use_cpu", "true",
                         "--val_data", shapes["val"], "--eval_strategy", "steps", "--eval_steps", "1",
                         "--eval_max_samples", "4", *FAST])
    # between-epoch generation runs under the training autocast too (16-bit weights meet fp32 norm outputs)
    assert any("eval_vqa_accuracy" in h for h in trainer.state.log_history)
    params = dict(trainer.model.named_parameters())
    vision = [p for n, p in params.items() if "vision_tower" in n and n.endswith(("q_proj.weight", "fc1.weight"))]
    assert vision and all(p.dtype == torch.bfloat16 for p in vision)
    assert params["base_model.model.lm_head.weight"].dtype == torch.bfloat16
    for n, p in params.items():  # what trains stays fp32 (PEFT's), everything else is as loaded
        if p.dtype != torch.uint8:
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    batch = next(iter(trainer.get_train_dataloader()))
    quant = loader.quantization_kwargs(4, "nf4", True, torch.bfloat16)
    margs = argparse.Namespace(lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=None,
                               train_vision="frozen", lora_modules_to_save=None)
    results = {}
    for autocast in (None, "fp16", "bf16"):  # PEFT's fp32 upcast; frozen matmul weights 16-bit; + embeddings
        torch.manual_seed(0)
        model, _ = loader.load_base(str(out / "base_model"), torch.bfloat16, quantization=quant)
        model = loader.apply_method(model, "finetune", "qlora", margs, autocast=autocast)
        fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == torch.float32)
        stream: list[torch.dtype] = []
        layer = model.get_base_model().model.language_model.layers[0]
        hook = layer.register_forward_hook(
            lambda m, a, o, seen=stream: seen.append((o[0] if isinstance(o, tuple) else o).dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the matmul-only rule is exact under bf16 too
            loss = model(**batch).loss
        hook.remove()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[autocast] = (loss.detach(), grads, fp32_bytes, stream[0])
    (loss_a, grads_a, fp32_a, stream_a), (loss_b, grads_b, fp32_b, stream_b), (loss_c, grads_c, fp32_c, stream_c) = (
        results[None], results["fp16"], results["bf16"])
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert fp32_c < fp32_b < fp32_a
    assert stream_a == stream_b == torch.float32 and stream_c == torch.bfloat16
    # the stated tolerance: loss within 0.5 % (bf16's rounding step, 2^-8 = 0.4 %), every gradient within 3 % of its
    # norm (measured on the warm-started tiny model: 0.17 % and <= 1.2 %; bf16 keeps 8 significant bits, so a
    # rounded stream moves gradients by about 2^-8 per layer)
    torch.testing.assert_close(loss_c, loss_a, rtol=5e-3, atol=0)
    assert grads_c.keys() == grads_a.keys()
    for k in grads_a:
        err = (grads_c[k] - grads_a[k]).norm() / grads_a[k].norm().clamp_min(1e-12)
        assert err < 3e-2, (k, float(err))


def test_loss_from_supervised_positions_only_equals_the_full_logits_loss(shapes, tmp_path):
    """LlavaTrainer computes logits only where the next token is supervised: same loss, same gradients."""
    from llavatune.model.loss import forward_loss, supervised_positions

    trainer = run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", tmp_path / "run", "--max_steps", "1",
                         "--save_strategy", "no", *FAST])
    model = trainer.model.eval()  # no dropout: both passes see the same network
    batch = next(iter(trainer.get_train_dataloader()))
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < n < batch["labels"].numel() // 4  # answers are a small part of a VQA sample

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    full, full_g = loss_and_grads(lambda: model(**batch).loss)
    for fn in (lambda: trainer.compute_loss(model, dict(batch)),  # mean over this batch
               lambda: trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n)),  # sum / count
               lambda: forward_loss(model, batch)):
        loss, grads = loss_and_grads(fn)
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
        assert grads.keys() == full_g.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], full_g[k], rtol=1e-4, atol=1e-6, msg=k)
    kept = model(**{k: v for k, v in batch.items() if k != "labels"},
                 logits_to_keep=supervised_positions(batch["labels"])).logits
    assert kept.shape[0] == n  # one row of logits per supervised token, not one per position


def test_pretrain_trains_projector_only(shapes, tmp_path):
    out = tmp_path / "stage1"
    trainer = run_train(["--model", "tiny", "--data", shapes["captions"], "--output_dir", out, "--max_steps", "3",
                         "--save_strategy", "no", "--stage", "pretrain", *FAST])
    diff = changed(trainer.model, base_state(out))
    assert all(v == ("multi_modal_projector" in k) for k, v in diff.items()), [k for k, v in diff.items() if v]
    # stage-1 output is a full llava-hf model whose projector feeds stage 2
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    out2 = tmp_path / "stage2"
    trainer2 = run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", out2, "--max_steps", "1",
                          "--save_strategy", "no", "--pretrained_projector", out, *FAST])
    del trainer2  # loading the stage-1 projector into a fresh stage-2 run works


def test_full_finetune_trains_llm_not_vision(shapes, tmp_path):
    out = tmp_path / "run"
    trainer = run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", out, "--max_steps", "2",
                         "--save_strategy", "no", "--method", "full", *FAST])
    diff = changed(trainer.model, base_state(out))
    assert any(v for k, v in diff.items() if "language_model.layers" in k)
    assert not any(v for k, v in diff.items() if "vision_tower" in k)


def test_separate_learning_rates(shapes, tmp_path):
    trainer = run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", tmp_path / "r", "--max_steps", "1",
                         "--save_strategy", "no", "--projector_lr", "2e-5", "--lr_scheduler_type", "constant",
                         "--warmup_steps", "0", *FAST])
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [2e-5, 1e-2]


class Killed(Exception):
    """Stands in for kill -9: the process stops in the middle of training, nothing is finished or cleaned up."""


class KillAfter(TrainerCallback):
    """Die right after step ``step`` was logged (metrics.jsonl holds it), like a kill between two checkpoints."""

    def __init__(self, step):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kw):
        if state.global_step == self.step and logs and "loss" in logs:
            raise Killed(f"killed after step {self.step}")


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(out) if "loss" in r}


def test_resume_reproduces_uninterrupted_run_and_logs_each_step_once(shapes, tmp_path):
    args = ["--model", "tiny", "--data", shapes["train"], "--max_steps", "6", "--save_strategy", "steps",
            "--save_steps", "3", *FAST]
    full = tmp_path / "full"
    run_train([*args, "--output_dir", full])
    part = tmp_path / "part"
    with pytest.raises(Killed):  # killed after step 4, one step past checkpoint-3
        run_train([*args, "--output_dir", part], callbacks=[KillAfter(4)])
    assert (part / "checkpoint-3" / "optimizer.pt").is_file() and not (part / "checkpoint-4").exists()
    assert max(losses(part)) == 4
    # the same command again resumes automatically from checkpoint-3 (model, optimizer, scheduler, RNG, data)
    run_train([*args, "--output_dir", part])
    steps = [r["step"] for r in metric_rows(part) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], "each step once: the interrupted attempt's step 4 is not kept twice"
    a, b = losses(full), losses(part)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    assert sum("train_runtime" in r for r in metric_rows(part)) == 1


def test_bare_resume_flag_continues_from_the_latest_checkpoint(shapes, tmp_path):
    args = ["--model", "tiny", "--data", shapes["train"], "--max_steps", "4", "--save_strategy", "steps",
            "--save_steps", "2", "--output_dir", tmp_path / "run", *FAST]
    with pytest.raises(Killed):
        run_train(args, callbacks=[KillAfter(3)])
    trainer = run_train([*args, "--resume"])  # bare flag (it used to say "expected one argument")
    assert trainer.state.global_step == 4
    assert [r["step"] for r in metric_rows(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


def test_finished_run_is_left_alone_and_a_different_run_is_refused(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--data", str(shapes["train"]), "--output_dir", str(out), "--max_steps", "2",
            "--save_strategy", "steps", "--save_steps", "2", *FAST]
    assert cli_main(args) == 0
    capsys.readouterr()
    names = sorted(p.name for p in out.rglob("*"))
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # the same command again: says it is finished, exit 0, changes nothing (no "train_loss 0.0" row, no new report)
    assert cli_main(args) == 0
    assert "finished" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == names
    assert all(p.read_bytes() == b for p, b in snapshot.items())
    # different data and a different learning rate: refused, naming both, offering --overwrite / a new folder
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(Path(shapes["train"]).read_text())[:8]))
    (tmp_path / "images").symlink_to(Path(shapes["train"]).parent / "images")
    changed = ["train", "--model", "tiny", "--data", str(other), "--output_dir", str(out), "--max_steps", "2",
               "--save_strategy", "steps", "--save_steps", "2", *FAST[:-6], "--learning_rate", "1e-3", *FAST[-4:]]
    assert cli_main(changed) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "different run" in err and "--data" in err and "--learning_rate 0.01 -> 0.001" in err
    assert "--overwrite" in err and "--output_dir" in err
    assert all(p.read_bytes() == b for p, b in snapshot.items()), "the finished run is untouched"
    # --overwrite replaces it (it is a llavatune run and holds no input)
    assert cli_main([*changed, "--overwrite"]) == 0
    assert json.loads((out / "llavatune_run.json").read_text())["fingerprint"]["learning_rate"] == 1e-3


def test_refuses_non_empty_output_dir(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = cli_main(["train", "--model", "tiny", "--data", str(shapes["train"]), "--output_dir", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "--overwrite" in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "./no/such/model"], "no such folder"),
        (["--method", "qlora", "--zero", "zero3"], "zero2"),
        (["--zero", "zero9"], "--zero"),
        (["--method", "dora"], "--method"),
        (["--lora_r", "0"], "--lora_r"),
        (["--model", "compose"], "--vision_model"),
        (["--early_stopping_patience", "2"], "--val_data"),
    ],
)
def test_bad_config_is_a_clear_error_before_training(shapes, tmp_path, capsys, argv, message):
    rc = cli_main(["train", "--data", str(shapes["train"]), "--output_dir", str(tmp_path / "o"), "--report_to", "none",
                   *argv])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_all_samples_failing_is_an_error(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                                {"from": "gpt", "value": "x " * 400}]}]))
    rc = cli_main(["train", "--model", "tiny", "--data", str(data), "--output_dir", str(tmp_path / "o"),
                   "--max_length", "64", "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == 1 and "no usable samples" in err


def test_same_seed_same_run_within_one_process(shapes, tmp_path):
    """The LoRA weights are drawn before the Trainer seeds: a second run in the same process (after other random
    work) must still start from the same weights and end with the same adapter. (--model tiny seeds when it
    builds its base; a saved model, as here, does not.)"""
    from safetensors.torch import load_file

    run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", tmp_path / "base", "--max_steps", "1",
               "--save_strategy", "no", *FAST])

    def adapter(out):
        run_train(["--model", tmp_path / "base" / "base_model", "--data", shapes["train"], "--output_dir", out,
                   "--max_steps", "2", "--save_strategy", "no", *FAST])
        return load_file(str(out / "adapter_model.safetensors"))

    first = adapter(tmp_path / "a")
    torch.rand(1000)  # anything else that draws from the global generator in between
    second = adapter(tmp_path / "b")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

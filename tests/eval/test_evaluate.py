"""Evaluation between epochs (metrics per epoch, best checkpoint, early stopping) and `llavatune eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llavatune.cli import main as cli_main
from llavatune.config import parse_config
from llavatune.data.records import Record, Turn
from llavatune.eval.evaluate import EvalSet, score_predictions
from llavatune.train.run import SECTIONS, train

FAST = ["--report_to", "none", "--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-2", "--seed", "0", "--eval_max_new_tokens", "4"]


def run_train(argv):
    return train(*parse_config(SECTIONS, [str(a) for a in argv]))


def evals(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory):
    """2 epochs with validation; best checkpoint by eval *loss, higher is better*, i.e. epoch 1 (loss falls)."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    trainer = run_train(["--model", "tiny", "--data", shapes["train"], "--val_data", shapes["val"], "--output_dir", out,
                         "--num_train_epochs", "2", "--metric_for_best_model", "loss", "--greater_is_better", "true",
                         *FAST])
    return out, trainer


def test_every_epoch_has_val_loss_and_vqa_accuracy(run):
    out, _ = run
    rows = evals(out)
    assert [round(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["eval_vqa_accuracy"] <= 100 and r["eval_loss"] > 0 and "eval_exact_match" in r
    assert sorted(p.name for p in (out / "eval_predictions").iterdir()) == [f"step-{r['step']}.jsonl" for r in rows]
    pred = json.loads((out / "eval_predictions" / f"step-{rows[0]['step']}.jsonl").read_text().splitlines()[0])
    assert {"id", "question", "prediction", "reference", "answers", "score"} <= set(pred)


def test_best_checkpoint_is_restored(run):
    out, trainer = run
    rows = evals(out)
    best = trainer.state.best_model_checkpoint
    worst_loss_step = max(rows, key=lambda r: r["eval_loss"])["step"]
    assert best and best.endswith(f"checkpoint-{worst_loss_step}")
    final = load_file(str(out / "adapter_model.safetensors"))
    chosen = load_file(str(Path(best) / "adapter_model.safetensors"))
    last = load_file(str(out / f"checkpoint-{rows[-1]['step']}" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    assert best.endswith(f"checkpoint-{rows[-1]['step']}") or not all(torch.equal(final[k], last[k]) for k in final)


def test_early_stopping_stops(shapes, tmp_path):
    out = tmp_path / "es"
    trainer = run_train(["--model", "tiny", "--data", shapes["train"], "--val_data", shapes["val"], "--output_dir", out,
                         "--num_train_epochs", "6", "--early_stopping_patience", "1", "--learning_rate", "0",
                         "--metric_for_best_model", "loss", *FAST[:-6]])
    assert trainer.state.epoch < 6
    assert len(evals(out)) == 2  # first evaluation sets the best, the second shows no improvement -> stop


@pytest.mark.parametrize("kind", ["final", "intermediate"])
def test_eval_command_on_adapter_checkpoints(run, shapes, tmp_path, capsys, kind):
    out, _ = run
    ckpt = out if kind == "final" else sorted(out.glob("checkpoint-*"))[0]
    dest = tmp_path / "ev"
    rc = cli_main(["eval", "--model", str(ckpt), "--data", str(shapes["val"]), "--out", str(dest), "--batch_size", "4",
                   "--max_new_tokens", "4"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((dest / "metrics.json").read_text())
    preds = [json.loads(x) for x in (dest / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n"] == len(preds) == len(json.loads(Path(shapes["val"]).read_text()))
    assert 0 <= metrics["vqa_accuracy"] <= 100
    assert "vqa_accuracy" in capsys.readouterr().out
    # batched answers equal one-at-a-time answers (left padding is invisible to the model)
    dest1 = tmp_path / "ev1"
    assert cli_main(["eval", "--model", str(ckpt), "--data", str(shapes["val"]), "--out", str(dest1),
                     "--batch_size", "1", "--max_new_tokens", "4"]) == 0
    preds1 = [json.loads(x) for x in (dest1 / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == [p["prediction"] for p in preds1]


def test_eval_command_on_full_and_qlora_checkpoints(shapes, tmp_path, capsys):
    for method in ("full", "qlora"):
        out = tmp_path / method
        run_train(["--model", "tiny", "--data", shapes["train"], "--output_dir", out, "--max_steps", "2",
                   "--save_strategy", "no", "--method", method, *FAST])
        rc = cli_main(["eval", "--model", str(out), "--data", str(shapes["val"]), "--max_samples", "4",
                       "--max_new_tokens", "3"])
        assert rc == 0, capsys.readouterr().err
        assert "4 samples" in capsys.readouterr().out


def test_eval_errors_are_clear(shapes, tmp_path, capsys):
    rc = cli_main(["eval", "--model", str(tmp_path), "--data", str(shapes["val"])])
    err = capsys.readouterr().err
    assert rc == 1 and "not a model or checkpoint directory" in err and "Traceback" not in err


def test_scoring_uses_answers_else_exact_match():
    recs = [
        Record("a", [Turn("human", "Q"), Turn("gpt", "two")], extra={"answers": ["2"] * 4 + ["3"] * 6}),
        Record("b", [Turn("human", "Q"), Turn("gpt", "A red Ball.")]),
    ]
    eset = EvalSet.from_records(recs, Path("."))
    rows, metrics = score_predictions(eset, ["two", "a red ball"])
    assert rows[0]["scored_by"] == "vqa" and rows[0]["score"] == 1.0  # "two" -> "2"; 4 of 10 match, so every leave-one-out subset has >= 3
    assert rows[1]["scored_by"] == "exact_match" and rows[1]["score"] == 1.0
    assert metrics["vqa_accuracy"] == 100.0

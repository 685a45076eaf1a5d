"""Small promises the docs make about commands: every command takes a YAML, messages suggest only what the command
accepts, report texts say what the run did, help texts match the README's usage."""

from __future__ import annotations

import pytest
import yaml

from llavatune.cli import main


@pytest.fixture(scope="module")
def run_all_val(shapes, tmp_path_factory):
    """A tiny run with generation eval on the whole validation set (--eval_max_samples 0)."""
    out = tmp_path_factory.mktemp("r") / "run"
    assert main(["train", "--model", "tiny", "--data", str(shapes["train"]), "--val_data", str(shapes["val"]),
                 "--output_dir", str(out), "--num_train_epochs", "1", "--eval_max_samples", "0",
                 "--eval_max_new_tokens", "2", "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none",
                 "--save_strategy", "no", "--load_best_model_at_end", "false"]) == 0
    return out


def test_report_says_all_validation_samples_for_eval_max_samples_0(run_all_val):
    text = (run_all_val / "report.md").read_text()
    assert "all validation samples" in text and "up to 0 samples" not in text


def test_report_takes_a_yaml_like_every_command(run_all_val, tmp_path, capsys):
    cfg = tmp_path / "report.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run_all_val), "gallery": 3}))
    (run_all_val / "report.md").unlink()
    assert main(["report", str(cfg)]) == 0
    assert (run_all_val / "report.md").is_file() and "wrote" in capsys.readouterr().out
    assert main(["report", str(cfg), "--gallery", "2"]) == 0  # flags after the YAML override it
    assert main(["report", str(run_all_val)]) == 0  # and the positional run folder still works


def test_demo_not_empty_message_does_not_suggest_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rc = main(["demo", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "--overwrite" in err and "--resume" not in err
    assert (out / "mine.txt").read_text() == "keep"


def test_check_help_says_model_may_be_a_hub_id(capsys):
    """The README runs `check DATA --model llava-hf/llava-1.5-7b-hf`; --help must not say "local model folder"."""
    assert main(["check", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    model_help = text.rsplit("--model MODEL", 1)[1].split("--max_length", 1)[0]
    assert "hub id" in model_help and "llava-hf/llava-1.5-7b-hf" in model_help

"""`llavatune demo` end to end at a reduced size (the full-size run is measured by hand: see the README)."""

from __future__ import annotations

import json

from llavatune.cli import main


def test_demo_runs_every_step_and_summarises(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--train_images", "24", "--val_images", "6", "--epochs", "1",
               "--pretrain_epochs", "1"])
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    # too small to learn: the demo must say so plainly and exit non-zero rather than claim success
    assert rc == (0 if summary["passed"] else 3)
    assert ("PASSED" in printed) == summary["passed"] and ("NOT REACHED" in printed) != summary["passed"]
    for cmd in ("llavatune prepare okvqa", "llavatune train", "--stage pretrain", "llavatune eval",
                "llavatune merge", "llavatune predict"):
        assert cmd in printed, cmd
    assert [e for e, _ in summary["per_epoch"]] == [0, 1]  # evaluated before training and after the epoch
    assert summary["baselines"]["constant"] > 0
    for path in ("data/train/data.json", "data/val/data.json", "stage1/model.safetensors",
                 "stage2/adapter_model.safetensors", "eval/metrics.json", "merged/model.safetensors"):
        assert (out / path).is_file(), path

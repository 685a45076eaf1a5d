"""The three launch forms the docs show, with 2 CPU ranks and no extra flags (no --zero, no --use_cpu):

    torchrun --nproc_per_node 2 -m llavatune.cli train ...
    accelerate launch --multi_gpu --num_processes 2 -m llavatune.cli train ...   (--multi_gpu: see docs/training.md)
    deepspeed --num_gpus 2 --module llavatune.cli train ...

Each must be data-parallel (gloo on CPU): every rank gets half of each global batch, so an epoch takes half the
steps of one process, and rank 0 alone writes metrics.jsonl and the report. Before, each rank trained alone on all
the data (and rank 1 refused the output folder rank 0 had just created); the DeepSpeed launcher's --local_rank=K
was an "unknown command".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llavatune.cli import main, strip_launcher_args

SAMPLES, PER_DEVICE = 16, 4  # one process: 4 steps per epoch; two ranks: 2


def launcher(kind: str, port: int) -> list[str]:
    py = [sys.executable, "-m"]
    if kind == "torchrun":
        return [*py, "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m"]
    if kind == "accelerate":
        return [*py, "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m"]
    return [*py, "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port), "--module"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchrun", "accelerate", "deepspeed"])
def test_two_cpu_ranks_are_data_parallel(kind, shapes, tmp_path):
    out = tmp_path / "run"
    port = 29800 + (os.getpid() + hash(kind)) % 150
    cmd = [*launcher(kind, port), "llavatune.cli", "train", "--model", "tiny", "--data", str(shapes["train"]),
           "--max_train_samples", str(SAMPLES), "--per_device_train_batch_size", str(PER_DEVICE), "--output_dir",
           str(out), "--report_to", "none", "--save_strategy", "no", "--lora_r", "4", "--lora_alpha", "8",
           "--train_sampling_strategy", "sequential"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [1, 2], rows  # half of one process's 4, each step logged once (rank 0 only)
    assert "data-parallel on CPU" in r.stderr
    assert (out / "report.html").is_file() and (out / "adapter_model.safetensors").is_file()


def test_deepspeed_launchers_local_rank_is_accepted_anywhere(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "unset")  # records the original state, restored after the test
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["--local_rank=1", "train", "--model", "tiny"]) == ["train", "--model", "tiny"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_launcher_args(["plan", "--local-rank", "0", "--batch", "2"]) == ["plan", "--batch", "2"]
    assert os.environ["LOCAL_RANK"] == "1"  # the launcher's own environment wins
    assert main(["--local_rank=0", "plan", "--model", "tiny", "--batch", "2"]) == 0
    assert "peak per GPU" in capsys.readouterr().out

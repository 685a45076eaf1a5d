"""``benchmarks/gpu_suite.py --dry-run``: the GPU suite's every section on tiny shapes on the CPU, so that a rare,
short GPU window is never lost to a trivial error in the script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] and not r["skipped"]
    sections = r["sections"]
    assert set(sections) == {"train_lora", "train_qlora", "eval_okvqa", "eval_vqav2"}
    has_trl = importlib.util.find_spec("trl") is not None
    for name in ("train_lora", "train_qlora"):
        s = sections[name]
        assert "error" not in s, s
        assert s["median"]["llavatune"]["tokens_per_s"] > 0 and s["median"]["llavatune"]["final_loss"] > 0
        assert ("trl" in s["median"]) == has_trl
        if has_trl:
            assert s["ratio_tokens_per_s_llavatune_vs_trl"] > 0
    for name in ("eval_okvqa", "eval_vqav2"):
        s = sections[name]
        assert s["identical"], s  # fp32 on the CPU: all three sides give the same answers
        assert s["sides"]["shared"]["samples_per_s"] > 0 and s["ratio_shared_vs_batch1"] > 0
    assert sections["eval_vqav2"]["images"] < sections["eval_vqav2"]["questions"]
    assert sections["eval_vqav2"]["sharing"]["shared_questions"] == sections["eval_vqav2"]["questions"]
    assert sections["eval_okvqa"]["sharing"]["shared_questions"] == 0  # one question per image: nothing to share

"""Everything a run report shows, read from a run directory (finished or still training).

Sources: ``llavatune_config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per log; the last
line may be torn while the run writes it), ``eval_predictions/step-N.jsonl`` (the latest one is the
gallery), ``checkpoint-N/trainer_state.json`` (best checkpoint), ``llavatune_checkpoint.json`` (method,
quantization) and ``params.txt`` (trainable-parameter summary written at the end of training; without it
the counts come from the safetensors headers of the adapter / weights and of the base model).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llavatune.files import CONFIG_FILE, EVAL_PREDICTIONS_DIR, META_FILE, METRICS_FILE

EVAL_KEYS = ("eval_loss", "eval_vqa_accuracy", "eval_exact_match", "eval_token_f1")


@dataclass
class RunData:
    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    summary_row: dict | None = None
    torn_lines: int = 0
    best: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    predictions: list[dict] = field(default_factory=list)
    predictions_file: Path | None = None
    image_root: Path | None = None
    checkpoints: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.summary_row is not None

    @property
    def has_validation(self) -> bool:
        return bool(self.section("data").get("val_data")) or bool(self.eval_rows)

    def section(self, name: str) -> dict[str, Any]:
        return self.config.get(name) or {}


def read_metrics(path: Path) -> tuple[list[dict], list[dict], dict | None, int]:
    """(train rows, eval rows, final summary row, number of unreadable lines). Tolerates a torn last line."""
    train, evals, summary, torn = [], [], None, 0
    if not path.is_file():
        return train, evals, summary, torn
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if not isinstance(row, dict):
                torn += 1
            elif "train_runtime" in row or "train_loss" in row:
                summary = row
            elif any(k in row for k in EVAL_KEYS):
                evals.append(row)
            elif "loss" in row:
                train.append(row)
    return train, evals, summary, torn


def _step_of(p: Path) -> int:
    m = re.search(r"(\d+)$", p.stem if p.is_file() else p.name)
    return int(m.group(1)) if m else -1


def latest_predictions(run_dir: Path) -> tuple[Path | None, list[dict]]:
    files = sorted((run_dir / EVAL_PREDICTIONS_DIR).glob("step-*.jsonl"), key=_step_of)
    for f in reversed(files):  # the newest readable one (a file being written is replaced atomically)
        rows = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if rows:
            return f, rows
    return None, []


def best_from_state(run_dir: Path) -> dict[str, Any] | None:
    """``best_model_checkpoint`` / ``best_metric`` of the newest checkpoint's trainer_state.json."""
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=_step_of)
    for c in reversed(ckpts):
        f = c / "trainer_state.json"
        try:
            state = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("best_model_checkpoint") or state.get("best_global_step"):
            step = state.get("best_global_step")
            if step is None and state.get("best_model_checkpoint"):
                step = _step_of(Path(state["best_model_checkpoint"]))
            return {"step": step, "metric_value": state.get("best_metric"), "source": f"{c.name}/trainer_state.json"}
    return None


def pick_best(data: RunData) -> dict[str, Any] | None:
    """The best evaluation: trainer_state's choice when there is one, else by metric_for_best_model."""
    if not data.eval_rows:
        return None
    training = data.section("training")
    metric = training.get("metric_for_best_model") or (
        "vqa_accuracy" if any("eval_vqa_accuracy" in r for r in data.eval_rows) else "loss")
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    greater = training.get("greater_is_better")
    if greater is None:
        greater = "loss" not in key
    state = best_from_state(data.run_dir)
    row = None
    if state and state.get("step") is not None:
        row = next((r for r in data.eval_rows if r.get("step") == state["step"]), None)
    source = state["source"] if row is not None and state else METRICS_FILE
    if row is None:
        rows = [r for r in data.eval_rows if isinstance(r.get(key), (int, float))]
        if not rows:
            return None
        row = (max if greater else min)(rows, key=lambda r: r[key])
    return {"metric": key, "value": row.get(key), "step": row.get("step"), "epoch": row.get("epoch"),
            "greater_is_better": greater, "source": source}


# ---------------------------------------------------------------------------------------------- params

def _safetensors_shapes(path: Path) -> dict[str, int]:
    """Tensor name -> number of elements, from a safetensors header only (no tensor data is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for d in info.get("shape", []):
            numel *= d
        out[name] = numel
    return out


def _group(name: str, fam=None) -> str:
    """A parameter's group as ``loader.parameter_summary`` labels it (the family's projector / vision module names)."""
    from llavatune.model.families import FAMILIES

    fam = fam or FAMILIES["llava"]
    part = fam.parameter_group(name)
    return {"projector": fam.projector[0], "vision": fam.vision[0]}.get(part, part)


def _family_of(config_dir: Path | None):
    from llavatune.model.families import family

    try:
        return family(json.loads((config_dir / "config.json").read_text()).get("model_type")) if config_dir else None
    except (OSError, ValueError):
        return None


def parse_param_summary(text: str) -> dict[str, Any] | None:
    """Parse ``loader.parameter_summary`` output (params.txt)."""
    m = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", text)
    if not m:
        return None
    trainable, total = (int(x.replace(",", "")) for x in m.groups())
    if total == 0:  # ZeRO-3 partitions parameters: the live counts are empty
        return None
    groups = {}
    for g in re.finditer(r"^\s+(\S+)\s+([\d,]+) params,\s+([\d,]+) trainable", text, re.M):
        groups[g.group(1)] = {"params": int(g.group(2).replace(",", "")), "trainable": int(g.group(3).replace(",", ""))}
    return {"trainable": trainable, "total": total, "groups": groups, "source": "params.txt (recorded at train time)"}


def params_from_files(data: RunData) -> dict[str, Any] | None:
    """Counts from safetensors headers (no weights are loaded): the base model (or the full weights) for the
    totals, the adapter for LoRA and the trainable ``modules_to_save`` copies."""
    run = data.run_dir
    dirs = [run] + [run / c for c in reversed(data.checkpoints)]
    adapter = next((d / "adapter_model.safetensors" for d in dirs if (d / "adapter_model.safetensors").is_file()), None)
    full = next((sorted(d.glob("model*.safetensors")) for d in dirs if any(d.glob("model*.safetensors"))), [])
    base_dir = next((run / c for c in (data.meta.get("base_model_relative"), "base_model")
                     if c and (run / c / "config.json").is_file()), None)
    weights = sorted(base_dir.glob("*.safetensors")) if base_dir else full
    if not weights:
        return None
    fam = _family_of(base_dir) or _family_of(weights[0].parent)
    groups: dict[str, dict[str, int]] = {}
    for f in weights:
        for name, n in _safetensors_shapes(f).items():
            groups.setdefault(_group(name, fam), {"params": 0, "trainable": 0})["params"] += n
    method = data.section("method")
    if adapter is not None:
        for name, n in _safetensors_shapes(adapter).items():
            g = _group(name, fam)
            if g == "lora":
                e = groups.setdefault("lora", {"params": 0, "trainable": 0})
                e["params"] += n
                e["trainable"] += n
            elif g in groups:  # modules_to_save: a trainable copy of a base module
                groups[g]["trainable"] += n
        src = [adapter, base_dir or (full[0] if full else None)]
    else:
        from llavatune.model.families import FAMILIES

        f = fam or FAMILIES["llava"]
        trained = {f.projector[0]}
        if method.get("stage", "finetune") == "finetune" and method.get("method") == "full":
            trained.add("llm")
        if method.get("train_vision") == "full":
            trained.add(f.vision[0])
        for k in trained & groups.keys():
            groups[k]["trainable"] = groups[k]["params"]
        src = [weights[0]]
    names = ", ".join(str(x.relative_to(run)) if x.is_relative_to(run) else str(x) for x in src if x is not None)
    return {"trainable": sum(g["trainable"] for g in groups.values()),
            "total": sum(g["params"] for g in groups.values()), "groups": groups,
            "source": f"safetensors headers ({names})"}


# ---------------------------------------------------------------------------------------------- loading

def image_root(data: RunData) -> Path | None:
    """The folder validation image paths are relative to: --image_folder, else the val data file's folder."""
    d = data.section("data")
    if d.get("image_folder"):
        return Path(d["image_folder"])
    if d.get("val_data"):
        return Path(d["val_data"]).parent
    return None


def load_run(run_dir: str | Path) -> RunData:
    run = Path(run_dir)
    data = RunData(run_dir=run)
    cfg = run / CONFIG_FILE
    if cfg.is_file():
        try:
            data.config = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            data.config = {}
    meta = run / META_FILE
    ckpts = sorted((p for p in run.glob("checkpoint-*") if p.is_dir()), key=_step_of)
    data.checkpoints = [c.name for c in ckpts]
    for m in [meta] + [c / META_FILE for c in reversed(ckpts)]:
        if m.is_file():
            try:
                data.meta = json.loads(m.read_text(encoding="utf-8"))
                break
            except json.JSONDecodeError:
                continue
    data.train_rows, data.eval_rows, data.summary_row, data.torn_lines = read_metrics(run / METRICS_FILE)
    data.best = pick_best(data)
    ptxt = run / "params.txt"
    if ptxt.is_file():
        data.params = parse_param_summary(ptxt.read_text(encoding="utf-8"))
    if data.params is None:
        try:
            data.params = params_from_files(data)
        except (OSError, ValueError, struct.error):
            data.params = None
    data.predictions_file, data.predictions = latest_predictions(run)
    data.image_root = image_root(data)
    return data

"""``--zero``: which DeepSpeed ZeRO configuration a run uses, the same vocabulary in ``train`` and ``plan``.

``zero2``, ``zero3`` and ``zero3_offload`` name the configs shipped in ``llavatune/configs/deepspeed/``; anything
else must be a DeepSpeed JSON file. ``train`` hands the file to the Trainer (``TrainingArguments.deepspeed``);
``plan`` reads the ZeRO stage and the offload settings from the same file, so both always mean the same run.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from llavatune.config import ConfigError

SHIPPED = ("zero2", "zero3", "zero3_offload")


def deepspeed_config(zero: str) -> str:
    """The JSON file ``--zero`` names: a shipped config (``zero2``, ``zero3``, ``zero3_offload``) or a user's file."""
    if Path(zero).is_file():
        return str(Path(zero).resolve())
    shipped = resources.files("llavatune") / "configs" / "deepspeed" / f"{zero}.json"
    if zero not in SHIPPED or not shipped.is_file():
        hint = f" (plan and train spell it zero{zero})" if zero in ("2", "3") else ""
        raise ConfigError(f"--zero: {zero!r} is neither {', '.join(SHIPPED)} nor an existing JSON file{hint}")
    return str(shipped)


def zero_settings(zero: str | None) -> tuple[int, bool]:
    """``(ZeRO stage, offload)`` of ``--zero`` (``(0, False)``: no DeepSpeed); offload is true when the config
    offloads the optimizer states or the parameters."""
    if not zero:
        return 0, False
    path = deepspeed_config(zero)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        opt = data.get("zero_optimization") or {}
        stage = int(opt.get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"--zero {zero}: not a readable DeepSpeed JSON config ({e})") from None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {zero}: zero_optimization.stage {stage} is not 0, 1, 2 or 3")
    offload = any(str((opt.get(k) or {}).get("device", "none")).lower() not in ("none", "")
                  for k in ("offload_optimizer", "offload_param"))
    return stage, offload

"""What a llavatune command prints: its own lines once per job, and third-party noise kept off the terminal.

Installed by ``llavatune.utils.setup_logging`` (every command, from ``llavatune.cli``), before any heavy library is
imported. Nothing here silences a library wholesale: each entry drops one exact message the user can do nothing
about, and names the versions it was checked against, so a new release that changes the message shows it again.

- ``RankZeroOnly``: under a launcher (torchrun, deepspeed, accelerate launch) only rank 0 logs llavatune's info and
  warning lines; every rank still reports errors.
- ``install``: the third-party messages below. Why each is noise:

  - bitsandbytes 0.50, ``bitsandbytes.backends.cpu.ops``: "Failed to load CPU gemm_4bit_forward from
    kernels-community" at import (PEFT and transformers import bitsandbytes whenever it is installed, even for a
    LoRA run). It offers an optional hub kernel; the built-in CPU path it falls back to is what runs.
  - DeepSpeed 0.19.8, logger ``DeepSpeed``: "Setting accelerator to CPU" at import (accelerate imports DeepSpeed
    whenever it is installed, even without ``--zero``). On CPU llavatune says itself how it trains.
  - torch 2.14 ``torch.distributed``: "`all_gather_into_tensor` / `reduce_scatter_tensor` is deprecated",
    FutureWarnings from DeepSpeed 0.19.8's ZeRO collectives (llavatune calls neither), once per rank and step.

- ``peft_wrapping``: around ``get_peft_model``, ``PeftModel.from_pretrained`` and ``prepare_model_for_kbit_training``
  only: PEFT 0.21's ``PeftModel.__init__`` reads transformers 5.24's deprecated ``is_gradient_checkpointing``
  property and its ``prepare_model_for_kbit_training`` calls the deprecated ``gradient_checkpointing_enable``
  (FutureWarnings about PEFT's calls, not ours).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# (logger name, message prefix) pairs dropped from those loggers.
DROPPED_LOG_MESSAGES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
                                      "'kernels'."),
    ("DeepSpeed", "Setting accelerator to CPU."),
)
# (message regex, category, module regex) for warnings.filterwarnings.
IGNORED_WARNINGS = (
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning,
     r"torch\.distributed\.c10d_logger"),
)
PEFT_WARNINGS = r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated"


def rank() -> int:
    """This process's global rank as the launcher set it (0 without one), readable before torch.distributed is up."""
    return int(os.environ.get("RANK") or 0)


class RankZeroOnly(logging.Filter):
    """Passes every record on rank 0, and only errors on the other ranks (each rank would print the same line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or rank() == 0


class DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def install() -> None:
    """The third-party filters of the module docstring (idempotent)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in DROPPED_LOG_MESSAGES:
        by_logger[name] = by_logger.get(name, ()) + (prefix,)
    for name, prefixes in by_logger.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in log.filters):
            log.addFilter(DropMessages(prefixes))
    for message, category, module in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT's wrapping of a model: the deprecation warnings about PEFT's own calls (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_WARNINGS, category=FutureWarning)
        yield

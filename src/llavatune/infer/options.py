"""The options that say which model to load and how, shared by every command that loads a trained model:
``predict``, ``chat``, ``serve``, ``eval`` and ``merge`` (one dataclass, as TRL's ``ModelConfig``).

Each command's options dataclass extends :class:`LoadOptions`, so ``--model``, ``--base_model``, ``--dtype``,
``--template`` and ``--device`` are spelled, documented and validated once.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from llavatune.config import ConfigError, config
from llavatune.data.templates import TemplateName

DTYPES = ("auto", "bfloat16", "float16", "float32")


@config
class LoadOptions:
    model: Optional[str] = None
    """The model: a training output or checkpoint-N folder (LoRA / QLoRA adapter or full weights), a merged or
    converted model, a llava-hf model folder or a hub id."""
    base_model: Optional[str] = None
    """Base model for an adapter checkpoint whose recorded base cannot be found."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype. auto: bfloat16 on a GPU that supports it, else float32; merge: the base model's saved dtype (a
    7B float16 base merges into float16). QLoRA bases are reloaded unquantized in this dtype for merge."""
    template: Optional[TemplateName] = None
    """Prompt template (default: the one the checkpoint was trained with, else the model's chat template); merge
    records it in the merged model for predict, chat and eval."""
    device: str = "auto"
    """Where to run: auto (the GPU when there is one; merge: the CPU), cpu, cuda or cuda:N."""

    def __post_init__(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"--device: {self.device!r} is not auto, cpu, cuda or cuda:N")

    def load_predictor(self):
        """The model loaded for generation, with the prompt template it was trained with (``load_predictor``)."""
        from llavatune.infer.predict import load_predictor

        return load_predictor(self.model, self.base_model, self.dtype, self.template, device=self.device)

"""bitsandbytes' quantized layer and parameter types, recognised in one place.

By class name, so that code looking at a model never imports bitsandbytes (which loads its native library and
logs about its kernels at import) for a model that does not use it.
"""

from __future__ import annotations

from typing import Any

LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes.nn modules (subclasses of torch.nn.Linear)
PARAMS = ("Params4bit", "Int8Params")  # their weights' parameter types (a Params4bit packs 2 weights per element)


def is_quantized_layer(module: Any) -> bool:
    return type(module).__name__ in LAYERS


def is_4bit_param(param: Any) -> bool:
    return type(param).__name__ == "Params4bit"


def quantized_parts(model: Any) -> list[str]:
    """The bitsandbytes layer and parameter types found in ``model`` (sorted; empty: nothing is quantized)."""
    found = {type(m).__name__ for m in model.modules()} | {type(p).__name__ for p in model.parameters()}
    return sorted(found & set(LAYERS + PARAMS))


def is_quantized(model: Any) -> bool:
    """Whether ``model`` holds bitsandbytes weights (loaded in 4 or 8 bit)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or any(is_quantized_layer(m) for m in model.modules()))

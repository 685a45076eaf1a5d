"""Inference and export: batched generation, ``llavatune predict`` / ``chat`` / ``serve`` (answers from any
checkpoint), ``merge`` (adapter into its base) and ``convert`` (original LLaVA checkpoints to llava-hf)."""

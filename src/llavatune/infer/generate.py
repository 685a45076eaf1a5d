"""Batched greedy generation for eval, predict and evaluation between epochs.

Prompts are built with the same ``Encoder`` (template segments) as training, so the model sees at
inference exactly the prefix it learned on. Batches are left-padded (decoder-only generation needs the
prompt to end at the same position), sorted by prompt length to waste little padding, and decoded with
the KV cache. The original LLaVA eval loop generates one sample at a time (LLaVA #562, #754).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from llavatune.data.encode import Encoder, image_size
from llavatune.data.images import open_image
from llavatune.data.records import Record, Turn


@dataclass
class Query:
    """One generation request: the conversation so far (ending with a human turn) and its image files."""

    turns: list[Turn]
    images: list[Path]
    ref: str = ""


def split_for_eval(rec: Record) -> tuple[list[Turn], str | None]:
    """Prompt turns (everything before the last answer) and that answer (the reference), for a record."""
    last = max((i for i, t in enumerate(rec.conversations) if t.role == "gpt"), default=None)
    if last is None:
        return list(rec.conversations), None
    return list(rec.conversations[:last]), rec.conversations[last].value


def parse_stop(text: str | None) -> tuple[str, ...]:
    """``--stop`` / ``--eval_stop``: comma-separated strings that end an answer (empty: none)."""
    return tuple(s for s in (text or "").split(",") if s)


def _cut(text: str, stop: Iterable[str]) -> str:
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


def unwrap(model):
    """The underlying model of DDP/DeepSpeed wrappers (PEFT wrappers are kept: they generate with LoRA)."""
    return getattr(model, "module", model)


def stop_token_ids(encoder: Encoder, model=None) -> list[int] | None:
    """Generation stops at the family's end-of-turn tokens (``<|im_end|>``, ``<end_of_turn>``, ...), the tokenizer's
    EOS and the model's own ``generation_config.eos_token_id`` (so a fine-tuned model stops instead of rambling)."""
    ids = list(encoder.stop_token_ids)
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if model is not None else None
    ids += gen if isinstance(gen, list) else [gen] if gen is not None else []
    return list(dict.fromkeys(i for i in ids if i is not None)) or None


def to_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """A collated batch on the model's device, floating-point image inputs in its dtype."""
    device = next(p for p in model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


@torch.no_grad()
def generate(
    model,
    encoder: Encoder,
    queries: list[Query],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop: Iterable[str] = (),
    synced_gpus: bool = False,
    progress: Any = None,
) -> list[str]:
    """Greedy answers for ``queries`` in their original order."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    tok = encoder.tokenizer
    collate = encoder.collator(padding_side="left")
    sizes = [[image_size(p) for p in q.images] if encoder.variable_image_tokens and q.images else None
             for q in queries]
    prompts = [encoder.prompt_ids(q.turns, s) for q, s in zip(queries, sizes)]
    order = sorted(range(len(queries)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(queries)
    eos = stop_token_ids(encoder, model)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            feats = [encoder.features(prompts[i], images=[open_image(p) for p in queries[i].images] or None)
                     for i in idx]
            batch = to_device(collate(feats), model)
            gen = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
                synced_gpus=synced_gpus,
            )
            new = gen[:, batch["input_ids"].shape[1] :]
            for i, row in zip(idx, new):
                out[i] = _cut(tok.decode(row, skip_special_tokens=True), stop)
            if progress is not None:
                progress.update(len(idx))
    finally:
        if was_training:
            model.train()
    return out

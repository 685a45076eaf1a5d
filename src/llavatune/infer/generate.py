"""Batched greedy generation for eval, predict and evaluation between epochs.

Prompts are built with the same ``Encoder`` (template segments) as training, so the model sees at
inference exactly the prefix it learned on. Batches are left-padded (decoder-only generation needs the
prompt to end at the same position), sorted by prompt length to waste little padding, and decoded with
the KV cache. The original LLaVA eval loop generates one sample at a time (LLaVA #562, #754).

Shared image prefixes (``share_prefix``, on by default): questions about the same image(s) whose prompts
agree up to and including the last image token (VQAv2 has ~5.4 questions per image, GQA over 10) are
answered from one prefill of that prefix. Per batch, the distinct prefixes are run once through the model
(the vision tower once per image; prefixes left-padded against each other), their KV cache rows are copied
to every question of the image, and ``generate`` continues from that cache with each question's own text.
A row is laid out as ``[pad][prefix][pad][suffix]``: both pads are masked, and ``generate`` derives the
positions from the attention mask (cumulative sum), so every real token has the position it has in the
unshared, left-padded prompt and attends to the same tokens -- the same computation, the same greedy
answers (a test compares them). Questions alone with their image, and models this path is not known to be
exact for, take the unshared path.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from llavatune.data.encode import Encoder, image_size
from llavatune.data.images import open_image
from llavatune.data.records import Turn
from llavatune.model.families import FAMILIES

logger = logging.getLogger("llavatune")

# Families whose prefill/continue computation is known to be the same as a full-prompt pass (the family table's
# ``shared_prefix``): image features are spliced into token positions, causal attention everywhere, positions =
# cumulative attention mask (1-D RoPE). Not for Qwen-VL (M-RoPE positions computed from the image grid in the
# prefill), PaliGemma (prefix-LM attention across the question), mllama (cross-attention states), Gemma 3
# (bidirectional image blocks).
SHARED_PREFIX_MODEL_TYPES = tuple(t for f in FAMILIES.values() if f.shared_prefix for t in f.model_types)


@dataclass
class Query:
    """One generation request: the conversation so far (ending with a human turn) and its image files."""

    turns: list[Turn]
    images: list[Path]
    ref: str = ""


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


def _core(model):
    """The transformers model under a PEFT wrapper (LoRA layers are injected into it, so it computes with them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.2x) or the older ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def shared_prefix_unsupported(model) -> str | None:
    """Why ``model`` cannot reuse a prefilled image prefix exactly (``None``: it can)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    core = _core(unwrap(model))
    kind = getattr(core.config, "model_type", None)
    if kind not in SHARED_PREFIX_MODEL_TYPES:
        return f"model type {kind!r} is not one of {', '.join(SHARED_PREFIX_MODEL_TYPES)}"
    try:
        layers = DynamicCache(config=core.config.get_text_config(decoder=True)).layers
    except Exception as e:  # noqa: BLE001 - an unusual config; the plain path works
        return f"its cache layout is unknown ({type(e).__name__})"
    if any(type(layer) is not DynamicLayer for layer in layers):
        return "its language model has sliding-window or non-attention cache layers"
    attn = getattr(core.config.get_text_config(decoder=True), "_attn_implementation", None) or "sdpa"
    if attn not in ("sdpa", "eager"):  # masks with pads inside a row: checked for these two kernels
        return f"attention implementation {attn!r} (shared prefixes are checked with sdpa and eager)"
    return None


@dataclass
class _Group:
    """Questions (indices into the query list) that share ``prefix`` (prompt ids through the last image token)."""

    prefix: list[int]
    members: list[int]
    images: list[Path]


def _group_by_prefix(queries: list[Query], prompts: list[list[int]], image_token_id: int) -> tuple[list[_Group], list[int]]:
    """Groups of >= 2 questions sharing an image prefix, and the questions left for the unshared path."""
    by_key: dict[tuple, _Group] = {}
    for i, (q, ids) in enumerate(zip(queries, prompts)):
        last = max((j for j, t in enumerate(ids) if t == image_token_id), default=None)
        if not q.images or last is None or last + 1 >= len(ids):
            by_key[("alone", i)] = _Group(ids, [i], q.images)
            continue
        key = (tuple(str(p) for p in q.images), tuple(ids[: last + 1]))
        g = by_key.setdefault(key, _Group(ids[: last + 1], [], q.images))
        g.members.append(i)
    groups = [g for g in by_key.values() if len(g.members) > 1]
    alone = sorted(i for g in by_key.values() if len(g.members) == 1 for i in g.members)
    return groups, alone


def _model_io(model) -> tuple[torch.device, torch.dtype]:
    device = next(p for p in model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    return device, dtype


def _pixel_features(encoder: Encoder, ids: list[int], images: list[Path]) -> dict[str, Any]:
    """A prompt's model inputs: its ids, its images' inputs and the family's per-token types (``Encoder.features``)."""
    return encoder.features(ids, images=[open_image(p) for p in images] or None)


def _to_device(batch: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    """A collated batch on ``device``, floating-point image inputs in ``dtype`` (ids and grids stay integers)."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def to_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """A collated batch on the model's device, floating-point image inputs in its dtype."""
    return _to_device(batch, *_model_io(model))


def stop_token_ids(encoder: Encoder, model=None) -> list[int] | None:
    """Generation stops at the family's end-of-turn tokens (``<|im_end|>``, ``<end_of_turn>``, ...), the tokenizer's
    EOS and the model's own ``generation_config.eos_token_id`` (so a fine-tuned model stops instead of rambling)."""
    ids = list(encoder.stop_token_ids)
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if model is not None else None
    ids += gen if isinstance(gen, list) else [gen] if gen is not None else []
    return list(dict.fromkeys(i for i in ids if i is not None)) or None


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """What ``generate`` uses for a 2-D mask: the cumulative count of real tokens (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


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
    share_prefix: bool = True,
    stats: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy answers for ``queries`` in their original order.

    ``share_prefix``: prefill each image prefix once for all the questions about it (see the module docstring);
    ``stats``, when given, receives what was shared (``shared_questions``, ``prefix_groups``, ``images_encoded``,
    ``prefill_tokens``, and ``share_prefix_off`` with the reason when sharing was asked for but not possible).
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    sizes = [[image_size(p) for p in q.images] if encoder.variable_image_tokens and q.images else None
             for q in queries]
    prompts = [_prompt(encoder, q, s) for q, s in zip(queries, sizes)]
    out: list[str] = [""] * len(queries)
    st = stats if stats is not None else {}
    st.update(shared_questions=0, prefix_groups=0, images_encoded=0, prefill_tokens=0)
    groups: list[_Group] = []
    alone = list(range(len(queries)))
    if share_prefix and queries:
        why = shared_prefix_unsupported(model)
        if why is None and synced_gpus:
            why = "ranks generate in lockstep under ZeRO-3 (synced_gpus)"
        if why is None:
            groups, alone = _group_by_prefix(queries, prompts, encoder.image_token_id)
        else:
            st["share_prefix_off"] = why
            logger.info(f"shared image prefixes off: {why}; every question is generated from its full prompt")
    try:
        _generate_plain(model, encoder, queries, prompts, alone, out, batch_size, max_new_tokens, stop,
                        synced_gpus, progress, st)
        if groups:
            _generate_shared(model, encoder, queries, prompts, groups, out, batch_size, max_new_tokens, stop,
                             progress, st)
    finally:
        if was_training:
            model.train()
    return out


def _prompt(encoder: Encoder, query: Query, sizes) -> list[int]:
    """The prompt ids of ``query``; one that cannot be encoded (an image its processor refuses) is one line naming it."""
    from llavatune.data.encode import SampleSkipped
    from llavatune.utils import UserError

    try:
        return encoder.prompt_ids(query.turns, sizes)
    except SampleSkipped as e:
        raise UserError(f"{query.ref or 'the question'}: {e}") from None


def _greedy_kwargs(encoder: Encoder, model, max_new_tokens: int) -> dict[str, Any]:
    return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                eos_token_id=stop_token_ids(encoder, model), pad_token_id=encoder.tokenizer.pad_token_id)


def _generate_plain(model, encoder, queries, prompts, indices, out, batch_size, max_new_tokens, stop, synced_gpus,
                    progress, st) -> None:
    """The unshared path: each question's full prompt, length-sorted, left-padded batches."""
    tok = encoder.tokenizer
    collate = encoder.collator(padding_side="left")
    device, dtype = _model_io(model)
    order = sorted(indices, key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = _to_device(collate([_pixel_features(encoder, prompts[i], queries[i].images) for i in idx]),
                           device, dtype)
        gen = model.generate(**batch, **_greedy_kwargs(encoder, model, max_new_tokens), synced_gpus=synced_gpus)
        new = gen[:, batch["input_ids"].shape[1] :]
        for i, row in zip(idx, new):
            out[i] = _cut(tok.decode(row, skip_special_tokens=True), stop)
        st["images_encoded"] += sum(len(queries[i].images) for i in idx)
        st["prefill_tokens"] += sum(len(prompts[i]) for i in idx)
        if progress is not None:
            progress.update(len(idx))


def _plan_batches(groups: list[_Group], prompts: list[list[int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """Batches of ``(group, question)`` pairs, at most ``batch_size`` questions each, whole groups kept together
    where they fit; a larger group fills consecutive batches (its prefix cache is kept from one to the next).
    Groups ordered by prefix length and questions by suffix length, so little padding is needed."""
    batches: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    for g in sorted(range(len(groups)), key=lambda g: (len(groups[g].prefix), groups[g].members[0])):
        members = sorted(groups[g].members, key=lambda i: (len(prompts[i]), i))
        if current and len(current) + len(members) > batch_size:
            batches.append(current)
            current = []
        for i in members:
            current.append((g, i))
            if len(current) == batch_size:
                batches.append(current)
                current = []
    if current:
        batches.append(current)
    return batches


def _generate_shared(model, encoder, queries, prompts, groups, out, batch_size, max_new_tokens, stop, progress,
                     st) -> None:
    from transformers import DynamicCache

    tok = encoder.tokenizer
    pad = tok.pad_token_id
    core = _core(model)
    cache_kw = _cache_kwarg(core)
    text_config = core.config.get_text_config(decoder=True)
    collate = encoder.collator(padding_side="left")
    device, dtype = _model_io(core)
    batches = _plan_batches(groups, prompts, batch_size)
    uses = {}
    for batch in batches:
        for g in dict.fromkeys(g for g, _ in batch):
            uses[g] = uses.get(g, 0) + 1
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # group -> per layer (1, heads, prefix, dim), no pad
    for batch in batches:
        # 1. each prefix not cached yet, once: vision tower + prefill, prefixes left-padded against each other
        distinct = list(dict.fromkeys(g for g, _ in batch))
        missing = [g for g in distinct if g not in kv]
        if missing:
            feats = [_pixel_features(encoder, groups[g].prefix, groups[g].images) for g in missing]
            pre = _to_device(collate(feats), device, dtype)
            cache = DynamicCache(config=text_config)
            core(**pre, position_ids=_positions(pre["attention_mask"]), use_cache=True, logits_to_keep=1,
                 **{cache_kw: cache})
            width = pre["input_ids"].shape[1]
            for r, g in enumerate(missing):
                start = width - len(groups[g].prefix)
                kv[g] = [(layer.keys[r : r + 1, :, start:], layer.values[r : r + 1, :, start:]) for layer in cache.layers]
            del cache, pre
            st["images_encoded"] += sum(len(groups[g].images) for g in missing)
            st["prefill_tokens"] += sum(len(groups[g].prefix) for g in missing)
            st["prefix_groups"] += len(missing)
        # 2. one cache row per question: its prefix's keys/values left-padded to the batch's longest prefix (pads
        # masked), then [pad][suffix] in the input ids
        P = max(len(groups[g].prefix) for g in distinct)
        row_of = {g: r for r, g in enumerate(distinct)}
        rows = torch.tensor([row_of[g] for g, _ in batch], device=device)
        layers = []
        for li in range(len(kv[distinct[0]])):
            pair = []
            for j in (0, 1):
                first = kv[distinct[0]][li][j]
                t = first.new_zeros((len(distinct), first.shape[1], P, first.shape[3]))
                for r, g in enumerate(distinct):
                    x = kv[g][li][j]
                    t[r, :, P - x.shape[2]:] = x[0]
                pair.append(t if len(distinct) == len(batch) else t.index_select(0, rows))
            layers.append(tuple(pair))
        suffixes = [prompts[i][len(groups[g].prefix):] for g, i in batch]
        S = max(map(len, suffixes))
        ids = torch.full((len(batch), P + S), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, ((g, _), s) in enumerate(zip(batch, suffixes)):
            n = len(groups[g].prefix)
            ids[r, P - n : P] = torch.tensor(groups[g].prefix, dtype=torch.long)
            mask[r, P - n : P] = 1
            ids[r, P + S - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, P + S - len(s):] = 1
        rowcache = DynamicCache(layers, config=text_config)
        del layers
        for g in distinct:  # a prefix is freed after the last batch that uses it
            uses[g] -= 1
            if not uses[g]:
                del kv[g]
        # 3. generate continues from the cache: it feeds only the ids past the cached length (the suffix part)
        gen = core.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **{cache_kw: rowcache},
                            **_greedy_kwargs(encoder, core, max_new_tokens))
        del rowcache
        for (_, i), row in zip(batch, gen[:, P + S:]):
            out[i] = _cut(tok.decode(row, skip_special_tokens=True), stop)
        st["prefill_tokens"] += sum(map(len, suffixes))
        st["shared_questions"] += len(batch)
        if progress is not None:
            progress.update(len(batch))

"""The training loss, computed only where a label is: shared by ``LlavaTrainer`` and ``plan --measure``.

``supervised_positions(labels)`` is passed to the model as ``logits_to_keep``, so the lm_head and the fp32
cross-entropy run only at the positions whose next token is supervised; ``supervised_lm_loss`` is the same number
as transformers' causal-LM loss on full logits. Kept out of the trainer module so that code which steps a model
outside the Trainer (the memory planner's measurement) does not import training code.
"""

from __future__ import annotations

from typing import Any

import torch

from llavatune.data.encode import IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool: the positions whose *next* token is supervised (``labels[:, 1:] != -100``, shifted back).

    Passed to the model as ``logits_to_keep``, so the lm_head and the fp32 cross-entropy run only there instead
    of at every position: a VQA sample has a few answer tokens among ~650 (576 of them image tokens), and the
    ``B x L x vocab`` fp32 logits (12 bytes per element with their gradients) are often the largest activation.
    """
    shift = labels[:, 1:] != IGNORE_INDEX
    return torch.nn.functional.pad(shift, (0, 1), value=False)


def supervised_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy from logits kept at ``supervised_positions(labels)`` (``(N, vocab)``, row-major).

    The same number as transformers' causal-LM loss on full logits: fp32 cross-entropy, summed and divided by
    ``num_items_in_batch`` (the Trainer's count of supervised tokens over the accumulated batch) when given,
    else the mean over this batch's supervised tokens.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    shift = labels[:, 1:]
    targets = shift[shift != IGNORE_INDEX].to(logits.device)
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def forward_loss(model, inputs: dict[str, Any]) -> torch.Tensor:
    """One forward and the mean loss over supervised tokens, as ``LlavaTrainer`` computes it (logits only at
    supervised positions). For code that steps a model outside the Trainer (``plan --measure``)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    return supervised_lm_loss(model(**inputs, logits_to_keep=supervised_positions(labels)), labels)

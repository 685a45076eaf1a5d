"""Seconds-long warm starts for tiny random models, so that they behave like pretrained ones.

A real VLM starts from a pretrained language model, whose output head can put most of the probability on
one token, and a pretrained vision tower, whose features tell images apart. A tiny random LLaVA has
neither: LoRA (the default method) leaves its random head and embeddings frozen, so every answer token and
the end-of-turn token stay near p = 1/vocabulary (the loss stalls near log(vocabulary)), and its random
frozen vision tower mixes a digit's strokes into features that a few hundred LoRA steps cannot read
(measured in ``benchmarks/tiny_learns.py``: docs/benchmarks.md). Three small steps give the miniature
what pretraining gives the real model, from the run's own data but never from its labels' pairing with
the images, so the first evaluation of a run still scores at chance and everything above chance is learned
by the user's training:

- :func:`warm_start`: next-token training of the language model on the data's text (conversations rendered
  with the chat template, image placeholders removed): a language model of its domain, like a pretrained LM.
- :func:`warm_start_vision`: self-supervised training of the vision tower on the data's images alone (an
  autoencoder: the mean of the image's feature tokens must reconstruct the standardized image through a
  linear decoder), so that its features keep what tells images apart; no text, no answers.
- :func:`init_projector`: a data-dependent initialisation of the projector (Krähenbühl et al. 2016,
  "Data-dependent initializations of convolutional neural networks"): its first layer standardizes the
  vision features it receives, its output matches the scale of the language model's token embeddings.

This is not the user's training (that is always transformers' ``Trainer``): these run inside a tiny-model
builder on one process, before any ``Trainer`` exists, in a few seconds on a CPU. A ``Trainer`` here would
join the run's distributed job and accelerate state from a single rank (the base model is built on the
main process only), so they are plain optimizer steps with transformers' own learning-rate schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass
class WarmStartStats:
    """What a warm start did: steps, examples (texts or images) and the mean loss at the start and end
    (next-token loss; for the vision tower, the reconstruction error)."""

    steps: int
    examples: int
    first_loss: float
    last_loss: float
    seconds: float


def warm_start(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    max_length: int = 256,
    seed: int = 0,
) -> WarmStartStats | None:
    """Train ``model``'s causal language model on ``texts`` (next-token loss on every token) in place.

    ``model``: any transformers model whose forward takes ``input_ids``/``attention_mask``/``labels`` and
    returns ``.loss`` without images (``LlavaForConditionalGeneration`` and the other image-text-to-text
    classes do, as does any ``*ForCausalLM``). ``texts``: whole documents, e.g. conversations rendered with
    the chat template; each is tokenized with the tokenizer's special tokens (BOS) and cut to
    ``max_length`` tokens. Batches are drawn with replacement by a generator seeded with ``seed``, so the
    result is the same for the same inputs (texts keep their frequencies: a common answer stays common).
    AdamW, linear warmup over 10 % of the steps then cosine decay. The model is left in eval mode.
    Returns ``None`` (and changes nothing) when ``steps`` is 0 or there is no text.
    """
    import time

    import torch
    from transformers import get_cosine_schedule_with_warmup

    texts = [t for t in texts if t]
    if steps <= 0 or not texts:
        return None
    t0 = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    docs = [ids[:max_length] for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    docs = [d for d in docs if len(d) > 1]
    if not docs:
        return None
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    model.train()
    losses = []
    for _ in range(steps):
        batch = [docs[i] for i in torch.randint(len(docs), (batch_size,), generator=gen).tolist()]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, d in enumerate(batch):
            ids[row, : len(d)] = torch.tensor(d)
            mask[row, : len(d)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    head = max(1, min(10, steps // 10))
    return WarmStartStats(steps, len(docs), _mean(losses[:head]), _mean(losses[-head:]), time.perf_counter() - t0)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def augment(pixel_values: Any, generator: Any, rotate: float = 10.0, scale: float = 0.1, shift: float = 0.12) -> Any:
    """A random small affine view of each image (rotation up to ``rotate`` degrees, zoom up to ``scale``, shift
    up to ``shift`` of the half-width), the background filled with each image's darkest value."""
    import math

    import torch

    n = pixel_values.shape[0]

    def uniform(*shape):
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle, zoom, move = uniform(n) * rotate * math.pi / 180, 1 + uniform(n) * scale, uniform(n, 2) * shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / zoom, -torch.sin(angle) / zoom
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / zoom, torch.cos(angle) / zoom
    theta[:, :, 2] = move
    theta = theta.to(pixel_values)
    grid = torch.nn.functional.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    floor = pixel_values.amin(dim=(1, 2, 3), keepdim=True)
    return torch.nn.functional.grid_sample(pixel_values - floor, grid, align_corners=False) + floor


def warm_start_vision(
    encode: Callable[[Any], Any],
    params: Sequence[Any],
    pixel_values: Any,
    steps: int = 600,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    temperature: float = 0.2,
    seed: int = 0,
    reconstruction_steps: int | None = None,
    reconstruction_batch_size: int = 64,
    reconstruction_learning_rate: float = 1e-2,
) -> WarmStartStats | None:
    """Self-supervised warm start of a vision tower on images alone (no text, no labels), in place.

    ``encode(pixel_values) -> (batch, tokens, dim)``: the features the projector reads (e.g. CLIP's
    ``vision_feature_layer`` without CLS); ``params``: the tower's parameters to train; ``pixel_values``:
    ``(n, channels, h, w)`` as the image processor makes them. Features are pooled per image (mean over its
    tokens), the way a language model reading them starts out (uniform attention). Two phases:

    1. ``reconstruction_steps`` of reconstruction alone: a linear decoder rebuilds the image (grey,
       2x2-average-pooled, standardized per pixel over the set) from its pooled features (MSE), so they keep
       what the image shows (an autoencoder: PCA-like features);
    2. ``steps`` of reconstruction plus contrastive learning (SimCLR, Chen et al. 2020, NT-Xent loss): two
       random views of each image (:func:`augment`) must be each other's nearest neighbours among all views of
       the batch, after a small MLP head, so the features also ignore a small shift, rotation or zoom while
       telling images apart -- what handwriting needs.

    Measured on MNIST (``benchmarks/tiny_learns.py``, linear probe of the pooled features, 1,000 images): random
    tower 54 %, phase 1 alone 82 %, both 85 %; contrastive alone from the random tower 62-71 %. Head and
    decoder are discarded afterwards. AdamW, 10 % warmup then cosine; batches and views drawn by a generator
    seeded with ``seed``.
    """
    import time

    import torch
    from transformers import get_cosine_schedule_with_warmup

    if steps <= 0 or pixel_values is None or len(pixel_values) == 0:
        return None
    t0 = time.perf_counter()
    pixel_values = pixel_values.float()
    target, head, decoder = _vision_heads(encode, pixel_values, seed)
    params = list(params)
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params + list(head.parameters()) + list(decoder.parameters()), lr=learning_rate,
                            weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    gen = torch.Generator().manual_seed(seed)
    rsteps = steps if reconstruction_steps is None else reconstruction_steps
    losses = _reconstruction_phase(encode, params, decoder, pixel_values, target, rsteps, reconstruction_batch_size,
                                   reconstruction_learning_rate, gen)
    losses += _contrastive_phase(encode, opt, sched, head, decoder, pixel_values, target, steps, batch_size,
                                 temperature, gen)
    for p, flag in zip(params, trainable):
        p.requires_grad_(flag)
    first = max(1, min(10, len(losses) // 10))
    return WarmStartStats(rsteps + steps, len(pixel_values), _mean(losses[:first]), _mean(losses[-first:]),
                          time.perf_counter() - t0)


def _vision_heads(encode: Callable[[Any], Any], pixel_values: Any, seed: int) -> tuple[Any, Any, Any]:
    """``warm_start_vision``'s reconstruction target (grey, 2x2-average-pooled, standardized per pixel over the
    set), contrastive MLP head and linear decoder (zero: the first updates fit it to the features as they are,
    instead of pushing the tower along a random decoder's gradients). Their initial weights are drawn with
    ``seed``; the global torch random state is left as it was."""
    import torch

    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the head's and decoder's initial weights
    with torch.no_grad():
        target = torch.nn.functional.avg_pool2d(pixel_values.mean(1, keepdim=True), 2).flatten(1)
        target = (target - target.mean(0)) / (target.std(0, unbiased=False) + 0.1)
        dim = encode(pixel_values[:1]).shape[-1]
    head = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))
    decoder = torch.nn.Linear(dim, target.shape[1])
    torch.random.set_rng_state(torch_state)
    torch.nn.init.zeros_(decoder.weight)
    torch.nn.init.zeros_(decoder.bias)
    return target, head, decoder


def _reconstruction_phase(encode, params: list, decoder, pixel_values, target, steps: int, batch_size: int,
                          learning_rate: float, gen) -> list[float]:
    """Phase 1 of ``warm_start_vision``: reconstruction alone (MSE of the decoded pooled features). Returns the
    losses."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(params + list(decoder.parameters()), lr=learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    m = min(batch_size, len(pixel_values))
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(pixel_values), (m,), generator=gen)
        loss = torch.nn.functional.mse_loss(decoder(encode(pixel_values[idx]).mean(1)), target[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _contrastive_phase(encode, opt, sched, head, decoder, pixel_values, target, steps: int, batch_size: int,
                       temperature: float, gen) -> list[float]:
    """Phase 2 of ``warm_start_vision``: contrastive (NT-Xent over two augmented views) plus reconstruction.
    Returns the reconstruction losses."""
    import torch

    n = min(batch_size, len(pixel_values))
    pairs = torch.cat([torch.arange(n) + n, torch.arange(n)])  # view i's positive is the other view of its image
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(pixel_values), (n,), generator=gen)
        x = pixel_values[idx]
        pooled = encode(torch.cat([augment(x, gen), augment(x, gen)])).mean(1)
        z = torch.nn.functional.normalize(head(pooled), dim=-1)
        sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
        reconstruction = torch.nn.functional.mse_loss(decoder(pooled), target[idx].repeat(2, 1))
        (torch.nn.functional.cross_entropy(sim, pairs) + reconstruction).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(reconstruction.item())
    return losses


def init_projector(linear_1: Any, linear_2: Any, activation: Callable[[Any], Any], features: Any,
                   out_rms: float) -> None:
    """Data-dependent initialisation of a two-layer projector ``linear_2(activation(linear_1(x)))``, in place.

    ``features``: ``(..., dim)`` vision features of sample images. ``linear_1`` is rescaled to read them
    standardized (per-dimension mean removed, divided by the standard deviation) with pre-activations of unit
    standard deviation; ``linear_2`` is rescaled so the projector's outputs have root-mean-square ``out_rms``
    (the language model's token embeddings'), so image tokens enter the language model at the scale its text
    tokens do. The random directions of the weights are kept; only scales and biases change.
    """
    import torch

    with torch.no_grad():
        f = features.reshape(-1, features.shape[-1]).to(linear_1.weight.dtype)
        mean, std = f.mean(0), f.std(0, unbiased=False) + 1e-6
        w = linear_1.weight / std
        b = (linear_1.bias if linear_1.bias is not None else 0) - w @ mean
        scale = (f @ w.T + b).std() + 1e-6
        linear_1.weight.copy_(w / scale)
        if linear_1.bias is not None:
            linear_1.bias.copy_(b / scale)
        out = linear_2(activation(linear_1(f)))
        factor = out.pow(2).mean().sqrt() / out_rms + 1e-12
        linear_2.weight.div_(factor)
        if linear_2.bias is not None:
            linear_2.bias.div_(factor)

"""Records -> token ids, labels and pixel values: the dataset and collator the Trainer consumes.

Labels are built from template segments (``llavatune.data.templates``): answer tokens keep their ids,
everything else (system prompt, questions, image tokens, padding) is -100. Each ``<image>`` expands to
exactly the number of feature vectors the vision tower + projector produce, so the model's
"image features and image tokens do not match" check (transformers #36002) cannot fire, and
truncation never cuts through an image's tokens: such a sample is dropped and counted, or (with
``truncation: truncate``) its text tail is cut *after* the last image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llavatune.data.images import ImageError, open_image
from llavatune.data.records import IMAGE_TOKEN, Record, Turn
from llavatune.data.templates import get_segmenter
from llavatune.utils import UserError, resolve_under

IGNORE_INDEX = -100
logger = logging.getLogger("llavatune")


def _size_hw(size: Any) -> tuple[int, int]:
    def get(key):
        if size is None:
            return None
        if isinstance(size, dict):
            return size.get(key)
        return getattr(size, key, None)

    if isinstance(size, int):
        return size, size
    h, w = get("height"), get("width")
    if h and w:
        return int(h), int(w)
    edge = get("shortest_edge")
    if edge:
        return int(edge), int(edge)
    raise ValueError(f"cannot tell the image size from {size!r}")


def image_tokens_per_image(processor: Any) -> int:
    """Number of ``<image>`` token positions one image takes in the sequence (LLaVA-1.5-style processors).

    ``(crop_h // patch_size) * (crop_w // patch_size) + num_additional_image_tokens``, minus 1 when
    ``vision_feature_select_strategy == "default"`` (the CLS feature is dropped), from the image processor's
    ``crop_size`` (or ``size``). This is exactly how ``LlavaProcessor`` expands the placeholder. Processors without a ``patch_size`` that expose
    ``image_seq_length`` (e.g. PaliGemma) use that. Raises ``ValueError`` when it cannot tell (dynamic-resolution
    processors, a bare tokenizer).
    """
    patch = getattr(processor, "patch_size", None)
    image_processor = getattr(processor, "image_processor", None)
    if not patch or image_processor is None:
        n = getattr(processor, "image_seq_length", None)
        if isinstance(n, int) and n > 0:
            return n
        raise ValueError(f"{type(processor).__name__} has no patch_size/image processor to count image tokens from")
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None)
    h, w = _size_hw(size)
    n = (h // patch) * (w // patch) + int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        n -= 1
    return n


def pil_image_processor(image_processor: Any) -> Any:
    """The PIL-backend twin of a LLaVA/CLIP image processor (``LlavaImageProcessor`` -> ``LlavaImageProcessorPil``).

    The original LLaVA code preprocesses with ``CLIPImageProcessor`` on PIL images (PIL bicubic resize);
    transformers 5 loads the torchvision backend by default, whose resize differs by one uint8 level on some
    values. Other processors, and those already on PIL, are returned as they are.
    """
    import transformers

    name = type(image_processor).__name__
    twin = getattr(transformers, name + "Pil", None) if name.startswith(("Llava", "CLIP")) else None
    if twin is None or isinstance(image_processor, twin):
        return image_processor
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    return twin(**settings)


def has_variable_image_tokens(processor: Any) -> bool:
    """LLaVA-NeXT tiles each image by its size ("any resolution"): its token count depends on the image."""
    return hasattr(processor, "_get_number_of_features")


def anyres_image_tokens(processor: Any, image_sizes) -> list[int]:
    """Tokens of each image for an any-resolution processor, from each image's (height, width)."""
    return list(processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in image_sizes]).num_image_tokens)


def image_size(path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None


class SampleSkipped(Exception):
    """A sample that cannot be used as is; ``reason`` is counted and reported."""


@dataclass
class Encoder:
    """Tokenize conversations segment by segment. ``encode`` for training, ``prompt_ids`` for generation."""

    processor: Any
    template: str = "auto"
    max_length: int = 2048
    truncation: str = "drop"  # "drop" | "truncate"

    def __post_init__(self):
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.segmenter = get_segmenter(self.template, self.processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.variable_image_tokens = has_variable_image_tokens(self.processor)
        self.n_image_tokens = 0 if self.variable_image_tokens else image_tokens_per_image(self.processor)
        self.eos = self.tokenizer.eos_token or ""
        image_processor = getattr(self.processor, "image_processor", None)
        self.image_processor = pil_image_processor(image_processor) if image_processor is not None else None
        probe = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []

    def image_token_counts(self, image_sizes: list[tuple[int, int]] | None, n: int) -> list[int]:
        """Tokens for each of ``n`` images; LLaVA-NeXT needs each image's (height, width)."""
        if not self.variable_image_tokens:
            return [self.n_image_tokens] * n
        if image_sizes is None or len(image_sizes) != n:
            raise ValueError("LLaVA-NeXT prompts need the (height, width) of every image")
        return anyres_image_tokens(self.processor, image_sizes)

    def _ids(self, text: str, counts: list[int]) -> list[int]:
        out: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i > 0:
                out += [self.image_token_id] * counts.pop(0)
            if piece:
                out += self.tokenizer(piece, add_special_tokens=False).input_ids
        return out

    def tokenize_segments(self, segments: list[tuple[str, bool]], counts: list[int]) -> tuple[list[int], list[bool]]:
        """Token ids of the joined segments (no BOS) and, per token, whether it is supervised.

        As the original LLaVA's ``tokenizer_image_token`` does, the text is split on ``<image>`` and each chunk is
        tokenized whole: tokenizing segment by segment would give a SentencePiece tokenizer a fresh ``▁`` at every
        segment start (``" a</s>"`` alone is ``▁``, ``▁a``; after ``ASSISTANT:`` it is ``▁a``). A token is supervised
        when it starts inside a supervised segment (character offsets). Tokenizers without offsets (Python
        backends) fall back to segment-by-segment tokenization.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            ids: list[int] = []
            mask: list[bool] = []
            for text, supervised in segments:
                seg = self._ids(text, counts)
                ids += seg
                mask += [supervised] * len(seg)
            return ids, mask
        spans, pos = [], 0
        for text, supervised in segments:
            if supervised and text:
                spans.append((pos, pos + len(text)))
            pos += len(text)
        ids, mask, pos = [], [], 0
        for i, chunk in enumerate("".join(t for t, _ in segments).split(IMAGE_TOKEN)):
            if i > 0:
                n = counts.pop(0)
                ids += [self.image_token_id] * n
                mask += [False] * n
                pos += len(IMAGE_TOKEN)
            if chunk:
                enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc["input_ids"]
                mask += [any(a <= pos + start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
            pos += len(chunk)
        return ids, mask

    def _counts(self, turns: list[Turn], image_sizes) -> list[int]:
        n = sum(t.value.count(IMAGE_TOKEN) for t in turns)
        return self.image_token_counts(image_sizes, n) if n else []

    def encode(self, turns: list[Turn], image_sizes: list[tuple[int, int]] | None = None) -> tuple[list[int], list[int]]:
        ids, labels = list(self.bos), [IGNORE_INDEX] * len(self.bos)
        counts = self._counts(turns, image_sizes)
        seg, mask = self.tokenize_segments(self.segmenter(turns, self.eos, False), counts)
        ids += seg
        labels += [x if m else IGNORE_INDEX for x, m in zip(seg, mask)]
        if len(ids) > self.max_length:
            ids, labels = self._truncate(ids, labels)
        if all(x == IGNORE_INDEX for x in labels):
            raise SampleSkipped("no answer tokens to learn from")
        return ids, labels

    def _truncate(self, ids, labels):
        if self.truncation != "truncate":
            raise SampleSkipped(f"longer than max_length={self.max_length} ({len(ids)} tokens)")
        cut = self.max_length
        if self.image_token_id in ids[cut:]:
            raise SampleSkipped(f"max_length={self.max_length} would cut through image tokens ({len(ids)} tokens)")
        ids, labels = ids[:cut], labels[:cut]
        if all(x == IGNORE_INDEX for x in labels):
            raise SampleSkipped(f"no answer tokens left after truncation to max_length={self.max_length}")
        return ids, labels

    def supervised_text(self, turns: list[Turn]) -> str:
        return "".join(t for t, s in self.segmenter(turns, self.eos, False) if s)

    def prompt_ids(self, turns: list[Turn], image_sizes: list[tuple[int, int]] | None = None) -> list[int]:
        """Token ids of the prompt for generating the next assistant turn (``turns`` ends with human)."""
        ids = list(self.bos)
        counts = self._counts(turns, image_sizes)
        ids += self.tokenize_segments(self.segmenter(turns, self.eos, True), counts)[0]
        return ids

    def pixel_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """``pixel_values`` (and ``image_sizes`` for LLaVA-NeXT) for a sample's images."""
        out = self.image_processor(images, return_tensors="pt")
        item = {"pixel_values": out["pixel_values"]}
        if "image_sizes" in out:
            item["image_sizes"] = out["image_sizes"]
        return item


def check_masking(encoder: Encoder, turns: list[Turn], labels: list[int]) -> str | None:
    """Return a problem description if the supervised tokens do not decode back to the answers."""
    kept = [x for x in labels if x != IGNORE_INDEX]
    if not kept:
        return "supervised span is empty"
    got = encoder.tokenizer.decode(kept, skip_special_tokens=False)
    want = encoder.supervised_text(turns)
    if "".join(got.split()) != "".join(want.split()):
        return f"supervised tokens decode to {got[:60]!r}, expected {want[:60]!r}"
    return None


@dataclass
class EncodedSample:
    index: int
    input_ids: list[int]
    labels: list[int]
    image_paths: list[Path]


@dataclass
class LlavaDataset(torch.utils.data.Dataset):
    """Tokenized records whose images load lazily (in dataloader workers) in ``__getitem__``.

    ``skipped`` maps reason -> list of record refs; nothing is dropped without being counted there.
    """

    records: list[Record]
    encoder: Encoder
    image_roots: list[Path]  # one per record: the folder its relative image paths resolve against
    name: str = "train"
    samples: list[EncodedSample] = field(default_factory=list, init=False)
    skipped: dict[str, list[str]] = field(default_factory=dict, init=False)
    masking_problems: list[tuple[str, str]] = field(default_factory=list, init=False)

    def __post_init__(self):
        for i, (rec, root) in enumerate(zip(self.records, self.image_roots)):
            try:
                paths = [resolve_under(root, p) for p in rec.images]
                if rec.n_placeholders != len(rec.images):
                    raise SampleSkipped(
                        f"{rec.n_placeholders} <image> placeholder(s) for {len(rec.images)} image(s)"
                    )
                sizes = [image_size(p) for p in paths] if self.encoder.variable_image_tokens and paths else None
                ids, labels = self.encoder.encode(rec.conversations, sizes)
            except SampleSkipped as e:
                self.skipped.setdefault(str(e).split(" (")[0], []).append(rec.ref)
                continue
            except UserError as e:
                self.skipped.setdefault("bad image", []).append(f"{rec.ref}: {e}")
                continue
            problem = check_masking(self.encoder, rec.conversations, labels)
            if problem:
                self.masking_problems.append((rec.ref, problem))
            self.samples.append(EncodedSample(i, ids, labels, paths))

    @property
    def n_skipped(self) -> int:
        return sum(map(len, self.skipped.values()))

    def report(self) -> str:
        lines = [f"{self.name}: {len(self.samples)} samples used, {self.n_skipped} skipped"]
        for reason, refs in self.skipped.items():
            lines.append(f"  skipped ({reason}): {len(refs)}, e.g. {', '.join(refs[:3])}")
        if self.masking_problems:
            ref, why = self.masking_problems[0]
            lines.append(f"  masking self-check failed on {len(self.masking_problems)} samples, e.g. {ref}: {why}")
        return "\n".join(lines)

    @property
    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        item: dict[str, Any] = {
            "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
            "labels": torch.tensor(s.labels, dtype=torch.long),
        }
        if s.image_paths:
            try:
                images = [open_image(p) for p in s.image_paths]
            except ImageError as e:
                rec = self.records[s.index]
                raise UserError(f"{self.name} record {rec.ref}: {e}; run 'llavatune check' on the data") from None
            item.update(self.encoder.pixel_inputs(images))
        return item


class LlavaCollator:
    """Pad a list of samples into a batch.

    Input: dicts with ``input_ids`` (L_i,), ``labels`` (L_i,) and, for samples with images,
    ``pixel_values`` (n_images_i, 3, H, W).
    Output: ``input_ids`` (B, L) padded with ``pad_token_id``, ``attention_mask`` (B, L) 1 on real
    tokens, ``labels`` (B, L) padded with -100, and ``pixel_values`` (sum n_images_i, 3, H, W) in
    sample order (the model fills image-token positions in reading order), absent when no sample has
    an image. LLaVA-NeXT samples carry (n_images_i, n_tiles, 3, H, W) pixel values, padded here to the
    batch's largest tile count, and ``image_sizes`` (sum n_images_i, 2). ``padding_side`` is "right" for training, "left" for batched generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        B = len(features)
        input_ids = torch.full((B, n), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, n), dtype=torch.long)
        has_labels = "labels" in features[0]
        labels = torch.full((B, n), IGNORE_INDEX, dtype=torch.long)
        for b, f in enumerate(features):
            L = len(f["input_ids"])
            sl = slice(0, L) if self.padding_side == "right" else slice(n - L, n)
            input_ids[b, sl] = f["input_ids"]
            attention[b, sl] = 1
            if has_labels:
                labels[b, sl] = f["labels"]
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if has_labels:
            batch["labels"] = labels
        pixels = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if pixels:
            if pixels[0].dim() == 5 or (pixels[0].dim() == 4 and "image_sizes" in features[0]):
                # LLaVA-NeXT: (n_images, n_tiles, 3, H, W) with n_tiles varying by image; pad the tile axis (the
                # model drops the padding using image_sizes), as LlavaNextProcessor does for a batch.
                tiles = max(p.shape[1] for p in pixels)
                pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixels]
                batch["image_sizes"] = torch.cat([f["image_sizes"] for f in features if f.get("image_sizes") is not None])
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        return batch

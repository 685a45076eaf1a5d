"""Records -> token ids, labels and pixel values: the dataset and collator the Trainer consumes.

Labels are built from template segments (``llavatune.data.templates``): answer tokens keep their ids,
everything else (system prompt, questions, image tokens, padding) is -100. Each ``<image>`` expands to
exactly the number of feature vectors the vision tower + projector produce, so the model's
"image features and image tokens do not match" check (transformers #36002) cannot fire.

Over-long samples (``max_length``): ``truncation: drop`` (the default) skips them, counted and reported;
``truncation: truncate`` keeps the longest prefix of *whole* exchanges (question + answer) that fits, with the
images of those turns; only when not even the first exchange fits is its answer cut short, and never through
image tokens (such a sample is skipped). The masking self-check compares against exactly what was kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llavatune._compat import has_variable_image_tokens
from llavatune._compat import processor_image_tokens as anyres_image_tokens
from llavatune.data.images import ImageError, open_image
from llavatune.data.records import IMAGE_TOKEN, Record, Turn, record_problems
from llavatune.data.templates import ChatTemplateSegmenter, canonical, get_segmenter
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


def image_size(path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None


class SampleSkipped(Exception):
    """A sample that cannot be used as is; counted and reported under its ``kind``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Fitted:
    """What :meth:`Encoder.fit` keeps of a conversation: the turns (whole exchanges), their token ids and labels,
    and whether the last kept answer had to be cut short (only when not even the first exchange fits)."""

    turns: list[Turn]
    input_ids: list[int]
    labels: list[int]
    cut: bool = False

    @property
    def n_images(self) -> int:
        return sum(t.value.count(IMAGE_TOKEN) for t in self.turns)


@dataclass
class Encoder:
    """Tokenize conversations segment by segment. ``encode`` for training, ``prompt_ids`` for generation.

    The model family (``llavatune.model.families``, from the processor's class) decides how an image placeholder
    becomes tokens: LLaVA-style families repeat the image token as many times as the vision tower yields features
    (``expansion == "count"``); the others take the processor's own replacement text for an image of that size
    (``"processor"``: Qwen-VL's ``<|vision_start|><|image_pad|>*n<|vision_end|>`` with ``n`` from the image grid,
    Gemma 3's ``<start_of_image>`` + soft tokens + ``<end_of_image>``, ...), computed once per image size from a blank
    image of that size, so prompts are exactly what ``processor(text=..., images=...)`` builds.
    """

    processor: Any
    template: str = "auto"
    max_length: int = 2048
    truncation: str = "drop"  # "drop" | "truncate"

    def __post_init__(self):
        from llavatune.model.families import FAMILIES, family_of_processor

        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.family = family_of_processor(self.processor)
        fam = self.family or FAMILIES["llava"]  # a processor of no known family: the LLaVA conventions
        template = canonical(self.template)
        if template == "auto" and fam.template and not _has_chat_template(self.processor):
            template = fam.template  # e.g. PaliGemma: no chat template, its own prompt format
        self.fallback_template = fam.template
        self.segmenter = get_segmenter(template, self.processor)
        self.placeholder = fam.placeholder
        self.by_processor = fam.expansion == "processor" and self.family is not None
        self.token_types = fam.token_types if self.family is not None else None
        self.token_type_rule = fam.token_type_rule
        self.image_inputs = fam.image_inputs
        self.collate_rules = dict(fam.collate)
        self._expansions: dict[tuple[int, int], str] = {}
        if self.by_processor:
            # the token the processor replaces (Qwen: <|image_pad|> inside the placeholder; Gemma 3: <start_of_image>)
            self.expand_token = self.processor.image_token
            self.image_token_id = _token_id(self.tokenizer, getattr(self.tokenizer, "image_token", None)) \
                or self.tokenizer.convert_tokens_to_ids(self.expand_token)
            self.image_token_ids = {i for i in getattr(self.processor, "image_token_ids", [self.image_token_id]) if i is not None}
            probe = self._expansion(64, 64)  # the markers around an image count as image tokens (never cut)
            specials = set(self.tokenizer.all_special_tokens) | set(getattr(self.tokenizer, "added_tokens_encoder", {}))
            self.image_token_ids |= {self.tokenizer.convert_tokens_to_ids(t) for t in specials
                                     if t and (t in probe or t in self.placeholder)}
            self.variable_image_tokens = True
            self.n_image_tokens = 0
        else:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            self.image_token_ids = {self.image_token_id}
            self.variable_image_tokens = has_variable_image_tokens(self.processor)
            self.n_image_tokens = 0 if self.variable_image_tokens else image_tokens_per_image(self.processor)
        # the end-of-turn marker supervised after each answer: the family's (<|im_end|>, <end_of_turn>, ...) when the
        # tokenizer has it as one token, else the tokenizer's EOS
        ends = [t for t in fam.end_of_turn if _token_id(self.tokenizer, t) is not None]
        self.eos = ends[0] if ends else (self.tokenizer.eos_token or "")
        stops = [_token_id(self.tokenizer, t) for t in ends] + [self.tokenizer.eos_token_id]
        self.stop_token_ids = list(dict.fromkeys(i for i in stops if i is not None))
        image_processor = getattr(self.processor, "image_processor", None)
        self.image_processor = pil_image_processor(image_processor) if image_processor is not None else None
        probe = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []

    # ------------------------------------------------------------------------------------------- image tokens
    def _expansion(self, h: int, w: int) -> str:
        """The processor's replacement text for one image of ``h`` x ``w`` pixels (cached per size)."""
        key = (int(h), int(w))
        if key not in self._expansions:
            from PIL import Image
            from transformers import ProcessorMixin

            blank = Image.new("RGB", (key[1], key[0]))
            try:
                out = self.processor(text=[self.expand_token], images=[blank], return_text_replacement_offsets=True)
            except ValueError as e:  # e.g. Qwen-VL refuses aspect ratios over 200
                raise SampleSkipped("image-size", f"{type(self.processor).__name__} cannot take a {key[1]} x {key[0]} "
                                    f"image: {str(e).splitlines()[0]}") from None
            offsets = out.get("text_replacement_offsets") or [[]]
            if offsets[0]:
                self._expansions[key] = offsets[0][0]["replacement"]
            elif type(self.processor).replace_image_token is not ProcessorMixin.replace_image_token:
                # a processor whose call does not report replacements (MllamaProcessor: the image enters through
                # cross-attention and its token stays one token): its own rule for that image
                self._expansions[key] = self.processor.replace_image_token(out, image_idx=0)
            else:
                raise ValueError(f"{type(self.processor).__name__} did not say how it expands {self.expand_token}")
        return self._expansions[key]

    def image_token_counts(self, image_sizes: list[tuple[int, int]] | None, n: int) -> list[int]:
        """Tokens for each of ``n`` images; variable-resolution families need each image's (height, width)."""
        if not self.variable_image_tokens:
            return [self.n_image_tokens] * n
        if image_sizes is None or len(image_sizes) != n:
            raise ValueError("this model's prompts need the (height, width) of every image")
        if self.by_processor:
            return [len(self.tokenizer(self._expansion(*s), add_special_tokens=False).input_ids) for s in image_sizes]
        return anyres_image_tokens(self.processor, image_sizes)

    def _n_images(self, text: str) -> int:
        return text.count(self.expand_token) if self.by_processor else text.count(IMAGE_TOKEN)

    def render(self, turns: list[Turn], gen: bool) -> list[tuple[str, bool]]:
        """The template's segments, each image placeholder written as the family's chat templates write it."""
        segments = self.segmenter(turns, self.eos, gen)
        if self.placeholder != IMAGE_TOKEN and not isinstance(self.segmenter, ChatTemplateSegmenter):
            segments = [(text.replace(IMAGE_TOKEN, self.placeholder), s) for text, s in segments]
        return segments

    def _starts_with_bos(self, segments) -> bool:
        """The rendered text already holds the BOS token (Gemma 3's chat template writes it): add no other."""
        bos = self.tokenizer.bos_token
        text = next((t for t, _ in segments if t), "")
        return bool(bos) and text.startswith(bos)

    def _ids(self, text: str, counts: list[int]) -> list[int]:
        out: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i > 0:
                out += [self.image_token_id] * counts.pop(0)
            if piece:
                out += self.tokenizer(piece, add_special_tokens=False).input_ids
        return out

    def tokenize_segments(self, segments: list[tuple[str, bool]], counts: list[int]) -> tuple[list[int], list[bool]]:
        """Token ids of the joined segments (no BOS) and, per token, whether it is supervised (``counts``: image
        tokens per image for LLaVA-style families, each image's (height, width) for processor-expanded ones).

        As the original LLaVA's ``tokenizer_image_token`` does, the text is split on ``<image>`` and each chunk is
        tokenized whole: tokenizing segment by segment would give a SentencePiece tokenizer a fresh ``▁`` at every
        segment start (``" a</s>"`` alone is ``▁``, ``▁a``; after ``ASSISTANT:`` it is ``▁a``). A token is supervised
        when it starts inside a supervised segment (character offsets). Tokenizers without offsets (Python
        backends) fall back to segment-by-segment tokenization. Processor-expanded families: the placeholders are
        replaced by the processor's text and the whole prompt is tokenized in one go, as the processor does.
        """
        if self.by_processor:
            return self._tokenize_expanded(segments, counts)
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

    def _tokenize_expanded(self, segments, sizes: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        text, spans = "", []
        for seg, supervised in segments:
            pieces = seg.split(self.expand_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self._expansion(*sizes.pop(0)) + piece
            if supervised and out:
                spans.append((len(text), len(text) + len(out)))
            text += out
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{type(self.tokenizer).__name__}: a fast tokenizer (tokenizer.json) is needed")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask

    def _counts(self, turns: list[Turn], image_sizes) -> list:
        """What :meth:`tokenize_segments` consumes per image: token counts, or (processor-expanded) image sizes."""
        n = sum(t.value.count(IMAGE_TOKEN) for t in turns)
        if not n:
            return []
        if self.by_processor:
            if image_sizes is None or len(image_sizes) != n:
                raise ValueError("this model's prompts need the (height, width) of every image")
            return [tuple(s) for s in image_sizes]
        return self.image_token_counts(image_sizes, n)

    def _encode_all(self, turns: list[Turn], image_sizes) -> tuple[list[int], list[int]]:
        segments = self.render(turns, False)
        bos = [] if self._starts_with_bos(segments) else list(self.bos)
        ids, labels = bos, [IGNORE_INDEX] * len(bos)
        seg, mask = self.tokenize_segments(segments, self._counts(turns, image_sizes))
        ids += seg
        labels += [x if m else IGNORE_INDEX for x, m in zip(seg, mask)]
        return ids, labels

    def fit(self, turns: list[Turn], image_sizes: list[tuple[int, int]] | None = None) -> Fitted:
        """Encode ``turns`` within ``max_length`` under the truncation policy; raises :class:`SampleSkipped`."""
        ids, labels = self._encode_all(turns, image_sizes)
        fitted = Fitted(list(turns), ids, labels)
        if len(ids) > self.max_length:
            fitted = self._truncate(turns, image_sizes, len(ids))
        if all(x == IGNORE_INDEX for x in fitted.labels):
            raise SampleSkipped("no-answer-tokens", "no answer tokens to learn from")
        return fitted

    def encode(self, turns: list[Turn], image_sizes: list[tuple[int, int]] | None = None) -> tuple[list[int], list[int]]:
        """Token ids and labels of ``turns`` (see :meth:`fit` for what an over-long sample keeps)."""
        f = self.fit(turns, image_sizes)
        return f.input_ids, f.labels

    def _truncate(self, turns: list[Turn], image_sizes, n: int) -> Fitted:
        if self.truncation != "truncate":
            raise SampleSkipped("too-long", f"longer than max_length={self.max_length} ({n} tokens; --truncation drop)")
        ends = [i + 1 for i, t in enumerate(turns) if t.role == "gpt"]  # prefixes that end after an answer

        def sizes_for(sub: list[Turn]):
            k = sum(t.value.count(IMAGE_TOKEN) for t in sub)
            return image_sizes[:k] if image_sizes is not None else None

        for end in reversed(ends[:-1] if ends and ends[-1] == len(turns) else ends):
            sub = list(turns[:end])
            ids, labels = self._encode_all(sub, sizes_for(sub))
            if len(ids) <= self.max_length:
                return Fitted(sub, ids, labels)
        # not even the first exchange fits: cut its answer short, never through image tokens
        sub = list(turns[: ends[0]]) if ends else list(turns)
        ids, labels = self._encode_all(sub, sizes_for(sub))
        cut = self.max_length
        if any(x in self.image_token_ids for x in ids[cut:]):
            raise SampleSkipped(
                "image-tokens-cut", f"max_length={self.max_length} would cut through image tokens ({n} tokens)"
            )
        ids, labels = ids[:cut], labels[:cut]
        if all(x == IGNORE_INDEX for x in labels):
            raise SampleSkipped(
                "no-answer-tokens", f"no answer tokens left after truncation to max_length={self.max_length}"
            )
        return Fitted(sub, ids, labels, cut=True)

    def supervised_text(self, turns: list[Turn]) -> str:
        return "".join(t for t, s in self.render(turns, False) if s)

    def prompt_ids(self, turns: list[Turn], image_sizes: list[tuple[int, int]] | None = None) -> list[int]:
        """Token ids of the prompt for generating the next assistant turn (``turns`` ends with human)."""
        segments = self.render(turns, True)
        ids = [] if self._starts_with_bos(segments) else list(self.bos)
        ids += self.tokenize_segments(segments, self._counts(turns, image_sizes))[0]
        return ids

    # ------------------------------------------------------------------------------------------- model inputs
    def pixel_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """What the image processor gives the model for a sample's images: ``pixel_values`` and the family's other
        image inputs (``image_sizes`` for LLaVA-NeXT/OneVision, ``image_grid_thw`` for Qwen-VL, ...).

        Processor-expanded families take them from the processor's own call on the sample's images (behind as many
        placeholders), because the processor passes its image processor settings of its own: InternVLProcessor turns
        on ``crop_to_patches`` (tiling), which the checkpoints' preprocessor_config.json leaves off; PixtralProcessor
        resizes to multiples of ``patch_size * spatial_merge_size``, not the image processor's own patch size."""
        if self.by_processor:
            out = self.processor(text=[self.expand_token * len(images)], images=[list(images)], return_tensors="pt")
        else:
            out = self.image_processor(images, return_tensors="pt")
        keep = set(self.image_inputs) | {"pixel_values", "image_sizes"}
        return {k: out[k] for k in out if k in keep}

    def token_type_ids(self, ids: list[int], labels: list[int] | None = None, image_inputs: dict | None = None):
        """The family's per-token types for ``ids``: 'image' marks the processor's image tokens (its own
        create_mm_token_type_ids); 'prefix_lm' is 0 on the prompt and 1 from the first supervised token on;
        'cross_attention' is Mllama's cross_attention_mask (tokens, images, tiles): which images' tiles each token
        attends to, built by the processor module's own functions from the ids and each image's tile count (the
        valid tiles of its ``aspect_ratio_mask``). None when the rule needs images and the sample has none."""
        if self.token_type_rule == "cross_attention":
            if not image_inputs:
                return None
            import sys

            module = sys.modules[type(self.processor).__module__]
            tiles = image_inputs["aspect_ratio_mask"][0].sum(-1).tolist()
            sparse = module.get_cross_attention_token_mask(list(ids), self.processor.image_token_id)
            dense = module.convert_sparse_cross_attention_mask_to_dense(
                [sparse], [tiles], max_num_tiles=image_inputs["aspect_ratio_mask"].shape[-1], length=len(ids))
            return torch.from_numpy(dense[0])
        if self.token_type_rule == "prefix_lm":
            first = next((i for i, x in enumerate(labels or ()) if x != IGNORE_INDEX), len(ids))
            return [0] * first + [1] * (len(ids) - first)
        return list(self.processor.create_mm_token_type_ids([ids])[0])

    def features(self, ids: list[int], labels: list[int] | None = None, images: list | None = None) -> dict[str, Any]:
        """One sample as the collator takes it: ``input_ids`` (and ``labels``), the image inputs, and the family's
        per-token types (``token_types``)."""
        item: dict[str, Any] = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if labels is not None:
            item["labels"] = torch.tensor(labels, dtype=torch.long)
        image_inputs = self.pixel_inputs(images) if images else None
        item.update(image_inputs or {})
        if self.token_types:
            types = self.token_type_ids(ids, labels, image_inputs)
            if types is not None:
                item[self.token_types] = torch.as_tensor(types, dtype=torch.long)
        return item

    def collator(self, padding_side: str = "right") -> LlavaCollator:
        return LlavaCollator(self.tokenizer.pad_token_id, padding_side, rules=self.collate_rules)


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    """The id of ``token`` when the tokenizer knows it as one token, else None."""
    if not token:
        return None
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return i


def _has_chat_template(processor: Any) -> bool:
    return any(getattr(o, "chat_template", None) for o in (processor, getattr(processor, "tokenizer", None)) if o is not None)


def check_masking(encoder: Encoder, turns: list[Turn], labels: list[int], cut: bool = False) -> str | None:
    """Return a problem description if the supervised tokens do not decode back to the answers of ``turns``
    (the turns :meth:`Encoder.fit` kept; with ``cut``, the last answer was cut short: a prefix must match)."""
    kept = [x for x in labels if x != IGNORE_INDEX]
    if not kept:
        return "supervised span is empty"
    got = "".join(encoder.tokenizer.decode(kept, skip_special_tokens=False).split())
    want = "".join(encoder.supervised_text(turns).split())
    if got != want and not (cut and want.startswith(got)):
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

    Records are validated with the same :func:`~llavatune.data.records.record_problems` as ``check`` (``train``
    has already skipped or refused bad records before this; ``prior_skipped`` counts them for the report).
    ``skipped`` maps problem kind -> record refs; nothing is dropped without being counted there.
    """

    records: list[Record]
    encoder: Encoder
    image_roots: list[Path]  # one per record: the folder its relative image paths resolve against
    name: str = "train"
    prior_skipped: int = 0
    samples: list[EncodedSample] = field(default_factory=list, init=False)
    skipped: dict[str, list[str]] = field(default_factory=dict, init=False)
    masking_problems: list[tuple[str, str]] = field(default_factory=list, init=False)
    n_truncated: int = field(default=0, init=False)

    def __post_init__(self):
        for i, (rec, root) in enumerate(zip(self.records, self.image_roots)):
            problems = record_problems(rec, "train")
            if problems:
                self.skipped.setdefault(problems[0].kind, []).append(f"{rec.ref}: {problems[0].message}")
                continue
            try:
                paths = [resolve_under(root, p) for p in rec.images]
            except UserError as e:
                self.skipped.setdefault("image-path-escapes", []).append(f"{rec.ref}: {e}")
                continue
            try:
                sizes = [image_size(p) for p in paths] if self.encoder.variable_image_tokens and paths else None
                fitted = self.encoder.fit(rec.conversations, sizes)
            except SampleSkipped as e:
                self.skipped.setdefault(e.kind, []).append(rec.ref)
                continue
            except UserError as e:
                self.skipped.setdefault("bad-image", []).append(f"{rec.ref}: {e}")
                continue
            if len(fitted.turns) < len(rec.conversations) or fitted.cut:
                self.n_truncated += 1
            problem = check_masking(self.encoder, fitted.turns, fitted.labels, fitted.cut)
            if problem:
                self.masking_problems.append((rec.ref, problem))
            self.samples.append(EncodedSample(i, fitted.input_ids, fitted.labels, paths[: fitted.n_images]))

    @property
    def n_skipped(self) -> int:
        return sum(map(len, self.skipped.values()))

    def report(self) -> str:
        total = self.n_skipped + self.prior_skipped
        head = f"{self.name}: {len(self.samples)} samples used, {total} skipped"
        if self.prior_skipped:
            head += f" ({self.prior_skipped} with data problems, listed above; {self.n_skipped} while encoding)"
        lines = [head]
        for reason, refs in self.skipped.items():
            lines.append(f"  skipped ({reason}): {len(refs)}, e.g. {', '.join(refs[:3])}")
        if self.n_truncated:
            lines.append(f"  truncated to max_length={self.encoder.max_length} (whole turns kept): {self.n_truncated}")
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
        images = None
        if s.image_paths:
            try:
                images = [open_image(p) for p in s.image_paths]
            except ImageError as e:  # verified before step 1, so the file changed since: say so, on one line
                rec = self.records[s.index]
                raise UserError(f"{self.name} record {rec.ref}: {e} (the file changed after it was verified at the "
                                "start of the run); run 'llavatune check' on the data") from None
        return self.encoder.features(s.input_ids, s.labels, images)


# Per-token inputs some families need next to input_ids (padded like them, with 0; Mllama's cross_attention_mask has
# two more dimensions, images and tiles, zero-padded to the batch's largest).
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids", "cross_attention_mask")


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Zero-pad every dimension but the first to the batch's largest size, then concatenate (LLaVA-NeXT's tile axis:
    the model drops the padding using image_sizes, as LlavaNextProcessor does for a batch)."""
    dims = tensors[0].dim()
    top = [max(t.shape[d] for t in tensors) for d in range(dims)]
    out = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, dims)):
            pad += [0, top[d] - t.shape[d]]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(out, dim=0)


# How per-sample tensors other than the token ones become a batch, by rule name (a family's ``collate`` entry);
# '..._per_sample': one row per sample, zeros for a sample without it (see LlavaCollator).
COLLATE_RULES = {"cat": _cat, "pad_cat": _pad_cat, "pad_cat_per_sample": _pad_cat}


class LlavaCollator:
    """Pad a list of samples into a batch.

    Input: dicts with ``input_ids`` (L_i,), ``labels`` (L_i,), the family's per-token types (L_i,) and, for samples
    with images, the image processor's outputs for their images.
    Output: ``input_ids`` (B, L) padded with ``pad_token_id``, ``attention_mask`` (B, L) 1 on real tokens, ``labels``
    (B, L) padded with -100, ``token_type_ids`` / ``mm_token_type_ids`` (B, L) padded with 0 (Gemma 3 and PaliGemma /
    Qwen-VL), and the image inputs of the samples that have images, in sample order (the model fills image-token
    positions in reading order), absent when no sample has an image:

    - ``pixel_values``: LLaVA, PaliGemma, Gemma 3 (sum n_images_i, 3, H, W); LLaVA-NeXT/OneVision (sum n_images_i,
      max n_tiles, 3, H, W), the tile axis zero-padded to the batch's largest ('pad_cat'); Qwen-VL (sum of patches,
      channels x temporal_patch x patch x patch): every image's patches one after the other.
    - ``image_sizes`` (sum n_images_i, 2): LLaVA-NeXT/OneVision, each image's (height, width).
    - ``image_grid_thw`` (sum n_images_i, 3): Qwen-VL, each image's (frames, rows, columns) of patches.
    - Mllama: ``pixel_values`` (B, max n_images, max tiles, 3, H, W), ``aspect_ratio_ids`` (B, max n_images),
      ``aspect_ratio_mask`` (B, max n_images, max tiles): one row per sample ('pad_cat_per_sample', zeros for a
      text-only sample), and ``cross_attention_mask`` (B, L, max n_images, max tiles), padded like the tokens.

    Keys are concatenated over the samples ('cat') unless ``rules`` (a family's ``collate``) name another rule of
    ``COLLATE_RULES``. ``padding_side`` is "right" for training, "left" for batched generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", rules: dict[str, str] | None = None):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.rules = rules

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        B = len(features)
        input_ids = torch.full((B, n), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, n), dtype=torch.long)
        has_labels = "labels" in features[0]
        labels = torch.full((B, n), IGNORE_INDEX, dtype=torch.long)
        token_keys = [k for k in TOKEN_KEYS if any(k in f for f in features)]
        types = {}
        for k in token_keys:
            present = [f[k] for f in features if k in f]
            extra = [max(t.shape[d] for t in present) for d in range(1, present[0].dim())]
            types[k] = torch.zeros((B, n, *extra), dtype=torch.long)
        for b, f in enumerate(features):
            L = len(f["input_ids"])
            sl = slice(0, L) if self.padding_side == "right" else slice(n - L, n)
            input_ids[b, sl] = f["input_ids"]
            attention[b, sl] = 1
            if has_labels:
                labels[b, sl] = f["labels"]
            for k in token_keys:
                if k in f:  # (absent: a text-only sample of a family whose rule needs images; zeros, no image)
                    types[k][(b, sl, *(slice(0, d) for d in f[k].shape[1:]))] = f[k]
        batch = {"input_ids": input_ids, "attention_mask": attention, **types}
        if has_labels:
            batch["labels"] = labels
        rules = dict(self.rules or {})
        pixels = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if pixels and self.rules is None and (pixels[0].dim() == 5 or (pixels[0].dim() == 4 and "image_sizes" in features[0])):
            rules["pixel_values"] = "pad_cat"  # LLaVA-NeXT's (n_images, n_tiles, 3, H, W) without a family's rules
        keys = dict.fromkeys(k for f in features for k in f if k not in ("input_ids", "labels", *token_keys))
        for key in keys:
            values = [f[key] for f in features if f.get(key) is not None]
            if values and rules.get(key, "cat").endswith("_per_sample"):
                # one row per sample (Mllama: (batch, images, tiles, ...)); a sample without images gets zeros,
                # as the processor pads a sample with fewer images
                values = [f[key] if f.get(key) is not None else torch.zeros_like(values[0]) for f in features]
            if values:
                batch[key] = COLLATE_RULES[rules.get(key, "cat")](values)
        return batch

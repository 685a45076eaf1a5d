"""Samples as the model sees them: the rendered text, what the loss learns, and the token counts.

    llavatune check data.json --model MODEL --show 3 [--template vicuna_v1] [--json report.json]
    llavatune train ...            # logs the first training sample this way before step 1
    llavatune predict ... --json   # "prompt": the rendered generation prompt

The text is exactly what the tokenizer is given: the template's rendering of the conversation, without the
BOS token the tokenizer adds itself, each ``<image>`` unexpanded (it stands for the image's tokens). The
supervised spans are the answers with their end-of-turn marker, the only text with labels; they are printed
between ``⟦`` and ``⟧``, and a newline shows as ``↵``. With ``--json`` each sample is
``{"id", "text", "supervised": [[start, end], ...], "tokens", "supervised_tokens", "image_tokens", "template"}``:
character spans of ``text`` (``text[start:end]``), and token counts with BOS and image tokens included.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavatune.data.records import Turn, normalize_image_placement
from llavatune.utils import UserError, resolve_under

logger = logging.getLogger("llavatune")
OPEN, CLOSE, NEWLINE = "⟦", "⟧", "↵"


@dataclass
class ShownSample:
    id: str
    text: str  # what the tokenizer is given: no BOS, <image> unexpanded
    supervised: list[list[int]]  # [start, end) character spans of text that carry labels
    tokens: int  # sequence length: BOS, text and image tokens
    supervised_tokens: int
    image_tokens: int
    template: str = ""
    note: str | None = None  # e.g. why training would skip the sample

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "text": self.text, "supervised": self.supervised, "tokens": self.tokens,
               "supervised_tokens": self.supervised_tokens, "image_tokens": self.image_tokens,
               "template": self.template}
        if self.note:
            out["note"] = self.note
        return out

    def marked(self) -> str:
        """The text with ``⟦``/``⟧`` around supervised spans and ``↵`` before each newline."""
        parts, pos = [], 0
        for start, end in self.supervised:
            parts += [self.text[pos:start], OPEN, self.text[start:end], CLOSE]
            pos = end
        parts.append(self.text[pos:])
        return "".join(parts).replace("\n", NEWLINE + "\n")

    def format(self, indent: str = "    ") -> str:
        head = (f"sample {self.id}: {self.tokens} tokens ({self.image_tokens} image, {self.supervised_tokens} "
                f"supervised)" + (f"; {self.note}" if self.note else ""))
        return head + "\n" + "\n".join(indent + line for line in self.marked().split("\n"))


def template_label(encoder) -> str:
    """The template an Encoder renders with, as users name it (``auto`` says which one it resolved to)."""
    from llavatune.data.templates import ChatTemplateSegmenter, canonical

    if encoder.template != "auto":
        return canonical(encoder.template)
    if isinstance(encoder.segmenter, ChatTemplateSegmenter):
        return "auto (the model's chat template)"
    fallback = getattr(encoder, "fallback_template", None) or "vicuna_v1"
    return f"auto ({fallback}: the model has no chat template)"


def render(encoder, turns: list[Turn], image_sizes=None, ref: str = "", encoded: tuple | None = None) -> ShownSample:
    """One training sample as ``encoder`` builds it. ``encoded``: its ``(input_ids, labels)`` when already
    encoded (training: after any truncation), else they are computed here without truncation."""
    from llavatune.data.encode import IGNORE_INDEX

    segments = encoder.render(turns, False)
    text, spans, pos = "", [], 0
    for seg, supervised in segments:
        if supervised and seg:
            spans.append([pos, pos + len(seg)])
        text += seg
        pos += len(seg)
    if encoded is not None:
        ids, labels = encoded
        n_tokens, n_sup = len(ids), sum(1 for x in labels if x != IGNORE_INDEX)
        n_img = sum(1 for x in ids if x == encoder.image_token_id)
    else:
        ids, labels = encoder._encode_all(turns, image_sizes)
        n_tokens, n_sup = len(ids), sum(1 for x in labels if x != IGNORE_INDEX)
        n_img = sum(1 for x in ids if x == encoder.image_token_id)
    return ShownSample(ref, text, spans, n_tokens, n_sup, n_img, template_label(encoder))


def prompt_text(encoder, turns: list[Turn]) -> str:
    """The rendered generation prompt for the next answer (no BOS, ``<image>`` unexpanded)."""
    return "".join(text for text, _ in encoder.render(turns, True))


def legend(encoder) -> str:
    tok = encoder.tokenizer
    bos = f"which adds BOS {tok.bos_token} itself" if encoder.bos else "which adds no BOS"
    per_image = ("its own number of image tokens" if encoder.variable_image_tokens
                 else f"{encoder.n_image_tokens} image tokens")
    image = encoder.expand_token if encoder.by_processor else "<image>"
    return (f"template {template_label(encoder)}; text as given to the tokenizer, {bos}; each {image} stands for "
            f"{per_image}; supervised text (what the loss learns) between {OPEN} and {CLOSE}; {NEWLINE} = newline")


def first_sample(dataset) -> str:
    """The log line ``train`` writes before step 1: the first training sample as the model sees it."""
    if not len(dataset):
        return f"{dataset.name}: no samples to show"
    s = dataset.samples[0]
    rec = dataset.records[s.index]
    shown = render(dataset.encoder, rec.conversations, ref=rec.id, encoded=(s.input_ids, s.labels))
    return f"first {dataset.name} sample as the model sees it ({legend(dataset.encoder)}):\n{shown.format()}"


@dataclass
class Shown:
    """``check --show``: the samples and how they were rendered."""

    samples: list[ShownSample]
    legend: str
    n_records: int
    skipped: int = 0  # records with errors passed over
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return [s.to_dict() for s in self.samples]

    def format(self) -> str:
        if not self.samples:
            return "--show: no records without errors to show"
        lines = [f"--show: the first {len(self.samples)} record(s) without errors as the model sees them ({self.legend})"]
        if self.skipped:
            lines.append(f"  ({self.skipped} record(s) with errors before them passed over)")
        lines += ["  " + s.format() for s in self.samples]
        return "\n".join(lines)


def show_for_check(report, model: str, template: str = "auto", n: int = 3, max_length: int | None = None) -> Shown:
    """The first ``n`` records of a ``check`` report that have no errors, rendered with ``model``'s processor and
    ``template`` (``auto``: the template recorded in a llavatune checkpoint, else the model's chat template), with
    the image placeholder placed as training places it. Nothing in ``report`` is changed."""
    from llavatune.data.check import _load_processor
    from llavatune.data.encode import Encoder, SampleSkipped, image_size
    from llavatune.model.loader import read_meta

    processor, _ = _load_processor(model, [e.record for e in report.entries])
    if processor is None:
        raise UserError(f"--show: {model} has no processor (tokenizer + image processor) to render samples with")
    if template == "auto" and Path(model).is_dir():
        template = read_meta(model).get("template") or "auto"
    try:
        encoder = Encoder(processor, template=template, max_length=10**9)
    except ValueError as e:
        raise UserError(f"--show: {model}: {e}") from None
    root = Path(report.image_folder)
    samples: list[ShownSample] = []
    passed = 0
    for ent in report.entries:
        if len(samples) >= n:
            break
        if ent.record is None or not ent.ok:
            passed += 1
            continue
        rec = normalize_image_placement(copy.deepcopy(ent.record))
        sizes = None
        if encoder.variable_image_tokens and rec.images:
            sizes = [image_size(resolve_under(root, p)) for p in rec.images]
        shown = render(encoder, rec.conversations, sizes, ref=rec.id)
        try:
            encoder.encode(rec.conversations, sizes)
        except SampleSkipped as e:
            shown.note = f"training skips it: {e}"
        if max_length and shown.tokens > max_length:
            shown.note = f"over --max-length {max_length}"
        samples.append(shown)
    return Shown(samples, legend(encoder), report.n_records, skipped=passed)

"""``llavatune synth``: LLaVA-Instruct-style instruction data from captions and boxes with any OpenAI-compatible LLM.

    llavatune synth --input captions_train2017.json --images train2017/ --kind conversation \\
                    --endpoint http://localhost:8000/v1 --model Qwen2.5-7B-Instruct --out synth/data.json

The LLaVA recipe: a text-only LLM never sees the image. Per image it gets a system message, a few
example (context -> ideal reply) pairs, then this image's captions and, for ``detail`` and ``complex``,
its object boxes as ``category: [x1, y1, x2, y2]`` normalized to 0-1 with 3 decimals. Its reply becomes
human/gpt turns with ``<image>`` at the start of the first human turn:

* ``conversation``: multi-turn Q&A parsed from ``Question: ... === Answer: ...`` blocks;
* ``detail``: the reply is the answer to one of :data:`DETAIL_INSTRUCTIONS` (chosen per image, always the
  same one for the same image);
* ``complex``: one reasoning question and its answer, from the same block format.

Inputs: COCO ``captions_*.json`` (+ ``instances_*.json`` for boxes; found beside the captions file when
not given) or JSONL ``{"image": ..., "captions": [...], "boxes": [{"category": ..., "bbox": [...]}]}``.

Robustness: ``--concurrency`` worker threads; retries with exponential backoff and jitter on 429, 5xx,
timeouts and dropped connections, honouring ``Retry-After``; every reply is appended to a JSONL cache
(flush + fsync per line) keyed by image, kind and a hash of the full request, so a rerun (after a kill,
Ctrl-C or failure) only asks for what is missing and a torn last line is ignored. Replies that cannot be
parsed go to ``OUT.rejects.jsonl`` with the reason; they never stop the run. The output is written once,
atomically, when every item has been tried.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from llavatune.config import ConfigError, config, parse_config
from llavatune.data.reader import existing_file, load_json, parse_json, read_jsonl_lines, read_text
from llavatune.data.records import (
    IMAGE_TOKEN,
    DataError,
    Record,
    Turn,
    record_problems,
    write_records,
)
from llavatune.utils import (
    UserError,
    atomic_write_json,
    atomic_write_text,
    check_output_file,
    image_path_mode,
    logger,
    progress,
    rebase_image_path,
    resolve_under,
)

KINDS = ("conversation", "detail", "complex")

#: Instructions of ``detail`` samples; each image always gets the same one (a hash of its path picks it).
DETAIL_INSTRUCTIONS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Give a detailed description of the image.",
    "What do you see in this picture? Describe it thoroughly.",
    "Write a thorough description of this image.",
    "Explain what this image shows, in detail.",
    "Describe everything you can see in this photo.",
    "Provide a comprehensive account of what this image shows.",
    "Walk me through the scene in this image in detail.",
    "Can you describe this picture carefully and completely?",
    "Tell me about this image in as much detail as you can.",
    "Give an elaborate description of the scene shown here.",
    "Describe the image: its objects, where they are and what is happening.",
)

_RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
_FATAL_STATUS = {401, 402, 403, 404}  # bad key, no credit, no access, wrong URL or model: every item would fail
_MAX_RETRY_AFTER = 600.0
_CACHE_VERSION = 1

# --------------------------------------------------------------------------------------------------- options


@config
class SynthArgs:
    input: str | None = None
    """captions to generate from (required): a COCO captions_*.json file, or a .jsonl file (or a .json list) of
    {"image": PATH, "captions": [...], "boxes": [{"category": NAME, "bbox": [...]}]} objects"""
    images: str | None = None
    """folder the image paths (COCO file_name, JSONL image) are relative to; paths escaping it are refused
    (default: the --input file's folder)"""
    kind: Literal["conversation", "detail", "complex"] = "conversation"
    """what to generate: 'conversation' (multi-turn Q&A from captions), 'detail' (a detailed description from
    captions and boxes) or 'complex' (one reasoning question and answer from captions and boxes)"""
    instances: str | None = None
    """COCO instances_*.json with the object boxes for --kind detail/complex (default: instances_SPLIT.json
    beside a captions_SPLIT.json input, when it exists)"""
    box_format: Literal["xywh", "xyxy", "xyxy_norm"] = "xywh"
    """JSONL boxes only: 'xywh' (pixels, COCO style), 'xyxy' (pixel corners) or 'xyxy_norm' (corners already
    in 0-1). Pixel boxes are normalized with the image size from the JSONL 'width'/'height' keys, else read
    from the image file"""
    out: str | None = None
    """output LLaVA JSON file (required, .json). Rejected items go to OUT with suffix .rejects.jsonl"""
    endpoint: str | None = None
    """base URL of an OpenAI-compatible server, e.g. http://localhost:8000/v1 (vLLM), http://localhost:8080/v1
    (llama.cpp), http://localhost:11434/v1 (Ollama), https://api.openai.com/v1 (default: $OPENAI_BASE_URL).
    A URL ending in /chat/completions is used as is"""
    api_key: str | None = None
    """API key sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY; none for local servers). Never
    written to any file"""
    model: str | None = None
    """model name sent to the server (required)"""
    system_prompt: str | None = None
    """text file replacing the built-in system message of --kind"""
    examples: str | None = None
    """file replacing the built-in few-shot examples of --kind: text with <<<user>>> / <<<assistant>>> marker
    lines, or a .json list of {"user": ..., "assistant": ...}; an empty file means no examples"""
    temperature: float = 0.7
    """sampling temperature sent to the server"""
    max_tokens: int = 1024
    """maximum reply length in tokens sent to the server"""
    seed: int | None = None
    """sampling seed sent to the server (servers that support it reply more reproducibly)"""
    concurrency: int = 8
    """requests in flight at once"""
    timeout: float = 120.0
    """seconds to wait for the server (per connect / read) before retrying"""
    max_retries: int = 6
    """retries per item on 429, 5xx, timeouts and dropped connections, after which the item is reported as
    failed (and asked again on the next run)"""
    backoff: float = 1.0
    """first retry delay in seconds; doubles each retry (with jitter) up to --max-backoff. A server's
    Retry-After header wins"""
    max_backoff: float = 60.0
    """longest retry delay in seconds (Retry-After excepted)"""
    max_consecutive_failures: int = 10
    """stop the run when this many items in a row failed after all retries (the server is probably down);
    finished items stay cached"""
    cache: str | None = None
    """append-only reply cache (default: OUT with suffix .synth-cache.jsonl). Rerunning with the same cache asks
    only for items without a reply; changing the prompts, captions, model or sampling options asks again"""
    retry_rejects: bool = False
    """ask again for items whose cached reply could not be parsed (by default such replies stay rejected and
    cost nothing on a rerun)"""
    limit: int | None = None
    """use only the first N usable images of the input (a quick trial run)"""
    price_in: float = 0.0
    """price per 1M prompt tokens, for the cost summary (in your currency, e.g. USD)"""
    price_out: float = 0.0
    """price per 1M completion tokens, for the cost summary"""
    dry_run: bool = False
    """build the prompts, print the first one and the counts, and stop without calling the server"""
    json: str | None = None
    """also write the run summary (counts, tokens, cost, reject reasons) to this JSON file"""

    def __post_init__(self):
        if not self.input:
            raise ConfigError("--input is required: a COCO captions_*.json file or a JSONL file of captions")
        if not self.out and not self.dry_run:
            raise ConfigError("--out is required: the LLaVA JSON file to write")
        if self.out and not self.out.endswith(".json"):
            raise ConfigError(f"--out {self.out}: the output is a LLaVA JSON list; give a path ending in .json")
        if not self.model:
            raise ConfigError("--model is required: the model name the server serves")
        for name in ("concurrency", "max_tokens", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries: must be 0 or more, got {self.max_retries}")
        for name in ("timeout", "backoff", "max_backoff", "price_in", "price_out", "temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must not be negative, got {getattr(self, name)}")
        if self.timeout == 0:
            raise ConfigError("--timeout: must be more than 0 seconds")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit: must be a positive number of images, got {self.limit}")


# --------------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptSet:
    """System message and few-shot (user, assistant) pairs of one kind."""

    system: str
    examples: list[tuple[str, str]]
    source: str = "built-in"


_MARK_RE = re.compile(r"^<<<(user|assistant)>>>[ \t]*$", re.M)


def parse_examples(text: str, name: str = "<examples>") -> list[tuple[str, str]]:
    """Parse an examples file: ``<<<user>>>`` / ``<<<assistant>>>`` marker lines, text before the first ignored."""
    marks = list(_MARK_RE.finditer(text))
    blocks = [
        (m.group(1), text[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)].strip())
        for i, m in enumerate(marks)
    ]
    pairs = []
    for i in range(0, len(blocks), 2):
        if blocks[i][0] != "user" or i + 1 >= len(blocks) or blocks[i + 1][0] != "assistant":
            raise ConfigError(
                f"--examples {name}: example {i // 2 + 1} must be a <<<user>>> block followed by an <<<assistant>>> "
                "block (each marker on a line of its own)"
            )
        if not blocks[i][1] or not blocks[i + 1][1]:
            raise ConfigError(f"--examples {name}: example {i // 2 + 1} has an empty block")
        pairs.append((blocks[i][1], blocks[i + 1][1]))
    return pairs


def builtin_prompt_file(kind: str, part: str) -> str:
    """The text of a built-in prompt file (``part``: 'system' or 'examples')."""
    return resources.files("llavatune.data").joinpath("synth_prompts", f"{kind}_{part}.txt").read_text("utf-8")


def load_prompts(kind: str, system_file: str | None = None, examples_file: str | None = None) -> PromptSet:
    """The prompts of ``kind``: built-in, or replaced by ``system_file`` / ``examples_file``."""
    system = read_text(system_file, "--system-prompt") if system_file else builtin_prompt_file(kind, "system")
    system = system.strip()
    if not system:
        raise ConfigError(f"--system-prompt {system_file}: the file is empty")
    if examples_file:
        text = read_text(examples_file, "--examples")
        if examples_file.endswith(".json"):
            data = parse_json(text, examples_file) if text.strip() else []
            ok = isinstance(data, list) and all(
                isinstance(d, dict) and isinstance(d.get("user"), str) and isinstance(d.get("assistant"), str)
                for d in data
            )
            if not ok:
                raise ConfigError(
                    f'--examples {examples_file}: expected a JSON list of {{"user": ..., "assistant": ...}}'
                )
            examples = [(d["user"].strip(), d["assistant"].strip()) for d in data]
        else:
            examples = parse_examples(text, examples_file)
    else:
        examples = parse_examples(builtin_prompt_file(kind, "examples"), f"built-in {kind}")
    src = "built-in" if not (system_file or examples_file) else "custom"
    return PromptSet(system=system, examples=examples, source=src)


# --------------------------------------------------------------------------------------------------- inputs


@dataclass
class Item:
    """One image to generate for."""

    key: str  # image path relative to the image root (POSIX), as written in the output
    id: str  # record id stem (COCO image id, the JSONL 'id', or the path without suffix)
    captions: list[str]
    boxes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)  # normalized xyxy
    where: str = ""  # "file:line" / "file: image id N", for messages


@dataclass
class Reject:
    reason: str
    message: str
    image: str | None = None
    id: str | None = None
    where: str | None = None
    reply: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class _ItemError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def normalize_box(bbox: Any, fmt: str, width: float | None, height: float | None) -> tuple[float, float, float, float]:
    """``bbox`` in ``fmt`` -> ``(x1, y1, x2, y2)`` in 0-1 (clamped, rounded to 3 decimals)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise _ItemError("bad-box", f"bbox must be a list of 4 numbers, got {bbox!r}")
    try:
        a, b, c, d = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise _ItemError("bad-box", f"bbox must be a list of 4 numbers, got {bbox!r}") from None
    if not all(map(math.isfinite, (a, b, c, d))):
        raise _ItemError("bad-box", f"bbox holds a non-finite number: {bbox!r}")
    if fmt == "xywh":
        if c < 0 or d < 0:
            raise _ItemError("bad-box", f"bbox {bbox!r} ([x, y, width, height]) has a negative width or height")
        x1, y1, x2, y2 = a, b, a + c, b + d
    else:
        x1, y1, x2, y2 = a, b, c, d
        if x2 < x1 or y2 < y1:
            raise _ItemError("bad-box", f"bbox {bbox!r} ([x1, y1, x2, y2]) has x2 < x1 or y2 < y1")
    if fmt != "xyxy_norm":
        if not width or not height or width <= 0 or height <= 0:
            raise _ItemError("image-size-unknown", "the image size is needed to normalize pixel boxes")
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    return tuple(round(min(1.0, max(0.0, v)), 3) for v in (x1, y1, x2, y2))  # type: ignore[return-value]


def format_box(category: str, box: Sequence[float]) -> str:
    return f"{category}: [{', '.join(f'{v:.3f}' for v in box)}]"


def format_context(item: Item, with_boxes: bool) -> str:
    """This image's part of the prompt: its captions and (``with_boxes``) its boxes."""
    lines = ["Captions:", *item.captions]
    if with_boxes and item.boxes:
        lines += ["", "Objects:", *(format_box(c, b) for c, b in item.boxes)]
    return "\n".join(lines)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception as e:  # noqa: BLE001 - any unreadable image is one rejected item
        raise _ItemError("image-unreadable", f"cannot read the image size of {path}: {type(e).__name__}: {e}") from None


def _locate(root: Path, rel: Any, extra_dirs: Sequence[str] = ()) -> tuple[str, Path]:
    """``(key, full path)`` of image ``rel`` under ``root`` (else under ``root/D`` for D in ``extra_dirs``)."""
    if not isinstance(rel, str) or not rel.strip():
        raise _ItemError("bad-input", "the image path is missing or not a string")
    for cand in [rel, *(os.path.join(d, rel) for d in extra_dirs if not os.path.isabs(rel))]:
        try:
            full = resolve_under(root, cand)
        except UserError as e:
            raise _ItemError("image-outside-root", str(e)) from None
        if full.is_file():
            key = os.path.relpath(full, root) if os.path.isabs(cand) else os.path.normpath(cand)
            return Path(key).as_posix(), full
    raise _ItemError("image-missing", f"image {rel!r} not found under {root}")


def _coco_split(path: Path, prefix: str) -> str | None:
    m = re.fullmatch(rf"{prefix}_(.+)\.json", path.name)
    return m.group(1) if m else None


def _coco_instances(args: SynthArgs, path: Path) -> Path | None:
    if args.instances:
        p = Path(args.instances)
        if args.kind == "conversation":
            logger.info("--instances is not used for --kind conversation (captions only, as in LLaVA)")
            return None
        if not p.is_file():
            raise ConfigError(f"--instances {p}: file not found")
        return p
    split = _coco_split(path, "captions")
    if args.kind != "conversation" and split:
        p = path.with_name(f"instances_{split}.json")
        if p.is_file():
            logger.info(f"boxes from {p}")
            return p
    return None


def load_coco(args: SynthArgs, path: Path, data: dict, root: Path) -> Iterable[Item | Reject]:
    """Items of a COCO captions file (+ instances for boxes), in the order of its ``images`` list."""
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataError(path, None, None, "a COCO captions file needs 'images' and 'annotations' lists")
    captions: dict[Any, list[str]] = {}
    for a in data["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("caption"), str) and a["caption"].strip():
            captions.setdefault(a.get("image_id"), []).append(" ".join(a["caption"].split()))
    sizes = {im.get("id"): (im.get("width"), im.get("height")) for im in data["images"] if isinstance(im, dict)}
    boxes: dict[Any, list[tuple[str, Any]]] = {}
    inst_path = _coco_instances(args, path)
    if inst_path:
        inst = load_json(inst_path, "--instances")
        if not isinstance(inst, dict) or not isinstance(inst.get("annotations"), list):
            raise DataError(inst_path, None, None, "a COCO instances file needs an 'annotations' list")
        cats = {c.get("id"): c.get("name") for c in inst.get("categories") or [] if isinstance(c, dict)}
        for a in inst["annotations"]:
            if isinstance(a, dict):
                name = cats.get(a.get("category_id")) or str(a.get("category_id"))
                boxes.setdefault(a.get("image_id"), []).append((name, a.get("bbox")))
        for im in inst.get("images") or []:
            if isinstance(im, dict) and not all(sizes.get(im.get("id")) or (None, None)):
                sizes[im.get("id")] = (im.get("width"), im.get("height"))
    elif args.kind != "conversation":
        logger.info(f"no COCO instances file for {path.name}: prompts hold captions only (pass --instances FILE)")
    split = _coco_split(path, "captions")
    extra_dirs = [split] if split else []
    for im in data["images"]:
        if not isinstance(im, dict):
            continue
        iid = im.get("id")
        where = f"{path.name}: image id {iid}"
        fname = im.get("file_name")
        try:
            key, full = _locate(root, fname, extra_dirs)
            caps = captions.get(iid) or []
            if not caps:
                raise _ItemError("no-captions", "the image has no captions")
            norm = []
            if args.kind != "conversation":
                w, h = sizes.get(iid) or (None, None)
                if boxes.get(iid) and not (w and h):
                    w, h = _image_size(full)
                norm = [(c, normalize_box(b, "xywh", w, h)) for c, b in boxes.get(iid, [])]
            yield Item(key=key, id=str(iid), captions=caps, boxes=norm, where=where)
        except _ItemError as e:
            yield Reject(e.reason, e.message, image=fname if isinstance(fname, str) else None, id=str(iid), where=where)


def load_jsonl(args: SynthArgs, path: Path, root: Path, data: Any = None) -> Iterable[Item | Reject]:
    """Items of a JSONL file (or of ``data``, the JSON list read from ``path``) of ``{image, captions, boxes}``."""
    if data is None:
        rows = read_jsonl_lines(path)
        label = "line"
    else:
        if not isinstance(data, list):
            raise DataError(path, None, None, "expected a COCO captions file or a list of {image, captions} objects")
        rows, label = list(enumerate(data)), "#"
    for n, obj in rows:
        where = f"{path.name}:{n}" if label == "line" else f"{path.name} #{n}"
        image = obj.get("image") if isinstance(obj, dict) else None
        try:
            if not isinstance(obj, dict):
                raise _ItemError("bad-input", f"expected a JSON object, got {type(obj).__name__}")
            key, full = _locate(root, image)
            caps = obj.get("captions", obj.get("caption"))
            if isinstance(caps, str):
                caps = [caps]
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise _ItemError("bad-input", "'captions' must be a list of strings")
            caps = [" ".join(c.split()) for c in caps if c.strip()]
            if not caps:
                raise _ItemError("no-captions", "the image has no captions")
            raw_boxes = obj.get("boxes") or []
            if not isinstance(raw_boxes, list):
                raise _ItemError("bad-input", "'boxes' must be a list of {category, bbox} objects")
            norm = []
            if args.kind != "conversation" and raw_boxes:
                w, h = obj.get("width"), obj.get("height")
                if args.box_format != "xyxy_norm" and not (isinstance(w, (int, float)) and isinstance(h, (int, float))):
                    w, h = _image_size(full)
                for i, b in enumerate(raw_boxes):
                    if not isinstance(b, dict) or not isinstance(b.get("category"), str):
                        raise _ItemError(
                            "bad-box", f"boxes[{i}] must be an object with a 'category' string and a 'bbox'"
                        )
                    try:
                        norm.append((b["category"].strip(), normalize_box(b.get("bbox"), args.box_format, w, h)))
                    except _ItemError as e:
                        raise _ItemError(e.reason, f"boxes[{i}]: {e.message}") from None
                if (
                    args.box_format != "xyxy_norm"
                    and max(w, h) > 2
                    and all(0 <= float(v) <= 1 for b in raw_boxes for v in b["bbox"])
                ):
                    raise _ItemError(
                        "bad-box",
                        f"every box value is between 0 and 1 but --box-format is {args.box_format} (pixels): the boxes "
                        "look normalized already; pass --box-format xyxy_norm",
                    )
            rid = obj.get("id")
            rid = str(rid) if rid is not None else str(Path(key).with_suffix("").as_posix())
            yield Item(key=key, id=rid, captions=caps, boxes=norm, where=where)
        except _ItemError as e:
            rid = obj.get("id") if isinstance(obj, dict) else None
            yield Reject(
                e.reason,
                e.message,
                image=image if isinstance(image, str) else None,
                id=None if rid is None else str(rid),
                where=where,
            )


def load_items(args: SynthArgs) -> tuple[list[Item], list[Reject]]:
    """Read ``--input``; apply ``--limit`` (usable images); reject duplicates. Returns (items, rejects)."""
    path = existing_file(args.input, "--input")  # type: ignore[arg-type]
    root = Path(args.images) if args.images else path.parent
    if not root.is_dir():
        raise UserError(f"--images {root} is not a folder")
    root = root.resolve()
    if path.suffix == ".json":
        data = load_json(path)
        source = load_coco(args, path, data, root) if isinstance(data, dict) else load_jsonl(args, path, root, data)
    else:
        source = load_jsonl(args, path, root)
    items: list[Item] = []
    rejects: list[Reject] = []
    seen: dict[str, str] = {}
    for x in source:
        if isinstance(x, Reject):
            rejects.append(x)
            continue
        if x.key in seen:
            rejects.append(
                Reject("duplicate-image", f"image already given at {seen[x.key]}", image=x.key, id=x.id, where=x.where)
            )
            continue
        seen[x.key] = x.where
        items.append(x)
        if args.limit and len(items) >= args.limit:
            break
    ids = Counter(it.id for it in items)
    for it in items:  # record ids must be unique: fall back to the image path for clashing ids
        if ids[it.id] > 1:
            it.id = it.key
    return items, rejects


# --------------------------------------------------------------------------------------------------- replies


class ReplyError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


_LABEL_RE = re.compile(
    r"^[ \t]*(?:[*_#>]+[ \t]*)?(question|answer|q|a|user|assistant)(?:[ \t]*\d+)?[ \t]*[*_]*[ \t]*[:：][ \t]*[*_]*[ \t]*",
    re.I | re.M,
)
_SEPARATOR_RE = re.compile(r"^[ \t]*(?:={3,}|-{3,}|\*{3,})[ \t]*$", re.M)
_THINK_RE = re.compile(r"<think>.*?</think>", re.S | re.I)


def _clean(text: str) -> str:
    return _SEPARATOR_RE.sub("", text).strip()


def strip_reasoning(text: str) -> str:
    """Drop ``<think>...</think>`` blocks that reasoning models put before their answer."""
    text = _THINK_RE.sub("", text)
    if "</think>" in text.lower():  # an opening tag lost by the server's chat template
        text = text[text.lower().rindex("</think>") + len("</think>") :]
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def parse_qa(text: str) -> list[tuple[str, str]]:
    """``Question: ... === Answer: ...`` blocks -> ``[(question, answer), ...]`` or :class:`ReplyError`.

    Tolerated: text before the first question, ``Q:``/``A:``, numbered (``Question 2:``) or markdown-bold
    labels, the label's text on the same line, missing or extra ``===``/``---`` separators, and one unanswered
    question at the very end (dropped).
    """
    text = strip_reasoning(text)
    marks = list(_LABEL_RE.finditer(text))
    if not marks:
        raise ReplyError("no-qa-blocks", "no 'Question:' / 'Answer:' blocks in the reply")
    blocks = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        role = "q" if m.group(1).lower() in ("question", "q", "user") else "a"
        blocks.append((role, _clean(text[m.end() : end])))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(blocks):
        role, body = blocks[i]
        if role != "q":
            raise ReplyError("qa-order", f"block {i + 1} is an answer without a question before it")
        if i + 1 == len(blocks):
            if pairs:  # a last question without an answer: drop it
                break
            raise ReplyError("qa-order", "the question has no answer")
        role2, body2 = blocks[i + 1]
        if role2 != "a":
            raise ReplyError("qa-order", f"question {len(pairs) + 1} is followed by another question, not an answer")
        if not body or not body2:
            raise ReplyError("empty-qa", f"question {len(pairs) + 1} or its answer is empty")
        pairs.append((body, body2))
        i += 2
    return pairs


def detail_instruction(key: str) -> str:
    """The ``detail`` instruction of an image: fixed per image path, spread evenly over the list."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return DETAIL_INSTRUCTIONS[h % len(DETAIL_INSTRUCTIONS)]


def reply_to_turns(kind: str, key: str, reply: str, finish_reason: str | None) -> list[Turn]:
    """An LLM reply -> human/gpt turns with ``<image>\\n`` opening the first human turn (or :class:`ReplyError`)."""
    if finish_reason == "content_filter":
        raise ReplyError("content-filtered", "the server filtered the reply (finish_reason content_filter)")
    text = strip_reasoning(reply or "")
    if not text:
        raise ReplyError("empty-reply", "the reply is empty")
    truncated = finish_reason == "length"
    if kind == "detail":
        if truncated:
            raise ReplyError("truncated-reply", "the reply was cut off at --max-tokens (finish_reason length)")
        if _LABEL_RE.match(text):
            raise ReplyError("unexpected-qa", "a detail reply should be a description, not Question/Answer blocks")
        pairs = [(detail_instruction(key), text)]
    else:
        pairs = parse_qa(text)
        if truncated:  # the last answer may be cut mid-sentence
            if kind == "complex" or len(pairs) < 2:
                raise ReplyError("truncated-reply", "the reply was cut off at --max-tokens (finish_reason length)")
            pairs = pairs[:-1]
        if kind == "complex":
            pairs = pairs[:1]
    turns: list[Turn] = []
    for i, (q, a) in enumerate(pairs):
        if IMAGE_TOKEN in q or IMAGE_TOKEN in a:
            raise ReplyError("image-token-in-reply", f"the reply contains the {IMAGE_TOKEN} placeholder")
        turns += [Turn("human", (IMAGE_TOKEN + "\n" if i == 0 else "") + q), Turn("gpt", a)]
    return turns


# --------------------------------------------------------------------------------------------------- cache


class ReplyCache:
    """Append-only JSONL cache of replies. One ``write`` + flush + fsync per line; a torn last line is dropped.

    An exclusive lock (POSIX) stops two runs from writing the same cache at once.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries: dict[tuple[str, str, str], dict] = {}
        self.n_bad = 0
        self._lock = threading.Lock()
        self._f = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        try:
            import fcntl

            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows
            pass
        except OSError:
            self._f.close()
            raise UserError(f"the cache {self.path} is in use by another llavatune synth run") from None
        self._load()

    def _load(self) -> None:
        self._f.seek(0)
        raw = self._f.read()
        if raw and not raw.endswith(b"\n"):  # a kill mid-write: repair the tail before appending
            cut = raw.rfind(b"\n") + 1
            try:
                json.loads(raw[cut:])
                self._f.write(b"\n")  # only the newline was lost
                raw += b"\n"
            except ValueError:
                logger.info(
                    f"{self.path}: dropping an incomplete last line ({len(raw) - cut} bytes) left by an interrupted run"
                )
                self._f.truncate(cut)
                raw = raw[:cut]
            self._f.flush()
            os.fsync(self._f.fileno())
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                self.entries[(e["kind"], e["image"], e["hash"])] = e
            except (ValueError, KeyError, TypeError):
                self.n_bad += 1
        if self.n_bad:
            logger.info(f"{self.path}: ignored {self.n_bad} unreadable line(s)")
        self._f.seek(0, os.SEEK_END)

    def get(self, kind: str, image: str, h: str) -> dict | None:
        return self.entries.get((kind, image, h))

    def append(self, entry: dict) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self._f.closed:  # a worker finishing after the run was abandoned
                return
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            self.entries[(entry["kind"], entry["image"], entry["hash"])] = entry

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()

    def __enter__(self) -> ReplyCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------- client


class Stopped(Exception):
    """The run is stopping (Ctrl-C or a fatal error elsewhere)."""


class FatalRequestError(UserError):
    """An error every request would hit (bad key, wrong URL or model, no credit): stop the run."""


class RequestFailed(Exception):
    """One item failed after all retries (or with a non-retryable status)."""


def chat_url(endpoint: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000/v1/chat/completions`` (a bare host gets ``/v1``)."""
    url = endpoint.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--endpoint {endpoint!r}: give an http(s) URL such as http://localhost:8000/v1")
    if url.endswith("/chat/completions"):
        return url
    if not parts.path:
        url += "/v1"
    return url + "/chat/completions"


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        err = json.loads(text).get("error")
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    text = " ".join(text.split())
    return text[:300] + ("..." if len(text) > 300 else "")


@dataclass
class Usage:
    prompt: int = 0
    completion: int = 0
    without_usage: int = 0  # replies whose response had no usage field

    def add(self, usage: Any) -> None:
        try:
            prompt, completion = int(usage["prompt_tokens"] or 0), int(usage.get("completion_tokens") or 0)
        except (TypeError, KeyError, ValueError, AttributeError):
            self.without_usage += 1
            return
        self.prompt += prompt
        self.completion += completion

    def cost(self, price_in: float, price_out: float) -> float:
        return (self.prompt * price_in + self.completion * price_out) / 1e6

    def to_dict(self, price_in: float, price_out: float) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "replies_without_usage": self.without_usage,
            "cost": round(self.cost(price_in, price_out), 6),
        }


class ChatClient:
    """POSTs chat-completion requests with the stdlib; retries with backoff. Thread-safe."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        backoff: float,
        max_backoff: float,
    ):
        self.url, self.timeout, self.max_retries = url, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.errors: Counter[str] = Counter()  # "429", "500", "timeout", ... over all attempts

    def _count(self, error: str | None = None, retry: bool = False) -> None:
        with self._lock:
            if error is None:
                self.requests += 1
            else:
                self.errors[error] += 1
            if retry:
                self.retries += 1

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, _MAX_RETRY_AFTER)
        base = min(self.max_backoff, self.backoff * (2**attempt))
        return base / 2 + random.uniform(0, base / 2)  # "equal jitter": spread retries of parallel workers

    def complete(self, body: dict, stop: threading.Event) -> dict:
        """The server's JSON response to ``body``; raises RequestFailed, FatalRequestError or Stopped."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise Stopped()
            self._count()
            retry_after = None
            req = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    out = json.loads(raw)
                    if not isinstance(out, dict) or not isinstance(out.get("choices"), list) or not out["choices"]:
                        raise ValueError("no 'choices' in the response")
                    return out
                except ValueError as e:
                    last, kind = f"unusable response ({e}): {_error_text(raw)}", "bad-response"
            except urllib.error.HTTPError as e:
                status = e.code
                try:
                    detail = _error_text(e.read())
                except Exception:  # noqa: BLE001 - the body is only for the message
                    detail = ""
                last, kind = f"HTTP {status}: {detail or e.reason}", str(status)
                if status in _FATAL_STATUS or (status == 429 and "insufficient_quota" in detail):
                    self._count(kind)
                    raise FatalRequestError(f"{self.url} refused the request: {last}") from None
                if status not in _RETRY_STATUS and status < 500:
                    self._count(kind)
                    raise RequestFailed(last) from None
                retry_after = retry_after_seconds(e.headers)
            except (TimeoutError, socket.timeout):
                last, kind = f"no response within --timeout {self.timeout:g} s", "timeout"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last, kind = f"no response within --timeout {self.timeout:g} s", "timeout"
                else:
                    last, kind = f"connection failed: {reason}", "connection"
            retry = attempt < self.max_retries
            self._count(kind, retry=retry)
            if not retry:
                break
            if stop.wait(self.delay(attempt, retry_after)):
                raise Stopped()
        raise RequestFailed(f"{last} (after {self.max_retries + 1} attempt(s))")


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class Job:
    item: Item
    body: dict
    hash: str


def request_body(args: SynthArgs, messages: list[dict]) -> dict:
    body: dict[str, Any] = {
        "model": args.model,
        "messages": messages,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
    }
    if args.seed is not None:
        body["seed"] = args.seed
    return body


def request_hash(body: dict) -> str:
    """Hash of everything that shapes the reply (model, messages, sampling options)."""
    blob = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def build_jobs(args: SynthArgs, prompts: PromptSet, items: list[Item]) -> list[Job]:
    head = [{"role": "system", "content": prompts.system}]
    for user, assistant in prompts.examples:
        head += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    with_boxes = args.kind != "conversation"
    jobs = []
    for it in items:
        body = request_body(args, [*head, {"role": "user", "content": format_context(it, with_boxes)}])
        jobs.append(Job(it, body, request_hash(body)))
    return jobs


def run_requests(
    args: SynthArgs, client: ChatClient, cache: ReplyCache, jobs: list[Job], usage: Usage
) -> dict[str, str]:
    """Ask the server for every job; cache each reply as it arrives. Returns {image key: failure message}.

    Raises :class:`UserError` (after caching whatever finished) on a fatal server error or too many failures
    in a row.
    """
    failures: dict[str, str] = {}
    if not jobs:
        return failures
    stop = threading.Event()
    fatal: list[str] = []

    def work(job: Job) -> dict:
        try:
            resp = client.complete(job.body, stop)
        except FatalRequestError:
            stop.set()  # here, not in the main thread: no queued job may start after this
            raise
        choice = resp["choices"][0] if isinstance(resp["choices"][0], dict) else {}
        msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = msg.get("content") or choice.get("text")  # "text": legacy completions-style servers
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        entry = {
            "v": _CACHE_VERSION,
            "kind": args.kind,
            "image": job.item.key,
            "hash": job.hash,
            "reply": content if isinstance(content, str) else "",
            "finish_reason": choice.get("finish_reason"),
            "usage": resp.get("usage"),
            "model": resp.get("model"),
            "time": round(time.time(), 3),
        }
        cache.append(entry)  # in the worker: a reply that arrived is never lost, even on Ctrl-C
        return entry

    bar = progress(total=len(jobs), desc=f"synth {args.kind}", unit="img")
    consecutive = 0
    pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="synth")
    pending = iter(jobs)
    inflight: dict[Any, Job] = {}

    def fill() -> None:
        while len(inflight) < 2 * args.concurrency and not stop.is_set():
            job = next(pending, None)
            if job is None:
                return
            inflight[pool.submit(work, job)] = job

    try:
        fill()
        while inflight:
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in done:
                job = inflight.pop(fut)
                try:
                    entry = fut.result()
                except Stopped:
                    continue
                except FatalRequestError as e:
                    fatal.append(str(e))
                    stop.set()
                    continue
                except RequestFailed as e:
                    failures[job.item.key] = str(e)
                    consecutive += 1
                    if consecutive >= args.max_consecutive_failures and not stop.is_set():
                        fatal.append(f"{consecutive} items in a row failed; the last: {e}")
                        stop.set()
                else:
                    consecutive = 0
                    usage.add(entry.get("usage"))
                if bar is not None:
                    bar.update(1)
                    cost = usage.cost(args.price_in, args.price_out)
                    post = {"tok_in": usage.prompt, "tok_out": usage.completion, "failed": len(failures)}
                    if cost:
                        post["cost"] = f"{cost:.4f}"
                    bar.set_postfix(post, refresh=False)
            fill()
    except BaseException:  # Ctrl-C: let requests in flight land in the cache (a second Ctrl-C quits at once)
        stop.set()
        if inflight:
            logger.info(f"stopping: waiting for {len(inflight)} request(s) in flight (Ctrl-C again to quit now)")
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    pool.shutdown(wait=True)
    if fatal:
        raise UserError(
            f"stopped: {fatal[0]}. {len(cache.entries)} replies are saved in {cache.path}; fix the problem and rerun "
            "the same command to continue where it stopped"
        )
    return failures


def _image_mode(out: Path, root: Path) -> tuple[str, str | None]:
    mode = image_path_mode(out.parent.resolve(), root)
    if mode != "keep":
        return mode, None
    return mode, (
        f"image paths in {out} are relative to {root} (not to {out.parent}): train and check with "
        f"--image-folder {root}, or write the output inside that folder"
    )


@dataclass
class SynthReport:
    out: str | None
    rejects: str | None
    cache: str | None
    kind: str
    model: str
    items: int = 0
    records: int = 0
    from_cache: int = 0
    requested: int = 0
    failed: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    http_requests: int = 0
    retries: int = 0
    http_errors: dict[str, int] = field(default_factory=dict)
    usage_run: dict[str, Any] = field(default_factory=dict)
    usage_all: dict[str, Any] = field(default_factory=dict)
    image_paths: str = ""
    image_folder_note: str | None = None
    prompts: str = "built-in"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def format(self) -> str:
        n_rej = sum(self.reject_reasons.values())
        lines = [f"synth {self.kind}: {self.items} image(s) -> {self.records} record(s) in {self.out}"]
        lines.append(
            f"  replies: {self.requested} new, {self.from_cache} from the cache ({self.cache}); "
            f"{self.http_requests} HTTP request(s), {self.retries} retr{'y' if self.retries == 1 else 'ies'}"
            + (f" ({', '.join(f'{k} x{v}' for k, v in sorted(self.http_errors.items()))})" if self.http_errors else "")
        )
        for label, u in (("this run", self.usage_run), ("every reply, cached included", self.usage_all)):
            line = f"  tokens ({label}): {u['prompt_tokens']:,} prompt + {u['completion_tokens']:,} completion"
            if u["cost"]:
                line += f", cost {u['cost']:.4f}"
            if u["replies_without_usage"]:
                line += f" ({u['replies_without_usage']} repl(ies) had no usage field)"
            lines.append(line)
        if n_rej:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reject_reasons.items(), key=lambda x: (-x[1], x[0])))
            lines.append(f"  rejected: {n_rej} ({reasons}) -> {self.rejects}")
        if self.failed:
            lines.append(f"  {self.failed} item(s) failed at the server; rerun the same command to ask for them again")
        lines.append(f"  image paths: {self.image_paths}")
        if self.image_folder_note:
            lines.append(f"  note: {self.image_folder_note}")
        return "\n".join(lines)


def _resolve_endpoint(args: SynthArgs) -> tuple[str, str | None]:
    endpoint = args.endpoint or os.environ.get("OPENAI_BASE_URL")
    if not endpoint and args.dry_run:
        return "(no --endpoint given)", None
    if not endpoint:
        raise ConfigError("--endpoint is required (or set OPENAI_BASE_URL), e.g. --endpoint http://localhost:8000/v1")
    return chat_url(endpoint), args.api_key or os.environ.get("OPENAI_API_KEY") or None


def _print_dry_run(args: SynthArgs, url: str, jobs: list[Job], todo: list[Job], rejects: list[Reject]) -> None:
    print(
        f"dry run: {len(jobs)} image(s) usable, {len(rejects)} rejected before asking, {len(todo)} to request from {url}"
    )
    if rejects:
        reasons = Counter(r.reason for r in rejects)
        print("  rejected: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    chars = sum(len(m["content"]) for j in todo for m in j.body["messages"])
    print(f"  prompts still to send: {chars:,} characters (roughly {chars // 4:,} tokens)")
    if jobs:
        j = (todo or jobs)[0]
        print(f"\nprompt for {j.item.key} (model {j.body['model']}):")
        for m in j.body["messages"]:
            print(f"----- {m['role']}\n{m['content']}")


def run_synth(args: SynthArgs) -> SynthReport:
    """Generate ``args.kind`` records for every image of ``args.input``; write ``args.out`` and its rejects."""
    url, api_key = _resolve_endpoint(args)
    prompts = load_prompts(args.kind, args.system_prompt, args.examples)
    out = Path(args.out) if args.out else None
    if out is not None:  # neither the output nor its rejects file may be the input (or a link to it)
        check_output_file(out, {"--input": args.input}, "--out")
        check_output_file(out.with_suffix(".rejects.jsonl"), {"--input": args.input}, f"--out {out} (its rejects file)")
    items, pre_rejects = load_items(args)
    if not items:
        reasons = Counter(r.reason for r in pre_rejects)
        first = f"; first: {pre_rejects[0].where}: {pre_rejects[0].message}" if pre_rejects else ""
        summary = ", ".join(f"{k} {v}" for k, v in reasons.most_common()) or "the input is empty"
        raise UserError(f"no usable images in {args.input} ({summary}){first}")
    jobs = build_jobs(args, prompts, items)
    cache_path = Path(args.cache) if args.cache else (out.with_suffix(".synth-cache.jsonl") if out else None)

    if args.dry_run:
        todo = jobs
        if cache_path and cache_path.is_file():
            with ReplyCache(cache_path) as cache:
                todo = [j for j in jobs if _needs_request(args, cache, j)]
        _print_dry_run(args, url, jobs, todo, pre_rejects)
        return SynthReport(out=None, rejects=None, cache=str(cache_path), kind=args.kind, model=str(args.model))

    assert out is not None and cache_path is not None
    root = (Path(args.images) if args.images else Path(args.input).parent).resolve()  # type: ignore[arg-type]
    mode, note = _image_mode(out, root)
    rejects_path = out.with_suffix(".rejects.jsonl")
    report = SynthReport(
        out=str(out), rejects=str(rejects_path), cache=str(cache_path), kind=args.kind, model=str(args.model)
    )
    report.prompts = prompts.source
    client = ChatClient(url, api_key, args.timeout, args.max_retries, args.backoff, args.max_backoff)
    usage_run = Usage()
    with ReplyCache(cache_path) as cache:
        todo = [j for j in jobs if _needs_request(args, cache, j)]
        report.from_cache = len(jobs) - len(todo)
        logger.info(
            f"{len(jobs)} image(s): {report.from_cache} from the cache, {len(todo)} to request from {url} "
            f"(model {args.model}, concurrency {args.concurrency})"
        )
        try:
            failures = run_requests(args, client, cache, todo, usage_run)
        finally:
            report.http_requests, report.retries = client.requests, client.retries
            report.http_errors = dict(client.errors)
        report.requested = len(todo) - len(failures)
        report.failed = len(failures)

        records: list[Record] = []
        rejects = list(pre_rejects)
        usage_all = Usage()
        out_dir = out.parent.resolve()
        for job in jobs:
            it = job.item
            entry = cache.get(args.kind, it.key, job.hash)
            if entry is None:
                msg = failures.get(it.key, "no reply")
                rejects.append(Reject("request-failed", msg, image=it.key, id=it.id, where=it.where))
                continue
            usage_all.add(entry.get("usage"))
            try:
                turns = reply_to_turns(args.kind, it.key, entry.get("reply") or "", entry.get("finish_reason"))
            except ReplyError as e:
                rejects.append(
                    Reject(e.reason, e.message, image=it.key, id=it.id, where=it.where, reply=entry.get("reply"))
                )
                continue
            rec = Record(
                id=f"{it.id}-{args.kind}", conversations=turns,
                images=[rebase_image_path(it.key, root, out_dir) if mode == "relative" else it.key],
            )
            problems = record_problems(rec)
            if problems:  # defensive: never write a record `train` would refuse
                msg = "; ".join(f"{q.field}: {q.message}" for q in problems)
                rejects.append(
                    Reject("invalid-record", msg, image=it.key, id=it.id, where=it.where, reply=entry.get("reply"))
                )
                continue
            records.append(rec)

    write_records(out, records)
    atomic_write_text(rejects_path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects))
    report.items = len(jobs)
    report.records = len(records)
    report.reject_reasons = dict(Counter(r.reason for r in rejects))
    report.usage_run = usage_run.to_dict(args.price_in, args.price_out)
    report.usage_all = usage_all.to_dict(args.price_in, args.price_out)
    report.image_paths = {
        "same": f"relative to {out.parent} (the image folder)",
        "relative": f"relative to {out.parent}",
        "keep": f"relative to {root}",
    }[mode]
    report.image_folder_note = note
    if args.json:
        atomic_write_json(args.json, report.to_dict())
    return report


def _needs_request(args: SynthArgs, cache: ReplyCache, job: Job) -> bool:
    entry = cache.get(args.kind, job.item.key, job.hash)
    if entry is None:
        return True
    if not args.retry_rejects:
        return False
    try:
        reply_to_turns(args.kind, job.item.key, entry.get("reply") or "", entry.get("finish_reason"))
    except ReplyError:
        return True
    return False


def main(argv: Sequence[str], prog: str = "llavatune synth") -> int:
    (args,) = parse_config(
        [SynthArgs],
        argv,
        prog=prog,
        description="Generate LLaVA-Instruct-style instruction data (conversation, detail or complex) from image "
        "captions and object boxes with any OpenAI-compatible chat-completions server. Rerunning the same command "
        "resumes: finished replies are cached. Exit 0 when every item got a reply (malformed replies are listed in "
        "the .rejects.jsonl file), 1 when some requests failed.",
    )
    report = run_synth(args)
    if args.dry_run:
        return 0
    print(report.format())
    return 1 if report.failed else 0


if __name__ == "__main__":  # pragma: no cover
    from llavatune.cli import main as _cli

    raise SystemExit(_cli(["synth", *sys.argv[1:]]))

"""What ``synth`` reads: the images to generate for, from a COCO ``captions_*.json`` (+ ``instances_*.json`` for
boxes) or a JSONL file of ``{image, captions, boxes}``; each becomes an :class:`Item` or a :class:`Reject` with
its reason, never an exception that stops the run."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from llavatune.config import ConfigError
from llavatune.data.reader import existing_file, load_json, read_jsonl_lines
from llavatune.data.records import DataError
from llavatune.utils import UserError, logger, resolve_under

if TYPE_CHECKING:
    from llavatune.data.synth.run import SynthArgs

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


class ItemError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def normalize_box(bbox: Any, fmt: str, width: float | None, height: float | None) -> tuple[float, float, float, float]:
    """``bbox`` in ``fmt`` -> ``(x1, y1, x2, y2)`` in 0-1 (clamped, rounded to 3 decimals)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ItemError("bad-box", f"bbox must be a list of 4 numbers, got {bbox!r}")
    try:
        a, b, c, d = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ItemError("bad-box", f"bbox must be a list of 4 numbers, got {bbox!r}") from None
    if not all(map(math.isfinite, (a, b, c, d))):
        raise ItemError("bad-box", f"bbox holds a non-finite number: {bbox!r}")
    if fmt == "xywh":
        if c < 0 or d < 0:
            raise ItemError("bad-box", f"bbox {bbox!r} ([x, y, width, height]) has a negative width or height")
        x1, y1, x2, y2 = a, b, a + c, b + d
    else:
        x1, y1, x2, y2 = a, b, c, d
        if x2 < x1 or y2 < y1:
            raise ItemError("bad-box", f"bbox {bbox!r} ([x1, y1, x2, y2]) has x2 < x1 or y2 < y1")
    if fmt != "xyxy_norm":
        if not width or not height or width <= 0 or height <= 0:
            raise ItemError("image-size-unknown", "the image size is needed to normalize pixel boxes")
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    return tuple(round(min(1.0, max(0.0, v)), 3) for v in (x1, y1, x2, y2))  # type: ignore[return-value]


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception as e:  # noqa: BLE001 - any unreadable image is one rejected item
        raise ItemError("image-unreadable", f"cannot read the image size of {path}: {type(e).__name__}: {e}") from None


def _locate(root: Path, rel: Any, extra_dirs: Sequence[str] = ()) -> tuple[str, Path]:
    """``(key, full path)`` of image ``rel`` under ``root`` (else under ``root/D`` for D in ``extra_dirs``)."""
    if not isinstance(rel, str) or not rel.strip():
        raise ItemError("bad-input", "the image path is missing or not a string")
    for cand in [rel, *(os.path.join(d, rel) for d in extra_dirs if not os.path.isabs(rel))]:
        try:
            full = resolve_under(root, cand)
        except UserError as e:
            raise ItemError("image-outside-root", str(e)) from None
        if full.is_file():
            key = os.path.relpath(full, root) if os.path.isabs(cand) else os.path.normpath(cand)
            return Path(key).as_posix(), full
    raise ItemError("image-missing", f"image {rel!r} not found under {root}")


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
                raise ItemError("no-captions", "the image has no captions")
            norm = []
            if args.kind != "conversation":
                w, h = sizes.get(iid) or (None, None)
                if boxes.get(iid) and not (w and h):
                    w, h = _image_size(full)
                norm = [(c, normalize_box(b, "xywh", w, h)) for c, b in boxes.get(iid, [])]
            yield Item(key=key, id=str(iid), captions=caps, boxes=norm, where=where)
        except ItemError as e:
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
                raise ItemError("bad-input", f"expected a JSON object, got {type(obj).__name__}")
            key, full = _locate(root, image)
            caps = obj.get("captions", obj.get("caption"))
            if isinstance(caps, str):
                caps = [caps]
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise ItemError("bad-input", "'captions' must be a list of strings")
            caps = [" ".join(c.split()) for c in caps if c.strip()]
            if not caps:
                raise ItemError("no-captions", "the image has no captions")
            raw_boxes = obj.get("boxes") or []
            if not isinstance(raw_boxes, list):
                raise ItemError("bad-input", "'boxes' must be a list of {category, bbox} objects")
            norm = []
            if args.kind != "conversation" and raw_boxes:
                w, h = obj.get("width"), obj.get("height")
                if args.box_format != "xyxy_norm" and not (isinstance(w, (int, float)) and isinstance(h, (int, float))):
                    w, h = _image_size(full)
                for i, b in enumerate(raw_boxes):
                    if not isinstance(b, dict) or not isinstance(b.get("category"), str):
                        raise ItemError(
                            "bad-box", f"boxes[{i}] must be an object with a 'category' string and a 'bbox'"
                        )
                    try:
                        norm.append((b["category"].strip(), normalize_box(b.get("bbox"), args.box_format, w, h)))
                    except ItemError as e:
                        raise ItemError(e.reason, f"boxes[{i}]: {e.message}") from None
                if (
                    args.box_format != "xyxy_norm"
                    and max(w, h) > 2
                    and all(0 <= float(v) <= 1 for b in raw_boxes for v in b["bbox"])
                ):
                    raise ItemError(
                        "bad-box",
                        f"every box value is between 0 and 1 but --box-format is {args.box_format} (pixels): the boxes "
                        "look normalized already; pass --box-format xyxy_norm",
                    )
            rid = obj.get("id")
            rid = str(rid) if rid is not None else str(Path(key).with_suffix("").as_posix())
            yield Item(key=key, id=rid, captions=caps, boxes=norm, where=where)
        except ItemError as e:
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

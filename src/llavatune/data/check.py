"""``llavatune check DATA``: validate a dataset before training and say exactly what is wrong.

    llavatune check data.json [--image-folder DIR] [--model MODEL] [--max-length 2048]
                              [--fix clean.json] [--json report.json]

Every record is checked and every problem is reported; nothing stops at the first bad record. The
report gives totals, counts per problem kind and a few examples of each kind, each naming the file
(``file:line`` for ``.jsonl``), the record (its id, or ``#index`` when it has none) and the field.

Severities: **errors** make a record unusable (the command exits 1); **warnings** (samples longer than
``--max-length``) and **info** (image modes that are converted to RGB: CMYK, alpha, 16-bit, grayscale)
are counted but allowed (exit 0).

``--fix OUT`` writes the records without errors to ``OUT`` (LLaVA JSON) and every rejected record, with
its reasons, to ``OUT`` with the suffix ``.rejects.jsonl``: nothing is dropped silently.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import statistics
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from llavatune.config import ConfigError, config, parse_config
from llavatune.data.images import MAX_PIXELS, to_rgb
from llavatune.data.records import IMAGE_TOKEN, DataError, Record, parse_record, record_problems, write_records
from llavatune.utils import UserError, atomic_write_text, image_path_mode, rebase_image_path, resolve_under

ERROR, WARNING, INFO = "error", "warning", "info"
_SEVERITIES = (ERROR, WARNING, INFO)

# record_problems() message fragment -> problem kind (anything unrecognised is "record-structure").
_STRUCTURE_KINDS = (
    ("has no human/gpt turns", "no-turns"),
    ("must start with a human turn", "not-starting-with-human"),
    ("must alternate", "not-alternating"),
    ("empty turn", "empty-turn"),
    ("no gpt", "no-gpt-turn"),
    ("placeholder", "placeholder-mismatch"),
    ("in an answer turn", "image-in-answer"),
)

_MODE_INFO = {
    "image-mode-cmyk": "CMYK image (converted to RGB; colours may shift slightly)",
    "image-mode-alpha": "image with transparency (composited on white)",
    "image-mode-16bit": "16/32-bit image (rescaled to 8 bits)",
    "image-mode-grayscale": "grayscale image (converted to RGB)",
    "image-mode-other": "non-RGB image (converted to RGB)",
}

_PROGRESS_MIN_IMAGES = 200  # show a progress bar (on a terminal) from this many image files on


@dataclass
class Problem:
    """One finding. ``str()`` reads ``FILE: record REF: field FIELD: message``."""

    severity: str  # "error" | "warning" | "info"
    kind: str  # e.g. "image-missing", "not-alternating", "too-long"
    message: str
    file: str | None = None  # the data file ("file:line" for .jsonl) or, for image-only findings, the image
    record: str | None = None  # the record's id as written ('q1'), or #index when it has none
    index: int | None = None  # the record's position in the file
    field: str | None = None
    image: str | None = None  # the image path as written in the data

    def __str__(self) -> str:
        parts = [self.file or "<data>"]
        if self.record is not None:
            parts.append(f"record {self.record}")
        if self.field:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + f": {self.message}"


@dataclass
class _Entry:
    """One record slot of the data file (a JSON object, or a .jsonl line that is not valid JSON)."""

    index: int
    raw: Any
    ref: str
    loc: str
    line: int | None = None
    record: Record | None = None
    images: list[str] = field(default_factory=list)
    image_field: str = "image"
    errors: list[Problem] = field(default_factory=list)


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`. ``ok`` is true when there is no error (warnings/info allowed)."""

    data: str
    image_folder: str
    readable: bool = True  # False: the file itself could not be read as records (not JSON, not a list)
    n_records: int = 0
    n_clean: int = 0
    n_image_refs: int = 0
    n_image_files: int = 0
    n_bad_image_files: int = 0
    image_modes: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, Any] | None = None
    fix: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list, repr=False)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def infos(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == INFO]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def n_rejected(self) -> int:
        return self.n_records - self.n_clean

    def counts(self, severity: str | None = None) -> dict[str, int]:
        """Problem kind -> number of findings (of one severity, or all)."""
        return dict(Counter(p.kind for p in self.problems if severity is None or p.severity == severity))

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable report (what ``--json`` writes)."""
        return {
            "data": self.data,
            "image_folder": self.image_folder,
            "ok": self.ok,
            "readable": self.readable,
            "records": {"read": self.n_records, "clean": self.n_clean, "rejected": self.n_rejected},
            "images": {
                "references": self.n_image_refs,
                "files": self.n_image_files,
                "bad_files": self.n_bad_image_files,
                "modes": self.image_modes,
            },
            "counts": {s: self.counts(s) for s in _SEVERITIES},
            "lengths": self.lengths,
            "fix": self.fix,
            "problems": [asdict(p) for p in self.problems],
        }

    def format(self, examples: int = 5) -> str:
        """The human-readable report: totals, counts per kind, then up to ``examples`` examples per kind."""
        lines = [f"checked {self.data} (images under {self.image_folder})"]
        if self.readable:
            lines.append(
                f"  records: {self.n_records} read, {self.n_clean} without errors, {self.n_rejected} with errors"
            )
            modes = ", ".join(f"{m} {n}" for m, n in sorted(self.image_modes.items(), key=lambda x: (-x[1], x[0])))
            lines.append(
                f"  images: {self.n_image_refs} reference(s) to {self.n_image_files} file(s), "
                f"{self.n_bad_image_files} bad file(s)" + (f"; modes: {modes}" if modes else "")
            )
        else:
            lines.append("  the file could not be read as a list of records; nothing else was checked")
        if self.lengths:
            lines.append("  " + _format_lengths(self.lengths))
        width = max([len(k) for k in self.counts()] + [20])
        for sev, title in ((ERROR, "errors"), (WARNING, "warnings"), (INFO, "info")):
            counts = self.counts(sev)
            if not counts:
                continue
            lines += ["", f"{title}: {sum(counts.values())}"]
            lines += [f"  {k:<{width}}  {n}" for k, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
        if examples > 0 and self.problems:
            lines += ["", "examples:"]
            for sev in _SEVERITIES:
                by_kind: dict[str, list[Problem]] = {}
                for p in self.problems:
                    if p.severity == sev:
                        by_kind.setdefault(p.kind, []).append(p)
                for kind, probs in sorted(by_kind.items(), key=lambda x: (-len(x[1]), x[0])):
                    lines.append(f"  [{sev}] {kind} ({len(probs)}):")
                    lines += [f"    {p}" for p in probs[:examples]]
                    if len(probs) > examples:
                        lines.append(f"    ... and {len(probs) - examples} more (see --json for all)")
        if self.fix:
            lines += ["", _format_fix(self.fix)]
        lines.append("")
        if self.ok:
            extra = f" ({len(self.warnings)} warning(s))" if self.warnings else ""
            lines.append(f"result: OK, no errors{extra}")
        elif not self.readable:
            lines.append("result: FAILED, the file could not be read as records")
        else:
            hint = "" if self.fix else "; --fix OUT writes the records without errors to OUT"
            lines.append(
                f"result: FAILED, {len(self.errors)} error(s); {self.n_rejected} of {self.n_records} record(s) "
                f"unusable{hint}"
            )
        return "\n".join(lines)


def _format_lengths(s: dict[str, Any]) -> str:
    head = f"tokens (estimate, {s['model']}, {s['image_tokens_per_image']} per image"
    head += ")" if s.get("image_tokens_note") is None else f"; {s['image_tokens_note']})"
    if not s["samples"]:
        return head + ": no samples without errors to measure"
    return (
        f"{head}: min {s['min']}, median {s['median']:g}, p95 {s['p95']}, max {s['max']} over {s['samples']} "
        f"sample(s); {s['over_max_length']} over --max-length {s['max_length']}"
    )


def _format_fix(f: dict[str, Any]) -> str:
    if not f.get("written"):
        return f"--fix: nothing written: {f['reason']}"
    text = (
        f"--fix: wrote {f['clean']} record(s) without errors to {f['out']} and {f['rejected']} rejected "
        f"record(s) with their reasons to {f['rejects']}"
    )
    if f.get("image_folder_note"):
        text += f"\n  {f['image_folder_note']}"
    return text


# ----------------------------------------------------------------------------------------------- reading


def _find_surrogate(obj: Any, path: str = "") -> str | None:
    """The field path of the first string holding an undecodable byte (``surrogateescape``), else None."""
    if isinstance(obj, str):
        return path or "<record>" if any("\udc80" <= c <= "\udcff" for c in obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            if _find_surrogate(k) is not None:
                return sub
            hit = _find_surrogate(v, sub)
            if hit is not None:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = _find_surrogate(v, f"{path}[{i}]")
            if hit is not None:
                return hit
    return None


def _read_entries(p: Path, report: CheckReport) -> list[_Entry] | None:
    """Read the file leniently: bad bytes and bad .jsonl lines become problems, not exceptions."""
    raw = p.read_bytes()
    body = raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw
    bom = len(raw) - len(body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = raw[:offset].count(b"\n") + 1
        text = body.decode("utf-8", errors="surrogateescape")
        n_bad = sum(1 for c in text if "\udc80" <= c <= "\udcff")
        report.problems.append(
            Problem(
                ERROR, "invalid-utf8",
                f"invalid UTF-8 at byte {offset} (line {line}); {n_bad} bad byte(s) in all; the records holding "
                "them are rejected; re-save the file as UTF-8",
                file=str(p),
            )
        )  # fmt: skip
    entries: list[_Entry] = []
    if p.suffix == ".jsonl":
        # split on "\n" only: str.splitlines() would also split inside strings holding U+2028 etc.
        for n, line_text in enumerate(text.split("\n"), 1):
            if not line_text.strip():
                continue
            loc = f"{p}:{n}"
            try:
                obj = json.loads(line_text)
            except json.JSONDecodeError as e:
                ent = _Entry(index=len(entries), raw=line_text, ref=f"#{len(entries)}", loc=loc, line=n)
                ent.errors.append(
                    Problem(ERROR, "invalid-json", f"not valid JSON (column {e.colno}): {e.msg}", file=loc,
                            record=ent.ref, index=ent.index)
                )  # fmt: skip
                entries.append(ent)
                continue
            entries.append(_Entry(index=len(entries), raw=obj, ref=_ref(obj, len(entries)), loc=loc, line=n))
        return entries
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        report.problems.append(
            Problem(ERROR, "invalid-json", f"not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}", file=str(p))
        )
        return None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        report.problems.append(
            Problem(
                ERROR, "not-a-list",
                f"expected a JSON list of records (or a .jsonl file, one record per line), got {type(data).__name__}",
                file=str(p),
            )
        )  # fmt: skip
        return None
    return [_Entry(index=i, raw=obj, ref=_ref(obj, i), loc=str(p)) for i, obj in enumerate(data)]


def _ref(obj: Any, index: int) -> str:
    if isinstance(obj, dict) and obj.get("id") is not None:
        return repr(str(obj["id"]))
    return f"#{index}"


def _raw_images(obj: Any) -> tuple[list[str], str]:
    """Best-effort image paths of a record that does not parse, so its images are still checked."""
    if not isinstance(obj, dict):
        return [], "image"
    key = "images" if "messages" in obj and "conversations" not in obj else "image"
    value = obj.get(key)
    if isinstance(value, str):
        return [value], key
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)], key
    return [], key


def _parse_kind(obj: Any, err: DataError) -> str:
    if not isinstance(obj, dict):
        return "not-an-object"
    if "conversations" not in obj and "messages" not in obj:
        return "missing-conversations"
    if "unknown role" in err.message:
        return "unknown-role"
    return "malformed-record"


def _structure_kind(message: str) -> str:
    return next((kind for frag, kind in _STRUCTURE_KINDS if frag in message), "record-structure")


def _add(ent: _Entry, severity: str, kind: str, message: str, field_name: str | None = None, image=None):
    ent.errors.append(
        Problem(severity, kind, message, file=ent.loc, record=ent.ref, index=ent.index, field=field_name, image=image)
    )


# ------------------------------------------------------------------------------------------------ images


def _mode_kind(mode: str, alpha: bool) -> str | None:
    if mode == "CMYK":
        return "image-mode-cmyk"
    if alpha:
        return "image-mode-alpha"
    if mode.startswith("I;16") or mode in ("I", "F"):
        return "image-mode-16bit"
    if mode in ("L", "1"):
        return "image-mode-grayscale"
    if mode != "RGB":
        return "image-mode-other"
    return None


def _inspect_image(path: Path, max_pixels: int) -> tuple[str | None, str, str | None, str | None]:
    """Open and fully decode one image as training would. Returns ``(error kind, message, mode, mode kind)``.

    Call with ``DecompressionBombWarning`` turned into an error (done once, in the calling thread:
    ``warnings.catch_warnings`` is not thread-safe).
    """
    from PIL import Image

    if not path.is_file():
        return "image-missing", "image file not found", None, None
    mode = None
    try:
        with Image.open(path) as im:
            mode = im.mode
            alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
            w, h = im.size
            if w * h > max_pixels:
                return (
                    "image-too-large",
                    f"image is {w}x{h} = {w * h} pixels, over the --max-pixels limit of {max_pixels} "
                    "(possible decompression bomb)",
                    mode, None,
                )  # fmt: skip
            im.load()
            to_rgb(im)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return "image-too-large", f"refused as a possible decompression bomb ({e})", mode, None
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError too
        if "truncat" in str(e).lower():
            return "image-truncated", f"{e}: the file is cut short; re-download or re-encode it", mode, None
        return "image-unreadable", f"cannot read image ({e})", mode, None
    except Exception as e:  # Pillow raises ValueError/SyntaxError/struct.error/... on some corrupt files
        return "image-unreadable", f"cannot read image ({type(e).__name__}: {e})", mode, None
    return None, "", mode, _mode_kind(mode, alpha)


def _check_images(
    report: CheckReport, entries: list[_Entry], root: Path, max_pixels: int, workers: int, progress: bool | None
) -> None:
    refs: dict[Path, list[tuple[_Entry, str, str]]] = {}
    for ent in entries:
        for j, rel in enumerate(ent.images):
            fld = ent.image_field if len(ent.images) == 1 else f"{ent.image_field}[{j}]"
            report.n_image_refs += 1
            try:
                full = resolve_under(root, rel)
            except UserError:
                _add(
                    ent, ERROR, "image-path-escapes",
                    f"{rel!r} is outside the image folder {root}; move the image inside it or pass --image-folder",
                    fld, rel,
                )  # fmt: skip
                continue
            except (ValueError, OSError) as e:
                _add(ent, ERROR, "image-missing", f"{rel!r}: not a usable path ({e})", fld, rel)
                continue
            refs.setdefault(full, []).append((ent, fld, rel))
    report.n_image_files = len(refs)
    if not refs:
        return
    from PIL import Image
    from tqdm.auto import tqdm

    results: dict[Path, tuple[str | None, str, str | None, str | None]] = {}
    show = progress if progress is not None else (None if len(refs) >= _PROGRESS_MIN_IMAGES else False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(_inspect_image, p, max_pixels): p for p in refs}
            bar = tqdm(as_completed(futures), total=len(futures), desc="checking images", unit="img",
                       disable=None if show is None else not show)  # fmt: skip
            for fut in bar:
                results[futures[fut]] = fut.result()
    modes: Counter[str] = Counter()
    for full, uses in refs.items():  # insertion order: deterministic, in record order
        kind, message, mode, mode_kind = results[full]
        if mode:
            modes[mode] += 1
        if kind:
            report.n_bad_image_files += 1
            for ent, fld, rel in uses:
                _add(ent, ERROR, kind, f"{rel!r} ({full}): {message}", fld, rel)
        elif mode_kind:
            report.problems.append(
                Problem(INFO, mode_kind, f"{_MODE_INFO[mode_kind]}, mode {mode}; used by record {uses[0][0].ref}"
                        + (f" and {len(uses) - 1} more" if len(uses) > 1 else ""),
                        file=str(full), image=uses[0][2])
            )  # fmt: skip
    report.image_modes = dict(modes)


# ---------------------------------------------------------------------------------------------- lengths


def _load_processor(model: str):
    """``(processor or None, tokenizer)`` from a local model folder or hub id; never runs remote code."""
    from transformers import AutoProcessor, AutoTokenizer

    from llavatune.model.refs import resolve_model

    model = resolve_model(model, "--model")
    processor = None
    try:
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
    except Exception:  # no processor files: fall back to the tokenizer alone
        processor = None
    tokenizer = getattr(processor, "tokenizer", None) or (processor if callable(processor) else None)
    if tokenizer is None or not hasattr(tokenizer, "convert_tokens_to_ids"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        except Exception as e:
            raise UserError(f"--model {model}: cannot load a processor or tokenizer from it ({e})") from None
        processor = None if processor is tokenizer else processor
    if processor is tokenizer:
        processor = None
    return processor, tokenizer


def _measure_lengths(report: CheckReport, entries: list[_Entry], model: str, max_length: int, root: Path) -> None:
    # imported here: encode imports torch, which only --model needs (a plain check starts ~1.3 s faster)
    from llavatune.data.encode import anyres_image_tokens, has_variable_image_tokens, image_size, image_tokens_per_image

    processor, tokenizer = _load_processor(model)
    note = None
    try:
        per_image = image_tokens_per_image(processor) if processor is not None else 0
        if processor is None:
            note = "tokenizer only: image tokens not counted"
    except ValueError as e:
        per_image, note = 0, f"image tokens not counted: {e}"
    clean = [e for e in entries if e.record is not None and not _has_error(e)]
    texts = ["\n".join(t.value.replace(IMAGE_TOKEN, "") for t in e.record.conversations) for e in clean]
    n_text: list[int] = []
    for start in range(0, len(texts), 1000):
        n_text += [len(ids) for ids in tokenizer(texts[start : start + 1000], add_special_tokens=True)["input_ids"]]
    totals = []
    over = 0
    # LLaVA-NeXT tiles each image by its size: count its real tokens from the image header
    variable = processor is not None and has_variable_image_tokens(processor)
    for ent, nt in zip(clean, n_text):
        if variable and ent.record.images:
            n_img = sum(anyres_image_tokens(processor, [image_size(resolve_under(root, p)) for p in ent.record.images]))
        else:
            n_img = per_image * len(ent.record.images)
        total = nt + n_img
        totals.append(total)
        if total > max_length:
            over += 1
            _add(
                ent, WARNING, "too-long",
                f"about {total} tokens ({nt} text + {n_img} image), over --max-length {max_length}; "
                "training truncates it (the answer may be cut off)",
            )  # fmt: skip
    stats: dict[str, Any] = {
        "model": model,
        "image_tokens_per_image": per_image,
        "image_tokens_note": note,
        "max_length": max_length,
        "samples": len(totals),
        "over_max_length": over,
        "estimate": True,
    }
    if totals:
        s = sorted(totals)
        stats.update(min=s[0], median=statistics.median(s), p95=s[max(0, math.ceil(0.95 * len(s)) - 1)], max=s[-1])
    report.lengths = stats


# ------------------------------------------------------------------------------------------------- check


def check_dataset(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    model: str | None = None,
    max_length: int = 2048,
    max_pixels: int = MAX_PIXELS,
    workers: int = 8,
    progress: bool | None = None,
) -> CheckReport:
    """Check every record and image of a LLaVA / messages ``.json`` or ``.jsonl`` file.

    ``image_folder`` defaults to the data file's folder. With ``model`` (a local folder or hub id with a processor
    or tokenizer) the report adds token-length statistics, an estimate (see :func:`image_tokens_per_image`).
    ``progress``: ``None`` shows a progress bar for large image sets on a terminal.
    Raises :class:`~llavatune.utils.UserError` only when the check cannot run at all (file or folder missing).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "file not found")
    if model:  # a typo'd path or an unreachable hub id: one line now, not after every image was read
        from llavatune.model.refs import resolve_model

        resolve_model(model, "--model")
    root = Path(image_folder) if image_folder is not None else p.parent
    if not root.is_dir():
        raise UserError(f"--image-folder {root} is not a folder")
    root = root.resolve()
    report = CheckReport(data=str(p), image_folder=str(root))
    entries = _read_entries(p, report)
    if entries is None:
        report.readable = False
        return report
    report.entries = entries
    report.n_records = len(entries)
    if not entries:
        report.problems.append(Problem(WARNING, "no-records", "the file holds no records", file=str(p)))

    first_by_id: dict[str, _Entry] = {}
    for ent in entries:
        if ent.errors:  # invalid JSON line: nothing more to check
            continue
        obj = ent.raw
        bad_field = _find_surrogate(obj)
        if bad_field is not None:
            _add(ent, ERROR, "invalid-utf8", "holds invalid UTF-8 bytes", bad_field)
        try:
            rec = parse_record(obj, p, ent.index)
        except DataError as err:
            _add(ent, ERROR, _parse_kind(obj, err), err.message, err.field)
            ent.images, ent.image_field = _raw_images(obj)
        else:
            ent.record = rec
            ent.images = list(rec.images)
            ent.image_field = "images" if isinstance(obj, dict) and "messages" in obj else "image"
            for fld, message in record_problems(rec):
                _add(ent, ERROR, _structure_kind(message), message, fld)
        rid = str(obj["id"]) if isinstance(obj, dict) and obj.get("id") is not None else None
        if rid is None and ent.record is not None:
            rid = ent.record.id
        if rid is not None:
            first = first_by_id.setdefault(rid, ent)
            if first is not ent:
                _add(
                    ent, ERROR, "duplicate-id",
                    f"id {rid!r} is also used by record #{first.index}{_line(first)}; ids must be unique "
                    "(evaluation matches answers by id)",
                    "id",
                )  # fmt: skip

    _check_images(report, entries, root, max_pixels, workers, progress)
    if model:
        _measure_lengths(report, entries, model, max_length, root)

    for ent in entries:
        report.problems.extend(ent.errors)
    report.n_clean = sum(1 for e in entries if not _has_error(e))
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    report.problems.sort(key=lambda q: (order[q.severity], -1 if q.index is None else q.index))
    return report


def _line(ent: _Entry) -> str:
    return f" (line {ent.line})" if ent.line else ""


def _has_error(ent: _Entry) -> bool:
    return any(p.severity == ERROR for p in ent.errors)


# --------------------------------------------------------------------------------------------------- fix


def _fix_paths(out: str | os.PathLike, data: str | os.PathLike) -> tuple[Path, Path]:
    out_p = Path(out)
    if out_p.suffix == ".jsonl":
        raise UserError(f"--fix {out}: the cleaned copy is a LLaVA JSON list; give a path ending in .json")
    if out_p.resolve() == Path(data).resolve():
        raise UserError(f"--fix {out}: that is the input file; choose another path for the cleaned copy")
    return out_p, out_p.with_suffix(".rejects.jsonl")


def _dump_json(obj: Any, indent: int | None = 2) -> str:
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable input bytes (lone surrogates): keep them as \\udcXX escapes
        text = json.dumps(obj, ensure_ascii=True, indent=indent)
    return text + "\n"


def _dump_row(row: dict) -> str:
    return _dump_json(row, indent=None)


def write_fixed(report: CheckReport, out: str | os.PathLike) -> dict[str, Any]:
    """Write records without errors to ``out`` (LLaVA JSON) and the others, with reasons, to ``*.rejects.jsonl``.

    ``out`` stays directly trainable: when its folder contains the image folder, image paths are rewritten
    relative to ``out``'s folder; otherwise they keep pointing into the image folder and the returned
    ``image_folder_note`` (also in the report) says which ``--image-folder`` to train with.
    """
    out_p, rejects_p = _fix_paths(out, report.data)
    if not report.readable:
        report.fix = {"written": False, "reason": f"{report.data} could not be read as a list of records"}
        return report.fix
    root = Path(report.image_folder)
    out_dir = out_p.parent.resolve()
    note = None
    mode = image_path_mode(out_dir, root)
    if mode == "keep" and any(e.images for e in report.entries if not _has_error(e)):
        note = (
            f"image paths in {out_p} are relative to {root} (not to {out_p.parent}): train with "
            f"--image-folder {root}, or put the cleaned file in that folder"
        )

    def rewrite(rel: str) -> str:
        return rebase_image_path(rel, root, out_dir) if mode == "relative" else rel

    clean, rejects = [], []
    for ent in report.entries:
        if _has_error(ent):
            row: dict[str, Any] = {"index": ent.index}
            if ent.line:
                row["line"] = ent.line
            if isinstance(ent.raw, dict) and ent.raw.get("id") is not None:
                row["id"] = ent.raw["id"]
            row["reasons"] = [
                {
                    k: v
                    for k, v in (("kind", q.kind), ("field", q.field), ("message", q.message), ("image", q.image))
                    if v
                }
                for q in ent.errors
                if q.severity == ERROR
            ]
            row["record"] = ent.raw
            rejects.append(row)
        else:
            assert ent.record is not None
            clean.append(replace(ent.record, images=[rewrite(x) for x in ent.record.images]))
    assert len(clean) + len(rejects) == report.n_records  # nothing is dropped silently
    write_records(out_p, clean)
    atomic_write_text(rejects_p, "".join(_dump_row(r) for r in rejects))
    report.fix = {
        "written": True,
        "out": str(out_p),
        "rejects": str(rejects_p),
        "clean": len(clean),
        "rejected": len(rejects),
        "image_paths": {
            "same": "unchanged",
            "relative": "relative to the cleaned file's folder",
            "keep": f"relative to {root}",
        }[mode],  # fmt: skip
        "image_folder_note": note,
    }
    return report.fix


# --------------------------------------------------------------------------------------------------- CLI


@config
class CheckArgs:
    data: str | None = None
    """the dataset to check: a LLaVA or messages-format .json / .jsonl file (usually given as the first
    argument: llavatune check DATA)"""
    image_folder: str | None = None
    """folder that image paths are relative to (default: the data file's folder)"""
    model: str | None = None
    """the model to be trained, for its processor or tokenizer: a local folder or a hub id such as
    llava-hf/llava-1.5-7b-hf (only its tokenizer and processor files are fetched). Adds token-length statistics (an
    estimate: text tokens plus image tokens per image) and counts samples over --max-length"""
    max_length: int = 2048
    """maximum sequence length in tokens; longer samples are reported as warnings (needs --model)"""
    max_pixels: int = MAX_PIXELS
    """images with more pixels than this are errors (decompression-bomb guard)"""
    fix: str | None = None
    """write the records without errors to this .json file (LLaVA format, image paths valid relative to its
    folder where possible) and the rejected ones with their reasons to the same name with .rejects.jsonl"""
    json: str | None = None
    """also write the full machine-readable report (every problem) to this JSON file"""
    examples: int = 5
    """examples shown per problem kind"""
    workers: int = 8
    """threads used to open images"""

    def __post_init__(self):
        for name in ("max_length", "max_pixels", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be at least 1, got {getattr(self, name)}")
        if self.examples < 0:
            raise ConfigError(f"--examples: must be 0 or more, got {self.examples}")


def _positional_data(argv: Sequence[str]) -> list[str]:
    """Turn ``[CONFIG.yaml] DATA [flags]`` (DATA anywhere among the flags) into ``--data DATA``."""
    argv = list(argv)
    out: list[str] = []
    data: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-"):
            takes_value = "=" not in tok and tok not in ("-h", "--help") and i + 1 < len(argv)
            out += argv[i : i + 2] if takes_value else [tok]
            i += 2 if takes_value else 1
            continue
        if i == 0 and tok.endswith((".yaml", ".yml")):
            out.append(tok)
        else:
            data.append(tok)
        i += 1
    if len(data) > 1:
        raise ConfigError(f"give one dataset to check, got {len(data)}: {' '.join(data)}")
    return out + (["--data", data[0]] if data else [])


def main(argv: Sequence[str], prog: str = "llavatune check") -> int:
    (args,) = parse_config(
        [CheckArgs],
        _positional_data(argv),
        prog=prog,
        description="Validate a dataset (records, images, placeholders, lengths) and report every problem. "
        f"Usage: {prog} DATA [--flag value ...]. Exit 0 when there are no errors, 1 otherwise.",
    )
    if not args.data:
        raise ConfigError(f"give the dataset to check: {prog} DATA")
    if args.fix:
        _fix_paths(args.fix, args.data)  # refuse a bad --fix path before the (long) check
    report = check_dataset(
        args.data,
        image_folder=args.image_folder,
        model=args.model,
        max_length=args.max_length,
        max_pixels=args.max_pixels,
        workers=args.workers,
    )
    if args.fix:
        write_fixed(report, args.fix)
    if args.json:
        atomic_write_text(args.json, _dump_json(report.to_dict()))
    # undecodable input bytes (lone surrogates) must not crash the printout
    print(report.format(examples=args.examples).encode("utf-8", "backslashreplace").decode("utf-8"))
    return 0 if report.ok else 1

"""``llavatune check DATA``: validate a dataset before training and say exactly what is wrong.

    llavatune check data.json [--image-folder DIR] [--model MODEL] [--max-length 2048] [--truncation drop]
                              [--fix clean.json] [--json report.json]

Every record is checked and every problem is reported; nothing stops at the first bad record. The
report gives totals, counts per problem kind and a few examples of each kind, each naming the file
(``file:line`` for ``.jsonl``), the record (its id, or ``#index`` when it has none) and the field.

The checks are :func:`llavatune.data.records.validate_data`, the one validation ``train``, ``eval`` and
``predict --input`` run too: an error here is a record they skip (listed) or, past ``--max_bad_records``,
a file they refuse; a structural error (not JSON, not a list, not UTF-8, no records) is always refused.

Severities: **errors** make a record unusable (the command exits 1); **warnings** (samples longer than
``--max-length``, with what ``--truncation`` will do to them) and **info** (image modes that are converted
to RGB: CMYK, alpha, 16-bit, grayscale) are counted but allowed (exit 0).

``--fix OUT`` writes the records without errors to ``OUT`` (LLaVA JSON) and every rejected record, with
its reasons, to ``OUT`` with the suffix ``.rejects.jsonl``: nothing is dropped silently. Neither ``--fix``
nor ``--json`` may name the data file or one of its images.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from llavatune.config import ConfigError, config, parse_config
from llavatune.data.images import MAX_PIXELS
from llavatune.data.records import (
    ERROR,
    IMAGE_TOKEN,
    INFO,
    SEVERITIES,
    WARNING,
    Entry,
    Problem,
    Validation,
    validate_data,
    write_records,
)
from llavatune.data.templates import TemplateName
from llavatune.utils import UserError, atomic_write_text, check_output_file, image_path_mode, rebase_image_path

__all__ = ["Problem", "CheckReport", "check_dataset", "write_fixed", "CheckArgs", "main"]
_SEVERITIES = SEVERITIES


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
    entries: list[Entry] = field(default_factory=list, repr=False)
    image_files: list[Path] = field(default_factory=list, repr=False)

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


# ---------------------------------------------------------------------------------------------- lengths


def _load_processor(model: str, records=()):
    """``(processor or None, tokenizer)`` from a local model folder or hub id (never runs remote code), or for a
    built-in tiny model's name the processor ``train --model NAME`` builds: its tokenizer trained on ``records``."""
    from transformers import AutoProcessor, AutoTokenizer

    from llavatune.model.families import TINY_MODELS
    from llavatune.model.refs import resolve_model

    if model in TINY_MODELS:
        from llavatune.data.records import collect_texts
        from llavatune.model.tiny import tiny_processor

        processor = tiny_processor(model, collect_texts(records))
        return processor, processor.tokenizer

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


def _check_family(model: str, processor) -> None:
    """A processor of a family llavatune knows but does not train yet: one line, as ``train`` would say."""
    from llavatune.model.families import family_of_processor, require

    fam = family_of_processor(processor)
    if fam is not None and not fam.supported:
        require(fam.name, f"--model {model}")


def _outcome(encoder, rec, sizes, truncation: str) -> tuple[bool, str]:
    """``(over, what training does)`` for a sample the estimate puts over --max_length, from the real encoder
    with the configured truncation when there is one, else from the policy alone."""
    from llavatune.data.encode import SampleSkipped

    if encoder is None:
        if truncation == "truncate":
            return True, "training keeps the whole exchanges that fit (--truncation truncate)"
        return True, "training drops it (--truncation drop; --truncation truncate keeps the whole turns that fit)"
    try:
        f = encoder.fit(rec.conversations, sizes)
    except SampleSkipped as e:
        why = {
            "too-long": "training drops it (--truncation drop; --truncation truncate keeps the whole turns that fit)",
            "image-tokens-cut": "training drops it: truncating would cut through image tokens",
            "no-answer-tokens": "training drops it: no answer tokens would be left after truncation",
        }.get(e.kind, f"training drops it ({e})")
        return True, why
    total = len(f.input_ids)
    n_ex = sum(t.role == "gpt" for t in rec.conversations)
    kept = sum(t.role == "gpt" for t in f.turns)
    if f.cut:
        return True, (f"training cuts its answer short at {total} tokens (--truncation truncate; not even the first "
                      "exchange fits)")
    if kept < n_ex:
        return True, f"training keeps its first {kept} of {n_ex} exchanges, whole ({total} tokens; --truncation truncate)"
    return False, f"encoded exactly with the template it is {total} tokens and fits: kept as is"


def _measure_lengths(report: CheckReport, entries: list[Entry], model: str, max_length: int, root: Path,
                     truncation: str = "drop", template: str = "auto") -> None:
    # imported here: encode imports torch, which only --model needs (a plain check starts ~1.3 s faster)
    from llavatune.data.encode import (
        Encoder,
        SampleSkipped,
        anyres_image_tokens,
        has_variable_image_tokens,
        image_size,
        image_tokens_per_image,
    )
    from llavatune.utils import resolve_under

    processor, tokenizer = _load_processor(model, [e.record for e in entries])
    if processor is not None:
        _check_family(model, processor)
    note = None
    encoder = None
    if processor is not None:
        try:
            encoder = Encoder(processor, template=template, max_length=max_length, truncation=truncation)
        except (ValueError, TypeError):
            encoder = None
    try:
        if encoder is not None and encoder.by_processor:
            # dynamic resolution (Qwen-VL), begin/end markers (Gemma 3): the processor's own count, per image size
            per_image, note = "varies", "counted per image from its size, as the processor expands it"
        else:
            per_image = image_tokens_per_image(processor) if processor is not None else 0
        if processor is None:
            note = "tokenizer only: image tokens not counted"
    except ValueError as e:
        per_image, note = 0, f"image tokens not counted: {e}"
    clean = [e for e in entries if e.record is not None and e.ok]
    texts = ["\n".join(t.value.replace(IMAGE_TOKEN, "") for t in e.record.conversations) for e in clean]
    n_text: list[int] = []
    for start in range(0, len(texts), 1000):
        n_text += [len(ids) for ids in tokenizer(texts[start : start + 1000], add_special_tokens=True)["input_ids"]]
    totals = []
    over = 0
    # LLaVA-NeXT tiles each image by its size, Qwen-VL resizes it to a multiple of its patch grid: count its real
    # tokens from the image header
    variable = processor is not None and (has_variable_image_tokens(processor) or (encoder is not None and
                                                                                  encoder.variable_image_tokens))
    for ent, nt in zip(clean, n_text):
        sizes = None
        if variable and ent.record.images:
            sizes = [image_size(resolve_under(root, p)) for p in ent.record.images]
            if encoder is not None:
                try:
                    n_img = sum(encoder.image_token_counts(sizes, len(sizes)))
                except SampleSkipped as e:  # an image size the processor refuses: training skips the sample
                    ent.add(WARNING, e.kind, f"{e}; training skips it")
                    n_img = 0
            else:
                n_img = sum(anyres_image_tokens(processor, sizes))
        else:
            n_img = per_image * len(ent.record.images) if isinstance(per_image, int) else 0
        total = nt + n_img
        totals.append(total)
        if total > max_length:
            over += 1
            _, what = _outcome(encoder, ent.record, sizes, truncation)
            ent.add(WARNING, "too-long",
                    f"about {total} tokens ({nt} text + {n_img} image), over --max_length {max_length}; {what}")
    stats: dict[str, Any] = {
        "model": model,
        "image_tokens_per_image": per_image,
        "image_tokens_note": note,
        "max_length": max_length,
        "truncation": truncation,
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
    workers: int | None = None,
    progress: bool | None = None,
    truncation: str = "drop",
    template: str = "auto",
) -> CheckReport:
    """Check every record and image of a LLaVA / messages ``.json`` or ``.jsonl`` file.

    The records and images go through :func:`~llavatune.data.records.validate_data`, the same validation
    ``train``, ``eval`` and ``predict --input`` use: what is an error here is skipped or refused there.
    ``image_folder`` defaults to the data file's folder. With ``model`` (a local folder or hub id with a
    processor or tokenizer, or a built-in tiny model's name) the report adds token-length statistics, an estimate (see :func:`image_tokens_per_image`), and
    says what the configured ``truncation`` does to each over-long sample. ``progress``: ``None`` shows a progress
    bar for large image sets on a terminal. Raises :class:`~llavatune.utils.UserError` only when the check cannot
    run at all (file or folder missing).
    """
    from llavatune.model.families import TINY_MODELS

    if model and model not in TINY_MODELS:  # a typo'd path or an unreachable hub id: one line now, not after every image was read
        from llavatune.model.families import check_folder
        from llavatune.model.refs import resolve_model

        check_folder(resolve_model(model, "--model"), "--model")
    v: Validation = validate_data(path, image_folder, purpose="train", max_pixels=max_pixels, workers=workers,
                                  progress=progress, workers_flag="--workers")
    report = CheckReport(data=str(v.data), image_folder=str(v.image_folder), readable=v.readable)
    report.entries = v.entries
    report.n_records = len(v.entries)
    report.n_image_refs, report.n_image_files = v.n_image_refs, v.n_image_files
    report.n_bad_image_files, report.image_modes = v.n_bad_image_files, v.image_modes
    report.image_files = list(v.image_files)
    if v.readable and model:
        _measure_lengths(report, v.entries, model, max_length, v.image_folder, truncation, template)
    report.problems = v.all_problems()
    report.n_clean = sum(1 for e in v.entries if e.ok)
    return report


# --------------------------------------------------------------------------------------------------- fix


def _fix_paths(out: str | os.PathLike, data: str | os.PathLike) -> tuple[Path, Path]:
    out_p = Path(out)
    if out_p.suffix == ".jsonl":
        raise UserError(f"--fix {out}: the cleaned copy is a LLaVA JSON list; give a path ending in .json")
    rejects = out_p.with_suffix(".rejects.jsonl")
    check_output_file(out_p, {"--data": data}, "--fix")
    check_output_file(rejects, {"--data": data}, f"--fix {out} (its rejects file)")
    return out_p, rejects


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
    if mode == "keep" and any(e.images for e in report.entries if e.ok):
        note = (
            f"image paths in {out_p} are relative to {root} (not to {out_p.parent}): train with "
            f"--image-folder {root}, or put the cleaned file in that folder"
        )

    def rewrite(rel: str) -> str:
        return rebase_image_path(rel, root, out_dir) if mode == "relative" else rel

    clean, rejects = [], []
    for ent in report.entries:
        if not ent.ok:
            rejects.append(ent.reject_row())
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
    """the model to be trained, for its processor or tokenizer: a local folder, a hub id such as
    llava-hf/llava-1.5-7b-hf (only its tokenizer and processor files are fetched), or a built-in tiny model ('tiny',
    'tiny-qwen2_5_vl', ...: its tokenizer trained on this file's text, as train builds it). Adds token-length statistics (an
    estimate: text tokens plus image tokens per image), counts samples over --max-length and says what --truncation
    does to each"""
    max_length: int = 2048
    """maximum sequence length in tokens; longer samples are reported as warnings (needs --model)"""
    truncation: str = "drop"
    """what training will do with over-long samples, as train's --truncation: 'drop' them or 'truncate' them to
    the whole exchanges that fit (needs --model)"""
    template: TemplateName = "auto"
    """prompt template training will use, as train's --template (needs --model): auto (the one recorded in a
    llavatune checkpoint, else the model's chat template, else vicuna_v1) or a named template"""
    max_pixels: int = MAX_PIXELS
    """images with more pixels than this are errors (decompression-bomb guard)"""
    fix: str | None = None
    """write the records without errors to this .json file (LLaVA format, image paths valid relative to its
    folder where possible) and the rejected ones with their reasons to the same name with .rejects.jsonl"""
    json: str | None = None
    """also write the full machine-readable report (every problem) to this JSON file"""
    examples: int = 5
    """examples shown per problem kind"""
    workers: int | None = None
    """processes that verify images in parallel (default: one per available CPU core)"""
    show: int = 0
    """print the first N records without errors as the model sees them (needs --model): the exact text given to the
    tokenizer (no BOS, <image> unexpanded) with the supervised spans marked, and token counts; with --json the report
    gains "shown" (see llavatune.data.show)"""

    def __post_init__(self):
        if self.show < 0 or (self.show and not self.model):
            raise ConfigError("--show N: N must be 0 or more, and --show needs --model (its tokenizer and template "
                              "decide what the model sees)")
        for name in ("max_length", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be at least 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {self.workers}")
        if self.examples < 0:
            raise ConfigError(f"--examples: must be 0 or more, got {self.examples}")
        if self.truncation not in ("drop", "truncate"):
            raise ConfigError(f"--truncation: choose drop or truncate, got {self.truncation!r}")


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


def _check_outputs(args: CheckArgs, images: Sequence[Path] = ()) -> None:
    """--json / --fix may not land on the data file, on an image, or on each other."""
    inputs: dict[str, Any] = {"--data": args.data}
    if images:
        inputs["an image of the dataset"] = list(images)
    if args.json:
        check_output_file(args.json, inputs, "--json")
    if args.fix:
        fix, rejects = _fix_paths(args.fix, args.data)
        check_output_file(fix, inputs, "--fix")
        check_output_file(rejects, inputs, f"--fix {args.fix} (its rejects file)")
        if args.json and Path(os.path.realpath(args.json)) in (Path(os.path.realpath(fix)),
                                                               Path(os.path.realpath(rejects))):
            raise UserError(f"--json {args.json}: the same file as --fix writes; choose another path")


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
    _check_outputs(args)  # refuse a bad --fix / --json path before the (long) check
    report = check_dataset(
        args.data,
        image_folder=args.image_folder,
        model=args.model,
        max_length=args.max_length,
        max_pixels=args.max_pixels,
        workers=args.workers,
        truncation=args.truncation,
        template=args.template,
    )
    _check_outputs(args, report.image_files)
    if args.fix:
        write_fixed(report, args.fix)
    shown = None
    if args.show:
        from llavatune.data.show import show_for_check

        shown = show_for_check(report, args.model, args.template, args.show, args.max_length)
    if args.json:
        atomic_write_text(args.json, _dump_json({**report.to_dict(), **({"shown": shown.to_json()} if shown else {})}))
    # undecodable input bytes (lone surrogates) must not crash the printout
    print(report.format(examples=args.examples).encode("utf-8", "backslashreplace").decode("utf-8"))
    if shown:
        print("\n" + shown.format())
    return 0 if report.ok else 1

"""Writing a prepared dataset: the output options, image placement (hard links, never re-encoded), the train/val
split by image, ``--group-by-image``, and the report (``prepare_report.json``, ``rejects.jsonl``, the resolved
options, the printed summary)."""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from llavatune.config import ConfigError, config, save_resolved
from llavatune.data.prepare.items import Item, Opened, Reject, require
from llavatune.data.records import IMAGE_TOKEN, DataError, Record, Turn, write_records
from llavatune.files import CONFIG_FILE, PREPARE_REJECTS_FILE, PREPARE_REPORT_FILE
from llavatune.utils import UserError, atomic_write_json, atomic_write_text, prepare_output_dir, progress

MAX_PRINTED_REJECTS = 10


@config
class OutputOptions:
    out: Optional[str] = None
    """Output folder (required). Receives data.json (LLaVA format), images/, prepare_report.json, the
    resolved options (llavatune_config.yaml) and, when a record was skipped, rejects.jsonl."""
    overwrite: bool = False
    """Replace a non-empty --out folder. Without it a non-empty folder is refused."""
    val_fraction: float = 0.0
    """Hold out this fraction of the images, with all their questions, as a validation split: writes
    DIR/train/ and DIR/val/, each with its own data.json and images/. 0 keeps everything in DIR/data.json."""
    seed: int = 0
    """Seed of the train/val split; the same input, fraction and seed always give the same split."""
    limit: Optional[int] = None
    """Keep only the first N usable records (a quick trial run)."""
    strict: bool = False
    """Stop with an error at the first record whose image is missing, instead of skipping it and listing it
    in rejects.jsonl."""
    max_skipped: float = 0.5
    """Fail (exit 1, nothing written) when more than this fraction of the records read is skipped (missing or
    unusable images: usually a wrong --images / --image-root). A run that keeps no record always fails."""
    group_by_image: bool = False
    """Write one multi-turn record per image holding all its questions (the <image> placeholder in the first
    turn only, question order shuffled with --seed), as LLaVA-1.5's training mix stores VQA data: the image
    and its prompt prefix are then encoded once per image instead of once per question. Each question's id,
    answers and types are kept in the record's 'turns' list, so eval still scores every question. Trade-offs:
    an epoch has fewer, longer samples (divide --per_device_train_batch_size or raise the learning rate
    accordingly), and answers to later questions see the earlier ones. See docs/data.md."""
    max_turns_per_record: int = 10
    """With --group-by-image: at most this many questions per record; an image with more is split into
    several records (each with the image)."""

    def __post_init__(self):
        require(self.out, "out", "the folder to write data.json and images/ into")
        if not 0.0 <= self.max_skipped <= 1.0:
            raise ConfigError(f"--max-skipped must be a fraction in [0, 1], got {self.max_skipped}")
        if self.max_turns_per_record < 1:
            raise ConfigError(f"--max-turns-per-record must be a positive number of questions, got {self.max_turns_per_record}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be a positive number of records, got {self.limit}")


class ImagePlacer:
    """Put each image into the output: hard link, falling back to a copy; never re-encode."""

    def __init__(self) -> None:
        self.can_link = True
        self.linked = self.copied = self.moved = 0
        self._dirs: set[Path] = set()

    def place(self, src: Path, dst: Path, move: bool = False) -> None:
        if dst.parent not in self._dirs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(dst.parent)
        try:
            if move:
                os.replace(src, dst)
                self.moved += 1
                return
            if self.can_link:
                try:
                    os.link(src, dst)
                    self.linked += 1
                    return
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        raise
                    if e.errno == errno.EXDEV:  # another file system: stop trying
                        self.can_link = False
            shutil.copy2(src, dst)
            self.copied += 1
        except FileNotFoundError:
            raise UserError(f"image {src} disappeared while preparing the dataset") from None


def split_items(items: list[Item], fraction: float, seed: int) -> dict[str, list[Item]]:
    """Deterministic train/val split by image (an image's questions stay together)."""
    if fraction <= 0:
        return {"": items}
    keys = sorted({it.dest for it in items})
    if len(keys) < 2:
        raise UserError(f"--val-fraction needs at least 2 distinct images; the data has {len(keys)}")
    rng = random.Random(seed)
    rng.shuffle(keys)
    n_val = min(max(1, round(fraction * len(keys))), len(keys) - 1)
    val = set(keys[:n_val])
    return {"train": [it for it in items if it.dest not in val], "val": [it for it in items if it.dest in val]}


def group_items(items: list[Item], max_turns: int, seed: int) -> list[list[Item]]:
    """``--group-by-image``: the questions of each image (images in order of first appearance), shuffled with
    ``seed`` (the same input and seed always give the same order), in chunks of at most ``max_turns``."""
    by_image: dict[str, list[Item]] = {}
    for it in items:
        by_image.setdefault(it.dest, []).append(it)
    rng = random.Random(seed)
    groups = []
    for its in by_image.values():
        its = list(its)
        rng.shuffle(its)
        groups += [its[k : k + max_turns] for k in range(0, len(its), max_turns)]
    return groups


def grouped_record(items: list[Item], image: str) -> Record:
    """One multi-turn record for questions about one image: ``<image>`` only in the first human turn (LLaVA-1.5's
    layout), each question's own id and fields (question_id, answers, types, ...) in ``turns``, in turn order."""
    conversations = []
    for k, it in enumerate(items):
        question = it.question
        if k and question.startswith(IMAGE_TOKEN):
            question = question[len(IMAGE_TOKEN):].lstrip("\n")
        conversations += [Turn("human", question), Turn("gpt", it.answer)]
    rid = items[0].id if len(items) == 1 else f"{items[0].id}+{len(items) - 1}"
    return Record(id=rid, conversations=conversations, images=[image],
                  extra={"turns": [{"id": it.id, **it.extra} for it in items]})


def check_out_vs_inputs(out: Path, inputs: dict[str, str]) -> None:
    out_r = out.resolve()
    for name, value in inputs.items():
        p = Path(value).resolve()
        if p == out_r or out_r in p.parents:
            raise UserError(
                f"--out {out} contains the input {value} (--{name.replace('_', '-')}); "
                "write the prepared data to another folder"
            )


def write_dataset(source: str, opened: Opened, opts: Any, out_opts: OutputOptions) -> dict[str, Any]:
    """Write the usable questions of an opened source (``opts``: its options) into ``out_opts.out``: collect them,
    refuse a run that keeps too few, place the images and write each split, then the report (also returned)."""
    t0 = time.perf_counter()
    try:
        out = Path(out_opts.out)
        check_out_vs_inputs(out, opened.inputs)
        created = not out.exists()
        out = prepare_output_dir(out, overwrite=out_opts.overwrite, kind="prepare", flag="--out",
                                 inputs={f"--{k.replace('_', '-')}": v for k, v in opened.inputs.items()})
        stage = out / ".staging"
        items, rejects, read = collect(source, opened, stage, out_opts)
        problem = _too_few(source, read, items, rejects, out_opts.max_skipped)
        if problem:
            shutil.rmtree(stage, ignore_errors=True)
            if created:  # made by this run: only the (removed) staging area and the output marker are in it
                shutil.rmtree(out, ignore_errors=True)
            print_rejects([r.to_json() for r in rejects[:MAX_PRINTED_REJECTS]], len(rejects), None)
            raise UserError(problem)
        placer = ImagePlacer()
        outputs, counts_by_split = write_splits(items, out, out_opts, placer)
        shutil.rmtree(stage, ignore_errors=True)
    finally:
        if opened.cleanup:
            opened.cleanup()
    if rejects:
        atomic_write_text(out / PREPARE_REJECTS_FILE, "".join(json.dumps(r.to_json()) + "\n" for r in rejects))
        outputs["rejects"] = str(out / PREPARE_REJECTS_FILE)
    report = _report(source, opened, opts, out_opts, read, items, rejects, placer, outputs, counts_by_split,
                     time.perf_counter() - t0)
    atomic_write_json(out / PREPARE_REPORT_FILE, report)
    save_resolved(out / CONFIG_FILE, {source: opts, "output": out_opts},
                  command=f"llavatune prepare {source} {out / CONFIG_FILE}")
    return report


def collect(source: str, opened: Opened, stage: Path, out_opts: OutputOptions) -> tuple[list[Item], list[Reject], int]:
    """``(usable questions, skipped records, records read)`` of an opened source, up to ``--limit`` usable ones.

    ``--strict`` turns the first skipped record into the error; a repeated id is always one."""
    items: list[Item] = []
    rejects: list[Reject] = []
    ids: dict[str, str] = {}
    read = 0
    for x in progress(opened.iterate(stage), total=opened.total, desc=f"prepare {source}", unit="rec"):
        read += 1
        if isinstance(x, Reject):
            if out_opts.strict:
                raise x.error()
            rejects.append(x)
            continue
        if x.id in ids:
            raise DataError(opened.inputs.get("input") or opened.inputs.get("questions"), x.ref, "id",
                            f"duplicate id {x.id!r} (also used by {ids[x.id]})")
        ids[x.id] = x.ref
        items.append(x)
        if out_opts.limit and len(items) >= out_opts.limit:
            break
    return items, rejects, read


def write_splits(items: list[Item], out: Path, out_opts: OutputOptions,
                 placer: ImagePlacer) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Each split's ``images/`` and ``data.json`` (written last: no data.json means an unfinished run).

    Returns ``(output files by name, counts by split)``."""
    outputs: dict[str, str] = {}
    counts_by_split: dict[str, dict[str, int]] = {}
    for name, its in split_items(items, out_opts.val_fraction, out_opts.seed).items():
        base = out / name if name else out
        placed: dict[str, str] = {}
        for it in progress(its, total=len(its), desc=f"images {name or 'all'}", unit="rec"):
            if it.dest not in placed:
                placed[it.dest] = f"images/{it.dest}"
                placer.place(it.image, base / placed[it.dest], move=it.staged)
        if out_opts.group_by_image:
            groups = group_items(its, out_opts.max_turns_per_record, out_opts.seed)
            records = [grouped_record(g, placed[g[0].dest]) for g in groups]
        else:
            records = [Record(id=it.id, conversations=[Turn("human", it.question), Turn("gpt", it.answer)],
                              images=[placed[it.dest]], extra=it.extra) for it in its]
        base.mkdir(parents=True, exist_ok=True)
        write_records(base / "data.json", records)
        outputs[name or "data"] = str(base / "data.json")
        counts_by_split[name or "all"] = {"records": len(records), "questions": len(its), "images": len(placed)}
    return outputs, counts_by_split


def _report(source: str, opened: Opened, opts: Any, out_opts: OutputOptions, read: int, items: list[Item],
            rejects: list[Reject], placer: ImagePlacer, outputs: dict[str, str],
            counts_by_split: dict[str, dict[str, int]], seconds: float) -> dict[str, Any]:
    """``prepare_report.json``: inputs, options, counts, skipped records by reason (and the first 20), outputs."""
    from llavatune import __version__

    return {
        "source": source,
        "inputs": opened.inputs,
        "options": {**dataclasses.asdict(opts), **dataclasses.asdict(out_opts)},
        "counts": {
            "read": read,
            "records": sum(c["records"] for c in counts_by_split.values()),
            "questions": len(items),
            "skipped": len(rejects),
            "images": placer.linked + placer.copied + placer.moved,
            "images_linked": placer.linked,
            "images_copied": placer.copied,
            "images_written": placer.moved,
            "splits": counts_by_split,
            **opened.stats,
        },
        "skipped_by_reason": dict(collections.Counter(r.reason for r in rejects)),
        "skipped_examples": [r.to_json() for r in rejects[:20]],
        "outputs": outputs,
        "seconds": round(seconds, 3),
        "llavatune_version": __version__,
    }


def _too_few(source: str, read: int, items: list, rejects: list[Reject], max_skipped: float) -> str | None:
    """Why the conversion must fail instead of writing a dataset (no record kept, or too many skipped), or None."""
    if read == 0:
        return f"prepare {source}: the input holds no records; nothing written"
    if items and len(rejects) <= max_skipped * read:
        return None
    reasons = ", ".join(f"{n} {k}" for k, n in collections.Counter(r.reason for r in rejects).items())
    first = rejects[0]
    what = ("no usable record" if not items else
            f"{len(rejects)} of {read} records skipped, more than --max-skipped {max_skipped:g} allows")
    return (f"prepare {source}: {what} ({reasons}; e.g. {first.file}: record {first.ref}: {first.message}); nothing "
            "written. Check --images / --image-root (or raise --max-skipped)")


def print_rejects(rows: list[dict[str, Any]], total: int, out: str | None) -> None:
    """The first skipped records (``Reject.to_json`` rows) on stderr, and how many more there are."""
    for r in rows[:MAX_PRINTED_REJECTS]:
        sys.stderr.write(f"skipped {r['file']}: record {r['record']}: {r['message']}\n")
    if total > MAX_PRINTED_REJECTS:
        where = f" (see {out}/rejects.jsonl)" if out else ""
        sys.stderr.write(f"... and {total - MAX_PRINTED_REJECTS} more skipped{where}\n")


def print_summary(report: dict[str, Any], out: str) -> None:
    c = report["counts"]
    print_rejects(report["skipped_examples"], c["skipped"], out)
    how = ", ".join(
        f"{n} {k}"
        for k, n in (("linked", c["images_linked"]), ("copied", c["images_copied"]), ("written", c["images_written"]))
        if n
    )
    split = "; ".join(f"{k}: {v['records']} records, {v['images']} images" for k, v in c["splits"].items())
    grouped = f" ({c['questions']} questions grouped by image)" if c["questions"] != c["records"] else ""
    print(
        f"prepared {c['records']} records{grouped} from {report['source']} ({c['read']} read, {c['skipped']} skipped"
        + (f": {', '.join(f'{n} {k}' for k, n in report['skipped_by_reason'].items())}" if c["skipped"] else "")
        + f") in {report['seconds']:.1f}s"
    )
    print(f"  {split}; images {how or 'none'}")
    for name, path in report["outputs"].items():
        print(f"  {name}: {path}")
    print(f"  report: {Path(out) / 'prepare_report.json'}")

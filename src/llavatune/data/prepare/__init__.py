"""``llavatune prepare SOURCE``: convert a dataset into LLaVA JSON + an images folder.

    llavatune prepare okvqa --questions OpenEnded_mscoco_val2014_questions.json \\
        --annotations mscoco_val2014_annotations.json --images coco/ --out data/okvqa_val
    llavatune prepare csv --input qa.csv --image-column file --out data/mine --val-fraction 0.1

Output (``--out DIR``)::

    DIR/data.json            LLaVA format; image paths relative to DIR ("images/COCO_val2014_...jpg")
    DIR/images/              each distinct image once: a hard link to the source (a copy across
                             file systems); never decoded or re-encoded
    DIR/prepare_report.json  counts, skipped records by reason, inputs and options
    DIR/rejects.jsonl        one line per skipped record (only when something was skipped)
    DIR/llavatune_config.yaml  the resolved options (feed it back: llavatune prepare SOURCE FILE.yaml)

With ``--val-fraction F`` the images (with all their questions, so no image is in both splits) are split
deterministically into ``DIR/train/`` and ``DIR/val/``, each a self-contained ``data.json`` + ``images/``.

Speed and memory: OK-VQA / VQAv2 / CSV / JSONL conversion never opens an image; the COCO folder is
listed once and images are linked, so memory does not grow with image bytes. The ``hf`` source writes
embedded image bytes out as files exactly as stored (the format sniffed from the bytes).

One module per source family, one for writing; this one holds the command:

- ``vqa``: the official OK-VQA / VQAv2 questions + annotations files and the COCO image index;
- ``tables``: CSV / TSV and JSON Lines tables of image path, question and answer;
- ``hf``: local Hugging Face datasets (``save_to_disk`` folders, parquet);
- ``items``: what every source yields (``Item``, ``Reject``, ``Opened``);
- ``write``: the output options, image placement, the split, ``--group-by-image`` and the report.

A new source is a module with an options dataclass and an ``open_...(options) -> Opened`` function, plus one
``SOURCES`` entry below.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from llavatune.config import ConfigError, parse_config
from llavatune.data.prepare.hf import HfOptions, image_extension, open_hf
from llavatune.data.prepare.items import VQA_SUFFIX, Item, Opened, Reject, majority_answer
from llavatune.data.prepare.tables import CsvOptions, JsonlOptions, open_csv, open_jsonl, parse_answer_list
from llavatune.data.prepare.vqa import OkvqaOptions, Vqav2Options, index_coco_images, open_vqa
from llavatune.data.prepare.write import OutputOptions, print_summary, write_dataset

__all__ = ["SOURCES", "Source", "run_prepare", "main", "OutputOptions", "OkvqaOptions", "Vqav2Options", "CsvOptions",
           "JsonlOptions", "HfOptions", "Item", "Reject", "Opened", "VQA_SUFFIX", "majority_answer", "parse_answer_list",
           "image_extension", "index_coco_images"]


@dataclass(frozen=True)
class Source:
    options: type
    open: Callable[[Any], Opened]
    summary: str
    description: str


SOURCES: dict[str, Source] = {
    "okvqa": Source(
        OkvqaOptions,
        lambda o: open_vqa(o, "okvqa"),
        "OK-VQA official questions + annotations + COCO images",
        "Convert the official OK-VQA files. The answer learned is the most frequent of the 10 annotator "
        "answers (ties: the earliest); all 10 are kept as 'answers' for VQA scoring, with question_id, "
        "image_id, question_type and answer_type. Record ids are okvqa-QUESTION_ID.",
    ),
    "vqav2": Source(
        Vqav2Options,
        lambda o: open_vqa(o, "vqav2"),
        "VQAv2 official questions + annotations + COCO images",
        "Convert the official VQAv2 files. The answer learned is the most frequent of the 10 annotator "
        "answers (ties: the earliest); all 10 are kept as 'answers', with multiple_choice_answer, question_id, "
        "image_id, question_type and answer_type. Record ids are vqav2-QUESTION_ID.",
    ),
    "csv": Source(
        CsvOptions,
        open_csv,
        "a CSV/TSV table of image path, question, answer",
        "Convert a CSV (or TSV) file with a header row: one row per question, with an image path column, a "
        "question column and an answer column; optional id and reference-answers columns.",
    ),
    "jsonl": Source(
        JsonlOptions,
        open_jsonl,
        "a JSON Lines file of {image, question, answer} objects",
        "Convert a JSON Lines file (or a .json list): one object per question, with image path, question "
        "and answer keys; optional id and reference-answers keys.",
    ),
    "hf": Source(
        HfOptions,
        open_hf,
        "a local Hugging Face dataset (save_to_disk folder or parquet)",
        "Convert a local Hugging Face dataset, read with the datasets library without any download. Embedded "
        "image bytes are written out as files exactly as stored (named by their hash, so repeated images are "
        "stored once); path-only images are linked.",
    ),
}


def run_prepare(source: str, opts: Any, out_opts: OutputOptions) -> dict[str, Any]:
    """Convert ``source`` (options ``opts``) into ``out_opts.out``; return the report (also written)."""
    return write_dataset(source, SOURCES[source].open(opts), opts, out_opts)


def _usage() -> str:
    width = max(map(len, SOURCES))
    lines = [
        "usage: llavatune prepare SOURCE [CONFIG.yaml] [--flag value ...] --out DIR",
        "",
        "Convert a dataset into LLaVA JSON: DIR/data.json (image paths relative to DIR), DIR/images/ (each",
        "image once, hard-linked, never re-encoded), DIR/prepare_report.json and, for skipped records,",
        "DIR/rejects.jsonl. --val-fraction F writes DIR/train/ and DIR/val/ instead.",
        "",
        "sources:",
    ]
    lines += [f"  {name:<{width}}  {s.summary}" for name, s in SOURCES.items()]
    lines += [
        "",
        "common options: --out DIR (required), --overwrite, --val-fraction F, --seed N, --limit N, --strict,",
        "  --max-skipped F (fail when more than this fraction of the records is skipped; default 0.5)",
        "  --group-by-image [--max-turns-per-record N] (one multi-turn record per image)",
        "Run 'llavatune prepare SOURCE --help' for a source's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str], prog: str = "llavatune prepare") -> int:
    argv = list(argv)
    if not argv:
        sys.stderr.write(_usage() + "\n")
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    source, rest = argv[0], argv[1:]
    if source not in SOURCES:
        import difflib

        hint = difflib.get_close_matches(source, SOURCES, n=1)
        extra = f"did you mean '{hint[0]}'? " if hint else ""
        raise ConfigError(f"unknown source '{source}'; {extra}choose one of {', '.join(SOURCES)}")
    spec = SOURCES[source]
    opts, out_opts = parse_config(
        [spec.options, OutputOptions], rest, prog=f"{prog} {source}", description=spec.description
    )
    report = run_prepare(source, opts, out_opts)
    print_summary(report, out_opts.out)
    return 0

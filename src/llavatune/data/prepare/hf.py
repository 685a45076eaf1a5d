"""Local Hugging Face datasets (``prepare hf``): a ``save_to_disk`` folder, a ``.parquet`` file, a folder of them or
a glob, read with the datasets library without any download. Embedded image bytes are written out as files exactly
as stored (named by their hash, the format sniffed from the bytes); path-only images are linked."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from llavatune._compat import streaming_features
from llavatune.config import config
from llavatune.data.prepare.items import Item, Opened, Reject, require
from llavatune.data.prepare.tables import Columns, image_root, row_item
from llavatune.data.records import DataError


@config
class HfOptions:
    input: Optional[str] = None
    """A local Hugging Face dataset: a folder written by save_to_disk(), a .parquet file, a folder of
    .parquet files or a glob such as 'data/*.parquet' (required). Nothing is downloaded."""
    split: Optional[str] = None
    """Split to convert when the folder holds a DatasetDict (default: its only split)."""
    image_column: str = "image"
    """Column holding the image: an Image feature, a {'bytes', 'path'} dict, raw bytes or a path."""
    question_column: str = "question"
    """Column holding the question."""
    answer_column: str = "answer"
    """Column holding the answer the model learns. May be absent when --answers-column is given: the most
    frequent of those answers is used."""
    answers_column: Optional[str] = None
    """Optional column with all reference answers (a list of strings or of {'answer': ...} dicts, or
    '|'-separated text). Kept as the record's 'answers'."""
    id_column: Optional[str] = None
    """Optional column with a unique record id (default: NAME-INDEX)."""
    image_root: Optional[str] = None
    """Folder that path-only images are relative to (default: the dataset's folder). Paths escaping it are
    refused."""
    prompt_suffix: str = ""
    """Text appended on its own line after each question, e.g. 'Answer the question using a single word or
    phrase.' (default: none)."""

    def __post_init__(self):
        require(self.input, "input", "the save_to_disk folder or parquet file(s)")


_MAGIC = [
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
]


def image_extension(data: bytes) -> str | None:
    """File extension for encoded image ``data`` (from its magic bytes; Pillow as a fallback)."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:
        return None
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}" if fmt else None)


def _load_hf(opts: HfOptions, tmp: Callable[[], Path]):
    """The dataset to iterate (a Dataset or an IterableDataset), its length and its folder."""
    import glob

    import datasets

    spec = opts.input
    p = Path(spec)
    if p.is_dir() and (
        (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()
    ):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises many types; report one line
            raise DataError(p, None, None, f"could not load the saved dataset: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            split = opts.split or (splits[0] if len(splits) == 1 else None)
            if split is None or split not in ds:
                what = f"no split {opts.split!r}" if opts.split else "several splits"
                raise DataError(p, None, "split", f"{what}; choose one with --split ({', '.join(splits)})")
            ds = ds[split]
        return ds, len(ds), p
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.parquet"))
        base = p
    elif p.is_file():
        files, base = [str(p)], p.parent
    else:
        files, base = sorted(glob.glob(spec)), Path(spec).parent
    if not files:
        raise DataError(
            p,
            None,
            None,
            "not found: expected a save_to_disk folder, a .parquet file, a folder of "
            ".parquet files or a glob (--input)",
        )
    if not all(f.endswith(".parquet") for f in files):
        raise DataError(p, None, None, "only .parquet files (or a save_to_disk folder) are supported by the hf source")
    try:
        import pyarrow.parquet as pq

        n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True, cache_dir=str(tmp()))
    except Exception as e:  # noqa: BLE001
        raise DataError(p, None, None, f"could not read the parquet file(s): {e}") from None
    return ds, n, base


class _TempDir:
    """A temporary folder made on first use (the datasets cache of a parquet stream), removed by ``cleanup``."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def __call__(self) -> Path:
        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix="llavatune-hf-"))
        return self.path

    def cleanup(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _image_value(value, src: Path, ref: str, column: str) -> tuple[bytes | None, str | None]:
    """``(encoded bytes, path)`` of a row's image: an Image feature's ``{'bytes', 'path'}``, raw bytes, a path, or a
    decoded PIL image (its file, else stored losslessly as PNG)."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    if value is not None and hasattr(value, "save"):  # a PIL image (only without decode=False)
        fname = getattr(value, "filename", "")
        if fname and Path(fname).is_file():
            return None, fname
        buf = io.BytesIO()  # no encoded bytes exist: store losslessly
        value.save(buf, format="PNG")
        return buf.getvalue(), None
    if value is not None:
        raise DataError(src, ref, column, f"expected an image, bytes or a path, got {type(value).__name__}")
    return None, None


def _columns_checked(opts: HfOptions, ds, src: Path, tmp: _TempDir):
    """The dataset reduced to the columns the conversion reads (a missing one is an error naming the others), image
    features left undecoded; and its column names."""
    import datasets

    try:
        ds = streaming_features(ds)  # streaming without a known schema: resolved from the first rows
    except BaseException:
        tmp.cleanup()
        raise
    features = ds.features
    names = list(features)
    cols = Columns(opts.image_column, opts.question_column, opts.answer_column, opts.answers_column, opts.id_column,
                   "column")
    for name, flag in cols.required():
        if name not in names:
            tmp.cleanup()
            raise DataError(src, None, name, f"column not found; the dataset has: {', '.join(names)} (set --{flag})")
    wanted = [opts.image_column, opts.question_column, opts.answer_column, opts.answers_column, opts.id_column]
    ds = ds.select_columns([c for c in dict.fromkeys(wanted) if c and c in names])
    if isinstance(features[opts.image_column], datasets.Image):
        ds = ds.cast_column(opts.image_column, datasets.Image(decode=False))
    return ds, cols, names


def open_hf(opts: HfOptions) -> Opened:
    """The rows of a local Hugging Face dataset as questions: embedded image bytes are staged as files named by their
    hash (moved into the output later), path-only images resolve under ``--image-root``."""
    tmp = _TempDir()
    try:
        ds, n, base = _load_hf(opts, tmp)
    except BaseException:
        tmp.cleanup()
        raise
    src = Path(opts.input)
    ds, cols, names = _columns_checked(opts, ds, src, tmp)
    root = image_root(opts.image_root, base)
    answer_col = opts.answer_column if opts.answer_column in names else "\0absent"
    table_cols = dataclasses.replace(cols, image="\0image", answer=answer_col)
    stem = src.stem if src.suffix else src.name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "hf"
    written: set[str] = set()

    def iterate(stage: Path) -> Iterator[Item | Reject]:
        stage.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(ds):
            ref = f"row {i}"
            rid = str(row[opts.id_column]) if opts.id_column and row.get(opts.id_column) is not None else f"{stem}-{i}"
            data, path = _image_value(row.get(opts.image_column), src, ref, opts.image_column)
            if data:
                ext = image_extension(data)
                if ext is None:
                    yield Reject(rid, str(src), ref, opts.image_column, "bad_image",
                                 "image bytes are not in a known image format")
                    continue
                name = hashlib.sha1(data).hexdigest()[:20] + ext
                if name not in written:
                    (stage / name).write_bytes(data)
                    written.add(name)
                # relative to the staging folder, the root it is resolved against (a relative --out must not be
                # joined onto itself: out/.staging/out/.staging/...)
                item = row_item({**row, "\0image": name}, ref, src, table_cols, stage.resolve(), opts.prompt_suffix,
                                rid)
                if isinstance(item, Item):
                    item.staged = True
                yield item
            elif path:
                yield row_item({**row, "\0image": path}, ref, src, table_cols, root, opts.prompt_suffix, rid)
            else:
                yield Reject(rid, str(src), ref, opts.image_column, "missing_image", "no image in this row")

    return Opened(total=n, iterate=iterate, inputs={"input": str(src), "image_root": str(root)},
                  stats={"dataset_rows": n}, cleanup=tmp.cleanup)

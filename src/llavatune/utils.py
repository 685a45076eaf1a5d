"""Small shared helpers: atomic writes, safe image paths, run-directory guard, logging."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from llavatune.files import BASE_MODEL_DIR, CONFIG_FILE, META_FILE, METRICS_FILE, OUTPUT_MARKER, PREPARE_REPORT_FILE

logger = logging.getLogger("llavatune")


class UserError(Exception):
    """An error caused by user input; the CLI prints its message on one line, without a traceback."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder + ``os.replace``: no half files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_under(root: str | os.PathLike, rel: str) -> Path:
    """The file image path ``rel`` names under ``root``; refuse paths that escape ``root``.

    Containment is checked on the *normalised* path (``..`` folded lexically, symlinks not followed) inside the
    resolved root, so an image folder reached through a symlink (``ln -s /datasets/coco/train2014 images``, the
    usual way to point at a shared copy) works, while ``../`` escapes and absolute paths outside the root are
    refused (security: a dataset must not make us read arbitrary files such as ``../../etc/passwd``). Absolute
    paths are allowed when they lie inside the root as given or as resolved. The path returned is the normalised
    one; opening it follows the user's symlinks.
    """
    root_real = Path(os.path.realpath(root))
    p = Path(rel)
    if p.is_absolute():
        full = Path(os.path.normpath(p))
        inside = _within(full, Path(os.path.abspath(root))) or _within(full, root_real)
    else:
        full = Path(os.path.normpath(root_real / p))
        inside = _within(full, root_real)
    if not inside:
        raise UserError(f"image path {rel!r} escapes the image folder {root_real}")
    return full


def image_path_mode(out_dir: Path, root: Path) -> str:
    """How image paths relative to ``root`` go into a data file written to ``out_dir`` (both resolved): "same"
    (the same folder), "relative" (``out_dir`` contains ``root``: rewrite them with :func:`rebase_image_path`),
    or "keep" (they stay relative to ``root``; training then needs ``--image-folder root``)."""
    if out_dir == root:
        return "same"
    if out_dir in root.parents:
        return "relative"
    return "keep"


def rebase_image_path(rel: str, root: Path, out_dir: Path) -> str:
    """Image path ``rel`` (relative to ``root``) made relative to ``out_dir``, an ancestor of ``root``."""
    new = os.path.relpath(os.path.normpath(os.path.join(root, rel)), out_dir)
    if new.startswith(".."):  # a '..' that only stays inside root through a symlink: resolve it as loading will
        new = os.path.relpath(resolve_under(root, rel), out_dir)
    return Path(new).as_posix()


# ------------------------------------------------------------------------------- outputs never touch inputs

# OUTPUT_MARKER is written first into every folder a llavatune command creates; ``--overwrite`` removes only folders
# that have it (or the files older llavatune versions left in their outputs, LEGACY_MARKERS).

LEGACY_MARKERS = (  # (kind, files that must all be there), first match wins
    ("prepare", (PREPARE_REPORT_FILE,)),  # prepare writes a llavatune_config.yaml too
    ("train", (CONFIG_FILE, METRICS_FILE)),
    ("train", (CONFIG_FILE, META_FILE)),
    ("train", (CONFIG_FILE, f"{BASE_MODEL_DIR}/config.json")),
    ("merge", (META_FILE, "config.json")),
)


def output_kind(path: str | os.PathLike) -> str | None:
    """The command that made folder ``path`` (``train``, ``prepare``, ``demo``, ``merge`` ...), or None when it is
    not recognisably a llavatune output."""
    p = Path(path)
    marker = p / OUTPUT_MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("command")
        except (OSError, ValueError, AttributeError):
            kind = None
        if isinstance(kind, str):
            return kind
    for kind, names in LEGACY_MARKERS:
        if all((p / n).is_file() for n in names):
            return kind
    return None


def write_output_marker(path: str | os.PathLike, kind: str) -> None:
    atomic_write_json(Path(path) / OUTPUT_MARKER, {"command": kind, "note": "made by llavatune; --overwrite may replace this folder"})


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(p))


def check_output_file(target: str | os.PathLike, inputs: dict[str, Any], flag: str) -> None:
    """Refuse to write file ``target`` when it is one of ``inputs`` (``{flag or description: path or paths}``).

    Compares real paths and file identity (a hard link or symlink to an input counts as the input).
    """
    t = Path(target)
    if t.is_dir():
        raise UserError(f"{flag} {target}: is a folder; give a file path")
    real = _real(t)
    for what, value in inputs.items():
        for v in value if isinstance(value, (list, tuple, set)) else [value]:
            if v is None:
                continue
            same = _real(v) == real
            if not same and t.exists() and Path(v).exists():
                try:
                    same = os.path.samefile(t, v)
                except OSError:
                    same = False
            if same:
                raise UserError(
                    f"{flag} {target}: that is an input file ({what} {v}); llavatune never writes over its inputs: "
                    "choose another path"
                )


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, kind: str, inputs: dict[str, Any] | None = None,
                     flag: str = "--output_dir", resume: bool = False) -> None:
    """Refuse, before anything is written, an output folder that would touch an input.

    ``path`` may not be a file; with ``overwrite`` (the folder would be deleted) it must be a llavatune ``kind``
    output (:func:`output_kind`) and no input (``{flag: path}``: data file, image folder, model folder) may lie
    inside it; without ``overwrite`` a non-empty folder is refused unless ``resume``.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: exists and is a file, not a folder; choose a folder path")
    if not (p.is_dir() and any(p.iterdir())):
        return
    if resume and not overwrite:
        return
    if not overwrite:
        raise UserError(
            f"{flag} {path}: exists and is not empty; pass --overwrite to replace it "
            + ("(or --resume to continue a training run) " if kind == "train" else "")
            + "or choose a new folder"
        )
    real = _real(p)
    for what, value in (inputs or {}).items():
        for v in value if isinstance(value, (list, tuple, set)) else [value]:
            if v is not None and Path(v).exists() and _within(_real(v), real):
                raise UserError(
                    f"{flag} {path}: --overwrite would delete it, and it contains the input {v} ({what}); "
                    "llavatune never deletes its inputs: choose another output folder"
                )
    if p.is_symlink():
        raise UserError(f"{flag} {path}: is a symbolic link; --overwrite does not delete through links: remove it yourself")
    found = output_kind(p)
    if found != kind:
        what_it_is = f"a llavatune {found} output" if found else "not a llavatune output"
        raise UserError(
            f"{flag} {path}: --overwrite only replaces a llavatune {kind} output (marked by {OUTPUT_MARKER}), and this "
            f"folder is {what_it_is}; choose another folder or remove it yourself"
        )


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, resume: bool = False, *, kind: str = "train",
                       inputs: dict[str, Any] | None = None, flag: str = "--output_dir") -> Path:
    """Create an output folder (marked as a llavatune ``kind`` output) after :func:`check_output_dir`.

    A non-empty folder is kept as is with ``resume``, replaced with ``overwrite`` (only when it is our own output
    and holds none of ``inputs``), refused otherwise.
    """
    p = Path(path)
    check_output_dir(p, overwrite=overwrite, kind=kind, inputs=inputs, flag=flag, resume=resume)
    if p.is_dir() and any(p.iterdir()):
        if resume and not overwrite:
            if not (p / OUTPUT_MARKER).is_file():
                write_output_marker(p, kind)
            return p
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    write_output_marker(p, kind)
    return p


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm progress bar on stderr: shown on a terminal only (``disable=None``), gone when done (``leave=False``).

    Wraps ``iterable`` when given; else ``update()`` it by hand (and ``close()`` it)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, leave=False, file=sys.stderr,
                dynamic_ncols=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now* (pytest's capture, a redirected stream), not the one at setup."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """llavatune's lines on stderr, once per job (rank 0), and the third-party noise of ``llavatune.quiet`` off."""
    from llavatune import quiet

    quiet.install()
    if not logger.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("[llavatune] %(message)s"))
        h.addFilter(quiet.RankZeroOnly())
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False


def finish_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    Without this, a rank that finishes first exits while gloo's worker threads are still live; the C++ runtime
    then aborts it ("terminate called without an active exception", SIGABRT) and torchrun fails the whole job
    even though the work was done (https://github.com/pytorch/pytorch/issues/190489). Only on the success path:
    after an error a barrier would wait forever.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

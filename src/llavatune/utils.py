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


def resolve_under(root: str | os.PathLike, rel: str) -> Path:
    """Resolve image path ``rel`` against ``root``; refuse paths that escape ``root``.

    Absolute paths are allowed only when they lie inside ``root`` (security: a dataset must not make us
    read arbitrary files such as ``../../etc/passwd``).
    """
    root_p = Path(root).resolve()
    p = Path(rel)
    full = (p if p.is_absolute() else root_p / p).resolve()
    if full != root_p and root_p not in full.parents:
        raise UserError(f"image path {rel!r} escapes the image folder {root_p}")
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


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> Path:
    """Create an output directory; refuse a non-empty one unless ``overwrite`` (or ``resume``)."""
    p = Path(path)
    if p.exists() and any(p.iterdir()):
        if resume:
            return p
        if not overwrite:
            raise UserError(
                f"output directory {p} exists and is not empty; pass --overwrite to replace it "
                "(or --resume to continue a training run)"
            )
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now* (pytest's capture, a redirected stream), not the one at setup."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    if not logger.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("[llavatune] %(message)s"))
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

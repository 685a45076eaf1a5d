"""The reply cache of ``synth``: every reply appended (flush + fsync per line) the moment it arrives, keyed by image,
kind and a hash of the full request, so a rerun only asks for what is missing; a torn last line is dropped."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from llavatune.utils import UserError, logger

CACHE_VERSION = 1

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

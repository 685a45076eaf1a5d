"""User images: faithful conversion of every mode to RGB, and verification before training.

Conversions (``to_rgb``; documented with their expected values in docs/data.md, tested on white, black and
gradient images):

- ``RGB``: as is. ``L`` (8-bit grey), ``1`` (bilevel: 0 -> 0, 1 -> 255), ``P`` without transparency, ``YCbCr``,
  ``LAB``, ``HSV``: Pillow's ``convert("RGB")``.
- ``CMYK``: Pillow's conversion (R = 255 - C - K ... clipped); Adobe-inverted CMYK JPEGs are un-inverted by Pillow's
  reader.
- ``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry, ``RGBa``/``La`` (premultiplied): composited on white.
- ``I;16`` / ``I;16B`` / ``I;16L`` (16-bit grey) and ``I`` (32-bit integer, Pillow's container for 16-bit grey
  from some readers): scaled by the 16-bit depth, ``round(v * 255 / 65535)`` (65535 -> 255, 32768 -> 128),
  values outside 0-65535 clipped. Never stretched from the image's own min/max: an all-white 16-bit image stays
  white.
- ``F`` (32-bit float): taken as 0.0-1.0 (the float-image convention of image processors), ``round(v * 255)``,
  clipped.

Verification (``inspect_image``/``verify_images``): every image is opened and decoded once before training, in
parallel processes, with the verdict remembered per ``(path, size, mtime)`` so resume and later runs skip it.
A header check alone misses truncation; JPEGs are decoded with libjpeg's DCT scaling (``draft``), which still
entropy-decodes every byte of the scan (so truncation and broken markers fail exactly as in a full decode) but
skips most of the inverse DCT; other formats are decoded in full.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

from llavatune.utils import UserError, atomic_write_json

# Pillow's own default (~89 Mpx) warns, 2x that raises; we treat anything past the warning as an error
# for training data: a 20k x 20k "image" is almost always corrupt or hostile (decompression bomb).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_POOL_MIN_FILES = 64  # fewer unverified files than this are checked in this process (no pool start-up)
_CHUNK = 32  # files per task sent to a worker process


class ImageError(UserError):
    pass


@dataclass(frozen=True)
class ImageVerdict:
    """What verifying one file found. ``kind`` is None for a usable image, else a problem kind such as
    ``image-missing``, ``image-is-directory``, ``image-truncated``, ``image-unreadable``, ``image-too-large``."""

    kind: str | None
    message: str = ""
    mode: str | None = None
    alpha: bool = False

    @property
    def ok(self) -> bool:
        return self.kind is None


def inspect_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> ImageVerdict:
    """Open and decode ``path`` as training will; never raises."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ImageVerdict("image-missing", "image file not found")
    except OSError as e:
        return ImageVerdict("image-unreadable", f"cannot read image ({e.strerror or e})")
    if stat.S_ISDIR(st.st_mode):
        return ImageVerdict("image-is-directory", "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        return ImageVerdict("image-unreadable", "is not a regular file")
    mode = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode = im.mode
                alpha = mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info)
                w, h = im.size
                if w * h > max_pixels:
                    return ImageVerdict(
                        "image-too-large",
                        f"image is {w}x{h} = {w * h} pixels, over the --max_pixels limit of {max_pixels} "
                        "(possible decompression bomb)",
                        mode,
                    )
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
                im.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return ImageVerdict("image-too-large", f"refused as a possible decompression bomb ({e})", mode)
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError too
        if "truncat" in str(e).lower():  # Pillow's own wording for a cut-short file ("image file is truncated")
            return ImageVerdict("image-truncated", f"{e}: the file is cut short; re-download or re-encode it", mode)
        return ImageVerdict("image-unreadable", f"cannot read image ({e})", mode)
    except Exception as e:  # noqa: BLE001  Pillow raises ValueError/SyntaxError/struct.error/... on corrupt files
        return ImageVerdict("image-unreadable", f"cannot read image ({type(e).__name__}: {e})", mode)
    return ImageVerdict(None, "", mode, alpha)


def open_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` fully and return an RGB image (:func:`to_rgb`). Raises :class:`ImageError` naming the file:
    missing, a directory, unreadable, truncated, decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise ImageError(f"{path}: image is {im.width}x{im.height} pixels, over the {max_pixels} limit")
                im.load()
                return to_rgb(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError too
        raise ImageError(f"{path}: cannot read image ({e})") from None
    except Exception as e:  # noqa: BLE001  corrupt files raise ValueError/SyntaxError/struct.error/...
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _white_background(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, faithfully (see the module docstring for each mode)."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        import numpy as np

        arr = np.asarray(im).astype(np.float64)
        scale = 255.0 if im.mode == "F" else 255.0 / 65535.0  # by bit depth, never by the image's own range
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
        im = im.convert("RGBA" if im.mode == "RGBa" else "LA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _white_background(im)
    return im.convert("RGB")


# ------------------------------------------------------------------------------------------- verification


class VerdictCache:
    """Verdicts per ``(real path, size, mtime)``, kept in a JSON file (``OUTPUT_DIR/image_checks.json``).

    A verdict is reused only while the file's size and modification time are unchanged and the pixel limit is the
    same; anything else is verified again.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike | None, max_pixels: int = MAX_PIXELS):
        self.path = Path(path) if path is not None else None
        self.max_pixels = max_pixels
        self.entries: dict[str, list] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("version") == self.VERSION and data.get("max_pixels") == max_pixels:
                    self.entries = dict(data.get("files") or {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # an unreadable cache only costs a re-check

    def get(self, key: str, size: int, mtime_ns: int) -> ImageVerdict | None:
        e = self.entries.get(key)
        if e is None or e[0] != size or e[1] != mtime_ns:
            return None
        return ImageVerdict(e[2], e[3], e[4], bool(e[5]))

    def put(self, key: str, size: int, mtime_ns: int, v: ImageVerdict) -> None:
        self.entries[key] = [size, mtime_ns, v.kind, v.message, v.mode, v.alpha]

    def save(self, path: str | os.PathLike | None = None) -> None:
        target = Path(path) if path is not None else self.path
        if target is None:
            return
        atomic_write_json(target, {"version": self.VERSION, "max_pixels": self.max_pixels, "files": self.entries},
                          indent=None)


def _inspect_many(paths: list[str], max_pixels: int) -> list[tuple]:
    """Worker-process task: verdicts of several files, as plain tuples (cheap to send back)."""
    out = []
    for p in paths:
        v = inspect_image(p, max_pixels)
        out.append((v.kind, v.message, v.mode, v.alpha))
    return out


def _workers(workers: int | None) -> int:
    if workers:
        return max(1, workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run_pool(fn, tasks: list[tuple], workers: int, on_done=None, workers_flag: str = "--image_workers") -> list:
    """``[fn(*t) for t in tasks]`` over ``workers`` processes (spawned: no inherited torch/CUDA state).

    A worker that dies (killed, out of memory, a crashing decoder) becomes one :class:`UserError` line instead of
    a ``BrokenProcessPool`` traceback.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    results: list = [None] * len(tasks)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *t): i for i, t in enumerate(tasks)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if on_done is not None:
                    on_done(futures[fut])
    except BrokenProcessPool as e:
        left = sum(r is None for r in results)
        raise UserError(
            f"verifying images: a worker process died ({e or 'killed'}) with {left} of {len(tasks)} batch(es) "
            f"unchecked; re-run with {workers_flag} 1 to check them in this process"
        ) from None
    return results


def verify_images(paths: Iterable[str | os.PathLike], max_pixels: int = MAX_PIXELS, workers: int | None = None,
                  cache: VerdictCache | None = None, progress: bool | None = None,
                  desc: str = "verifying images", workers_flag: str = "--image_workers") -> dict[Path, ImageVerdict]:
    """Verdict of every file in ``paths`` (:func:`inspect_image`), verified in parallel processes, reusing and
    updating ``cache``. ``progress``: None shows a bar on a terminal, True/False force it."""
    from tqdm.auto import tqdm

    files = list(dict.fromkeys(Path(p) for p in paths))
    verdicts: dict[Path, ImageVerdict] = {}
    todo: list[tuple[Path, str, int, int]] = []
    for f in files:
        key = os.path.realpath(f)
        try:
            st = os.stat(key)
        except OSError:
            verdicts[f] = inspect_image(f, max_pixels)  # missing or unreachable: nothing to remember
            continue
        v = cache.get(key, st.st_size, st.st_mtime_ns) if cache is not None else None
        if v is not None:
            verdicts[f] = v
        else:
            todo.append((f, key, st.st_size, st.st_mtime_ns))
    n = _workers(workers)
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=(None if progress is None else not progress)
               if todo else True)
    with bar:
        if len(todo) < _POOL_MIN_FILES or n == 1:
            found = []
            for t in todo:
                v = inspect_image(t[0], max_pixels)
                found.append((v.kind, v.message, v.mode, v.alpha))
                bar.update(1)
        else:
            chunk = max(1, min(_CHUNK, len(todo) // (4 * n) or 1))
            groups = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
            parts = run_pool(_inspect_many, [([str(t[0]) for t in g], max_pixels) for g in groups], n,
                             on_done=lambda i: bar.update(len(groups[i])), workers_flag=workers_flag)
            found = [r for part in parts for r in part]
    for (f, key, size, mtime), r in zip(todo, found):
        v = ImageVerdict(*r)
        verdicts[f] = v
        if cache is not None and v.kind not in ("image-missing",):
            cache.put(key, size, mtime, v)
    return {f: verdicts[f] for f in files}

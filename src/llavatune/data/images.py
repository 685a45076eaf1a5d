"""Opening user images safely: any mode to RGB, truncated/bomb detection with clear errors."""

from __future__ import annotations

import os
import warnings

from PIL import Image

from llavatune.utils import UserError

# Pillow's own default (~89 Mpx) warns, 2x that raises; we treat anything past the warning as an error
# for training data: a 20k x 20k "image" is almost always corrupt or hostile (decompression bomb).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageError(UserError):
    pass


def open_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` fully and return an RGB image. Raises :class:`ImageError` naming the file.

    Handled: grayscale (L, LA, 1), palette (P), RGBA (alpha composited on white), CMYK, 16/32-bit
    (I;16, I, F — rescaled to 8 bits). Refused: missing, unreadable, truncated, decompression bombs.
    """
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
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError too
        raise ImageError(f"{path}: cannot read image ({e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype("uint8"), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")

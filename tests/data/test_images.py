"""Faithful pixels for every image mode (white, black, gradient), and image verification (verdicts, cache, pool)."""

from __future__ import annotations

import os
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llavatune.data.images import VerdictCache, inspect_image, open_image, run_pool, to_rgb, verify_images
from llavatune.utils import UserError

RAMP = np.arange(16, dtype=np.float64)  # a 16-step horizontal gradient


def _grey(values, mode: str, dtype) -> Image.Image:
    arr = np.tile(np.asarray(values, dtype=dtype), (4, 1))
    if mode == "I;16B":
        return Image.frombytes("I;16B", (arr.shape[1], arr.shape[0]), arr.astype(">u2").tobytes())
    return Image.fromarray(arr, mode) if mode not in ("I;16",) else Image.fromarray(arr.astype(np.uint16))


def _expect_grey(values) -> np.ndarray:
    return np.tile(np.asarray(values, dtype=np.uint8)[:, None], (1, 3))  # (W, 3): one RGB per column


# (name, image, expected RGB of row 0, one entry per column)
CASES = [
    # 16-bit grey: scaled by the bit depth (65535 -> 255), never stretched from the image's own min/max
    ("I;16 white", _grey([65535] * 16, "I;16", np.uint16), _expect_grey([255] * 16)),
    ("I;16 black", _grey([0] * 16, "I;16", np.uint16), _expect_grey([0] * 16)),
    ("I;16 mid-grey", _grey([32768] * 16, "I;16", np.uint16), _expect_grey([128] * 16)),
    ("I;16 gradient", _grey(RAMP * 4369, "I;16", np.uint16), _expect_grey(RAMP * 17)),  # 0..65535 -> 0..255
    ("I;16 dark gradient", _grey(RAMP * 257, "I;16", np.uint16), _expect_grey(RAMP)),  # 0..3855 -> 0..15, not 0..255
    ("I;16B white", _grey([65535] * 16, "I;16B", np.uint16), _expect_grey([255] * 16)),
    ("I;16B gradient", _grey(RAMP * 4369, "I;16B", np.uint16), _expect_grey(RAMP * 17)),
    ("I white", _grey([65535] * 16, "I", np.int32), _expect_grey([255] * 16)),
    ("I black", _grey([0] * 16, "I", np.int32), _expect_grey([0] * 16)),
    ("I gradient, out of range clipped", _grey(list(RAMP[:-1] * 4369) + [200000], "I", np.int32),
     _expect_grey(list(RAMP[:-1] * 17) + [255])),
    ("F white", _grey([1.0] * 16, "F", np.float32), _expect_grey([255] * 16)),
    ("F black", _grey([0.0] * 16, "F", np.float32), _expect_grey([0] * 16)),
    ("F gradient", _grey(RAMP / 15, "F", np.float32), _expect_grey(RAMP * 17)),
    # 8-bit grey and bilevel
    ("L white", _grey([255] * 16, "L", np.uint8), _expect_grey([255] * 16)),
    ("L black", _grey([0] * 16, "L", np.uint8), _expect_grey([0] * 16)),
    ("L gradient", _grey(RAMP * 17, "L", np.uint8), _expect_grey(RAMP * 17)),
    ("1 white", Image.new("1", (16, 4), 1), _expect_grey([255] * 16)),
    ("1 black", Image.new("1", (16, 4), 0), _expect_grey([0] * 16)),
    ("1 stripes", Image.fromarray(np.tile(np.arange(16) % 2 == 0, (4, 1))), _expect_grey([255, 0] * 8)),
    # CMYK: white is no ink, black is full K; K ramps down to black
    ("CMYK white", Image.new("CMYK", (16, 4), (0, 0, 0, 0)), _expect_grey([255] * 16)),
    ("CMYK black", Image.new("CMYK", (16, 4), (0, 0, 0, 255)), _expect_grey([0] * 16)),
    ("CMYK gradient", Image.fromarray(np.stack([np.zeros((4, 16)), np.zeros((4, 16)), np.zeros((4, 16)),
                                                np.tile(RAMP * 17, (4, 1))], -1).astype(np.uint8), "CMYK"),
     _expect_grey(255 - RAMP * 17)),
    ("CMYK cyan", Image.new("CMYK", (16, 4), (255, 0, 0, 0)), np.tile([[0, 255, 255]], (16, 1))),
    # transparency: composited on white
    ("RGBA opaque white", Image.new("RGBA", (16, 4), (255, 255, 255, 255)), _expect_grey([255] * 16)),
    ("RGBA opaque black", Image.new("RGBA", (16, 4), (0, 0, 0, 255)), _expect_grey([0] * 16)),
    ("RGBA transparent black", Image.new("RGBA", (16, 4), (0, 0, 0, 0)), _expect_grey([255] * 16)),
    ("RGBA alpha gradient over black", Image.fromarray(np.stack([np.zeros((4, 16))] * 3 + [np.tile(RAMP * 17, (4, 1))],
                                                               -1).astype(np.uint8), "RGBA"),
     _expect_grey(255 - RAMP * 17)),
    ("LA opaque white", Image.new("LA", (16, 4), (255, 255)), _expect_grey([255] * 16)),
    ("LA transparent black", Image.new("LA", (16, 4), (0, 0)), _expect_grey([255] * 16)),
    ("LA opaque gradient", Image.merge("LA", [_grey(RAMP * 17, "L", np.uint8), Image.new("L", (16, 4), 255)]),
     _expect_grey(RAMP * 17)),
]


def _palette(transparent: bool) -> Image.Image:
    im = Image.new("P", (16, 4))
    im.putpalette([255, 255, 255, 0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 1] * 16)
    if transparent:
        im.info["transparency"] = 2  # the red entry is see-through
    return im


CASES += [
    ("P white/black/red", _palette(False), np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 0]] * 4)),
    ("P with transparency", _palette(True), np.array([[255, 255, 255], [0, 0, 0], [255, 255, 255], [0, 0, 0]] * 4)),
]


@pytest.mark.parametrize("name, im, want", CASES, ids=[c[0] for c in CASES])
def test_every_mode_converts_to_the_expected_rgb(name, im, want):
    mode = im.mode
    got = to_rgb(im)
    assert got.mode == "RGB" and got.size == im.size
    row = np.asarray(got)[0]
    np.testing.assert_array_equal(row, np.asarray(want, dtype=np.uint8), err_msg=f"{name} ({mode})")


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_white_16bit_file_stays_white(tmp_path, fmt):
    """Reproduction 3: a 16-bit all-white image used to be stretched from its own min to max, i.e. to black."""
    path = tmp_path / f"white16.{fmt.lower()}"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path, fmt)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # a real 16-bit file, as Pillow reads it
    assert np.asarray(open_image(path)).min() == 255
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)).save(grey)
    assert np.asarray(open_image(grey)).max() == 4  # 1000 / 65535 * 255, not stretched to 0 or 255


def test_cmyk_jpeg_round_trip_and_grey_16bit_pixel_values_through_the_processor(tmp_path, tiny_processor):
    path = tmp_path / "white.jpg"
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(path, quality=100)
    assert np.asarray(open_image(path)).min() >= 254  # Adobe-inverted CMYK JPEG read back as white
    from llavatune.data.encode import Encoder

    enc = Encoder(tiny_processor, template="vicuna_v1")
    white16 = tmp_path / "w.png"
    Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)).save(white16)
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "w8.png")
    a = enc.pixel_inputs([open_image(white16)])["pixel_values"]
    b = enc.pixel_inputs([open_image(tmp_path / "w8.png")])["pixel_values"]
    assert np.array_equal(a.numpy(), b.numpy()), "the model sees a white 16-bit image exactly as a white 8-bit one"


def _bomb_png(path, side=20000):
    """A real 20000 x 20000 bilevel PNG (400 Mpx) that compresses to a few kilobytes: a decompression bomb."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def image_zoo(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "zoo"
    d.mkdir()
    photo = Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8"))
    photo.save(d / "ok.jpg", quality=90)
    photo.save(d / "ok.png")
    data = (d / "ok.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(data[: int(len(data) * 0.9)])
    png = (d / "ok.png").read_bytes()
    (d / "trunc.png").write_bytes(png[: len(png) // 2])
    (d / "text.jpg").write_text("not an image\n")
    (d / "empty.png").write_bytes(b"")
    (d / "folder.jpg").mkdir()
    _bomb_png(d / "bomb.png")
    return d


EXPECTED = {
    "ok.jpg": None, "ok.png": None, "trunc.jpg": "image-truncated",
    "trunc.png": "image-truncated", "text.jpg": "image-unreadable", "empty.png": "image-unreadable",
    "folder.jpg": "image-is-directory", "bomb.png": "image-too-large", "missing.jpg": "image-missing",
}  # fmt: skip


def test_inspect_image_finds_every_kind_of_bad_file(image_zoo):
    for name, kind in EXPECTED.items():
        v = inspect_image(image_zoo / name)
        assert v.kind == kind, (name, v)
    assert inspect_image(image_zoo / "folder.jpg").message == "is a directory, not an image file"
    assert "400000000 pixels" in inspect_image(image_zoo / "bomb.png").message
    assert inspect_image(image_zoo / "ok.jpg").mode == "RGB"


@pytest.mark.parametrize("progressive", [False, True])
def test_fast_jpeg_verification_agrees_with_a_full_decode_at_every_cut(tmp_path, progressive):
    """JPEGs are verified with DCT scaling (draft): as reliable as a full decode, cut anywhere."""
    y, x = np.mgrid[0:120, 0:160]
    arr = np.stack([x * 1.5, y * 2.0, (x + y) * 0.9], -1) + np.random.default_rng(1).normal(0, 20, (120, 160, 3))
    src = tmp_path / "photo.jpg"
    Image.fromarray(np.clip(arr, 0, 255).astype("uint8")).save(src, quality=90, progressive=progressive)
    data = src.read_bytes()
    cut_file = tmp_path / "cut.jpg"
    for n in sorted({*range(200, len(data), max(1, len(data) // 60)), len(data) - 1, len(data) - 2}):
        cut_file.write_bytes(data[:n])
        try:
            with Image.open(cut_file) as im:
                im.load()
            full = None
        except Exception:  # noqa: BLE001
            full = "bad"
        fast = inspect_image(cut_file)
        assert (fast.kind is None) == (full is None), (n, len(data), fast)
    assert inspect_image(src).ok


def test_verdicts_are_remembered_per_path_size_and_mtime(image_zoo, tmp_path, monkeypatch):
    import llavatune.data.images as images

    files = [image_zoo / n for n in EXPECTED]
    cache = VerdictCache(tmp_path / "run" / "image_checks.json")
    first = verify_images(files, cache=cache, workers=1)
    assert {p.name: v.kind for p, v in first.items()} == EXPECTED
    cache.save()
    calls = []
    real = images.inspect_image
    monkeypatch.setattr(images, "inspect_image", lambda p, m=images.MAX_PIXELS: calls.append(p) or real(p, m))
    again = verify_images(files, cache=VerdictCache(tmp_path / "run" / "image_checks.json"), workers=1)
    assert again == first
    assert sorted(p.name for p in calls) == ["missing.jpg"], "only what has no remembered verdict is opened again"
    # a file that changes (re-downloaded) is verified again
    (image_zoo / "trunc.jpg").write_bytes((image_zoo / "ok.jpg").read_bytes())
    calls.clear()
    fresh = verify_images(files, cache=VerdictCache(tmp_path / "run" / "image_checks.json"), workers=1)
    assert fresh[image_zoo / "trunc.jpg"].ok and image_zoo / "trunc.jpg" in calls
    # a different pixel limit invalidates every verdict
    assert VerdictCache(tmp_path / "run" / "image_checks.json", max_pixels=10).entries == {}


def test_parallel_verification_gives_the_same_verdicts_as_one_process(image_zoo):
    files = [image_zoo / n for n in EXPECTED] * 1
    many = []
    for i in range(80):  # enough files to start the process pool
        p = image_zoo / f"copy{i}.jpg"
        p.write_bytes((image_zoo / ("ok.jpg" if i % 3 else "trunc.jpg")).read_bytes())
        many.append(p)
    serial = verify_images(files + many, workers=1)
    parallel = verify_images(files + many, workers=2, progress=False)
    assert parallel == serial
    assert sum(not v.ok for v in parallel.values()) == len([k for k in EXPECTED.values() if k]) + 27


def test_a_dying_worker_process_is_one_line(capsys):
    with pytest.raises(UserError) as e:
        run_pool(signal.raise_signal, [(signal.SIGKILL,)], 1, workers_flag="--image_workers")
    msg = str(e.value)
    assert "\n" not in msg and "worker process died" in msg and "--image_workers 1" in msg
    assert os.getpid()  # this process lives on

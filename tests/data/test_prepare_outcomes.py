"""``llavatune prepare`` as a hurried user runs it: relative paths, and runs that must not end "successfully" empty."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.data.records import load_records
from llavatune.data.shapes import make_shapes_vqa


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli_main(["prepare", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if ": error:" in x]
    assert len(lines) == 1, err
    return lines[0]


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_with_relative_input_and_out(tmp_path, capsys, monkeypatch, layout):
    """Embedded image bytes staged under a relative --out resolve (they were looked up at out/.staging/out/.staging/...:
    every record skipped, exit 0, an empty dataset)."""
    import datasets

    rows = {"image": [{"bytes": _png("red"), "path": None}, {"bytes": _png("blue"), "path": None}],
            "question": ["What color?", "Which color?"], "answer": ["red", "blue"]}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(rows, features=features)
    monkeypatch.chdir(tmp_path)
    if layout == "save_to_disk":
        ds.save_to_disk("saved")
        src = "saved"
    else:
        ds.to_parquet("qa.parquet")
        src = "qa.parquet"
    capsys.readouterr()
    rc, out, err = run(capsys, "hf", "--input", src, "--out", "out_hf")
    assert rc == 0, err
    recs = load_records(Path("out_hf") / "data.json")
    assert [r.conversations[1].value for r in recs] == ["red", "blue"]
    assert "0 skipped" in out and not Path("out_hf/rejects.jsonl").exists()
    assert [(Path("out_hf") / r.images[0]).read_bytes() for r in recs] == [_png("red"), _png("blue")]


def test_csv_with_relative_paths_everywhere(tmp_path, capsys, monkeypatch):
    """A plain folder of one's own images and a CSV next to it, every path relative (the README's "Your data")."""
    monkeypatch.chdir(tmp_path)
    Path("mydata/photos").mkdir(parents=True)
    for name, color in (("cat.png", "red"), ("dog.png", "blue")):
        Image.new("RGB", (16, 16), color).save(Path("mydata/photos") / name)
    Path("mydata/qa.csv").write_text("image,question,answer\ncat.png,What color is it?,red\ndog.png,And this?,blue\n")
    rc, _, err = run(capsys, "csv", "--input", "mydata/qa.csv", "--image-root", "mydata/photos", "--out", "prepared")
    assert rc == 0, err
    recs = load_records(Path("prepared/data.json"))
    assert len(recs) == 2 and all((Path("prepared") / r.images[0]).is_file() for r in recs)


@pytest.fixture
def okvqa(tmp_path) -> dict:
    return make_shapes_vqa(tmp_path / "src", n_train_images=2, n_val_images=4, questions_per_image=2, image_size=16)


def _args(p: dict) -> list:
    return ["okvqa", "--questions", p["val_questions"], "--annotations", p["val_annotations"]]


def test_zero_records_is_an_error_and_writes_nothing(okvqa, tmp_path, capsys):
    wrong = tmp_path / "train_images_only"  # the val questions with the train2014 images: none of them there
    wrong.mkdir()
    (wrong / "train2014").symlink_to(okvqa["images_dir"] / "train2014")
    out = tmp_path / "out"
    rc, _, err = run(capsys, *_args(okvqa), "--images", wrong, "--out", out)
    line = error_line(err)
    assert rc == 1 and "no usable record" in line and "8 missing_image" in line and "--images" in line
    assert not out.exists()  # nothing written, so the corrected command runs without --overwrite
    rc, _, err = run(capsys, *_args(okvqa), "--images", okvqa["images_dir"], "--out", out)
    assert rc == 0, err


def test_more_than_the_stated_fraction_skipped_is_an_error(okvqa, tmp_path, capsys):
    qs = json.loads(okvqa["val_questions"].read_text())["questions"]
    image_ids = sorted({q["image_id"] for q in qs})
    for iid in image_ids[:3]:  # 3 of 4 images gone: 6 of 8 questions unusable
        os.unlink(okvqa["images_dir"] / "val2014" / f"COCO_val2014_{iid:012d}.jpg")
    out = tmp_path / "out"
    rc, _, err = run(capsys, *_args(okvqa), "--images", okvqa["images_dir"], "--out", out)
    line = error_line(err)
    assert rc == 1 and "6 of 8 records skipped" in line and "--max-skipped 0.5" in line
    assert "skipped " in err.splitlines()[0]  # the skipped records are listed before the error
    assert not out.exists()
    rc, stdout, err = run(capsys, *_args(okvqa), "--images", okvqa["images_dir"], "--out", out, "--max-skipped", "0.8")
    assert rc == 0 and "6 skipped" in stdout
    assert len(load_records(out / "data.json")) == 2


def test_an_empty_input_is_an_error(tmp_path, capsys):
    src = tmp_path / "qa.jsonl"
    src.write_text("")
    rc, _, err = run(capsys, "jsonl", "--input", src, "--out", tmp_path / "out")
    assert rc == 1 and "no records" in error_line(err)

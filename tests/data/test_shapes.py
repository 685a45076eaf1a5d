"""The synthetic shapes VQA generator: official layouts, learnable answers, determinism."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from llavatune.data.shapes import COLORS, SHAPES, make_shapes_vqa


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_okvqa_layout_and_schema(tmp_path):
    paths = make_shapes_vqa(tmp_path, n_train_images=5, n_val_images=3, questions_per_image=2, image_size=48)
    assert paths["val_questions"].name == "OpenEnded_mscoco_val2014_questions.json"
    assert paths["val_annotations"].name == "mscoco_val2014_annotations.json"
    assert paths["train_questions"].name == "OpenEnded_mscoco_train2014_questions.json"
    q = json.loads(paths["val_questions"].read_text())
    a = json.loads(paths["val_annotations"].read_text())
    for key in ("info", "license", "data_subtype", "data_type"):
        assert key in q and key in a
    assert q["data_subtype"] == "val2014"
    assert len(q["questions"]) == 6 and len(a["annotations"]) == 6
    assert set(q["questions"][0]) == {"image_id", "question", "question_id"}
    ann = a["annotations"][0]
    assert set(ann) == {"image_id", "question_id", "question_type", "answer_type", "confidence", "answers"}
    assert len(ann["answers"]) == 10
    assert set(ann["answers"][0]) == {"answer_id", "raw_answer", "answer_confidence", "answer"}
    # OK-VQA stores each of the 5 annotators' answers twice
    answers = [x["answer"] for x in ann["answers"]]
    assert answers[0::2] == answers[1::2]
    for question in q["questions"]:
        image = paths["images_dir"] / "val2014" / f"COCO_val2014_{question['image_id']:012d}.jpg"
        assert image.is_file()
        with Image.open(image) as im:
            assert im.format == "JPEG" and im.size == (48, 48)
    # question ids are unique across splits
    qt = json.loads(paths["train_questions"].read_text())
    ids = [x["question_id"] for x in q["questions"] + qt["questions"]]
    assert len(ids) == len(set(ids))


def test_vqav2_layout_and_schema(tmp_path):
    paths = make_shapes_vqa(tmp_path, n_train_images=2, n_val_images=2, questions_per_image=3, layout="vqav2")
    assert paths["val_questions"].name == "v2_OpenEnded_mscoco_val2014_questions.json"
    assert paths["val_annotations"].name == "v2_mscoco_val2014_annotations.json"
    ann = json.loads(paths["val_annotations"].read_text())["annotations"][0]
    assert {"multiple_choice_answer", "answers", "question_type", "answer_type"} <= set(ann)
    assert set(ann["answers"][0]) == {"answer_id", "answer", "answer_confidence"}
    counts = collections.Counter(x["answer"] for x in ann["answers"])
    assert counts[ann["multiple_choice_answer"]] == max(counts.values())


def test_answers_match_the_pixels_and_mostly_agree(tmp_path):
    paths = make_shapes_vqa(tmp_path, n_train_images=40, n_val_images=0, questions_per_image=4, image_size=64)
    q = json.loads(paths["train_questions"].read_text())["questions"]
    a = {x["question_id"]: x for x in json.loads(paths["train_annotations"].read_text())["annotations"]}
    variants = 0
    for question in q:
        answers = [x["answer"] for x in a[question["question_id"]]["answers"]]
        top, n = collections.Counter(answers).most_common(1)[0]
        assert n >= 6  # at least 3 of the 5 annotators agree
        variants += n < 10
        if question["question"] == "How many shapes are there?":
            assert top in {"1", "2", "3"}
        if question["question"] == "What shape is in the image?":
            assert top in SHAPES
        if question["question"] == "What color is the shape?":
            assert top in COLORS
            # the single shape's colour is really in the picture
            image = paths["images_dir"] / "train2014" / f"COCO_train2014_{question['image_id']:012d}.jpg"
            with Image.open(image) as im:
                pixels = [rgb for _, rgb in im.convert("RGB").getcolors(maxcolors=1 << 16)]
            want = COLORS[top]
            assert any(sum(abs(p[i] - want[i]) for i in range(3)) < 60 for p in pixels)
    assert variants > 0  # some annotators disagree, so the VQA metric's leave-one-out matters


def test_captions_in_llava_format(tmp_path):
    paths = make_shapes_vqa(tmp_path, n_train_images=3, n_val_images=2)
    captions = json.loads(paths["train_captions"].read_text())
    assert len(captions) == 3
    c = captions[0]
    assert c["conversations"][0]["from"] == "human" and c["conversations"][0]["value"].startswith("<image>\n")
    assert c["conversations"][1]["from"] == "gpt" and " on the " in c["conversations"][1]["value"]
    assert (paths["train_captions"].parent / c["image"]).is_file()  # relative to the captions file


def test_deterministic_for_a_seed(tmp_path):
    make_shapes_vqa(tmp_path / "a", n_train_images=4, n_val_images=2, seed=3)
    make_shapes_vqa(tmp_path / "b", n_train_images=4, n_val_images=2, seed=3)
    make_shapes_vqa(tmp_path / "c", n_train_images=4, n_val_images=2, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        make_shapes_vqa(tmp_path, layout="gqa")
    with pytest.raises(ValueError, match="questions_per_image"):
        make_shapes_vqa(tmp_path, questions_per_image=11)

"""``llavatune prepare``: every source on official-schema fixtures built with the synthetic generator."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.data.prepare import image_extension, majority_answer, parse_answer_list
from llavatune.data.records import load_records, record_problems
from llavatune.data.shapes import make_shapes_vqa

SUFFIX = "Answer the question using a single word or phrase."


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["prepare", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def okvqa(tmp_path) -> dict:
    return make_shapes_vqa(tmp_path / "src", n_train_images=4, n_val_images=5, questions_per_image=3, image_size=32)


@pytest.fixture
def vqav2(tmp_path) -> dict:
    return make_shapes_vqa(
        tmp_path / "src", n_train_images=2, n_val_images=4, questions_per_image=2, image_size=32, layout="vqav2"
    )


def okvqa_args(paths: dict, split: str = "val") -> list[str]:
    return [
        "--questions",
        paths[f"{split}_questions"],
        "--annotations",
        paths[f"{split}_annotations"],
        "--images",
        paths["images_dir"],
    ]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def check_images_resolve(data_json: Path) -> None:
    for rec in load_records(data_json):
        assert not record_problems(rec), rec
        for rel in rec.images:
            assert not Path(rel).is_absolute() and ".." not in Path(rel).parts
            assert (data_json.parent / rel).is_file()


# ---------------------------------------------------------------------------------------------- helpers


def test_majority_answer_tie_break():
    assert majority_answer(["a", "b", "b", "a", "c"]) == "a"  # tie: earliest occurrence wins
    assert majority_answer(["x", "y", "y"]) == "y"
    assert majority_answer(["2", "two", "2", "two", "two"]) == "two"
    with pytest.raises(ValueError):
        majority_answer([])


def test_parse_answer_list():
    assert parse_answer_list('["2", "two"]') == ["2", "two"]
    assert parse_answer_list("2| two |2") == ["2", "two", "2"]
    assert parse_answer_list([{"answer": "cat"}, "dog", 3]) == ["cat", "dog", "3"]
    assert parse_answer_list("") == [] and parse_answer_list(None) == []
    with pytest.raises(ValueError):
        parse_answer_list("[not json")


def test_image_extension_sniffs_bytes():
    for fmt, ext in (("JPEG", ".jpg"), ("PNG", ".png"), ("GIF", ".gif"), ("WEBP", ".webp"), ("BMP", ".bmp")):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format=fmt)
        assert image_extension(buf.getvalue()) == ext
    assert image_extension(b"not an image at all") is None


# ---------------------------------------------------------------------------------------------- okvqa


def test_okvqa_converts(okvqa, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out)
    assert rc == 0, err
    assert "prepared 15 records" in stdout
    data = load(out / "data.json")
    questions = {q["question_id"]: q for q in load(okvqa["val_questions"])["questions"]}
    anns = {a["question_id"]: a for a in load(okvqa["val_annotations"])["annotations"]}
    assert len(data) == len(questions) == 15
    for rec in data:
        qid = rec["question_id"]
        assert rec["id"] == f"okvqa-{qid}"
        assert rec["conversations"][0] == {"from": "human", "value": f"<image>\n{questions[qid]['question']}\n{SUFFIX}"}
        answers = [a["answer"] for a in anns[qid]["answers"]]
        assert rec["answers"] == answers and len(answers) == 10
        assert rec["conversations"][1] == {"from": "gpt", "value": majority_answer(answers)}
        assert rec["question_type"] == anns[qid]["question_type"]
        assert rec["answer_type"] == anns[qid]["answer_type"]
        assert rec["image_id"] == questions[qid]["image_id"]
        assert rec["image"] == f"images/COCO_val2014_{rec['image_id']:012d}.jpg"
    check_images_resolve(out / "data.json")
    report = load(out / "prepare_report.json")
    assert report["counts"]["records"] == 15 and report["counts"]["skipped"] == 0
    assert not (out / "rejects.jsonl").exists()
    assert (out / "llavatune_config.yaml").is_file()


def test_okvqa_each_image_placed_once_as_hard_link(okvqa, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out)[0] == 0
    placed = sorted((out / "images").iterdir())
    assert len(placed) == 5  # 5 images, 3 questions each
    for p in placed:
        src = okvqa["images_dir"] / "val2014" / p.name
        assert p.read_bytes() == src.read_bytes()  # never re-encoded
        assert os.stat(p).st_ino == os.stat(src).st_ino  # same file system: a hard link
    report = load(out / "prepare_report.json")
    assert report["counts"]["images"] == 5 and report["counts"]["images_linked"] == 5


def test_okvqa_falls_back_to_copy_when_links_fail(okvqa, tmp_path, capsys, monkeypatch):
    def no_link(src, dst, **kw):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out"
    assert run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out)[0] == 0
    report = load(out / "prepare_report.json")
    assert report["counts"]["images_copied"] == 5 and report["counts"]["images_linked"] == 0
    check_images_resolve(out / "data.json")


def test_okvqa_answer_field_suffix_and_limit(okvqa, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(
        capsys,
        "okvqa",
        *okvqa_args(okvqa),
        "--out",
        out,
        "--answer-field",
        "raw_answer",
        "--prompt-suffix",
        "",
        "--limit",
        "4",
    )
    assert rc == 0, err
    data = load(out / "data.json")
    assert len(data) == 4
    anns = {a["question_id"]: a for a in load(okvqa["val_annotations"])["annotations"]}
    for rec in data:
        assert rec["answers"] == [a["raw_answer"] for a in anns[rec["question_id"]]["answers"]]
        assert not rec["conversations"][0]["value"].endswith(SUFFIX)
        assert rec["conversations"][0]["value"].count("\n") == 1


def test_okvqa_tie_break_in_annotations(okvqa, tmp_path, capsys):
    a = load(okvqa["val_annotations"])
    first = a["annotations"][0]
    for j, ans in enumerate(first["answers"]):  # 5 x "two" then 5 x "2": a tie, "two" comes first
        ans["answer"] = "two" if j < 5 else "2"
    okvqa["val_annotations"].write_text(json.dumps(a))
    out = tmp_path / "out"
    assert run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out)[0] == 0
    rec = next(r for r in load(out / "data.json") if r["question_id"] == first["question_id"])
    assert rec["conversations"][1]["value"] == "two"


def test_okvqa_flat_folder_and_subfolder_lookup(okvqa, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (okvqa["images_dir"] / "val2014").iterdir():
        shutil.copy(p, flat / p.name)
    out = tmp_path / "out"
    args = ["--questions", okvqa["val_questions"], "--annotations", okvqa["val_annotations"], "--images", flat]
    assert run(capsys, "okvqa", *args, "--out", out)[0] == 0
    check_images_resolve(out / "data.json")
    # train split in the same COCO folder (train2014/ subfolder)
    out2 = tmp_path / "out2"
    assert run(capsys, "okvqa", *okvqa_args(okvqa, "train"), "--out", out2)[0] == 0
    assert len(load(out2 / "data.json")) == 12
    assert all(r["image"].startswith("images/COCO_train2014_") for r in load(out2 / "data.json"))


def test_missing_image_is_reported_not_dropped(okvqa, tmp_path, capsys):
    qs = load(okvqa["val_questions"])["questions"]
    gone = qs[0]["image_id"]
    (okvqa["images_dir"] / "val2014" / f"COCO_val2014_{gone:012d}.jpg").unlink()
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out)
    assert rc == 0
    n_gone = sum(q["image_id"] == gone for q in qs)
    assert n_gone == 3
    assert f"COCO_val2014_{gone:012d}.jpg not found" in err
    assert f"{n_gone} skipped" in stdout
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == n_gone and all(r["reason"] == "missing_image" for r in rejects)
    assert {r["id"] for r in rejects} == {f"okvqa-{q['question_id']}" for q in qs if q["image_id"] == gone}
    report = load(out / "prepare_report.json")
    assert report["counts"]["skipped"] == n_gone and report["skipped_by_reason"] == {"missing_image": n_gone}
    assert len(load(out / "data.json")) == len(qs) - n_gone

    rc, _, err = run(capsys, "okvqa", *okvqa_args(okvqa), "--out", tmp_path / "strict", "--strict")
    assert rc == 1
    line = one_line_error(err)
    assert "OpenEnded_mscoco_val2014_questions.json" in line and f"COCO_val2014_{gone:012d}.jpg" in line


def test_question_without_annotation_is_an_error(okvqa, tmp_path, capsys):
    a = load(okvqa["val_annotations"])
    dropped = a["annotations"].pop(2)
    okvqa["val_annotations"].write_text(json.dumps(a))
    rc, _, err = run(capsys, "okvqa", *okvqa_args(okvqa), "--out", tmp_path / "out")
    assert rc == 1
    line = one_line_error(err)
    assert "mscoco_val2014_annotations.json" in line and f"question_id {dropped['question_id']}" in line
    assert not (tmp_path / "out").exists()  # inputs are validated before anything is written


def test_wrong_schema_and_missing_files(okvqa, tmp_path, capsys):
    swapped = [
        "--questions",
        okvqa["val_annotations"],
        "--annotations",
        okvqa["val_questions"],
        "--images",
        okvqa["images_dir"],
    ]
    rc, _, err = run(capsys, "okvqa", *swapped, "--out", tmp_path / "o1")
    assert rc == 1 and "pass it as --annotations" in one_line_error(err)
    bad = tmp_path / "bad.json"
    bad.write_text('{"questions": [{"image_id": "x", "question": "?", "question_id": 1}]}')
    rc, _, err = run(
        capsys,
        "okvqa",
        "--questions",
        bad,
        "--annotations",
        okvqa["val_annotations"],
        "--images",
        okvqa["images_dir"],
        "--out",
        tmp_path / "o2",
    )
    assert rc == 1 and "field 'image_id': expected int" in one_line_error(err)
    rc, _, err = run(
        capsys,
        "okvqa",
        "--questions",
        tmp_path / "nope.json",
        "--annotations",
        bad,
        "--images",
        okvqa["images_dir"],
        "--out",
        tmp_path / "o3",
    )
    assert rc == 1 and "nope.json: file not found" in one_line_error(err)
    rc, _, err = run(capsys, "okvqa", *okvqa_args(okvqa)[:4], "--images", tmp_path, "--out", tmp_path / "o4")
    assert rc == 1 and "no COCO images found" in one_line_error(err)


def test_non_empty_out_refused_without_overwrite(okvqa, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out)
    assert rc == 1 and "--overwrite" in one_line_error(err)
    assert (out / "keep.txt").exists()
    # --overwrite replaces only a llavatune prepare output, never a folder of the user's own files
    rc, _, err = run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out, "--overwrite")
    assert rc == 1 and "not a llavatune output" in one_line_error(err) and (out / "keep.txt").read_text() == "mine"
    out2 = tmp_path / "out2"
    assert run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out2)[0] == 0
    (out2 / "stale.txt").write_text("from an earlier prepare")
    rc, _, err = run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out2, "--overwrite")
    assert rc == 0 and not (out2 / "stale.txt").exists() and (out2 / "data.json").is_file()


def test_overwrite_never_deletes_inputs(okvqa, capsys):
    root = okvqa["root"]
    rc, _, err = run(capsys, "okvqa", *okvqa_args(okvqa), "--out", root, "--overwrite")
    assert rc == 1 and "contains the input" in one_line_error(err)
    assert okvqa["val_questions"].is_file()


def test_val_split_is_deterministic_and_by_image(okvqa, tmp_path, capsys):
    def split(name: str, seed: int) -> tuple[list, list]:
        out = tmp_path / name
        rc, _, err = run(
            capsys, "okvqa", *okvqa_args(okvqa, "train"), "--out", out, "--val-fraction", "0.5", "--seed", seed
        )
        assert rc == 0, err
        assert not (out / "data.json").exists()
        for part in ("train", "val"):
            check_images_resolve(out / part / "data.json")
        return load(out / "train" / "data.json"), load(out / "val" / "data.json")

    train1, val1 = split("a", 0)
    train2, val2 = split("b", 0)
    assert [r["id"] for r in train1] == [r["id"] for r in train2] and [r["id"] for r in val1] == [r["id"] for r in val2]
    assert len(train1) + len(val1) == 12 and train1 and val1
    assert not {r["image"] for r in train1} & {r["image"] for r in val1}  # no image in both splits
    assert len({r["image"] for r in val1}) == 2  # half of the 4 images
    others = [split(f"s{seed}", seed)[1] for seed in range(1, 6)]
    assert any({r["id"] for r in v} != {r["id"] for r in val1} for v in others)


# ---------------------------------------------------------------------------------------------- vqav2


def test_vqav2_converts(vqav2, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "vqav2", *okvqa_args(vqav2), "--out", out)
    assert rc == 0, err
    data = load(out / "data.json")
    anns = {a["question_id"]: a for a in load(vqav2["val_annotations"])["annotations"]}
    assert len(data) == 8
    for rec in data:
        ann = anns[rec["question_id"]]
        assert rec["id"] == f"vqav2-{rec['question_id']}"
        assert rec["answers"] == [a["answer"] for a in ann["answers"]]
        assert rec["multiple_choice_answer"] == ann["multiple_choice_answer"]
        assert rec["conversations"][1]["value"] == majority_answer(rec["answers"])
    check_images_resolve(out / "data.json")
    assert len(list((out / "images").iterdir())) == 4


# ---------------------------------------------------------------------------------------------- csv / jsonl


@pytest.fixture
def table(tmp_path) -> dict:
    """Images in nested folders, two with the same file name, plus a question per image."""
    root = tmp_path / "pics"
    rows = []
    for i, (sub, color) in enumerate((("a", "red"), ("b", "green"), ("a/deep", "blue"))):
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), color).save(root / sub / "img.png")
        rows.append(
            {
                "id": f"q{i}",
                "file": f"{sub}/img.png",
                "question": "What color is it?",
                "answer": color,
                "answers": json.dumps([color, color, "dark " + color]),
            }
        )
    rows.append(
        {"id": "q3", "file": "a/img.png", "question": "Is it square?", "answer": "yes", "answers": "yes|yes|no"}
    )
    return {"root": root, "rows": rows}


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def test_csv_converts(table, tmp_path, capsys):
    src = write_csv(tmp_path / "qa.csv", table["rows"])
    out = tmp_path / "out"
    rc, _, err = run(
        capsys,
        "csv",
        "--input",
        src,
        "--image-column",
        "file",
        "--id-column",
        "id",
        "--answers-column",
        "answers",
        "--image-root",
        table["root"],
        "--out",
        out,
    )
    assert rc == 0, err
    data = load(out / "data.json")
    assert [r["id"] for r in data] == ["q0", "q1", "q2", "q3"]
    assert data[0]["conversations"][0]["value"] == "<image>\nWhat color is it?"  # no suffix by default
    assert data[0]["answers"] == ["red", "red", "dark red"] and data[3]["answers"] == ["yes", "yes", "no"]
    assert data[0]["image"] == "images/a/img.png" and data[1]["image"] == "images/b/img.png"
    assert data[3]["image"] == data[0]["image"]  # shared image placed once
    assert len([p for p in (out / "images").rglob("*") if p.is_file()]) == 3
    check_images_resolve(out / "data.json")
    assert os.stat(out / "images/a/img.png").st_ino == os.stat(table["root"] / "a/img.png").st_ino


def test_tsv_default_image_root_and_answer_from_answers(table, tmp_path, capsys):
    rows = [{"image": r["file"], "question": r["question"], "answers": r["answers"]} for r in table["rows"]]
    src = write_csv(table["root"] / "qa.tsv", rows, delimiter="\t")  # image root defaults to the file's folder
    out = tmp_path / "out"
    rc, _, err = run(capsys, "csv", "--input", src, "--answers-column", "answers", "--out", out)
    assert rc == 0, err
    data = load(out / "data.json")
    assert [r["id"] for r in data] == ["qa-1", "qa-2", "qa-3", "qa-4"]
    assert [r["conversations"][1]["value"] for r in data] == ["red", "green", "blue", "yes"]


def test_csv_errors_name_file_row_and_field(table, tmp_path, capsys):
    rows = [dict(r) for r in table["rows"]]
    rows[2]["file"] = "../../etc/passwd"
    src = write_csv(tmp_path / "qa.csv", rows)
    rc, _, err = run(
        capsys, "csv", "--input", src, "--image-column", "file", "--image-root", table["root"], "--out", tmp_path / "o1"
    )
    line = one_line_error(err)
    assert rc == 1 and "qa.csv" in line and "row 3" in line and "field 'file'" in line and "escapes" in line

    rc, _, err = run(capsys, "csv", "--input", src, "--image-root", table["root"], "--out", tmp_path / "o2")
    line = one_line_error(err)
    assert rc == 1 and "field 'image': column not found" in line and "--image-column" in line

    rows = [dict(r) for r in table["rows"]]
    rows[1]["question"] = ""
    src = write_csv(tmp_path / "qa2.csv", rows)
    rc, _, err = run(
        capsys, "csv", "--input", src, "--image-column", "file", "--image-root", table["root"], "--out", tmp_path / "o3"
    )
    line = one_line_error(err)
    assert rc == 1 and "qa2.csv: record row 2 (line 3): field 'question': missing value" in line


def test_csv_missing_image_rejected_with_report(table, tmp_path, capsys):
    rows = [dict(r) for r in table["rows"]]
    rows[1]["file"] = "b/missing.png"
    src = write_csv(tmp_path / "qa.csv", rows)
    out = tmp_path / "out"
    rc, _, err = run(
        capsys,
        "csv",
        "--input",
        src,
        "--image-column",
        "file",
        "--image-root",
        table["root"],
        "--id-column",
        "id",
        "--out",
        out,
    )
    assert rc == 0 and "b/missing.png" in err
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["field"], r["reason"]) for r in rejects] == [("q1", "file", "missing_image")]
    assert [r["id"] for r in load(out / "data.json")] == ["q0", "q2", "q3"]


def test_jsonl_converts(table, tmp_path, capsys):
    src = tmp_path / "qa.jsonl"
    lines = []
    for r in table["rows"]:
        answers = json.loads(r["answers"]) if r["answers"].startswith("[") else r["answers"]
        abs_path = str(table["root"] / r["file"])  # absolute paths inside the root are fine
        lines.append(
            json.dumps({"uid": r["id"], "img": abs_path, "q": r["question"], "a": r["answer"], "all": answers})
        )
    src.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    out = tmp_path / "out"
    rc, _, err = run(
        capsys,
        "jsonl",
        "--input",
        src,
        "--image-key",
        "img",
        "--question-key",
        "q",
        "--answer-key",
        "a",
        "--answers-key",
        "all",
        "--id-key",
        "uid",
        "--image-root",
        table["root"],
        "--out",
        out,
        "--prompt-suffix",
        SUFFIX,
    )
    assert rc == 0, err
    data = load(out / "data.json")
    assert [r["id"] for r in data] == ["q0", "q1", "q2", "q3"]
    assert data[2]["answers"] == ["blue", "blue", "dark blue"] and data[3]["answers"] == ["yes", "yes", "no"]
    assert data[0]["conversations"][0]["value"].endswith("\n" + SUFFIX)
    check_images_resolve(out / "data.json")

    src.write_text(lines[0] + "\n" + json.dumps({"img": "a/img.png", "a": "x"}) + "\n")
    rc, _, err = run(
        capsys,
        "jsonl",
        "--input",
        src,
        "--image-key",
        "img",
        "--question-key",
        "q",
        "--answer-key",
        "a",
        "--image-root",
        table["root"],
        "--out",
        tmp_path / "o2",
    )
    line = one_line_error(err)
    assert rc == 1 and "qa.jsonl: record line 2: field 'q': missing key (set --question-key)" in line


def test_json_list_input(table, tmp_path, capsys):
    src = table["root"] / "qa.json"
    src.write_text(
        json.dumps([{"image": r["file"], "question": r["question"], "answer": r["answer"]} for r in table["rows"]])
    )
    out = tmp_path / "out"
    assert run(capsys, "jsonl", "--input", src, "--out", out)[0] == 0
    assert len(load(out / "data.json")) == 4
    check_images_resolve(out / "data.json")


# ---------------------------------------------------------------------------------------------- hf


def _encoded(color: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, format=fmt)
    return buf.getvalue()


def test_jsonl_keeps_a_line_separator_inside_strings(table, tmp_path, capsys):
    # U+2028 ends a line for str.splitlines() but not for JSON Lines: the record must stay whole
    src = tmp_path / "qa.jsonl"
    r = table["rows"][0]
    row = {"uid": r["id"], "img": r["file"], "q": "What is\u2028shown?", "a": r["answer"]}
    src.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc, _, err = run(capsys, "jsonl", "--input", src, "--image-key", "img", "--question-key", "q", "--answer-key", "a",
                     "--id-key", "uid", "--image-root", table["root"], "--out", out)
    assert rc == 0, err
    assert "What is\u2028shown?" in load(out / "data.json")[0]["conversations"][0]["value"]


@pytest.fixture
def hf_rows() -> dict:
    jpg, png = _encoded("red", "JPEG"), _encoded("blue", "PNG")
    return {
        "image": [{"bytes": jpg, "path": "red.jpg"}, {"bytes": png, "path": None}, {"bytes": jpg, "path": "red.jpg"}],
        "question": ["What color?", "What color?", "Is it red?"],
        "label": ["red", "blue", "yes"],
        "answers": [["red", "red", "orange"], ["blue"], ["yes", "yes"]],
        "bytes": [jpg, png, jpg],
    }


def test_hf_save_to_disk_writes_bytes_as_is(hf_rows, tmp_path, capsys):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "label": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "bytes": datasets.Value("binary"),
        }
    )
    ds = datasets.Dataset.from_dict(hf_rows, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()  # datasets' own progress bars
    out = tmp_path / "out"
    rc, _, err = run(capsys, "hf", "--input", tmp_path / "ds", "--answer-column", "label", "--out", out)
    assert rc == 1 and "several splits" in one_line_error(err) and "--split" in err
    rc, _, err = run(
        capsys,
        "hf",
        "--input",
        tmp_path / "ds",
        "--split",
        "train",
        "--answer-column",
        "label",
        "--answers-column",
        "answers",
        "--out",
        out,
    )
    assert rc == 0, err
    data = load(out / "data.json")
    assert [r["id"] for r in data] == ["ds-0", "ds-1", "ds-2"]
    assert [r["conversations"][1]["value"] for r in data] == ["red", "blue", "yes"]
    assert data[0]["answers"] == ["red", "red", "orange"]
    assert data[0]["image"].endswith(".jpg") and data[1]["image"].endswith(".png")
    assert data[2]["image"] == data[0]["image"]  # identical bytes stored once
    assert (out / data[0]["image"]).read_bytes() == hf_rows["bytes"][0]  # never re-encoded
    assert (out / data[1]["image"]).read_bytes() == hf_rows["bytes"][1]
    assert len(list((out / "images").iterdir())) == 2
    assert not (out / ".staging").exists()
    check_images_resolve(out / "data.json")

    # a single Dataset (not a DatasetDict) saved with save_to_disk
    ds.save_to_disk(str(tmp_path / "single"))
    capsys.readouterr()
    rc, _, err = run(capsys, "hf", "--input", tmp_path / "single", "--answer-column", "label", "--out", tmp_path / "o1")
    assert rc == 0, err
    assert len(load(tmp_path / "o1" / "data.json")) == 3

    # a raw-bytes column works too
    out2 = tmp_path / "out2"
    rc, _, err = run(
        capsys,
        "hf",
        "--input",
        tmp_path / "ds",
        "--split",
        "test",
        "--image-column",
        "bytes",
        "--answer-column",
        "label",
        "--out",
        out2,
    )
    assert rc == 0, err
    (rec,) = load(out2 / "data.json")
    assert (out2 / rec["image"]).read_bytes() == hf_rows["bytes"][0]


def test_hf_parquet_with_paths_and_bytes(hf_rows, tmp_path, capsys, monkeypatch):
    import datasets

    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (8, 8), "green").save(pics / "g.png")
    rows = {
        "img": [{"bytes": hf_rows["bytes"][0], "path": None}, {"bytes": None, "path": "g.png"}],
        "question": ["What color?", "What color?"],
        "answer": ["red", "green"],
        "qid": [7, 8],
    }
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "qid": datasets.Value("int64"),
        }
    )
    monkeypatch.chdir(pics)  # datasets looks at the path-only image while writing
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "part-0.parquet"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    out = tmp_path / "out"
    rc, _, err = run(
        capsys,
        "hf",
        "--input",
        tmp_path / "part-0.parquet",
        "--image-column",
        "img",
        "--id-column",
        "qid",
        "--image-root",
        pics,
        "--out",
        out,
    )
    assert rc == 0, err
    data = load(out / "data.json")
    assert [r["id"] for r in data] == ["7", "8"]
    assert (out / data[0]["image"]).read_bytes() == hf_rows["bytes"][0]
    assert data[1]["image"] == "images/g.png"
    assert os.stat(out / data[1]["image"]).st_ino == os.stat(pics / "g.png").st_ino
    check_images_resolve(out / "data.json")

    rc, _, err = run(capsys, "hf", "--input", tmp_path / "part-0.parquet", "--out", tmp_path / "o2")
    line = one_line_error(err)
    assert rc == 1 and "field 'image': column not found" in line and "img" in line


# ---------------------------------------------------------------------------------------------- CLI surface


def test_cli_help(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for source in ("okvqa", "vqav2", "csv", "jsonl", "hf"):
        assert f"  {source}" in out
    rc, out, _ = run(capsys, "okvqa", "--help")
    assert rc == 0
    for flag in (
        "--questions",
        "--annotations",
        "--images",
        "--answer-field",
        "--prompt-suffix",
        "--out",
        "--overwrite",
        "--val-fraction",
        "--seed",
        "--limit",
        "--strict",
        "raw_answer",
    ):
        assert flag in out
    assert "COCO names" in out  # field docstrings become the help text
    rc, out, _ = run(capsys, "hf", "--help")
    assert rc == 0 and "save_to_disk" in out


def test_cli_errors_are_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "okvq", "--out", tmp_path)
    assert rc == 2 and "did you mean 'okvqa'" in one_line_error(err)
    rc, _, err = run(capsys, "okvqa", "--questions", "q.json")
    assert rc == 2 and "--annotations is required" in one_line_error(err)
    rc, _, err = run(capsys, "csv", "--input", tmp_path / "x.csv")
    assert rc == 2 and "--out is required" in one_line_error(err)
    rc, _, err = run(capsys, "csv", "--input", tmp_path / "x.csv", "--out", tmp_path / "o", "--val-fraction", "1.5")
    assert rc == 2 and "--val-fraction" in one_line_error(err)
    rc, _, err = run(capsys, "csv", "--input", tmp_path / "x.csv", "--out", tmp_path / "o")
    assert rc == 1 and "x.csv: file not found" in one_line_error(err)
    rc, _, err = run(capsys)
    assert rc == 2 and "usage: llavatune prepare SOURCE" in err


def test_yaml_config_reproduces_a_run(okvqa, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "okvqa", *okvqa_args(okvqa), "--out", out, "--limit", "5")[0] == 0
    again = tmp_path / "again"
    rc, _, err = run(capsys, "okvqa", out / "llavatune_config.yaml", "--out", again)
    assert rc == 0, err
    assert load(out / "data.json") == load(again / "data.json")

"""``prepare --group_by_image``: one multi-turn record per image, for every source, with nothing lost for scoring."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.data.records import IMAGE_TOKEN, load_records, record_problems
from llavatune.data.shapes import make_shapes_vqa
from llavatune.eval.evaluate import EvalSet, question_records

SUFFIX = "Answer the question using a single word or phrase."


def prepare(capsys, *argv) -> list[dict]:
    rc = cli_main(["prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = Path(argv[argv.index("--out") + 1]) / "data.json"
    return json.loads(data.read_text()) if data.is_file() else []  # with --val-fraction: train/ and val/


def vqa_args(paths: dict, split: str = "val") -> list:
    return ["--questions", paths[f"{split}_questions"], "--annotations", paths[f"{split}_annotations"],
            "--images", paths["images_dir"]]


def check_grouped(grouped: list[dict], flat: list[dict], data_json: Path, max_turns: int) -> None:
    """Every question of ``flat`` sits in exactly one grouped record, about its image, with its answer, its
    question text and all its other fields; <image> only in each record's first turn."""
    by_id = {r["id"]: r for r in flat}
    seen = []
    for rec in grouped:
        conv, turns = rec["conversations"], rec["turns"]
        assert len(conv) == 2 * len(turns) and 1 <= len(turns) <= max_turns
        assert [t["from"] for t in conv] == ["human", "gpt"] * len(turns)
        assert conv[0]["value"].startswith(IMAGE_TOKEN + "\n")
        assert sum(t["value"].count(IMAGE_TOKEN) for t in conv) == 1
        for k, meta in enumerate(turns):
            src = by_id[meta["id"]]
            assert rec["image"] == src["image"]
            want_q = src["conversations"][0]["value"]
            got_q = conv[2 * k]["value"] if k == 0 else IMAGE_TOKEN + "\n" + conv[2 * k]["value"]
            assert got_q == want_q
            assert conv[2 * k + 1]["value"] == src["conversations"][1]["value"]
            extra = {key: v for key, v in src.items() if key not in ("id", "image", "conversations")}
            assert {key: v for key, v in meta.items() if key != "id"} == extra
            seen.append(meta["id"])
    assert sorted(seen) == sorted(by_id)  # nothing lost, nothing twice
    for rec in load_records(data_json):
        assert not record_problems(rec), rec


def test_vqav2_groups_questions_by_image(tmp_path, capsys):
    paths = make_shapes_vqa(tmp_path / "src", n_train_images=0, n_val_images=6, questions_per_image=5,
                            image_size=32, layout="vqav2")
    flat = prepare(capsys, "vqav2", *vqa_args(paths), "--out", tmp_path / "flat")
    grouped = prepare(capsys, "vqav2", *vqa_args(paths), "--out", tmp_path / "g", "--group-by-image")
    assert len(flat) == 30 and len(grouped) == 6
    check_grouped(grouped, flat, tmp_path / "g" / "data.json", 10)
    report = json.loads((tmp_path / "g" / "prepare_report.json").read_text())
    assert report["counts"]["records"] == 6 and report["counts"]["questions"] == 30
    assert report["counts"]["splits"]["all"] == {"records": 6, "questions": 30, "images": 6}
    assert all(t["answers"] and "multiple_choice_answer" in t and "question_type" in t
               for r in grouped for t in r["turns"])

    # the order is shuffled with --seed: reproducible, and another seed gives another order
    again = prepare(capsys, "vqav2", *vqa_args(paths), "--out", tmp_path / "g2", "--group-by-image")
    assert again == grouped
    other = prepare(capsys, "vqav2", *vqa_args(paths), "--out", tmp_path / "g3", "--group-by-image", "--seed", "1")
    order = [[t["id"] for t in r["turns"]] for r in grouped]
    assert [[t["id"] for t in r["turns"]] for r in other] != order
    assert [sorted(x) for x in order] == [sorted(t["id"] for t in r["turns"]) for r in other]
    assert order != [sorted(x) for x in order]  # really shuffled, not the file's order

    # a cap splits an image's questions into several records, each with the image
    capped = prepare(capsys, "vqav2", *vqa_args(paths), "--out", tmp_path / "c", "--group-by-image",
                     "--max-turns-per-record", "2")
    assert len(capped) == 18 and sorted({len(r["turns"]) for r in capped}) == [1, 2]
    check_grouped(capped, flat, tmp_path / "c" / "data.json", 2)
    assert len({r["id"] for r in capped}) == 18


def test_okvqa_with_val_split_groups_inside_each_split(tmp_path, capsys):
    paths = make_shapes_vqa(tmp_path / "src", n_train_images=8, n_val_images=0, questions_per_image=3, image_size=32)
    prepare(capsys, "okvqa", *vqa_args(paths, "train"), "--out", tmp_path / "flat", "--val-fraction", "0.25")
    prepare(capsys, "okvqa", *vqa_args(paths, "train"), "--out", tmp_path / "g", "--val-fraction", "0.25",
            "--group-by-image")
    for split in ("train", "val"):
        flat = json.loads((tmp_path / "flat" / split / "data.json").read_text())
        grouped = json.loads((tmp_path / "g" / split / "data.json").read_text())
        assert len(grouped) == len({r["image"] for r in flat})
        check_grouped(grouped, flat, tmp_path / "g" / split / "data.json", 10)


@pytest.fixture
def table(tmp_path) -> dict:
    root = tmp_path / "pics"
    rows = []
    for i, color in enumerate(("red", "green", "blue")):
        (root / "sub").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), color).save(root / "sub" / f"{color}.png")
        rows += [{"id": f"c{i}", "file": f"sub/{color}.png", "question": "What color is it?", "answer": color,
                  "answers": json.dumps([color, color, "dark " + color])},
                 {"id": f"s{i}", "file": f"sub/{color}.png", "question": "Is it square?", "answer": "yes",
                  "answers": "yes|yes|no"}]
    return {"root": root, "rows": rows}


def test_csv_and_jsonl_group_by_image(table, tmp_path, capsys):
    src = tmp_path / "qa.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(table["rows"][0]))
        w.writeheader()
        w.writerows(table["rows"])
    common = ["--image-column", "file", "--id-column", "id", "--answers-column", "answers", "--image-root",
              table["root"], "--prompt-suffix", SUFFIX]
    flat = prepare(capsys, "csv", "--input", src, *common, "--out", tmp_path / "flat")
    grouped = prepare(capsys, "csv", "--input", src, *common, "--out", tmp_path / "g", "--group-by-image")
    assert len(grouped) == 3
    check_grouped(grouped, flat, tmp_path / "g" / "data.json", 10)
    assert all(SUFFIX in t["value"] for r in grouped for t in r["conversations"][::2])

    jl = tmp_path / "qa.jsonl"
    jl.write_text("".join(json.dumps({**r, "answers": json.loads(r["answers"]) if r["answers"].startswith("[")
                                      else r["answers"]}) + "\n" for r in table["rows"]))
    common = ["--image-key", "file", "--id-key", "id", "--answers-key", "answers", "--image-root", table["root"]]
    flat = prepare(capsys, "jsonl", "--input", jl, *common, "--out", tmp_path / "jflat")
    grouped = prepare(capsys, "jsonl", "--input", jl, *common, "--out", tmp_path / "jg", "--group-by-image",
                      "--max-turns-per-record", "1")
    assert len(grouped) == 6  # a cap of 1: one question per record, still the 'turns' layout
    check_grouped(grouped, flat, tmp_path / "jg" / "data.json", 1)


def test_hf_group_by_image(tmp_path, capsys):
    import datasets

    def encoded(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        return buf.getvalue()

    red, blue = encoded("red"), encoded("blue")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}, {"bytes": red, "path": None}],
         "question": ["What color?", "What color?", "Is it red?"], "answer": ["red", "blue", "yes"]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()
    flat = prepare(capsys, "hf", "--input", tmp_path / "ds", "--out", tmp_path / "flat")
    grouped = prepare(capsys, "hf", "--input", tmp_path / "ds", "--out", tmp_path / "g", "--group-by-image")
    assert len(grouped) == 2 and sorted(len(r["turns"]) for r in grouped) == [1, 2]
    check_grouped(grouped, flat, tmp_path / "g" / "data.json", 10)


def test_bad_cap_is_a_one_line_error(tmp_path, capsys):
    paths = make_shapes_vqa(tmp_path / "src", n_train_images=0, n_val_images=1, questions_per_image=1, image_size=32)
    rc = cli_main(["prepare", "okvqa", *map(str, vqa_args(paths)), "--out", str(tmp_path / "o"), "--group-by-image",
                   "--max-turns-per-record", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "--max-turns-per-record" in err and "Traceback" not in err


def test_evaluation_asks_each_grouped_question_on_its_own(tmp_path, capsys):
    """A grouped record evaluates as its questions did before grouping: same prompts, same scoring fields."""
    paths = make_shapes_vqa(tmp_path / "src", n_train_images=0, n_val_images=3, questions_per_image=4,
                            image_size=32, layout="vqav2")
    prepare(capsys, "vqav2", *vqa_args(paths), "--out", tmp_path / "flat")
    prepare(capsys, "vqav2", *vqa_args(paths), "--out", tmp_path / "g", "--group-by-image")
    flat = EvalSet.from_records(load_records(tmp_path / "flat" / "data.json"), tmp_path / "flat")
    grouped = EvalSet.from_records(load_records(tmp_path / "g" / "data.json"), tmp_path / "g")
    assert len(grouped.queries) == len(flat.queries) == 12
    f = {r.id: (q.turns, ref, r.extra) for r, q, ref in zip(flat.records, flat.queries, flat.references)}
    for r, q, ref in zip(grouped.records, grouped.queries, grouped.references):
        turns, fref, extra = f[r.id]
        assert [(t.role, t.value) for t in q.turns] == [(t.role, t.value) for t in turns]
        assert ref == fref
        assert {k: v for k, v in r.extra.items() if k != "record"} == extra
    assert len(EvalSet.from_records(load_records(tmp_path / "g" / "data.json"), tmp_path / "g", 5).queries) == 5

    bad = load_records(tmp_path / "g" / "data.json")[0]
    bad.extra["turns"] = bad.extra["turns"][:-1]
    with pytest.raises(Exception, match="field 'turns'"):
        question_records(bad)


def test_training_on_grouped_records_and_evaluating_each_question(tmp_path, capsys):
    """Grouped records train (every answer supervised, the masking self-check passes) and between-epoch evaluation
    scores every question of the grouped validation records, with the generation's speed logged."""
    paths = make_shapes_vqa(tmp_path / "src", n_train_images=6, n_val_images=3, questions_per_image=4,
                            image_size=32, layout="vqav2")
    for split in ("train", "val"):
        prepare(capsys, "vqav2", *vqa_args(paths, split), "--out", tmp_path / split, "--group-by-image")
    out = tmp_path / "run"
    rc = cli_main(["train", "--model", "tiny", "--data", str(tmp_path / "train" / "data.json"), "--val_data",
                   str(tmp_path / "val" / "data.json"), "--output_dir", str(out), "--max_steps", "2",
                   "--per_device_train_batch_size", "2", "--eval_strategy", "steps", "--eval_steps", "2",
                   "--save_strategy", "no", "--report_to", "none", "--lora_r", "4", "--lora_alpha", "8",
                   "--eval_max_new_tokens", "3", "--dataloader_num_workers", "0"])
    assert rc == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = next(r for r in rows if "eval_vqa_accuracy" in r)
    assert ev["eval_generation_seconds"] > 0 and ev["eval_generation_samples_per_second"] > 0
    assert ev["eval_samples_per_second"] != ev["eval_generation_samples_per_second"]  # the Trainer's own is kept
    preds = [json.loads(x) for x in (out / "eval_predictions" / "step-2.jsonl").read_text().splitlines()]
    val_ids = {t["question_id"] for r in json.loads((tmp_path / "val" / "data.json").read_text()) for t in r["turns"]}
    assert len(preds) == 12 and {p["question_id"] for p in preds} == val_ids
    assert all(p["scored_by"] == "vqa" for p in preds)

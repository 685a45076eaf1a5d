"""``llavatune check``: every malformation is found, counted and named; --fix keeps nothing silently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavatune.cli import main as cli
from llavatune.data.records import load_records, read_json_objects
from llavatune.utils import resolve_under


def _conv(q="<image>\nWhat is it?", a="a cat"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _rec(rid, image=None, conv=None):
    r = {"id": rid} if rid is not None else {}
    if image is not None:
        r["image"] = image
    r["conversations"] = conv if conv is not None else _conv()
    return r


def _noise(w, h, channels=3):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return (np.random.default_rng(0).random(shape) * 255).astype("uint8")


@pytest.fixture
def dataset(tmp_path):
    """A data folder with good, odd-mode and broken images, and records with every malformation."""
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    Image.fromarray(_noise(16, 16)).save(d / "rgb.jpg")
    Image.fromarray(_noise(16, 16)).save(d / "img" / "sub.jpg")
    Image.new("CMYK", (16, 16), (0, 50, 100, 0)).save(d / "cmyk.jpg")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(d / "rgba.png")
    im16 = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)
    assert im16.mode == "I;16"
    im16.save(d / "i16.png")
    Image.fromarray(_noise(16, 16, 1), "L").save(d / "gray.png")
    Image.fromarray(_noise(64, 64)).save(tmp_path / "full.jpg", quality=95)
    full = (tmp_path / "full.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (d / "notimage.jpg").write_text("this is not an image\n")
    Image.new("RGB", (100, 100)).save(d / "big.png")  # 10,000 px > --max-pixels 5000 below
    Image.fromarray(_noise(8, 8)).save(tmp_path / "escape.jpg")
    Image.fromarray(_noise(8, 8)).save(tmp_path / "outside.jpg")

    records = [
        _rec("ok1", "rgb.jpg"),  # 0
        _rec("ok-cmyk", "cmyk.jpg"),  # 1
        _rec("ok-rgba", "rgba.png"),  # 2
        _rec("ok-16", "i16.png"),  # 3
        _rec("ok-gray", "gray.png"),  # 4
        _rec("text-only", None, _conv("Say hi.", "hi")),  # 5
        _rec("ok-sub", "img/sub.jpg"),  # 6
        _rec("ok-abs", str(d / "rgb.jpg")),  # 7  absolute but inside the folder: fine
        {  # 8  messages format
            "id": "ok-msg",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "a dog"},
            ],
            "images": ["rgb.jpg"],
        },
        _rec("missing", "nope.jpg"),  # 9
        _rec("trunc", "trunc.jpg"),  # 10
        _rec("notimg", "notimage.jpg"),  # 11
        _rec("big", "big.png"),  # 12
        _rec("escape", "../escape.jpg"),  # 13
        _rec("abs-out", str(tmp_path / "outside.jpg")),  # 14
        "just a string",  # 15
        {"id": "noconv", "image": "rgb.jpg"},  # 16
        _rec("badrole", "rgb.jpg", [{"from": "robot", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]),  # 17
        _rec("emptyturn", "rgb.jpg", _conv(a="  ")),  # 18
        _rec("notalt", "rgb.jpg", _conv() + [{"from": "gpt", "value": "again"}]),  # 19
        _rec("startgpt", None, [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]),  # 20
        _rec(None, "rgb.jpg", [{"from": "human", "value": "<image>\nq"}]),  # 21  no id, no gpt turn
        _rec("mismatch", "rgb.jpg", _conv(q="no placeholder here")),  # 22
        _rec("ok1", "rgb.jpg"),  # 23  duplicate id
        _rec("two-bad", "nope2.jpg", _conv(q="no placeholder")),  # 24  two problems, both reported
    ]
    path = d / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _run(capsys, *argv):
    rc = cli(["check", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _report(path) -> dict:
    return json.loads(Path(path).read_text())


def test_report_counts_every_problem(dataset, tmp_path, capsys):
    rc, out, _ = _run(capsys, dataset, "--max-pixels", 5000, "--json", tmp_path / "r.json", "--examples", 20)
    assert rc == 1
    rep = _report(tmp_path / "r.json")
    assert rep["records"] == {"read": 25, "clean": 9, "rejected": 16}
    errors = rep["counts"]["error"]
    assert errors == {
        "image-missing": 2,
        "image-truncated": 1,
        "image-unreadable": 1,
        "image-too-large": 1,
        "image-path-escapes": 2,
        "not-an-object": 1,
        "missing-conversations": 1,
        "unknown-role": 1,
        "empty-answer": 1,
        "not-alternating": 1,  # 'notalt' ('startgpt' is reported once, as not starting with a human turn)
        "not-starting-with-human": 1,
        "no-gpt-turn": 1,
        "placeholder-mismatch": 2,
        "duplicate-id": 1,
    }
    assert rep["counts"]["info"] == {
        "image-mode-cmyk": 1,
        "image-mode-alpha": 1,
        "image-mode-16bit": 1,
        "image-mode-grayscale": 1,
    }
    assert rep["counts"]["warning"] == {}
    assert rep["images"]["modes"]["CMYK"] == 1 and rep["images"]["modes"]["I;16"] == 1
    assert rep["images"]["bad_files"] == 5  # nope, nope2, trunc, notimage, big (escapes are never opened)
    by_kind: dict[str, set] = {}
    for p in rep["problems"]:
        by_kind.setdefault(p["kind"], set()).add(p["record"])
    assert by_kind["image-missing"] == {"'missing'", "'two-bad'"}
    assert by_kind["image-truncated"] == {"'trunc'"}
    assert by_kind["image-unreadable"] == {"'notimg'"}
    assert by_kind["image-too-large"] == {"'big'"}
    assert by_kind["image-path-escapes"] == {"'escape'", "'abs-out'"}
    assert by_kind["not-an-object"] == {"#15"}
    assert by_kind["missing-conversations"] == {"'noconv'"}
    assert by_kind["unknown-role"] == {"'badrole'"}
    assert by_kind["empty-answer"] == {"'emptyturn'"}
    assert by_kind["not-starting-with-human"] == {"'startgpt'"}
    assert by_kind["no-gpt-turn"] == {"#21"}
    assert by_kind["placeholder-mismatch"] == {"'mismatch'", "'two-bad'"}
    assert by_kind["duplicate-id"] == {"'ok1' (#23)"}  # the repeating record is named by its position too
    dup = next(p for p in rep["problems"] if p["kind"] == "duplicate-id")
    assert dup["index"] == 23 and dup["field"] == "id"
    assert dup["message"].startswith("record #23 repeats the id 'ok1' of record #0")
    esc = next(p for p in rep["problems"] if p["record"] == "'escape'")
    assert esc["field"] == "image" and esc["image"] == "../escape.jpg" and esc["file"] == str(dataset)

    # the printed report: totals, counts per kind, examples naming file, record and field
    assert "25 read, 9 without errors, 16 with errors" in out
    assert "errors: 17" in out and "info: 4" in out
    assert f"{dataset}: record 'trunc': field 'image': 'trunc.jpg'" in out
    assert f"{dataset}: record #21: field 'conversations'" in out
    assert f"{dataset}: record 'badrole': field 'conversations[0].from': unknown role 'robot'" in out
    assert "result: FAILED" in out


def test_examples_are_limited_per_kind(dataset, capsys):
    rc, out, _ = _run(capsys, "--max-pixels", 5000, dataset, "--examples", 1)  # DATA may follow flags
    assert rc == 1
    assert "[error] image-path-escapes (2):" in out
    assert "... and 1 more" in out


def test_clean_dataset_exits_zero_with_info(dataset, tmp_path, capsys):
    good = [o for o in json.loads(dataset.read_text())[:9]]
    path = dataset.parent / "good.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in good) + "\n")
    rc, out, _ = _run(capsys, path)
    assert rc == 0, out
    assert "result: OK" in out
    assert "image-mode-cmyk" in out and "9 read, 9 without errors, 0 with errors" in out


def test_fix_writes_trainable_copy_and_rejects(dataset, tmp_path, capsys):
    out_path = tmp_path / "clean.json"  # the parent of the image folder: paths get rewritten
    rc, out, _ = _run(capsys, dataset, "--max-pixels", 5000, "--fix", out_path)
    assert rc == 1
    clean = load_records(out_path)
    assert [r.id for r in clean] == [
        "ok1", "ok-cmyk", "ok-rgba", "ok-16", "ok-gray", "text-only", "ok-sub", "ok-abs", "ok-msg"
    ]  # fmt: skip
    for r in clean:
        for img in r.images:
            assert not Path(img).is_absolute() and not img.startswith("..")
            assert resolve_under(out_path.parent, img).is_file()
    assert clean[0].images == ["data/rgb.jpg"] and clean[6].images == ["data/img/sub.jpg"]
    assert clean[7].images == ["data/rgb.jpg"]
    rejects = [json.loads(x) for x in (tmp_path / "clean.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 16 and len(clean) + len(rejects) == 25
    by_index = {r["index"]: r for r in rejects}
    assert {x["kind"] for x in by_index[24]["reasons"]} == {"image-missing", "placeholder-mismatch"}
    assert by_index[24]["record"]["id"] == "two-bad"
    assert by_index[15]["record"] == "just a string" and by_index[15]["reasons"][0]["kind"] == "not-an-object"
    assert by_index[23]["reasons"] == [
        {"kind": "duplicate-id", "field": "id", "message": by_index[23]["reasons"][0]["message"]}
    ]
    assert all(r["reasons"] for r in rejects)
    assert "wrote 9 record(s) without errors" in out
    # the cleaned copy checks clean
    rc, out, _ = _run(capsys, out_path)
    assert rc == 0, out


def test_fix_in_image_folder_keeps_paths(dataset, capsys):
    out_path = dataset.parent / "clean.json"
    _run(capsys, dataset, "--max-pixels", 5000, "--fix", out_path)
    clean = load_records(out_path)
    assert clean[0].images == ["rgb.jpg"] and clean[7].images == [str(dataset.parent / "rgb.jpg")]
    assert (dataset.parent / "clean.rejects.jsonl").is_file()


def test_fix_elsewhere_names_the_image_folder(dataset, tmp_path, capsys):
    out_path = tmp_path / "elsewhere" / "clean.json"
    rc, out, _ = _run(capsys, dataset, "--max-pixels", 5000, "--fix", out_path)
    assert f"train with --image-folder {dataset.parent}" in out
    clean = load_records(out_path)
    assert clean[0].images == ["rgb.jpg"]
    rc, out, _ = _run(capsys, out_path, "--image-folder", dataset.parent)
    assert rc == 0, out


def test_fix_refuses_jsonl_and_input(dataset, capsys):
    rc, _, err = _run(capsys, dataset, "--fix", dataset.with_suffix(".jsonl"))
    assert rc == 1 and ".json" in err
    rc, _, err = _run(capsys, dataset, "--fix", dataset)
    assert rc == 1 and "input file" in err


def test_jsonl_bad_lines_and_invalid_utf8(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    good = json.dumps(_rec("good", None, _conv("q", "a"))).encode()
    bad_utf8 = json.dumps(_rec("latin", None, _conv("q", "caf#"))).encode().replace(b"#", b"\xe9")
    path.write_bytes(good + b"\n" + bad_utf8 + b"\n" + b"{not json\n" + good.replace(b"good", b"good2") + b"\n")
    offset = len(good) + 1 + bad_utf8.index(b"\xe9")
    rc, out, _ = _run(capsys, path, "--json", tmp_path / "r.json", "--fix", tmp_path / "clean.json")
    assert rc == 1
    rep = _report(tmp_path / "r.json")
    assert rep["records"] == {"read": 4, "clean": 2, "rejected": 2}
    assert f"invalid UTF-8 at byte {offset} (line 2)" in out
    kinds = {(p["kind"], p["record"], p["file"]) for p in rep["problems"]}
    assert ("invalid-utf8", "'latin'", f"{path}:2") in kinds
    assert ("invalid-json", "#2", f"{path}:3") in kinds
    assert [r.id for r in load_records(tmp_path / "clean.json")] == ["good", "good2"]
    rejects = [json.loads(x) for x in (tmp_path / "clean.rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["line"]) for r in rejects] == [(1, 2), (2, 3)]
    assert rejects[1]["record"] == "{not json"


def test_invalid_utf8_json_file(tmp_path, capsys):
    path = tmp_path / "d.json"
    text = json.dumps([_rec("a", None, _conv("q", "a")), _rec("b", None, _conv("q", "caf#"))]).encode()
    path.write_bytes(text.replace(b"#", b"\xff"))
    rc, out, _ = _run(capsys, path)
    assert rc == 1
    assert f"invalid UTF-8 at byte {text.index(b'#')} (line 1)" in out
    assert "record 'b': field 'conversations[1].value': holds invalid UTF-8 bytes" in out
    assert "2 read, 1 without errors" in out


@pytest.mark.parametrize(
    "content, kind", [("{not json", "invalid-json"), ('{"id": 1}', "not-a-list"), ("[1, 2", "invalid-json")]
)
def test_file_level_errors(tmp_path, capsys, content, kind):
    path = tmp_path / "d.json"
    path.write_text(content)
    rc, out, _ = _run(capsys, path, "--json", tmp_path / "r.json", "--fix", tmp_path / "c.json")
    assert rc == 1
    assert _report(tmp_path / "r.json")["counts"]["error"] == {kind: 1}
    assert "could not be read" in out and not (tmp_path / "c.json").exists()


def test_missing_data_file(tmp_path, capsys):
    rc, _, err = _run(capsys, tmp_path / "nope.json")
    assert rc == 1 and "file not found" in err
    rc, _, err = _run(capsys, tmp_path / "a.json", tmp_path / "b.json")
    assert rc == 2 and "one dataset" in err


def test_model_length_statistics(tmp_path, capsys):
    from transformers import AutoProcessor

    from llavatune.data.encode import image_tokens_per_image
    from llavatune.model.tiny import build_tiny

    words = "red green blue cat dog house tree car"
    d = tmp_path / "data"
    d.mkdir()
    Image.fromarray(_noise(16, 16)).save(d / "a.jpg")
    long_answer = " ".join([words] * 20)
    recs = [
        _rec("short", "a.jpg", _conv("<image>\nred?", "cat")),
        _rec("mid", "a.jpg", _conv("<image>\n" + words, words)),
        _rec("long", None, _conv("Say it.", long_answer)),
    ]
    (d / "data.json").write_text(json.dumps(recs))
    model = tmp_path / "model"
    build_tiny([words, "Say it. What is it?"], model)
    processor = AutoProcessor.from_pretrained(model)
    per_image = image_tokens_per_image(processor)
    assert per_image == (32 // 8) ** 2  # 16 patches, CLS added (+1) then dropped by "default" (-1)

    def n_text(rec):
        text = "\n".join(t["value"].replace("<image>", "") for t in rec["conversations"])
        return len(processor.tokenizer(text)["input_ids"])

    expected = sorted([n_text(recs[0]) + per_image, n_text(recs[1]) + per_image, n_text(recs[2])])
    assert expected[-1] == n_text(recs[2]) > 60 > expected[1]
    rc, out, _ = _run(capsys, d / "data.json", "--model", model, "--max-length", 60, "--json", tmp_path / "r.json")
    assert rc == 0, out  # too long is a warning, not an error
    lengths = _report(tmp_path / "r.json")["lengths"]
    assert lengths["image_tokens_per_image"] == 16 and lengths["samples"] == 3
    assert (lengths["min"], lengths["median"], lengths["max"]) == tuple(expected)
    assert lengths["p95"] == expected[-1] and lengths["over_max_length"] == 1
    assert "1 over --max-length 60" in out
    assert "record 'long'" in out and "too-long" in out


def test_raw_records_readable_by_loader(dataset):
    # sanity: the fixture's data file is valid JSON the normal reader accepts
    assert len(read_json_objects(dataset)) == 25


def test_model_lengths_say_what_the_configured_truncation_does(tmp_path, capsys):
    """Reproduction 12: `check --model` said an over-length sample "will be truncated" when training drops it."""
    from llavatune.model.tiny import build_tiny

    words = "red green blue cat dog house tree car"
    d = tmp_path / "data"
    d.mkdir()
    Image.fromarray(_noise(16, 16)).save(d / "a.jpg")
    long_answer = " ".join([words] * 20)
    recs = [
        _rec("ok", "a.jpg", _conv("<image>\nred?", "cat")),
        _rec("long", None, _conv("Say it.", long_answer)),
        _rec("multi", "a.jpg", _conv("<image>\nred?", "cat") + _conv("Say it.", long_answer)),
    ]
    (d / "data.json").write_text(json.dumps(recs))
    model = tmp_path / "model"
    build_tiny([words, "Say it. What is it?"], model)

    def warnings_of(*flags):
        rc, out, _ = _run(capsys, d / "data.json", "--model", model, "--max-length", 60, "--json", tmp_path / "r.json",
                          *flags)
        assert rc == 0, out
        probs = _report(tmp_path / "r.json")["problems"]
        return {p["record"]: p["message"] for p in probs if p["kind"] == "too-long"}

    dropped = warnings_of()
    assert set(dropped) == {"'long'", "'multi'"}
    assert all("training drops it (--truncation drop" in m for m in dropped.values()), dropped
    kept = warnings_of("--truncation", "truncate")
    assert "keeps its first 1 of 2 exchanges, whole" in kept["'multi'"], kept
    assert "cuts its answer short" in kept["'long'"], kept

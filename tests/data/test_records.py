"""The record layer: LLaVA and messages formats, extra fields, text-only records, clear errors."""

from __future__ import annotations

import json

import pytest

from llavatune.data.records import DataError, load_records, normalize_image_placement, record_problems, write_records


def write(tmp_path, name, obj):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(o) + "\n" for o in obj))
    else:
        p.write_text(json.dumps(obj))
    return p


def test_llava_format_keeps_extra_fields_and_roundtrips(tmp_path):
    recs = [{"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                              {"from": "gpt", "value": "A"}],
             "question_id": 7, "answers": ["A"] * 10, "question_type": "what"},
            {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    loaded = load_records(write(tmp_path, "d.json", recs))
    assert loaded[0].images == ["x.jpg"] and loaded[0].extra == {"question_id": 7, "answers": ["A"] * 10,
                                                                  "question_type": "what"}
    assert loaded[1].images == [] and record_problems(loaded[1]) == []
    write_records(tmp_path / "out.json", loaded)
    assert json.loads((tmp_path / "out.json").read_text()) == recs


def test_messages_format_becomes_the_same_record(tmp_path):
    msgs = [{"id": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": ["r.png"], "answers": ["red"]}]
    (rec,) = load_records(write(tmp_path, "m.jsonl", msgs))
    assert [t.role for t in rec.conversations] == ["system", "human", "gpt"]
    assert rec.conversations[1].value == "<image>\nWhat color?" and rec.images == ["r.png"]
    assert rec.extra == {"answers": ["red"]} and record_problems(rec) == []


def test_multi_image_list_and_placement(tmp_path):
    (rec,) = load_records(write(tmp_path, "d.json", [{"id": "mi", "image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "same"}]}]))
    assert rec.images == ["a.jpg", "b.jpg"] and rec.n_placeholders == 2
    (one,) = load_records(write(tmp_path, "e.json", [{"id": "s", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "What is this <image>?"}, {"from": "gpt", "value": "x"}]}]))
    assert normalize_image_placement(one).conversations[0].value == "<image>\nWhat is this ?"


@pytest.mark.parametrize("obj, field, words", [
    ({"id": "r1", "conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from", "unknown role"),
    ({"id": "r2", "conversations": "hello"}, "conversations", "must be a list"),
    ({"id": "r3", "image": 5, "conversations": []}, "image", "path string"),
    ({"id": "r4"}, None, "needs 'conversations'"),
])
def test_errors_name_file_record_and_field(tmp_path, obj, field, words):
    p = write(tmp_path, "bad.json", [obj])
    with pytest.raises(DataError) as e:
        load_records(p)
    msg = str(e.value)
    assert str(p) in msg and repr(obj["id"]) in msg and words in msg
    if field:
        assert f"field '{field}'" in msg


def test_jsonl_error_names_line_and_utf8_error_names_byte(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "conversations": []}\n{not json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        load_records(p)
    q = tmp_path / "u.json"
    q.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(DataError, match="invalid UTF-8 at byte"):
        load_records(q)


def test_structural_problems_are_reported():
    from llavatune.data.records import Record, Turn

    r = Record("x", [Turn("gpt", "a"), Turn("human", "")], images=["i.jpg"])
    found = {(q.kind, q.field) for q in record_problems(r)}  # problems are data: kind and field, no text matching
    assert {("not-starting-with-human", "conversations[0]"), ("placeholder-mismatch", "image"),
            ("empty-turn", "conversations[1].value")} <= found
    assert all(q.severity == "error" and q.record == "'x'" for q in record_problems(r))


@pytest.mark.parametrize("value, want", [
    ("<image>What is this?", "<image>\nWhat is this?"),  # the original rewrites these too (preprocess_multimodal)
    ("<image> What is this?", "<image>\nWhat is this?"),
    ("<image>\nWhat is this?", "<image>\nWhat is this?"),
    ("What is this?\n<image>", "<image>\nWhat is this?"),
    ("<image>", "<image>"),  # (<image> + "\n" + "").strip()
])
def test_single_image_placement_equals_the_original(tmp_path, value, want):
    (rec,) = load_records(write(tmp_path, "p.json", [{"id": "s", "image": "a.jpg", "conversations": [
        {"from": "human", "value": value}, {"from": "gpt", "value": "x"}]}]))
    assert normalize_image_placement(rec).conversations[0].value == want

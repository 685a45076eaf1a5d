"""One reader for the JSON / JSONL / text files users give: the same errors, naming file and line, in every command."""

from __future__ import annotations

import json

import pytest

from llavatune.cli import main as cli
from llavatune.data.reader import (
    DataError,
    load_json,
    parse_jsonl,
    read_json_objects,
    read_jsonl_lines,
    read_text,
)


def test_text_drops_the_bom_and_names_the_bad_byte_and_its_line(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"\xef\xbb\xbfhello\nw\xe9rld\n")
    with pytest.raises(DataError) as e:
        read_text(p, "--input")
    # byte 10: the BOM (3) + "hello\n" (6) + "w" before it; line 2
    assert str(e.value) == f"{p}: invalid UTF-8 at byte 10 (line 2); re-save the file as UTF-8"
    assert e.value.kind == "invalid-utf8"
    p.write_bytes(b"\xef\xbb\xbfhello")
    assert read_text(p) == "hello"
    with pytest.raises(DataError, match=r"nope\.txt: file not found \(--input\)"):
        read_text(tmp_path / "nope.txt", "--input")
    with pytest.raises(DataError, match="is a folder"):
        read_text(tmp_path)


def test_json_errors_name_line_and_column(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"a": 1},\n  {"b": }\n]\n')
    with pytest.raises(DataError) as e:
        load_json(p)
    assert str(e.value).startswith(f"{p}:3: not valid JSON (column 9): ")
    assert (e.value.line, e.value.kind) == (3, "invalid-json")


def test_record_lists_unwrap_data_and_jsonl_splits_on_newlines_only(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"data": [{"id": 1}, {"id": 2}]}))
    assert read_json_objects(p) == [{"id": 1}, {"id": 2}]
    p.write_text(json.dumps({"id": 1}))
    with pytest.raises(DataError, match="expected a JSON list of records"):
        read_json_objects(p)
    q = tmp_path / "d.jsonl"
    # U+2028 (LINE SEPARATOR) inside a string: str.splitlines() would cut the line there
    q.write_text('{"q": "a\u2028b"}\n\n{"q": "c"}\n', encoding="utf-8")
    assert read_jsonl_lines(q) == [(1, {"q": "a\u2028b"}), (3, {"q": "c"})]
    assert read_json_objects(q) == [{"q": "a\u2028b"}, {"q": "c"}]
    lines = parse_jsonl(q, '{"ok": 1}\n{bad\n')
    assert next(lines) == (1, {"ok": 1})
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        next(lines)


def test_error_names_file_line_record_and_field():
    e = DataError("d.jsonl", "'q1'", "conversations[0].from", "unknown role 'bot'", line=4, kind="unknown-role")
    assert str(e) == "d.jsonl:4: record 'q1': field 'conversations[0].from': unknown role 'bot'"


def _one_line(err: str, prog: str) -> str:
    (line,) = [x for x in err.splitlines() if x.startswith(f"{prog}: error: ")]
    return line


def test_every_command_reports_a_bad_byte_the_same_way(tmp_path, capsys):
    """prepare (VQA, CSV, JSONL), score and synth all read through the one reader: one message, naming the byte
    offset and the line (before, each said it differently, and some named neither)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    questions = bad / "questions.json"
    questions.write_bytes(b'{"questions": [\n {"question": "caf\xe9?"}]}')
    table = bad / "qa.csv"
    table.write_bytes(b"image,question,answer\na.jpg,caf\xe9?,yes\n")
    rows = bad / "qa.jsonl"
    rows.write_bytes(b'{"image": "a.jpg", "question": "ok", "answer": "yes"}\n{"question": "caf\xe9"}\n')
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"annotations": []}))
    good_q, good_a = tmp_path / "q.json", tmp_path / "a.json"
    good_q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]}))
    good_a.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "yes"}]}]}))
    cases = [
        (["prepare", "okvqa", "--questions", str(questions), "--annotations", str(good), "--images", str(bad),
          "--out", str(tmp_path / "o1")], questions, 34, 2),
        (["prepare", "csv", "--input", str(table), "--out", str(tmp_path / "o2")], table, 31, 2),
        (["prepare", "jsonl", "--input", str(rows), "--out", str(tmp_path / "o3")], rows, 71, 2),
        (["score", "--questions", str(good_q), "--annotations", str(good_a), "--predictions", str(rows)], rows, 71, 2),
        (["score", "--questions", str(questions), "--annotations", str(good), "--predictions", str(rows)],
         questions, 34, 2),
        (["synth", "--input", str(rows), "--out", str(tmp_path / "s.json"), "--model", "m", "--endpoint",
          "http://127.0.0.1:9/v1"], rows, 71, 2),
    ]
    for argv, path, offset, line in cases:
        assert cli(argv) == 1, argv
        message = _one_line(capsys.readouterr().err, f"llavatune {argv[0]}")
        assert message.endswith(f"{path}: invalid UTF-8 at byte {offset} (line {line}); re-save the file as UTF-8"), (
            argv, message)


def test_a_broken_model_json_is_one_line_naming_file_and_line(tmp_path, capsys):
    """Model folders' JSON files (config.json for plan, adapter_config.json for predict / eval / merge, an original
    checkpoint's config.json for convert) are read through the reader too: one line, not a JSONDecodeError traceback."""
    for name, argv in (("config.json", ["plan", "--model"]),
                       ("adapter_config.json", ["predict", "--question", "What?", "--model"]),
                       ("config.json", ["convert", "--out", str(tmp_path / "out"), "--from-original"])):
        d = tmp_path / f"m-{argv[0]}"
        d.mkdir()
        (d / name).write_text('{\n  "model_type": "llava",\n  oops\n}\n')
        assert cli([*argv, str(d)]) == 1, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert _one_line(err, f"llavatune {argv[0]}").endswith(f"{d / name}:3: not valid JSON (column 3): "
                                                               "Expecting property name enclosed in double quotes")

"""Fault injection: one table of damaged datasets, each run through `check` and `train`.

Every row asserts the exit code, one error line naming file, record and field, no traceback, that `train` refuses
before writing anything (default --max_bad_records) or skips the record with a report naming it (a larger
--max_bad_records), that `check` and `train` agree on what is an error, and that every input file is byte-identical
afterwards. Below the table: the reproductions of issue 12 that are about commands rather than one bad record.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from llavatune.cli import main as cli

FAST = ["--report_to", "none", "--lora_r", "4", "--lora_alpha", "8", "--per_device_train_batch_size", "4",
        "--dataloader_num_workers", "0", "--save_strategy", "no", "--seed", "0"]
COLORS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
N = 8  # records in the clean dataset: one bad record is 12.5 %, over the default --max_bad_records 0.01


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """One tiny llava-hf model for every row (passed as a local --model folder)."""
    from llavatune.model.tiny import build_tiny

    d = tmp_path_factory.mktemp("fault_base") / "model"
    build_tiny(["What color is the shape?", "red green blue yellow", "Say hi. hello"], d)
    return d


def _rec(i: int, conv=None, image="default", rid="default") -> dict:
    color = list(COLORS)[i % 4]
    r: dict = {"id": f"r{i}" if rid == "default" else rid}
    if rid is None:
        del r["id"]
    if image is not None:
        r["image"] = f"images/{color}.jpg" if image == "default" else image
    r["conversations"] = conv if conv is not None else [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": color}]
    return r


def make_clean(root: Path) -> list:
    (root / "images").mkdir(parents=True)
    for name, rgb in COLORS.items():
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{name}.jpg", quality=95)
    Image.new("RGB", (8, 8)).save(root.parent / "outside.jpg")
    return [_rec(i) for i in range(N)]


def _bomb(path: Path, side: int = 20000) -> None:
    """A real 20000 x 20000 PNG (400 Mpx) of a few kilobytes."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _set(i: int, rec) -> Callable:
    def apply(root: Path, recs: list):
        recs[i] = rec(root) if callable(rec) else rec
        return recs
    return apply


def _truncated(root: Path) -> dict:
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype("uint8")).save(root / "images" / "t.jpg")
    data = (root / "images" / "t.jpg").read_bytes()
    (root / "images" / "t.jpg").write_bytes(data[: len(data) * 2 // 3])
    return _rec(3, image="images/t.jpg")


def _corrupt(root: Path) -> dict:
    (root / "images" / "c.jpg").write_bytes(b"<html>this is an error page, not a JPEG</html>\n")
    return _rec(3, image="images/c.jpg")


def _bomb_rec(root: Path) -> dict:
    _bomb(root / "images" / "bomb.png")
    return _rec(3, image="images/bomb.png")


def _dir_rec(root: Path) -> dict:
    (root / "images" / "a_folder.jpg").mkdir()
    return _rec(3, image="images/a_folder.jpg")


def _raw(text: bytes) -> Callable:
    return lambda root, recs: text


def _jsonl_bad_line(root: Path, recs: list) -> bytes:
    lines = [json.dumps(r).encode() for r in recs]
    lines[3] = b'{"id": "r3", "conversations": [oops'
    return b"\n".join(lines) + b"\n"


H = {"from": "human", "value": "<image>\nWhat color is the shape?"}
G = {"from": "gpt", "value": "red"}


@dataclass
class Fault:
    name: str
    kind: str
    apply: Callable
    record: str | None = "'r3'"  # how messages name the bad record (None: the file itself is wrong)
    field: str | None = None
    message: str = ""  # a piece of the message
    data_name: str = "data.json"
    line: int | None = None  # .jsonl: the line the record is on

    @property
    def structural(self) -> bool:
        return self.record is None


FAULTS = [
    # images (found before step 1, never mid-run)
    Fault("missing image", "image-missing", _set(3, _rec(3, image="images/nope.jpg")), field="image",
          message="image file not found"),
    Fault("truncated image", "image-truncated", _set(3, _truncated), field="image", message="truncated"),
    Fault("corrupt image", "image-unreadable", _set(3, _corrupt), field="image", message="cannot read image"),
    Fault("decompression bomb", "image-too-large", _set(3, _bomb_rec), field="image", message="400000000 pixels"),
    Fault("directory as image", "image-is-directory", _set(3, _dir_rec), field="image", message="is a directory"),
    Fault("../ escape", "image-path-escapes", _set(3, _rec(3, image="../outside.jpg")), field="image",
          message="outside the image folder"),
    Fault("absolute path outside", "image-path-escapes", _set(3, lambda root: _rec(3, image=str(root.parent / "outside.jpg"))),
          field="image", message="outside the image folder"),
    Fault("image field not a path", "bad-image-field", _set(3, _rec(3, image=5)), field="image",
          message="path string"),
    # records
    Fault("record not an object", "not-an-object", _set(3, "just a string"), record="#3",
          message="expected a JSON object"),
    Fault("no conversations", "missing-conversations", _set(3, {"id": "r3", "image": "images/red.jpg"}),
          message="needs 'conversations'"),
    Fault("unknown role", "unknown-role", _set(3, _rec(3, [{"from": "robot", "value": "<image>\nhi"}, G])),
          field="conversations[0].from", message="unknown role 'robot'"),
    Fault("unknown role (messages format)", "unknown-role", _set(3, {"id": "r3", "images": ["images/red.jpg"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "bot", "content": "red"}]}), field="messages[1].role", message="unknown role 'bot'"),
    Fault("turn without value", "malformed-record", _set(3, _rec(3, [H, {"from": "gpt"}])), field="conversations[1]",
          message="needs 'from' and 'value'"),
    Fault("empty answer", "empty-answer", _set(3, _rec(3, [H, {"from": "gpt", "value": "  "}])),
          field="conversations[1].value", message="empty answer"),
    Fault("empty turn", "empty-turn", _set(3, _rec(3, [{"from": "system", "value": ""}, H, G])),
          field="conversations[0].value", message="empty turn"),
    Fault("starts with gpt", "not-starting-with-human", _set(3, _rec(3, [G, H])), field="conversations[0]",
          message="must start with a human turn"),
    Fault("not alternating", "not-alternating", _set(3, _rec(3, [H, G, G])), field="conversations[2].from",
          message="must alternate"),
    Fault("no answer", "no-gpt-turn", _set(3, _rec(3, [H])), field="conversations", message="no gpt"),
    Fault("no turns", "no-turns", _set(3, _rec(3, [{"from": "system", "value": "Be brief."}])), field="conversations",
          message="no human/gpt turns"),
    Fault("placeholder missing", "placeholder-mismatch", _set(3, _rec(3, [{"from": "human", "value": "Color?"}, G])),
          field="image", message="0 '<image>' placeholder(s) but 1 image(s)"),
    Fault("two placeholders, one image", "placeholder-mismatch",
          _set(3, _rec(3, [{"from": "human", "value": "<image> and <image>?"}, G])), field="image",
          message="2 '<image>' placeholder(s) but 1 image(s)"),
    Fault("image in answer", "image-in-answer", _set(3, _rec(3, [H, {"from": "gpt", "value": "<image> red"}])),
          field="conversations[1].value", message="in an answer turn"),
    Fault("grouped turns mismatch", "turns-mismatch",
          _set(3, {**_rec(3, [H, G, {"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "circle"}]),
                   "turns": [{"id": "r3-0"}]}), field="turns", message="one object per question/answer pair (2 here)"),
    Fault("duplicate id", "duplicate-id", _set(5, _rec(5, rid="r2")), record="'r2' (#5)", field="id",
          message="record #5 repeats the id 'r2' of record #2"),
    Fault("bad JSON line (.jsonl)", "invalid-json", _jsonl_bad_line, record="#3", data_name="data.jsonl", line=4,
          message="not valid JSON"),
    # the file itself is wrong: refused whatever --max_bad_records says
    Fault("not JSON", "invalid-json", _raw(b'[{"id": "r0", '), record=None, line=1, message="not valid JSON"),
    Fault("not a list", "not-a-list", _raw(b'{"id": "r0"}'), record=None, message="expected a JSON list"),
    Fault("no records", "no-records", _raw(b"[]"), record=None, message="holds no records"),
    Fault("not UTF-8", "invalid-utf8", lambda root, recs: json.dumps(recs).replace("red", "r\udce9d").encode(
        "utf-8", "surrogateescape"), record=None, message="invalid UTF-8 at byte"),
]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    else:
        path.write_text(json.dumps(content, indent=1))


def _error_line(err: str, prog: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_through_check_and_train(fault: Fault, base, tmp_path, capsys):
    root = tmp_path / "d"
    recs = make_clean(root)
    data = root / fault.data_name
    _write(data, fault.apply(root, recs))
    before = _hashes(tmp_path)
    loc = f"{data}:{fault.line}" if fault.line else str(data)
    where = f"{loc}: record {fault.record}: " + (f"field '{fault.field}': " if fault.field else "")

    # check: exit 1, the problem named by file, record and field
    rc = cli(["check", str(data), "--json", str(tmp_path / "report.json")])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    report = json.loads((tmp_path / "report.json").read_text())
    assert fault.kind in report["counts"]["error"], report["counts"]
    if fault.structural:
        assert f"{loc}: " in out and fault.message in out
    else:
        assert any(line.strip().startswith(where) and fault.message in line for line in out.splitlines()), out
        assert report["records"]["rejected"] == 1
    (tmp_path / "report.json").unlink()

    # train, default --max_bad_records: refused before anything is written, on one line
    run = tmp_path / "run"
    argv = ["train", "--model", str(base), "--data", str(data), "--output_dir", str(run), "--max_steps", "1", *FAST]
    rc = cli(argv)
    out, err = capsys.readouterr()
    line = _error_line(err, "llavatune train")
    assert rc == 1 and "Traceback" not in out + err
    assert fault.message in line and (where in line if not fault.structural else f"{loc}: " in line), line
    assert not run.exists(), "a refused run leaves no half-written output folder"

    if not fault.structural:
        # a larger --max_bad_records: the same record is skipped, named in the log and in skipped_records.jsonl
        rc = cli([*argv, "--max_bad_records", "0.2"])
        out, err = capsys.readouterr()
        assert rc == 0 and "Traceback" not in out + err, err
        assert any(where in x and fault.message in x for x in err.splitlines()), err
        assert f"{N - 1} samples used, 1 skipped (1 with data problems" in err
        (row,) = [json.loads(x) for x in (run / "skipped_records.jsonl").read_text().splitlines()]
        assert row["index"] == int(fault.record.split("#")[-1].rstrip(")")) if "#" in fault.record else 3
        assert fault.kind in [r["kind"] for r in row["reasons"]]
    assert _hashes(tmp_path) == {**before, **{k: v for k, v in _hashes(tmp_path).items() if k.startswith("run/")}}, \
        "every input file is byte-identical afterwards"


def test_check_and_train_agree_on_every_error(base, tmp_path, capsys):
    """All the per-record faults in one file: check's rejected records are exactly train's skipped ones."""
    root = tmp_path / "d"
    recs = make_clean(root)
    recs = recs + [_rec(i) for i in range(N, 40)]
    k = N
    for fault in FAULTS:
        if fault.structural or fault.data_name != "data.json" or fault.kind == "duplicate-id":
            continue
        bad = fault.apply(root, [_rec(3)] * 4)[3]
        recs[k] = {**bad, "id": f"r{k}"} if isinstance(bad, dict) else bad
        k += 1
    recs.append(_rec(2))  # a duplicate id
    data = root / "data.json"
    _write(data, recs)
    assert cli(["check", str(data), "--fix", str(tmp_path / "clean.json")]) == 1
    capsys.readouterr()
    rejected = [json.loads(x)["index"] for x in (tmp_path / "clean.rejects.jsonl").read_text().splitlines()]
    run = tmp_path / "run"
    assert cli(["train", "--model", str(base), "--data", str(data), "--output_dir", str(run), "--max_steps", "1",
                "--max_bad_records", "0.6", *FAST]) == 0
    err = capsys.readouterr().err
    skipped = [json.loads(x)["index"] for x in (run / "skipped_records.jsonl").read_text().splitlines()]
    assert skipped == rejected and len(skipped) == k - N + 1
    assert f"{len(recs) - len(skipped)} samples used, {len(skipped)} skipped" in err


# ------------------------------------------------------------------------------------------ reproductions


def test_check_never_writes_its_report_over_the_data_or_an_image(tmp_path, capsys):
    """Reproduction 1: `check d/data.json --json d/data.json` replaced the dataset with the report."""
    root = tmp_path / "d"
    _write(root / "data.json", make_clean(root))
    before = _hashes(tmp_path)
    for argv in (["--json", root / "data.json"], ["--json", root / "images" / "red.jpg"],
                 ["--fix", root / "data.json"], ["--json", root / "./data.json"],
                 ["--fix", root / "x.json", "--json", root / "x.rejects.jsonl"]):
        rc = cli(["check", str(root / "data.json"), *map(str, argv)])
        err = capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    (root / "data.rejects.jsonl").write_bytes((root / "data.json").read_bytes())  # data named like a rejects file
    assert cli(["check", str(root / "data.rejects.jsonl"), "--fix", str(root / "data.json")]) == 1
    assert "its rejects file" in capsys.readouterr().err
    (root / "data.rejects.jsonl").unlink()
    assert _hashes(tmp_path) == before


def test_train_overwrite_never_deletes_the_data_it_trains_on(tmp_path, capsys):
    """Reproduction 2: `train --data d/data.json --output_dir d --overwrite` deleted data.json and every image."""
    root = tmp_path / "d"
    _write(root / "data.json", make_clean(root))
    (root / "prepare_report.json").write_text("{}")  # even a folder llavatune's prepare made
    before = _hashes(tmp_path)
    for out in (root, root / "images"):
        rc = cli(["train", "--model", "tiny", "--data", str(root / "data.json"), "--output_dir", str(out),
                  "--overwrite", "--max_steps", "2", *FAST])
        err = capsys.readouterr().err
        line = _error_line(err, "llavatune train")
        assert rc == 1 and ("contains the input" in line or "not a llavatune" in line), line
    assert _hashes(tmp_path) == before


def test_a_few_bad_images_among_many_records_are_named_before_step_1(base, tmp_path, capsys):
    """Reproduction 9: a truncated JPEG among many records was never mentioned with a small --max_steps."""
    root = tmp_path / "d"
    make_clean(root)
    recs = [_rec(i) for i in range(150)]
    recs[97] = _truncated(root) | {"id": "r97"}
    _write(root / "data.json", recs)
    run = tmp_path / "run"
    assert cli(["train", "--model", str(base), "--data", str(root / "data.json"), "--output_dir", str(run),
                "--max_steps", "1", *FAST]) == 0  # 1 of 150 (0.7 %) is under the default 1 %: skipped, named
    err = capsys.readouterr().err
    assert f"{root / 'data.json'}: record 'r97': field 'image': 'images/t.jpg'" in err and "truncated" in err
    assert "149 samples used, 1 skipped" in err
    checks = json.loads((run / "image_checks.json").read_text())["files"]
    assert len(checks) == 5 and sum(v[2] == "image-truncated" for v in checks.values()) == 1


def test_symlinked_image_folder_works_in_check_and_train(base, tmp_path, capsys):
    """Reproduction 11: `ln -s /datasets/coco/train2014 images` was refused as escaping, for every record."""
    shared = tmp_path / "datasets" / "coco"
    recs = make_clean(shared)
    root = tmp_path / "d"
    root.mkdir()
    (root / "images").symlink_to(shared / "images")
    recs[2] = _rec(2, image="images/../../outside.jpg")  # a ../ escape through the link stays refused
    _write(root / "data.json", recs)
    rc = cli(["check", str(root / "data.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "7 without errors, 1 with errors" in out and "record 'r2': field 'image'" in out
    assert cli(["train", "--model", str(base), "--data", str(root / "data.json"), "--output_dir", str(tmp_path / "run"),
                "--max_steps", "1", "--max_bad_records", "0.2", *FAST]) == 0
    assert "7 samples used, 1 skipped" in capsys.readouterr().err


def test_bad_image_in_a_dataloader_worker_is_one_line(base, tmp_path, capsys):
    """Reproduction 12: with --dataloader_num_workers 1 a bad image was a worker traceback. Images are verified
    before step 1 now; one that breaks after that (replaced mid-run) still fails on one line, naming it."""
    from transformers import TrainerCallback

    from llavatune.config import parse_config
    from llavatune.train.run import SECTIONS, train

    root = tmp_path / "d"
    _write(root / "data.json", make_clean(root))

    class BreakImages(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            for p in (root / "images").iterdir():
                p.write_bytes(b"broken")

    argv = ["--model", str(base), "--data", str(root / "data.json"), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "2", *FAST[:-4], "--dataloader_num_workers", "1", "--save_strategy", "no"]
    from llavatune.utils import UserError

    with pytest.raises(UserError) as e:
        train(*parse_config(SECTIONS, argv), extra_callbacks=[BreakImages()])
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and "worker" not in msg, msg
    assert msg.startswith("train record 'r") and "images/" in msg and "cannot read image" in msg


def test_truncate_keeps_whole_turns_in_train(base, tmp_path, capsys):
    """Reproduction 7: `--truncation truncate` on multi-turn samples whose later turn does not fit failed the
    masking self-check and blamed --template."""
    root = tmp_path / "d"
    make_clean(root)
    recs = [_rec(i, [H, {"from": "gpt", "value": list(COLORS)[i % 4]},
                     {"from": "human", "value": "What color is the shape?"},
                     {"from": "gpt", "value": "red green blue yellow " * 20}]) for i in range(N)]
    _write(root / "data.json", recs)
    argv = ["train", "--model", str(base), "--data", str(root / "data.json"), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1", "--max_length", "64", *FAST]
    assert cli([*argv, "--truncation", "truncate"]) == 0
    err = capsys.readouterr().err
    assert "masking self-check failed" not in err and f"{N} samples used, 0 skipped" in err
    assert f"truncated to max_length=64 (whole turns kept): {N}" in err


def test_eval_and_predict_use_the_same_validation(base, tmp_path, capsys):
    """`eval` and `predict --input` skip (and list) or refuse exactly what `check` reports, before the model loads."""
    root = tmp_path / "d"
    recs = make_clean(root)
    recs[3] = _rec(3, image="images/nope.jpg")
    _write(root / "data.json", recs)
    before = _hashes(root)
    ev = ["eval", "--model", str(base), "--data", str(root / "data.json"), "--max_new_tokens", "2", "--batch_size", "8"]
    assert cli([*ev, "--out", str(tmp_path / "ev")]) == 1
    line = _error_line(capsys.readouterr().err, "llavatune eval")
    assert f"{root / 'data.json'}: record 'r3': field 'image'" in line and "--max_bad_records" in line
    assert not (tmp_path / "ev").exists()
    assert cli([*ev, "--out", str(tmp_path / "ev"), "--max_bad_records", "0.2"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == N - 1 and metrics["skipped"] == 1
    assert metrics["skipped_records"][0]["reasons"][0]["kind"] == "image-missing"
    assert "record(s) with problems skipped" in capsys.readouterr().out
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "image": "images/red.jpg", "question": "What color?"},
        {"id": "b", "image": "images/gone.jpg", "question": "What color?"},
        {"id": "c", "question": "Say hi."}]))
    pr = ["predict", "--model", str(base), "--input", str(root / "q.jsonl"), "--max_new_tokens", "2"]
    assert cli([*pr, "--out", str(root / "q.jsonl"), "--overwrite"]) == 1  # never over its input
    assert "that is an input file" in capsys.readouterr().err
    assert cli([*pr, "--out", str(tmp_path / "answers.jsonl"), "--max_bad_records", "0.5"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[1]["answer"] is None
    assert f"{root / 'q.jsonl'}:2: record 'b': field 'image'" in rows[1]["error"]
    assert isinstance(rows[0]["answer"], str) and isinstance(rows[2]["answer"], str)
    assert {k: v for k, v in _hashes(root).items() if k in before} == before


def test_score_never_writes_over_its_inputs(shapes, tmp_path, capsys):
    src = Path(shapes["src"])
    q = next(src.rglob("*val2014_questions.json"))
    a = next(src.rglob("*val2014_annotations.json"))
    preds = tmp_path / "p.jsonl"
    preds.write_text("")
    before = {p: p.read_bytes() for p in (q, a, preds)}
    for target in (a, q, preds):
        rc = cli(["score", "--questions", str(q), "--annotations", str(a), "--predictions", str(preds),
                  "--out", str(target)])
        line = _error_line(capsys.readouterr().err, "llavatune score")
        assert rc == 1 and "that is an input file" in line
    assert all(p.read_bytes() == b for p, b in before.items())

"""``llavatune synth`` against a real chat-completions HTTP server on 127.0.0.1 (no patched client).

The fake server answers deterministically from the request (the captions of the image asked about) and
injects faults named by markers in the captions: ``[429]`` (once, with Retry-After), ``[500xN]`` (the first
N attempts), ``[400]``, ``[slow]`` (first attempt sleeps past the client timeout), ``[malformed]``,
``[bold]`` (markdown-style labels), ``[length]`` (finish_reason length).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.config import ConfigError, parse_config
from llavatune.data import synth
from llavatune.data.check import check_dataset
from llavatune.data.records import load_records
from llavatune.data.synth import (
    DETAIL_INSTRUCTIONS,
    ChatClient,
    ItemError,
    ReplyCache,
    ReplyError,
    SynthArgs,
    load_prompts,
    normalize_box,
    parse_examples,
    parse_qa,
    reply_to_turns,
    retry_after_seconds,
)
from llavatune.utils import UserError

TAG_RE = re.compile(r"image (\S+) shows")


# --------------------------------------------------------------------------------------------------- server


class FakeLLM:
    def __init__(self):
        self.lock = threading.Lock()
        self.log: list[dict] = []  # every request: tag, time, body, headers, status
        self.attempts: Counter[str] = Counter()
        self.mode = "qa"  # "qa" (Question/Answer blocks) or "text" (a description)
        self.delay = 0.0  # seconds before every answer
        self.fail_after: int | None = None  # after this many successful replies, answer 500 to everything
        self.successes = 0
        self.usage_sent = [0, 0]
        self.url = ""

    def tags(self, status: int | None = None) -> list[str]:
        return [r["tag"] for r in self.log if status is None or r["status"] == status]

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()

    def reply_for(self, user: str) -> tuple[str, str]:
        caps = user.split("\n\n")[0].split("\n")[1:]
        if "[malformed]" in user:
            return "Sorry, I would rather just say: " + caps[0], "stop"
        if self.mode == "text":
            return "A detailed look at the picture. " + " ".join(caps), "stop"
        if "[bold]" in user:
            return (
                f"Sure! Here is the conversation.\n\n**Question 1:** What does the image show?\n**Answer 1:** {caps[0]}\n\n"
                f"**Question 2:** How many descriptions?\n**Answer 2:** {len(caps)}.",
                "stop",
            )
        text = (
            f"Question:\nWhat does the image show?\n===\nAnswer:\n{caps[0]}\n===\n"
            f"Question:\nHow many descriptions are there?\n===\nAnswer:\nThere are {len(caps)}."
        )
        if "[length]" in user:
            return text + "\n===\nQuestion:\nAnd what else?\n===\nAnswer:\nAlso th", "length"
        return text, "stop"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_POST(self):
        fake: FakeLLM = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        user = body["messages"][-1]["content"]
        m = TAG_RE.search(user)
        tag = m.group(1) if m else "?"
        with fake.lock:
            fake.attempts[tag] += 1
            n = fake.attempts[tag]
            rec = {"tag": tag, "time": time.monotonic(), "body": body, "headers": dict(self.headers), "status": 200}
            fake.log.append(rec)
            broken = fake.fail_after is not None and fake.successes >= fake.fail_after

        def fail(status, headers=None, message="injected"):
            rec["status"] = status
            self._send(status, {"error": {"message": message}}, headers)

        if broken:
            return fail(500, message="server is broken")
        if "[429]" in user and n == 1:
            return fail(429, {"Retry-After": "0.3"}, "rate limited")
        m500 = re.search(r"\[500x(\d+)\]", user)
        if m500 and n <= int(m500.group(1)):
            return fail(500)
        if "[400]" in user:
            return fail(400, message="context too long")
        if "[401]" in user:
            return fail(401, message="invalid api key")
        if "[slow]" in user and n == 1:
            time.sleep(1.0)
        if fake.delay:
            time.sleep(fake.delay)
        reply, finish = fake.reply_for(user)
        usage = {
            "prompt_tokens": sum(len(x["content"]) for x in body["messages"]) // 10,
            "completion_tokens": len(reply) // 10,
        }
        with fake.lock:
            fake.successes += 1
            fake.usage_sent[0] += usage["prompt_tokens"]
            fake.usage_sent[1] += usage["completion_tokens"]
        self._send(
            200,
            {
                "id": "cmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": finish}],
                "usage": {**usage, "total_tokens": sum(usage.values())},
            },
        )


@pytest.fixture
def llm(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake = FakeLLM()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield fake
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------------------------------- data


def _image(path: Path, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def make_jsonl(root: Path, names: list[str], markers: dict[str, str] | None = None, **extra) -> Path:
    """``root/images/NAME.jpg`` + ``root/caps.jsonl`` (one line per name)."""
    markers = markers or {}
    lines = []
    for name in names:
        _image(root / "images" / f"{name}.jpg")
        caps = [f"The image {name} shows a red square. {markers.get(name, '')}".strip(), "A plain red picture."]
        lines.append(json.dumps({"image": f"{name}.jpg", "captions": caps, **extra}))
    p = root / "caps.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture
def coco(tmp_path) -> dict:
    """COCO val2017 layout: annotations/captions_val2017.json + instances_val2017.json, images/val2017/*.jpg."""
    ann = tmp_path / "coco" / "annotations"
    ann.mkdir(parents=True)
    imgdir = tmp_path / "coco" / "images"
    _image(imgdir / "val2017" / "000000000001.jpg", (300, 150))
    _image(imgdir / "val2017" / "000000000002.jpg", (64, 48))
    _image(imgdir / "val2017" / "000000000003.jpg", (10, 10))  # no captions
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "width": 300, "height": 150},
        {"id": 2, "file_name": "000000000002.jpg"},  # no size: read from the file
        {"id": 3, "file_name": "000000000003.jpg", "width": 10, "height": 10},
        {"id": 4, "file_name": "000000000004.jpg", "width": 10, "height": 10},  # missing file
    ]
    caps = [
        {"id": 10, "image_id": 1, "caption": "The image one shows a dog   on a sofa."},
        {"id": 11, "image_id": 1, "caption": "A brown dog resting indoors."},
        {"id": 12, "image_id": 2, "caption": "The image two shows a cat near a window."},
        {"id": 13, "image_id": 4, "caption": "The image four shows nothing."},
    ]
    inst_anns = [
        {"id": 20, "image_id": 1, "category_id": 18, "bbox": [100, 50, 100, 50], "area": 1, "iscrowd": 0},
        {"id": 21, "image_id": 1, "category_id": 63, "bbox": [0, 0, 300, 150], "area": 1, "iscrowd": 0},
        {"id": 22, "image_id": 1, "category_id": 18, "bbox": [250, 100, 80, 80], "area": 1, "iscrowd": 0},  # overflows
        {"id": 23, "image_id": 2, "category_id": 17, "bbox": [16, 12, 32, 24], "area": 1, "iscrowd": 0},
    ]
    cats = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}, {"id": 63, "name": "couch"}]
    (ann / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": caps}))
    (ann / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": inst_anns, "categories": cats})
    )
    return {"captions": ann / "captions_val2017.json", "images": imgdir, "root": tmp_path / "coco"}


def args_for(llm: FakeLLM, inp: Path, out: Path, *extra: str, images: Path | None = None) -> list[str]:
    argv = ["--input", str(inp), "--out", str(out), "--endpoint", llm.url, "--model", "fake-llm"]
    if images is not None:
        argv += ["--images", str(images)]
    return argv + ["--backoff", "0.001", "--max-backoff", "0.01", "--timeout", "5", *extra]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    rc = synth.main(argv, "llavatune synth")
    return rc, capsys.readouterr().out


def rejects_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.with_suffix(".rejects.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------- prompts


def test_coco_detail_prompts_hold_captions_and_normalized_boxes(llm, coco, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", llm.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    llm.mode = "text"
    out = coco["root"] / "synth" / "detail.json"
    argv = ["--input", str(coco["captions"]), "--images", str(coco["images"]), "--kind", "detail"]
    rc, stdout = run(capsys, [*argv, "--model", "fake-llm", "--out", str(out)])
    assert rc == 0, stdout

    assert sorted(llm.tags()) == ["one", "two"]  # no call for the image without captions or file
    by_tag = {r["tag"]: r for r in llm.log}
    msgs = by_tag["one"]["body"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]  # system, 1 example pair, image
    assert msgs[0]["content"] == load_prompts("detail").system
    assert by_tag["one"]["headers"]["Authorization"] == "Bearer sk-test-123"
    assert msgs[-1]["content"] == (
        "Captions:\n"
        "The image one shows a dog on a sofa.\n"  # whitespace collapsed
        "A brown dog resting indoors.\n"
        "\n"
        "Objects:\n"
        "dog: [0.333, 0.333, 0.667, 0.667]\n"  # [100, 50, 100, 50] on 300x150
        "couch: [0.000, 0.000, 1.000, 1.000]\n"
        "dog: [0.833, 0.667, 1.000, 1.000]"  # clamped to the image
    )
    # image 2 has no size in the COCO file: read with Pillow (64x48)
    assert by_tag["two"]["body"]["messages"][-1]["content"].endswith("cat: [0.250, 0.250, 0.750, 0.750]")

    recs = load_records(out)
    assert [r.id for r in recs] == ["1-detail", "2-detail"]
    assert recs[0].images == ["val2017/000000000001.jpg"]  # found in the split folder named by the captions file
    assert recs[0].conversations[0].value.startswith("<image>\n")
    assert recs[0].conversations[0].value[len("<image>\n") :] in DETAIL_INSTRUCTIONS
    assert recs[0].conversations[1].value.startswith("A detailed look at the picture. The image one shows")
    reasons = {r["id"]: r["reason"] for r in rejects_of(out)}
    assert reasons == {"3": "no-captions", "4": "image-missing"}
    # out/ is not inside the image root: paths stay relative to it, and the summary says so
    assert f"--image-folder {coco['images'].resolve()}" in stdout
    report = check_dataset(out, image_folder=coco["images"])
    assert report.ok, report.format()


def test_conversation_prompts_use_captions_only(llm, coco, capsys):
    out = coco["images"] / "conv.json"  # inside the image root: paths relative to it
    rc, _ = run(capsys, args_for(llm, coco["captions"], out, images=coco["images"]))
    assert rc == 0
    msgs = llm.log[0]["body"]["messages"]
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 2 + ["user"]
    assert "Objects:" not in msgs[-1]["content"] and "[0." not in msgs[-1]["content"]
    assert msgs[-1]["content"].startswith("Captions:\nThe image ")
    body = llm.log[0]["body"]
    assert body["model"] == "fake-llm" and body["temperature"] == 0.7 and body["max_tokens"] == 1024
    assert check_dataset(out).ok
    recs = load_records(out)
    assert recs[0].images == ["val2017/000000000001.jpg"]
    assert [t.role for t in recs[0].conversations] == ["human", "gpt", "human", "gpt"]
    assert recs[0].conversations[0].value == "<image>\nWhat does the image show?"
    assert recs[0].conversations[2].value == "How many descriptions are there?"  # <image> only in the first turn


def test_box_normalization_and_jsonl_boxes(llm, tmp_path, capsys):
    assert normalize_box([100, 50, 100, 50], "xywh", 300, 150) == (0.333, 0.333, 0.667, 0.667)
    assert normalize_box([100, 50, 200, 100], "xyxy", 300, 150) == (0.333, 0.333, 0.667, 0.667)
    assert normalize_box([0.12345, 0.5, 1.2, 0.9], "xyxy_norm", None, None) == (0.123, 0.5, 1.0, 0.9)
    for bad in ([1, 2, 3], [0, 0, -1, 5], "box", [0, 0, float("nan"), 1]):
        with pytest.raises(ItemError):
            normalize_box(bad, "xywh", 10, 10)

    root = tmp_path / "j"
    _image(root / "images" / "a.jpg", (200, 100))
    _image(root / "images" / "b.jpg", (200, 100))
    _image(root / "images" / "c.jpg", (200, 100))
    _image(tmp_path / "outside.jpg")
    rows = [
        {"image": "a.jpg", "captions": ["The image a shows a box."], "boxes": [{"category": "box", "bbox": [20, 10, 50, 40]}]},
        # size given in the line wins over the file's
        {"image": "b.jpg", "width": 400, "height": 200, "captions": ["The image b shows a box."],
         "boxes": [{"category": "box", "bbox": [20, 10, 50, 40]}]},
        # looks normalized already while --box-format is pixels: refused with a hint
        {"image": "c.jpg", "captions": ["The image c shows a box."], "boxes": [{"category": "box", "bbox": [0.1, 0.1, 0.5, 0.5]}]},
        {"image": "../outside.jpg", "captions": ["The image x shows a box."]},
        {"image": "a.jpg", "captions": ["The image a2 shows a box."]},
        {"image": "nope.jpg", "captions": ["The image n shows a box."]},
        {"image": "c.jpg", "captions": 5},
    ]  # fmt: skip
    inp = root / "caps.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = root / "out.json"
    llm.mode = "text"
    rc, _ = run(capsys, args_for(llm, inp, out, "--kind", "complex", images=root / "images"))
    assert rc == 0
    ctx = {r["tag"]: r["body"]["messages"][-1]["content"] for r in llm.log}
    assert sorted(ctx) == ["a", "b"]
    assert ctx["a"].endswith("Objects:\nbox: [0.100, 0.100, 0.350, 0.500]")
    assert ctx["b"].endswith("Objects:\nbox: [0.050, 0.050, 0.175, 0.250]")
    rej = {r["where"].rsplit(":", 1)[1]: r for r in rejects_of(out)}
    assert rej["3"]["reason"] == "bad-box" and "--box-format xyxy_norm" in rej["3"]["message"]
    assert rej["4"]["reason"] == "image-outside-root"
    assert rej["5"]["reason"] == "duplicate-image"
    assert rej["6"]["reason"] == "image-missing"
    assert rej["7"]["reason"] == "bad-input"
    # the fake server answers "text" for complex: no Q/A blocks -> both rejected, nothing crashed
    assert rej["1"]["reason"] == rej["2"]["reason"] == "no-qa-blocks"
    assert rej["1"]["reply"].startswith("A detailed look")


def test_prompt_files_override(llm, tmp_path, capsys):
    inp = make_jsonl(tmp_path, ["p1"])
    (tmp_path / "sys.txt").write_text("You write Q&A.\n")
    (tmp_path / "ex.txt").write_text(
        "header, ignored\n<<<user>>>\nCaptions:\nA dog.\n<<<assistant>>>\nQuestion:\nWhat?\n===\nAnswer:\nA dog.\n"
    )
    out = tmp_path / "o.json"
    argv = args_for(llm, inp, out, "--system-prompt", str(tmp_path / "sys.txt"), "--examples", str(tmp_path / "ex.txt"))
    assert run(capsys, [*argv, "--images", str(tmp_path / "images")])[0] == 0
    msgs = llm.log[0]["body"]["messages"]
    assert msgs[:3] == [
        {"role": "system", "content": "You write Q&A."},
        {"role": "user", "content": "Captions:\nA dog."},
        {"role": "assistant", "content": "Question:\nWhat?\n===\nAnswer:\nA dog."},
    ]
    (tmp_path / "ex.json").write_text(json.dumps([{"user": "u", "assistant": "a"}]))
    assert load_prompts("complex", examples_file=str(tmp_path / "ex.json")).examples == [("u", "a")]
    (tmp_path / "empty.txt").write_text("")
    assert load_prompts("detail", examples_file=str(tmp_path / "empty.txt")).examples == []
    with pytest.raises(ConfigError, match="example 1"):
        parse_examples("<<<assistant>>>\nx\n<<<user>>>\ny\n", "bad.txt")
    for kind in synth.KINDS:  # the built-ins parse and have examples
        assert load_prompts(kind).examples


def test_dry_run_calls_nothing(llm, tmp_path, capsys):
    inp = make_jsonl(tmp_path, ["d1", "d2"])
    out = tmp_path / "o" / "data.json"
    rc, stdout = run(capsys, [*args_for(llm, inp, out, "--dry-run", "true"), "--images", str(tmp_path / "images")])
    assert rc == 0
    assert llm.log == [] and not out.parent.exists()
    assert "2 image(s) usable" in stdout and "----- system" in stdout and "The image d1 shows" in stdout


# --------------------------------------------------------------------------------------------------- parsing


def test_parse_qa_well_formed_and_variants():
    canonical = "Question:\nWhat is it?\n===\nAnswer:\nA cat.\n===\nQuestion:\nWhere?\n===\nAnswer:\nOn a mat.\n"
    want = [("What is it?", "A cat."), ("Where?", "On a mat.")]
    assert parse_qa(canonical) == want
    variants = [
        canonical.replace("\n", "\r\n"),
        "Sure, here it is:\n\nQuestion: What is it?\nAnswer: A cat.\n\nQuestion: Where?\nAnswer: On a mat.",
        "Q: What is it?\nA: A cat.\nQ: Where?\nA: On a mat.",
        "**Question 1:** What is it?\n**Answer 1:** A cat.\n---\n**Question 2:** Where?\n**Answer 2:** On a mat.",
        "### Question:\nWhat is it?\n\n### Answer:\nA cat.\n\n### Question:\nWhere?\n\n### Answer:\nOn a mat.\n===",
        "<think>Let me think about the captions.</think>\n" + canonical,
        canonical + "===\nQuestion:\nAn unanswered last question?",  # dropped
    ]
    for text in variants:
        assert parse_qa(text) == want, text
    multi = parse_qa("Question:\nWhy?\n===\nAnswer:\nFirst line.\n\nSecond paragraph.\n")
    assert multi == [("Why?", "First line.\n\nSecond paragraph.")]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Sorry, I cannot help with that.", "no-qa-blocks"),
        ("Answer:\nA cat.\n===\nQuestion:\nWhat?", "qa-order"),
        ("Question:\nWhat?\n===\nQuestion:\nWhere?\n===\nAnswer:\nHere.", "qa-order"),
        ("Question:\nWhat is it?", "qa-order"),
        ("Question:\nWhat?\n===\nAnswer:\n\n===\n", "empty-qa"),
    ],
)
def test_parse_qa_malformed(text, reason):
    with pytest.raises(ReplyError) as e:
        parse_qa(text)
    assert e.value.reason == reason


def test_reply_to_turns_per_kind():
    qa = "Question:\nQ1?\n===\nAnswer:\nA1.\n===\nQuestion:\nQ2?\n===\nAnswer:\nA2."
    conv = reply_to_turns("conversation", "x.jpg", qa, "stop")
    assert [(t.role, t.value) for t in conv] == [
        ("human", "<image>\nQ1?"),
        ("gpt", "A1."),
        ("human", "Q2?"),
        ("gpt", "A2."),
    ]
    assert [t.value for t in reply_to_turns("conversation", "x.jpg", qa, "length")] == ["<image>\nQ1?", "A1."]
    assert [t.value for t in reply_to_turns("complex", "x.jpg", qa, "stop")] == ["<image>\nQ1?", "A1."]
    det = reply_to_turns("detail", "x.jpg", "  A long description.  ", "stop")
    assert det[0].value == "<image>\n" + synth.detail_instruction("x.jpg") and det[1].value == "A long description."
    assert synth.detail_instruction("x.jpg") == synth.detail_instruction("x.jpg")
    assert len({synth.detail_instruction(f"{i}.jpg") for i in range(100)}) > len(DETAIL_INSTRUCTIONS) // 2
    for kind, text, finish, reason in [
        ("detail", "", "stop", "empty-reply"),
        ("detail", "Cut off desc", "length", "truncated-reply"),
        ("detail", "Question:\nQ?\n===\nAnswer:\nA.", "stop", "unexpected-qa"),
        ("complex", qa, "length", "truncated-reply"),
        ("conversation", "Question:\nQ?\n===\nAnswer:\nSee <image> here.", "stop", "image-token-in-reply"),
        ("conversation", "", "content_filter", "content-filtered"),
    ]:
        with pytest.raises(ReplyError) as e:
            reply_to_turns(kind, "x.jpg", text, finish)
        assert e.value.reason == reason


def test_malformed_replies_are_rejected_not_fatal(llm, tmp_path, capsys):
    inp = make_jsonl(tmp_path, ["m1", "m2", "m3", "m4"], {"m2": "[malformed]", "m3": "[bold]", "m4": "[length]"})
    out = tmp_path / "data.json"
    argv = [*args_for(llm, inp, out), "--images", str(tmp_path / "images")]
    rc, stdout = run(capsys, argv)
    assert rc == 0 and "rejected: 1 (no-qa-blocks 1)" in stdout
    recs = {r.id: r for r in load_records(out)}
    assert sorted(recs) == ["m1-conversation", "m3-conversation", "m4-conversation"]
    assert recs["m3-conversation"].conversations[0].value == "<image>\nWhat does the image show?"  # **Question 1:**
    assert len(recs["m4-conversation"].conversations) == 4  # cut-off third pair dropped
    (rej,) = rejects_of(out)
    assert rej["reason"] == "no-qa-blocks" and rej["image"] == "m2.jpg" and rej["reply"].startswith("Sorry")
    # a rerun asks nothing (the malformed reply is cached too) ...
    llm.reset_log()
    assert run(capsys, argv)[0] == 0 and llm.log == []
    # ... unless asked to retry rejects
    assert run(capsys, [*argv, "--retry-rejects", "true"])[0] == 0
    assert llm.tags() == ["m2"]


# --------------------------------------------------------------------------------------------------- retries


def test_retries_backoff_retry_after_and_timeouts(llm, tmp_path, capsys):
    names = ["ok", "r429", "r500", "slow", "bad400"]
    markers = {"r429": "[429]", "r500": "[500x2]", "slow": "[slow]", "bad400": "[400]"}
    inp = make_jsonl(tmp_path, names, markers)
    out = tmp_path / "data.json"
    argv = [*args_for(llm, inp, out), "--images", str(tmp_path / "images"), "--timeout", "0.3", "--max-retries", "3"]
    argv += ["--json", str(tmp_path / "report.json")]
    t0 = time.monotonic()
    rc, stdout = run(capsys, argv)
    assert time.monotonic() - t0 < 10
    assert rc == 1  # one item failed at the server (400: not retried)
    counts = Counter(llm.tags())
    assert counts == {"ok": 1, "r429": 2, "r500": 3, "slow": 2, "bad400": 1}
    t429 = [r["time"] for r in llm.log if r["tag"] == "r429"]
    assert t429[1] - t429[0] >= 0.29  # Retry-After: 0.3 honoured although --backoff is 0.001
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["http_requests"] == 9 and report["retries"] == 4 and report["failed"] == 1
    assert report["http_errors"] == {"429": 1, "500": 2, "timeout": 1, "400": 1}
    assert sorted(r.id for r in load_records(out)) == [f"{n}-conversation" for n in ["ok", "r429", "r500", "slow"]]
    (rej,) = rejects_of(out)
    assert rej["reason"] == "request-failed" and "HTTP 400: context too long" in rej["message"]
    assert "rerun the same command" in stdout


def test_failed_items_are_asked_again_on_rerun(llm, tmp_path, capsys):
    inp = make_jsonl(tmp_path, ["f1", "f2"], {"f2": "[500x4]"})
    out = tmp_path / "data.json"
    argv = [*args_for(llm, inp, out), "--images", str(tmp_path / "images"), "--max-retries", "2"]
    assert run(capsys, argv)[0] == 1
    assert Counter(llm.tags()) == {"f1": 1, "f2": 3}
    assert [r["reason"] for r in rejects_of(out)] == ["request-failed"]
    llm.reset_log()
    assert run(capsys, argv)[0] == 0
    assert llm.tags() == ["f2", "f2"]  # attempt 4 fails, 5 succeeds; f1 comes from the cache
    assert len(load_records(out)) == 2 and rejects_of(out) == []


def test_backoff_delays_and_retry_after_parsing():
    c = ChatClient("http://127.0.0.1:9/v1/chat/completions", None, 1, 5, backoff=1.0, max_backoff=8.0)
    for attempt, base in [(0, 1), (1, 2), (2, 4), (3, 8), (6, 8)]:
        for _ in range(20):
            assert base / 2 <= c.delay(attempt, None) <= base
    assert c.delay(0, 30.0) == 30.0  # Retry-After wins over --max-backoff
    assert retry_after_seconds({"Retry-After": "7"}) == 7.0
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "7"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 20))
    assert 15 < retry_after_seconds({"Retry-After": date}) <= 21
    assert retry_after_seconds({}) is None and retry_after_seconds({"Retry-After": "soon"}) is None
    assert synth.chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert synth.chat_url("http://h:11434") == "http://h:11434/v1/chat/completions"
    assert synth.chat_url("http://h/x/chat/completions") == "http://h/x/chat/completions"
    with pytest.raises(ConfigError):
        synth.chat_url("localhost:8000")


def test_fatal_status_stops_the_run(llm, tmp_path, capsys):
    inp = make_jsonl(tmp_path, ["k1", "k2", "k3"], {"k1": "[401]", "k2": "[401]", "k3": "[401]"})
    out = tmp_path / "data.json"
    with pytest.raises(UserError, match="HTTP 401: invalid api key"):
        run(capsys, [*args_for(llm, inp, out, "--concurrency", "1"), "--images", str(tmp_path / "images")])
    assert len(llm.log) == 1  # no retries, no more items
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- resume


def _cache_keys(path: Path) -> set[str]:
    keys = set()
    for line in path.read_text().splitlines():
        try:
            keys.add(json.loads(line)["image"])
        except ValueError:
            pass
    return keys


def test_resume_after_server_outage_same_output(llm, tmp_path, capsys):
    names = [f"s{i:02d}" for i in range(8)]
    inp = make_jsonl(tmp_path, names)
    images = tmp_path / "images"
    ref = tmp_path / "ref" / "data.json"
    assert run(capsys, [*args_for(llm, inp, ref), "--images", str(images)])[0] == 0

    llm.reset_log()
    llm.fail_after = llm.successes + 3
    out = tmp_path / "run" / "data.json"
    argv = [*args_for(llm, inp, out, "--concurrency", "1", "--max-retries", "1", "--max-consecutive-failures", "2")]
    argv += ["--images", str(images)]
    with pytest.raises(UserError, match="2 items in a row failed"):
        run(capsys, argv)
    assert not out.exists()  # no partial output
    done = _cache_keys(out.with_suffix(".synth-cache.jsonl"))
    assert len(done) == 3

    llm.reset_log()
    llm.fail_after = None
    assert run(capsys, argv)[0] == 0
    assert not {f"{t}.jpg" for t in llm.tags()} & done  # nothing finished was asked again
    assert sorted(llm.tags()) == sorted(n for n in names if f"{n}.jpg" not in done)
    assert out.read_text() == ref.read_text()


def test_resume_after_kill_same_output_no_duplicate_calls(llm, tmp_path, capsys):
    names = [f"k{i:02d}" for i in range(24)]
    inp = make_jsonl(tmp_path, names)
    images = tmp_path / "images"
    ref = tmp_path / "ref" / "data.json"
    assert run(capsys, [*args_for(llm, inp, ref), "--images", str(images)])[0] == 0

    llm.reset_log()
    llm.delay = 0.08
    out = tmp_path / "run" / "data.json"
    cache = out.with_suffix(".synth-cache.jsonl")
    argv = [*args_for(llm, inp, out, "--concurrency", "2"), "--images", str(images)]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llavatune.cli", "synth", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not cache.exists() or cache.read_text().count("\n") < 5):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.kill()  # SIGKILL: no cleanup at all
    finally:
        proc.wait(10)
    assert not out.exists()
    with cache.open("ab") as f:  # as if the kill landed mid-write
        f.write(b'{"v": 1, "kind": "conversation", "image": "k23.jpg", "hash": "ab')
    done = _cache_keys(cache)
    assert 5 <= len(done) < len(names)

    llm.reset_log()
    llm.delay = 0.0
    assert run(capsys, argv)[0] == 0
    asked = [f"{t}.jpg" for t in llm.tags()]
    assert not set(asked) & done  # no duplicate calls for finished items
    assert len(asked) == len(set(asked)) == len(names) - len(done)
    assert out.read_text() == ref.read_text()
    assert check_dataset(out, image_folder=images).ok
    lines = cache.read_text().splitlines()
    assert len(lines) == len(names) and all(json.loads(x) for x in lines)  # torn line repaired


def test_cache_torn_and_complete_last_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    good = {"kind": "detail", "image": "a.jpg", "hash": "h", "reply": "x"}
    p.write_bytes((json.dumps(good) + "\n").encode() + b'{"kind": "detail", "ima')
    with ReplyCache(p) as c:
        assert len(c.entries) == 1
        c.append({**good, "image": "b.jpg"})
    assert [json.loads(x)["image"] for x in p.read_text().splitlines()] == ["a.jpg", "b.jpg"]
    p.write_bytes(p.read_bytes() + json.dumps({**good, "image": "c.jpg"}).encode())  # only the newline lost
    with ReplyCache(p) as c:
        assert set(k[1] for k in c.entries) == {"a.jpg", "b.jpg", "c.jpg"}
        with pytest.raises(UserError, match="in use"):
            ReplyCache(p)
        c.append({**good, "image": "d.jpg"})
    assert len(p.read_text().splitlines()) == 4


def test_changed_prompt_or_model_asks_again(llm, tmp_path, capsys):
    inp = make_jsonl(tmp_path, ["h1"])
    out = tmp_path / "data.json"
    argv = [*args_for(llm, inp, out), "--images", str(tmp_path / "images")]
    run(capsys, argv)
    run(capsys, argv)
    assert len(llm.log) == 1
    run(capsys, [*argv, "--temperature", "0.2"])
    assert len(llm.log) == 2
    idx = argv.index("--model") + 1
    run(capsys, argv[:idx] + ["other"] + argv[idx + 1 :])
    assert len(llm.log) == 3


# --------------------------------------------------------------------------------------------------- accounting


def test_token_and_cost_accounting(llm, tmp_path, capsys):
    inp = make_jsonl(tmp_path, ["t1", "t2", "t3"], {"t2": "[429]"})
    out = tmp_path / "data.json"
    report_p = tmp_path / "r.json"
    argv = [*args_for(llm, inp, out, "--price-in", "2.5", "--price-out", "10", "--json", str(report_p))]
    argv += ["--images", str(tmp_path / "images")]
    rc, stdout = run(capsys, argv)
    assert rc == 0
    p_tok, c_tok = llm.usage_sent
    assert p_tok > 0 and c_tok > 0
    rep = json.loads(report_p.read_text())
    cost = (p_tok * 2.5 + c_tok * 10) / 1e6
    assert rep["usage_run"] == {
        "prompt_tokens": p_tok,
        "completion_tokens": c_tok,
        "replies_without_usage": 0,
        "cost": round(cost, 6),
    }
    assert rep["usage_all"] == rep["usage_run"]
    assert f"{p_tok:,} prompt + {c_tok:,} completion, cost {cost:.4f}" in stdout
    # fully cached rerun: nothing spent now, the totals of all records unchanged
    run(capsys, argv)
    rep2 = json.loads(report_p.read_text())
    assert rep2["usage_run"]["prompt_tokens"] == 0 and rep2["usage_run"]["cost"] == 0
    assert rep2["usage_all"] == rep["usage_all"] and rep2["from_cache"] == 3 and rep2["requested"] == 0


def test_limit_and_output_passes_check(llm, tmp_path, capsys):
    names = [f"l{i}" for i in range(6)]
    root = tmp_path / "ds"
    inp = make_jsonl(root, names)
    out = root / "data.json"  # the image folder root/images/ lies below it: paths like images/l0.jpg
    rc, stdout = run(
        capsys, [*args_for(llm, inp, out, "--limit", "4", "--kind", "complex"), "--images", str(root / "images")]
    )
    assert rc == 0
    recs = load_records(out)
    assert [r.id for r in recs] == [f"l{i}-complex" for i in range(4)]
    assert recs[0].images == ["images/l0.jpg"]
    assert [t.role for t in recs[0].conversations] == ["human", "gpt"]  # complex: one Q&A
    assert len(llm.log) == 4
    report = check_dataset(out)
    assert report.ok and report.n_records == 4, report.format()


def test_config_errors(tmp_path, monkeypatch):
    def parse(*argv):
        return parse_config([SynthArgs], list(argv), prog="llavatune synth")

    with pytest.raises(ConfigError, match="--model is required"):
        parse("--input", "x.jsonl", "--out", "o.json")
    with pytest.raises(ConfigError, match="ending in .json"):
        parse("--input", "x.jsonl", "--out", "o.jsonl", "--model", "m")
    with pytest.raises(ConfigError, match="--concurrency"):
        parse("--input", "x.jsonl", "--out", "o.json", "--model", "m", "--concurrency", "0")
    (args,) = parse("--input", "x.jsonl", "--out", "o.json", "--model", "m")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        synth.run_synth(args)


def test_cli_command(llm, tmp_path, capsys):
    try:
        rc = cli_main(["synth", "--help"])
    except SystemExit as e:  # depending on whether the CLI turns argparse's exit into a return code
        rc = e.code
    assert rc == 0
    assert "--price-in" in capsys.readouterr().out.replace("_", "-")
    assert cli_main(["synth", "--input", "x.jsonl", "--out", "o.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "llavatune synth: error: --model is required: the model name the server serves"
    inp = make_jsonl(tmp_path, ["c1"])
    out = tmp_path / "data.json"
    assert cli_main(["synth", *args_for(llm, inp, out), "--images", str(tmp_path / "images")]) == 0
    assert "1 record(s)" in capsys.readouterr().out
    assert cli_main(["synth", *args_for(llm, inp, out), "--images", str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err

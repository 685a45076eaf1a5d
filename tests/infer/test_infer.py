"""predict, chat, merge and serve on tiny-model checkpoints of every kind (LoRA, QLoRA, full, intermediate
checkpoint-N, plain llava-hf, merged), plus the bad-input errors they share."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavatune.cli import main as cli_main

MAX_NEW = 8
QUESTIONS = ["What color is the shape?", "How many shapes are there?", "Where is the circle?"]
TRAIN = ["--num_train_epochs", "1", "--lora_r", "8", "--lora_alpha", "16", "--report_to", "none",
         "--save_strategy", "epoch", "--per_device_train_batch_size", "4", "--max_train_samples", "8",
         "--dataloader_num_workers", "0", "--seed", "0"]

try:
    import bitsandbytes  # noqa: F401

    HAS_BNB = True
except ImportError:  # pragma: no cover
    HAS_BNB = False


@contextlib.contextmanager
def one_thread():
    """Tiny matrices: one thread is fastest, and on a busy 2-core machine several threads spin against each
    other (generation gets ~40x slower). Restored afterwards so other test modules see the default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def perturb_adapter(ckpt: Path, seed: int) -> None:
    """A few training steps barely move LoRA B (it starts at zero): give the adapter weights that change the
    answers, so that "merged == unmerged" cannot pass by the adapter doing nothing."""
    from safetensors.torch import load_file, save_file

    f = ckpt / "adapter_model.safetensors"
    state = load_file(str(f))
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if "lora_B" in k:
            state[k] = torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype) * 0.3
        elif "multi_modal_projector" in k:
            state[k] = v + torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype) * 0.05
    save_file(state, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def ckpts(shapes, tmp_path_factory) -> dict[str, Path]:
    """One trained tiny checkpoint per kind, shared by every test here."""
    root = tmp_path_factory.mktemp("infer_ckpts")
    out = {}
    methods = ["lora", "full"] + (["qlora"] if HAS_BNB else [])
    for i, method in enumerate(methods):
        d = root / method
        with one_thread():
            rc = cli_main(["train", "--model", "tiny", "--data", str(shapes["train"]), "--output_dir", str(d),
                           "--method", method, *TRAIN])
        assert rc == 0
        if method != "full":
            perturb_adapter(d, seed=i)
        out[method] = d
    out["intermediate"] = next((root / "lora").glob("checkpoint-*"))
    out["llava-hf"] = root / "lora" / "base_model"
    return out


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("infer_images")
    out = {}
    for name, color, bg in (("red", (220, 30, 30), (245, 245, 245)), ("blue", (30, 60, 220), (15, 15, 15)),
                            ("green", (30, 170, 40), (128, 128, 128))):
        img = Image.new("RGB", (48, 32), bg)
        img.paste(Image.new("RGB", (14, 14), color), (8, 9))
        img.save(d / f"{name}.png")
        out[name] = d / f"{name}.png"
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out["broken"] = d / "broken.png"
    return out


@pytest.fixture(scope="module")
def lora_predictor(ckpts):
    from llavatune.infer.predict import load_predictor

    return load_predictor(str(ckpts["lora"]))


def answers_of(predictor, pairs, max_new_tokens=MAX_NEW):
    from llavatune.infer.generate import Query
    from llavatune.infer.predict import question_turns

    queries = [Query(question_turns(q, 1 if img else 0), [img] if img else []) for img, q in pairs]
    return predictor.answer(queries, batch_size=1, max_new_tokens=max_new_tokens)


def error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if ": error:" in x]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# predict


KINDS = ["lora", "qlora", "full", "intermediate", "llava-hf"]


@pytest.mark.parametrize("kind", KINDS)
def test_predict_single_and_batch_every_kind(kind, ckpts, images, tmp_path, capsys, request):
    if kind not in ckpts:
        pytest.skip("bitsandbytes is not installed")
    model = str(ckpts[kind])
    rc = cli_main(["predict", "--model", model, "--image", str(images["blue"]), "--question", QUESTIONS[0],
                   "--max_new_tokens", str(MAX_NEW), "--json"])
    assert rc == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert single["image"] == str(images["blue"]) and single["question"] == QUESTIONS[0]
    assert isinstance(single["answer"], str)

    # batch: relative paths (resolved against the JSONL's folder), extra fields kept, order kept, a text-only
    # question mixed in; left-padded batches give the answers one-at-a-time generation gives
    shutil.copy(images["blue"], tmp_path / "blue.png")
    shutil.copy(images["red"], tmp_path / "red.png")
    rows = [{"id": "q1", "image": "red.png", "question": QUESTIONS[1]},
            {"id": "q2", "image": "blue.png", "question": QUESTIONS[0]},
            {"id": "q3", "question": "Say something about shapes"},
            {"id": "q4", "image": "red.png", "question": QUESTIONS[2], "extra": [1, 2]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    assert cli_main(["predict", "--model", model, "--input", str(tmp_path / "in.jsonl"), "--out", str(out),
                     "--batch_size", "4", "--max_new_tokens", str(MAX_NEW)]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "answer"} for g in got] == rows
    assert got[1]["answer"] == single["answer"]
    if kind == "lora":
        one_by_one = answers_of(request.getfixturevalue("lora_predictor"), [(tmp_path / "red.png", QUESTIONS[1]), (None, rows[2]["question"]),
                                    (tmp_path / "red.png", QUESTIONS[2])])
        assert [got[0]["answer"], got[2]["answer"], got[3]["answer"]] == one_by_one


def test_predict_prints_bare_answer_and_guards_out(ckpts, images, tmp_path, capsys):
    model = str(ckpts["full"])
    args = ["predict", "--model", model, "--image", str(images["red"]), "--question", QUESTIONS[0],
            "--max_new_tokens", "6"]
    assert cli_main(args) == 0
    bare = capsys.readouterr().out.rstrip("\n")
    assert cli_main(args + ["--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"].strip()
    assert answer and bare.endswith(answer)  # the answer as it is (it may span lines), nothing after it
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": str(images["red"].name), "question": "q"}) + "\n")
    out = tmp_path / "o.jsonl"
    out.write_text("keep me")
    batch = ["predict", "--model", model, "--input", str(tmp_path / "in.jsonl"), "--out", str(out),
             "--image_folder", str(images["red"].parent), "--max_new_tokens", "4"]
    assert cli_main(batch) == 1
    assert "--overwrite" in error_line(capsys.readouterr().err) and out.read_text() == "keep me"
    assert cli_main(batch + ["--overwrite"]) == 0
    assert "answer" in json.loads(out.read_text())
    # without --out, batch mode prints JSON lines
    assert cli_main(batch[:5] + batch[7:]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["question"] == "q"


def _copy(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True)
    for n in names:
        shutil.copy(src / n, dst / n)
    return dst


def test_bad_input_gives_one_line_errors(ckpts, images, tmp_path, capsys):
    def fails(argv, *needles, rc=1):
        got = cli_main(["predict", *map(str, argv)])
        line = error_line(capsys.readouterr().err)
        assert got == rc, line
        for n in needles:
            assert n in line, line
        return line

    q = ["--question", "What?"]
    model = ["--model", ckpts["full"]]
    # unreadable / missing images, named, before any model is loaded
    fails([*model, "--image", images["broken"], *q], str(images["broken"]), "cannot read image")
    fails([*model, "--image", tmp_path / "nope.png", *q], "nope.png", "not found")
    fails([*model, *q, "--input", tmp_path / "x.jsonl"], "either --question")
    bad = tmp_path / "bad.jsonl"  # rows are named file:line, as 'llavatune check' names them
    bad.write_text('{"image": "a.png", "question": "q"}\n{not json\n')
    fails([*model, "--input", bad], f"{bad}:1", "a.png", "not found")
    bad.write_text('{"question": "q"}\n{not json\n')
    fails([*model, "--input", bad], f"{bad}:2", "not valid JSON")
    bad.write_text('{"image": "../../etc/passwd", "question": "q"}\n')
    fails([*model, "--input", bad], f"{bad}:1", "outside the image folder")
    bad.write_text('{"image": null}\n')
    fails([*model, "--input", bad], f"{bad}:1", "'question'")
    if not torch.cuda.is_available():
        fails([*model, "--image", images["red"], *q, "--device", "cuda"], "no CUDA GPU", "--device cpu")
    # model folders missing files
    fails(["--model", tmp_path / "missing", "--image", images["red"], *q], "missing")
    (tmp_path / "empty").mkdir()
    fails(["--model", tmp_path / "empty", "--image", images["red"], *q], "no config.json", "checkpoint-N")
    full = ckpts["full"]
    no_weights = _copy(full, tmp_path / "no_weights", ["config.json", "tokenizer.json", "tokenizer_config.json",
                                                         "processor_config.json"])
    fails(["--model", no_weights, "--image", images["red"], *q], "model weights", "llavatune merge")
    no_proc = _copy(full, tmp_path / "no_proc", ["config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json"])
    fails(["--model", no_proc, "--image", images["red"], *q], "image processor files")
    # an adapter whose base cannot be found; then told where it is
    lora = ckpts["lora"]
    moved = _copy(lora, tmp_path / "moved" / "adapter", ["adapter_config.json", "adapter_model.safetensors",
                                                         "llavatune_checkpoint.json"])
    meta = json.loads((moved / "llavatune_checkpoint.json").read_text())
    meta.update(base_model=str(tmp_path / "gone" / "base_model"), base_model_relative="../gone/base_model")
    (moved / "llavatune_checkpoint.json").write_text(json.dumps(meta))
    acfg = json.loads((moved / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(tmp_path / "gone" / "base_model")
    (moved / "adapter_config.json").write_text(json.dumps(acfg))
    fails(["--model", moved, "--image", images["red"], *q], "base model cannot be found", "--base_model")
    assert cli_main([str(a) for a in ["predict", "--model", moved, "--base_model", lora / "base_model", "--image",
                                      images["red"], *q, "--max_new_tokens", "3"]]) == 0
    capsys.readouterr()
    (moved / "adapter_model.safetensors").unlink()
    fails(["--model", moved, "--base_model", lora / "base_model", "--image", images["red"], *q],
          "adapter_model.safetensors", "incomplete")


# ---------------------------------------------------------------------------------------------------
# chat


def test_chat_scripted_terminal_session(ckpts, images, monkeypatch, capsys):
    script = "\n".join([
        QUESTIONS[0], QUESTIONS[1],
        f"/image {images['broken']}",  # refused, the session goes on with the old image
        f"/image {images['blue']}", QUESTIONS[2],
        "/reset", "", "Hello?", "/help", "/exit", "this line is never read",
    ]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    rc = cli_main(["chat", "--model", str(ckpts["lora"]), "--image", str(images["red"]), "--max_new_tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"about {images['red']}" in out
    assert out.count("llava> ") == 4
    assert "error: image:" in out and "cannot read image" in out
    assert f"(image: {images['blue']}; new conversation)" in out
    assert "(conversation reset)" in out and "/image PATH" in out
    # end of input ends the session too
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTIONS[0] + "\n"))
    assert cli_main(["chat", "--model", str(ckpts["full"]), "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.count("llava> ") == 1


def test_chat_session_keeps_turns_and_streams(lora_predictor, images):
    from llavatune.infer.chat import ChatSession
    from llavatune.infer.generate import Query

    session = ChatSession(lora_predictor, images["red"], max_new_tokens=24)
    streamed = []
    answers = []
    for q in QUESTIONS:
        pieces: list[str] = []
        answers.append(session.ask(q, on_text=pieces.append))
        streamed.append(pieces)
        assert "".join(pieces).strip() == answers[-1]
    assert any(len(p) > 1 for p in streamed), "tokens arrive in pieces while generating"
    roles = [t.role for t in session.turns]
    assert roles == ["human", "gpt"] * 3
    assert session.turns[0].value == "<image>\n" + QUESTIONS[0] and session.turns[2].value == QUESTIONS[1]
    assert [t.value for t in session.turns[1::2]] == answers
    # each answer is what batched generate() gives for the same conversation prefix
    for i in range(3):
        prefix = session.turns[: 2 * i + 1]
        assert lora_predictor.answer([Query(prefix, [images["red"]])], 1, 24)[0] == answers[i]
    session.reset()
    assert session.turns == []
    # a stopped generation (Ctrl-C) is not added to the conversation
    stop = threading.Event()
    stop.set()
    session.ask(QUESTIONS[0], stop_event=stop)
    assert session.turns == []


# ---------------------------------------------------------------------------------------------------
# merge: stock transformers, nothing from llavatune, gives the unmerged checkpoint's greedy answers

STOCK = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

req = json.loads(sys.argv[1])
out = {}
for d in req["models"]:
    model = LlavaForConditionalGeneration.from_pretrained(d).eval()
    proc = AutoProcessor.from_pretrained(d)
    rows = []
    for img, q in req["queries"]:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = proc(text=prompt, images=Image.open(img).convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=req["max_new_tokens"], do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        new = gen.sequences[0, inputs["input_ids"].shape[1]:]
        # per step: the top-2 logit gap, and how many answer characters the tokens so far make
        margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in gen.scores)]
        ends = [len(proc.tokenizer.decode(new[:k + 1], skip_special_tokens=True).strip()) for k in range(len(new))]
        rows.append({"prompt": prompt, "prompt_ids": inputs["input_ids"][0].tolist(), "margins": margins,
                     "ends": ends, "answer": proc.tokenizer.decode(new, skip_special_tokens=True).strip()})
    out[d] = {"rows": rows, "dtype": str(model.dtype)}
out["llavatune_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "llavatune")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def merged(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for kind in ("lora", "qlora"):
        if kind in ckpts:
            assert cli_main(["merge", "--model", str(ckpts[kind]), "--out", str(root / kind)]) == 0
            out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def stock_answers(merged, images, tmp_path_factory):
    queries = [[str(images[c]), q] for c, q in zip(("red", "blue", "green"), QUESTIONS)]
    req = {"models": [str(p) for p in merged.values()], "queries": queries, "max_new_tokens": MAX_NEW}
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", STOCK, json.dumps(req)], capture_output=True, text=True, env=env,
                         cwd=tmp_path_factory.mktemp("stock"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data.pop("llavatune_modules") == [], "the stock-transformers side must not import llavatune"
    return queries, data


@pytest.fixture(scope="module")
def base_answers(ckpts, stock_answers):
    from llavatune.infer.predict import load_predictor

    queries, _ = stock_answers
    return answers_of(load_predictor(str(ckpts["llava-hf"])), [(Path(img), q) for img, q in queries])


def same_up_to_a_tie(row: dict, answer: str, tie: float = 1e-3) -> bool:
    """The stock greedy answer equals llavatune's, or they part where the stock model's top two logits are within
    ``tie`` (merged weights W + BA and the adapter's W x + B(A x) round differently, ~1e-6: greedy decoding may
    pick either of two tied tokens; a wrong merge moves logits by far more than that)."""
    if row["answer"] == answer:
        return True
    common = len(os.path.commonprefix([row["answer"], answer]))
    step = next((k for k, n in enumerate(row["ends"]) if n > common), len(row["ends"]) - 1)
    return row["margins"][step] < tie


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_merged_model_round_trips_through_stock_transformers(kind, ckpts, merged, stock_answers, base_answers):
    from llavatune.infer.predict import load_predictor, question_turns

    if kind not in merged:
        pytest.skip("bitsandbytes is not installed")
    out = merged[kind]
    for f in ("model.safetensors", "config.json", "generation_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    assert not any(out.glob("adapter_*")), "standalone: no adapter files"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and "quantization_config" not in cfg
    queries, data = stock_answers
    rows = data[str(out)]["rows"]
    assert data[str(out)]["dtype"] == "torch.float32"

    # the unmerged adapter through llavatune (QLoRA: on the base reloaded unquantized, as merged)
    unmerged = load_predictor(str(ckpts[kind]), quantized=False)
    pairs = [(Path(img), q) for img, q in queries]
    for (_img, q), row in zip(pairs, rows):
        assert unmerged.encoder.prompt_ids(question_turns(q, 1)) == row["prompt_ids"], \
            "the chat template and the Encoder build the same prompt"
        assert row["prompt"] == f"USER: <image>\n{q} ASSISTANT:"
    want = answers_of(unmerged, pairs)
    for row, answer in zip(rows, want):
        assert same_up_to_a_tie(row, answer), (row["answer"], answer)
    assert any(want), "some answer is non-empty"
    assert base_answers != want, "the adapter must change the answers for this test to mean anything"
    # llavatune loads the merged model too, with the same answers
    assert answers_of(load_predictor(str(out)), pairs) == want


def test_qlora_merges_into_the_unquantized_base(ckpts, merged):
    if "qlora" not in merged:
        pytest.skip("bitsandbytes is not installed")
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(ckpts["qlora"] / "base_model").state_dict()
    out = LlavaForConditionalGeneration.from_pretrained(merged["qlora"]).state_dict()
    adapter = load_file(str(ckpts["qlora"] / "adapter_model.safetensors"))
    scale = 16 / 8
    n = 0
    for k in adapter:
        if not k.endswith("lora_A.weight"):
            continue
        module = k[len("base_model.model."):-len(".lora_A.weight")]
        b = adapter[k.replace("lora_A", "lora_B")]
        expected = base[f"{module}.weight"] + scale * b @ adapter[k]
        assert torch.allclose(out[f"{module}.weight"], expected, atol=1e-6), module
        n += 1
    assert n == 14  # 7 linear layers x 2 blocks
    proj = {k.split("multi_modal_projector.")[1]: v for k, v in adapter.items() if "multi_modal_projector" in k}
    for name, v in proj.items():
        assert torch.equal(out[f"model.multi_modal_projector.{name}"], v.to(out[f"model.multi_modal_projector.{name}"].dtype))
    # untouched weights are bit-identical to the 16/32-bit base: nothing went through 4-bit
    assert torch.equal(out["model.language_model.embed_tokens.weight"], base["model.language_model.embed_tokens.weight"])


def test_merge_refuses_existing_out_and_replaces_atomically(ckpts, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli_main(["merge", "--model", str(ckpts["lora"]), "--out", str(out)]) == 1
    assert "--overwrite" in error_line(capsys.readouterr().err) and (out / "keep.txt").exists()
    assert cli_main(["merge", "--model", str(ckpts["lora"]), "--out", str(ckpts["lora"] / "inside")]) == 1
    assert "inside the source" in error_line(capsys.readouterr().err)
    # --overwrite never deletes a folder of the user's own files, only an earlier merge output
    assert cli_main(["merge", "--model", str(ckpts["full"]), "--out", str(out), "--overwrite"]) == 1
    assert "not a llavatune output" in error_line(capsys.readouterr().err) and (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert cli_main(["merge", "--model", str(ckpts["lora"]), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from the earlier merge")
    assert cli_main(["merge", "--model", str(ckpts["full"]), "--out", str(out), "--overwrite", "--template",
                     "llava_v1"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no temp folders left next to the output"
    meta = json.loads((out / "llavatune_checkpoint.json").read_text())
    assert meta["method"] == "merged" and meta["source_method"] == "full"
    assert meta["template"] == "llava_v1"  # --template: recorded for predict / chat / eval of the merged model


# ---------------------------------------------------------------------------------------------------
# serve


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with opener.open(req, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, dict]:
    b = uuid.uuid4().hex
    body = b""
    for k, v in fields.items():
        body += f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    for k, (fn, data) in files.items():
        body += (f'--{b}\r\nContent-Disposition: form-data; name="{k}"; filename="{fn}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{b}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={b}"}


@pytest.fixture(scope="module")
def server(lora_predictor):
    from llavatune.infer.serve import make_server

    srv = make_server(lora_predictor, port=0, max_new_tokens=MAX_NEW, model_name="tiny-lora")
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_serve_answers_over_http_on_loopback(server, lora_predictor, images):
    import base64

    assert server.server_address[0] == "127.0.0.1"
    status, body, ctype = http(server.url)
    assert status == 200 and "text/html" in ctype
    page = body.decode()
    assert 'type="file"' in page and "/api/predict" in page and "tiny-lora" in page
    assert json.loads(http(server.url + "api/health")[1]) == {"status": "ok", "model": "tiny-lora"}

    want = answers_of(lora_predictor, [(images["red"], QUESTIONS[0]), (None, QUESTIONS[1])])
    data, headers = multipart({"question": QUESTIONS[0]}, {"image": ("red.png", images["red"].read_bytes())})
    status, body, ctype = http(server.url + "api/predict", data, headers)
    assert status == 200 and "application/json" in ctype
    assert json.loads(body) == {"answer": want[0]}
    # JSON with a base64 data URL; a text-only question
    payload = {"image": "data:image/png;base64," + base64.b64encode(images["red"].read_bytes()).decode(),
               "question": QUESTIONS[0]}
    status, body, _ = http(server.url + "api/predict", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["answer"] == want[0]
    status, body, _ = http(server.url + "api/predict", json.dumps({"question": QUESTIONS[1]}).encode(),
                           {"Content-Type": "application/json"})
    assert json.loads(body)["answer"] == want[1]
    # follow-up question about the same image: the history becomes earlier turns
    from llavatune.data.records import Turn
    from llavatune.infer.generate import Query

    hist = [[QUESTIONS[0], want[0]]]
    data, headers = multipart({"question": QUESTIONS[2], "history": json.dumps(hist)},
                              {"image": ("red.png", images["red"].read_bytes())})
    status, body, _ = http(server.url + "api/predict", data, headers)
    turns = [Turn("human", "<image>\n" + QUESTIONS[0]), Turn("gpt", want[0]), Turn("human", QUESTIONS[2])]
    assert status == 200 and json.loads(body)["answer"] == lora_predictor.answer([Query(turns, [images["red"]])], 1,
                                                                                 MAX_NEW)[0]
    # the no-JavaScript form posts to /predict and gets a page back
    status, body, ctype = http(server.url + "predict", data, headers)
    assert status == 200 and "text/html" in ctype and "A:" in body.decode()


def test_serve_rejects_bad_requests(server, images):
    data, headers = multipart({"question": "What?"}, {"image": ("x.png", images["broken"].read_bytes())})
    status, body, _ = http(server.url + "api/predict", data, headers)
    err = json.loads(body)["error"]
    assert status == 400 and "uploaded image" in err and "cannot read image" in err
    data, headers = multipart({}, {"image": ("red.png", images["red"].read_bytes())})
    status, body, _ = http(server.url + "api/predict", data, headers)
    assert status == 400 and "question" in json.loads(body)["error"]
    status, body, _ = http(server.url + "api/predict", b"[1]", {"Content-Type": "application/json"})
    assert status == 400
    status, body, _ = http(server.url + "api/predict", b"{bad", {"Content-Type": "application/json"})
    assert status == 400 and "JSON" in json.loads(body)["error"]
    data, headers = multipart({"question": "q", "history": "[[1]]"}, {})
    assert http(server.url + "api/predict", data, headers)[0] == 400
    assert http(server.url + "nope")[0] == 404
    assert http(server.url + "api/nope", b"{}", {"Content-Type": "application/json"})[0] == 404
    assert not list(Path(server.tmp.name).iterdir()), "uploads are deleted after use"


def test_serve_command_starts_on_loopback(ckpts, images, tmp_path, monkeypatch, capsys):
    """The real command (in a thread): binds 127.0.0.1 by default, prints its URL, answers, and (when chromium is
    here) renders the page headless."""
    from llavatune.infer import serve

    started = []

    def capture(*args, **kwargs):
        srv = make_server(*args, **kwargs)
        started.append(srv)
        return srv

    make_server = serve.make_server
    monkeypatch.setattr(serve, "make_server", capture)
    rc = []
    t = threading.Thread(target=lambda: rc.append(cli_main(["serve", "--model", str(ckpts["full"]), "--port", "0",
                                                            "--max_new_tokens", "4"])), daemon=True)
    t.start()
    deadline = time.time() + 60
    while not started and time.time() < deadline and t.is_alive():
        time.sleep(0.05)
    assert started, capsys.readouterr().err[-2000:]
    srv = started[0]
    try:
        assert srv.server_address[0] == "127.0.0.1"
        url = srv.url
        assert http(url + "api/health")[0] == 200
        data, headers = multipart({"question": "What?"}, {"image": ("red.png", images["red"].read_bytes())})
        status, body, _ = http(url + "api/predict", data, headers)
        assert status == 200 and "answer" in json.loads(body)
        browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                       None)
        if browser is not None:
            shot = tmp_path / "page.png"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                            "--window-size=900,700", url], capture_output=True, timeout=60)
            assert shot.is_file() and Image.open(shot).size == (900, 700)
    finally:
        srv.shutdown()
        t.join(timeout=30)
    assert rc == [0]
    assert f"at {url}" in capsys.readouterr().out
    if browser is None:
        pytest.skip("no chromium for a headless screenshot (the HTTP checks above passed)")


def test_commands_are_registered(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("predict", "chat", "merge", "convert", "serve"):
        assert f"  {name} " in out

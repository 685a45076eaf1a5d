"""The prompt made visible: ``check --show``, the first training sample in the train log, ``predict --json``'s
``"prompt"`` — the exact text given to the tokenizer, the supervised spans and the token counts."""

from __future__ import annotations

import json
import logging

from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.data.encode import IGNORE_INDEX, Encoder
from llavatune.data.records import Turn

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def write_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    Image.new("RGB", (20, 14), (200, 30, 30)).save(d / "a.png")
    recs = [
        {"id": "broken", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        # <image> after the question: training moves it to the start of the turn, as the original code does
        {"id": "q1", "image": "a.png", "conversations": [
            {"from": "human", "value": "What color is the shape? <image>"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "2"}]},
        {"id": "q2", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    ]
    path = d / "data.json"
    path.write_text(json.dumps(recs, indent=1))
    return path


def test_check_show_prints_and_reports_what_the_model_sees(tiny_processor, tmp_path, capsys):
    data = write_data(tmp_path)
    before = data.read_bytes()
    rc = cli_main(["check", str(data), "--model", str(tiny_processor.path), "--template", "vicuna_v1", "--show", "5",
                   "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert rc == 1  # the broken record is still an error; --show passes over it
    shown = json.loads((tmp_path / "report.json").read_text())["shown"]
    assert [s["id"] for s in shown] == ["q1", "q2"]
    s = shown[0]
    assert s["text"] == (VICUNA + " USER: <image>\nWhat color is the shape? ASSISTANT: red</s>"
                         "USER: How many shapes are there? ASSISTANT: 2</s>")
    assert [s["text"][a:b] for a, b in s["supervised"]] == [" red</s>", " 2</s>"]
    # token counts are those of the sample training builds (BOS and 16 image tokens included)
    enc = Encoder(tiny_processor, template="vicuna_v1")
    turns = [Turn("human", "<image>\nWhat color is the shape?"), Turn("gpt", "red"),
             Turn("human", "How many shapes are there?"), Turn("gpt", "2")]
    ids, labels = enc.encode(turns)
    assert (s["tokens"], s["image_tokens"]) == (len(ids), 16)
    assert s["supervised_tokens"] == sum(1 for x in labels if x != IGNORE_INDEX)
    assert s["template"] == "vicuna_v1"
    assert shown[1]["text"] == VICUNA + " USER: Say hi. ASSISTANT: hi</s>" and shown[1]["image_tokens"] == 0
    # printed: supervised spans marked, newlines visible, counts and the legend
    assert "ASSISTANT:⟦ red</s>⟧USER: How many shapes are there? ASSISTANT:⟦ 2</s>⟧" in out
    assert "USER: <image>↵\n" in out
    assert f"sample q1: {len(ids)} tokens (16 image, {s['supervised_tokens']} supervised)" in out
    assert "text as given to the tokenizer, which adds BOS <s> itself" in out and "16 image tokens" in out
    assert "1 record(s) with errors before them passed over" in out
    assert data.read_bytes() == before, "the data file is never changed"


def test_check_show_defaults_to_the_models_chat_template(tiny_processor, tmp_path, capsys):
    data = write_data(tmp_path)
    assert cli_main(["check", str(data), "--model", str(tiny_processor.path), "--show", "1",
                     "--json", str(tmp_path / "r.json")]) == 1
    (s,) = json.loads((tmp_path / "r.json").read_text())["shown"]
    # the tiny model's chat template is llava-hf-1.5's: no system prompt
    assert s["text"].startswith("USER: <image>\nWhat color is the shape? ASSISTANT: red</s>")
    assert s["template"] == "auto (the model's chat template)"
    out = capsys.readouterr().out
    assert "--show: the first 1 record(s) without errors" in out


def test_check_show_needs_a_model(tmp_path, capsys):
    data = write_data(tmp_path)
    rc = cli_main(["check", str(data), "--show", "2"])
    err = capsys.readouterr().err
    assert rc != 0 and "--show needs --model" in err
    assert cli_main(["check", str(data), "--model", "x", "--show", "1", "--template", "vicuna"]) != 0
    assert "--template" in capsys.readouterr().err


def test_train_logs_the_first_sample_before_step_1(shapes, tmp_path):
    from transformers import TrainerCallback

    from llavatune.config import parse_config
    from llavatune.train.run import SECTIONS, train

    messages: list[str] = []
    seen_at_step_1: list[list[str]] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not seen_at_step_1:
                seen_at_step_1.append(list(messages))

    argv = ["--model", "tiny", "--data", str(shapes["train"]), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
            "--report_to", "none", "--lora_r", "4", "--lora_alpha", "8", "--per_device_train_batch_size", "2",
            "--dataloader_num_workers", "0", "--template", "vicuna_v1"]
    log = logging.getLogger("llavatune")
    handler, level = Collect(logging.INFO), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        train(*parse_config(SECTIONS, argv), extra_callbacks=(FirstStep(),))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    logged = [m for m in seen_at_step_1[0] if m.startswith("first train sample as the model sees it")]
    assert len(logged) == 1
    text = logged[0]
    assert "template vicuna_v1" in text and VICUNA + " USER: <image>↵" in text
    assert "ASSISTANT:⟦ " in text and "</s>⟧" in text and "16 image" in text


def test_predict_json_includes_the_rendered_prompt(tiny_processor, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 14), (200, 30, 30)).save(img)
    base = ["predict", "--model", str(tiny_processor.path), "--image", str(img), "--question", "What color is it?",
            "--max_new_tokens", "2", "--json"]
    assert cli_main(base) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["prompt"] == "USER: <image>\nWhat color is it? ASSISTANT:"  # the model's chat template, no BOS
    assert cli_main(base + ["--template", "llava_v1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["prompt"].startswith("A chat between a curious human") and row["prompt"].endswith(
        " USER: <image>\nWhat color is it? ASSISTANT:")
    # the bare answer stays the default output
    assert cli_main(base[:-1]) == 0
    assert "prompt" not in capsys.readouterr().out

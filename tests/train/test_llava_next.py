"""LLaVA-NeXT ("any resolution"): per-image token counts, training, eval, merge, stock-transformers round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.config import parse_config
from llavatune.data.encode import Encoder, LlavaCollator, LlavaDataset
from llavatune.data.records import Record, Turn
from llavatune.model.tiny import build_tiny
from llavatune.train.run import SECTIONS, train


@pytest.fixture(scope="module")
def next_processor(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_next")
    model, processor = build_tiny(["What color is the shape? red blue"], d, next=True)
    return d, model, processor


@pytest.mark.parametrize("size", [(32, 32), (20, 60), (64, 24), (100, 100)])
def test_token_count_is_the_real_per_image_count(next_processor, tmp_path, size):
    d, model, processor = next_processor
    h, w = size
    img = Image.new("RGB", (w, h), (200, 30, 30))
    enc = Encoder(processor, template="auto")
    ids = enc.prompt_ids([Turn("human", "<image>\nColor?")], [(h, w)])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}], add_generation_prompt=True)
    stock = processor(images=[img], text=[prompt], return_tensors="pt")
    assert ids == stock["input_ids"][0].tolist()  # identical prompt, image tokens included
    # and the model accepts it: features and image tokens match
    with torch.no_grad():
        model(input_ids=stock["input_ids"], pixel_values=stock["pixel_values"], image_sizes=stock["image_sizes"])


def test_mixed_size_batch_collates_and_runs(next_processor, tmp_path):
    d, model, processor = next_processor
    Image.new("RGB", (60, 20), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (30, 30), "blue").save(tmp_path / "sq.png")
    recs = [Record("w", [Turn("human", "<image>\nColor?"), Turn("gpt", "red")], ["wide.png"]),
            Record("s", [Turn("human", "<image> and <image>: colors?"), Turn("gpt", "blue red")], ["sq.png", "wide.png"]),
            Record("t", [Turn("human", "Hi"), Turn("gpt", "hello")])]
    ds = LlavaDataset(recs, Encoder(processor), [tmp_path] * 3)
    assert len(ds) == 3
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1], ds[2]])
    assert batch["pixel_values"].shape[0] == 3 and batch["image_sizes"].tolist() == [[20, 60], [30, 30], [20, 60]]
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_tiny_next_trains_evaluates_merges_and_round_trips(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = train(*parse_config(SECTIONS, [str(a) for a in [
        "--model", "tiny-next", "--data", shapes["train"], "--val_data", shapes["val"], "--output_dir", out,
        "--num_train_epochs", "1", "--lora_r", "8", "--lora_alpha", "16", "--report_to", "none",
        "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--eval_max_new_tokens", "3"]]))
    assert type(trainer.model.get_base_model()).__name__ == "LlavaNextForConditionalGeneration"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_vqa_accuracy" in r for r in rows)
    assert cli_main(["eval", "--model", str(out), "--data", str(shapes["val"]), "--max_samples", "4",
                     "--max_new_tokens", "3", "--out", str(tmp_path / "ev")]) == 0
    ours = [json.loads(x)["prediction"] for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    merged = tmp_path / "merged"
    assert cli_main(["merge", "--model", str(out), "--out", str(merged)]) == 0
    capsys.readouterr()
    val = json.loads(shapes["val"].read_text())[:4]
    queries = [[str(shapes["val"].parent / r["image"]), r["conversations"][0]["value"].replace("<image>\n", "")]
               for r in val]
    script = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
d, queries = sys.argv[1], json.loads(sys.argv[2])
model = LlavaNextForConditionalGeneration.from_pretrained(d).eval()
proc = AutoProcessor.from_pretrained(d)
answers = []
for img, q in queries:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    inputs = proc(text=proc.apply_chat_template(msgs, add_generation_prompt=True), images=Image.open(img).convert("RGB"),
                  return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answers.append(proc.tokenizer.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
print(json.dumps(answers))
"""
    res = subprocess.run([sys.executable, "-c", script, str(merged), json.dumps(queries)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ours

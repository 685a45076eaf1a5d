"""Several images per sample, and batches mixing text-only, 1-image and 2-image samples."""

from __future__ import annotations

import json

import torch
from PIL import Image

from llavatune.config import parse_config
from llavatune.data.encode import IGNORE_INDEX, Encoder, LlavaCollator, LlavaDataset
from llavatune.data.records import Record, Turn
from llavatune.train.run import SECTIONS, train


def draw(path, color):
    Image.new("RGB", (24, 24), color).save(path)
    return path.name


def test_three_image_sample_masks_and_expands(tiny_processor, tmp_path):
    names = [draw(tmp_path / f"{c}.png", c) for c in ("red", "green", "blue")]
    rec = Record("three", [Turn("human", "First <image>, second <image>, third <image>: which is green?"),
                           Turn("gpt", "second")], names)
    enc = Encoder(tiny_processor, template="vicuna_v1")
    ds = LlavaDataset([rec], enc, [tmp_path])
    item = ds[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    n = enc.n_image_tokens
    assert ids.count(enc.image_token_id) == 3 * n and item["pixel_values"].shape[0] == 3
    # three separate runs of exactly n image tokens each
    runs, cur = [], 0
    for t in ids + [-1]:
        if t == enc.image_token_id:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    assert runs == [n, n, n]
    got = enc.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert got.replace(" ", "") == "second</s>"
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_processor.path)
    batch = LlavaCollator(tiny_processor.tokenizer.pad_token_id)([item])
    assert torch.isfinite(model(**batch).loss)


def test_mixed_batch_trains(tmp_path):
    a, b = draw(tmp_path / "a.png", "red"), draw(tmp_path / "b.png", "blue")
    recs = []
    for i in range(4):
        recs.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
        recs.append({"id": f"o{i}", "image": a, "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                                    {"from": "gpt", "value": "red"}]})
        recs.append({"id": f"w{i}", "image": [a, b], "conversations": [
            {"from": "human", "value": "<image> then <image>: second color?"}, {"from": "gpt", "value": "blue"}]})
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(recs))
    argv = ["--model", "tiny", "--data", data, "--output_dir", tmp_path / "run", "--report_to", "none", "--max_steps", "3",
            "--per_device_train_batch_size", "6", "--train_sampling_strategy", "sequential", "--save_strategy", "no",
            "--lora_r", "4", "--lora_alpha", "8"]
    trainer = train(*parse_config(SECTIONS, [str(x) for x in argv]))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(x)) for x in losses)

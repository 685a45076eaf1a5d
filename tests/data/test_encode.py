"""Loss masking per template, image-token expansion, truncation safety, collation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llavatune.data.encode import (
    IGNORE_INDEX,
    Encoder,
    LlavaCollator,
    LlavaDataset,
    check_masking,
    image_tokens_per_image,
)
from llavatune.data.records import Record, Turn
from llavatune.data.templates import ChatTemplateSegmenter, get_segmenter

CONV = [
    Turn("human", "<image>\nWhat color is the shape?"),
    Turn("gpt", "red"),
    Turn("human", "How many shapes are there?"),
    Turn("gpt", "2"),
]


def supervised(enc: Encoder, ids, labels) -> str:
    return enc.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2", "chatml", "auto"])
def test_labels_are_exactly_the_answers(tiny_processor, template):
    enc = Encoder(tiny_processor, template=template)
    ids, labels = enc.encode(CONV)
    assert len(ids) == len(labels)
    # labels equal ids where supervised, -100 elsewhere
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    got = supervised(enc, ids, labels)
    eos = enc.tokenizer.eos_token
    assert got.replace(" ", "") == f"red{eos}2{eos}".replace(" ", "") or got.replace(" ", "") == "red<|im_end|>2<|im_end|>"
    # the question text and the image tokens are never supervised
    img = enc.image_token_id
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == img)
    assert check_masking(enc, CONV, labels) is None


def test_image_placeholder_expands_to_feature_count(tiny_processor):
    enc = Encoder(tiny_processor, template="vicuna_v1")
    ids, _ = enc.encode(CONV)
    n = image_tokens_per_image(tiny_processor)
    assert n == (32 // 8) ** 2  # CLIP patches, CLS dropped by the "default" strategy
    assert ids.count(enc.image_token_id) == n
    # the same count the stock processor expands to
    text = tiny_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
    )
    stock = tiny_processor(images=[Image.new("RGB", (40, 30))], text=[text], return_tensors="pt")
    assert int((stock["input_ids"] == enc.image_token_id).sum()) == n


def test_plain_template_supervises_caption_only(tiny_processor):
    enc = Encoder(tiny_processor, template="plain")
    turns = [Turn("human", "<image>\nDescribe the image briefly."), Turn("gpt", "a red circle on the left")]
    ids, labels = enc.encode(turns)
    assert supervised(enc, ids, labels).strip() == "a red circle on the left"
    assert "Describe" not in enc.tokenizer.decode(ids)  # original LLaVA drops the instruction in pretraining


def test_vicuna_text_matches_original_llava_format(tiny_processor):
    segs = get_segmenter("vicuna_v1")(
        [Turn("system", "SYS"), Turn("human", "Q1"), Turn("gpt", "A1"), Turn("human", "Q2"), Turn("gpt", "A2")],
        "</s>", False,
    )
    assert "".join(t for t, _ in segs) == "SYS USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    gen = get_segmenter("vicuna_v1")([Turn("human", "Q1")], "</s>", True)
    assert "".join(t for t, _ in gen).endswith("USER: Q1 ASSISTANT:")


def test_llama2_text_matches_original_llava_format():
    segs = get_segmenter("llava_llama_2")(
        [Turn("system", "S"), Turn("human", "Q1"), Turn("gpt", "A1"), Turn("human", "Q2"), Turn("gpt", "A2")],
        "</s>", False,
    )
    assert "".join(t for t, _ in segs) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s>"


def test_chat_template_segments_add_eos_when_template_has_none():
    # llava-1.5-hf style: answers end with a space and no EOS; we must still teach the model to stop.
    def render(messages, tokenize=False, add_generation_prompt=False):
        out = ""
        for m in messages:
            text = "".join(c.get("text", "<image>\n" if c["type"] == "image" else "") for c in m["content"])
            out += ("USER: " + text + " ") if m["role"] == "user" else ("ASSISTANT: " + text + " ")
        return out + ("ASSISTANT:" if add_generation_prompt else "")

    segs = ChatTemplateSegmenter(render)([Turn("human", "<image>\nQ"), Turn("gpt", "A")], "</s>", False)
    assert [s for s in segs if s[1]] == [(" A</s>", True)]


def test_prompt_ids_are_a_prefix_of_training_ids(tiny_processor):
    enc = Encoder(tiny_processor, template="auto")
    ids, _ = enc.encode(CONV[:2])
    prompt = enc.prompt_ids(CONV[:1])
    assert ids[: len(prompt)] == prompt


def test_truncation_never_cuts_image_tokens(tiny_processor):
    n = image_tokens_per_image(tiny_processor)
    long_q = "What color is the shape? " * 40
    turns = [Turn("human", long_q + "<image>"), Turn("gpt", "red")]  # image at the END of a long question
    drop = Encoder(tiny_processor, template="vicuna_v1", max_length=60, truncation="drop")
    with pytest.raises(Exception, match="longer than max_length"):
        drop.encode(turns)
    trunc = Encoder(tiny_processor, template="vicuna_v1", max_length=60, truncation="truncate")
    with pytest.raises(Exception, match="cut through image tokens"):
        trunc.encode(turns)
    # text after the image may be cut; the image block stays whole
    turns2 = [Turn("human", "<image>\nWhat?"), Turn("gpt", "red " * 200)]
    ids, labels = trunc.encode(turns2)
    assert len(ids) == 60 and ids.count(trunc.image_token_id) == n
    assert any(lab != IGNORE_INDEX for lab in labels)


def test_dataset_counts_skips_and_collates(tiny_processor, tmp_path):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a.png")
    recs = [
        Record("ok", [Turn("human", "<image>\nColor?"), Turn("gpt", "red")], ["a.png"]),
        Record("text", [Turn("human", "Say hi"), Turn("gpt", "hi")]),
        Record("mismatch", [Turn("human", "Color?"), Turn("gpt", "red")], ["a.png"]),
        Record("escape", [Turn("human", "<image>\nColor?"), Turn("gpt", "red")], ["../../etc/passwd"]),
    ]
    enc = Encoder(tiny_processor, template="vicuna_v1")
    ds = LlavaDataset(recs, enc, [tmp_path] * 4)
    assert len(ds) == 2 and ds.n_skipped == 2
    report = ds.report()
    assert "mismatch" in report and "escape" in report
    batch = LlavaCollator(tiny_processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    B, L = batch["input_ids"].shape
    assert B == 2 and batch["labels"].shape == (B, L) and batch["attention_mask"].sum() == len(ds[0]["input_ids"]) + len(ds[1]["input_ids"])
    assert batch["pixel_values"].shape[0] == 1  # only the image sample contributes pixels
    left = LlavaCollator(0, padding_side="left")([ds[0], ds[1]])
    assert left["attention_mask"][:, -1].all()


def test_mixed_batch_forward_matches_feature_count(tiny_processor, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_processor.path)
    Image.new("RGB", (20, 30), (0, 0, 255)).save(tmp_path / "b.png")
    recs = [
        Record("img", [Turn("human", "<image>\nColor?"), Turn("gpt", "blue")], ["b.png"]),
        Record("txt", [Turn("human", "Hello"), Turn("gpt", "hi")]),
    ]
    ds = LlavaDataset(recs, Encoder(tiny_processor), [tmp_path] * 2)
    batch = LlavaCollator(tiny_processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_truncation_keeps_whole_turns_and_the_masking_self_check_agrees(tiny_processor, tmp_path):
    """Reproduction 7: a multi-turn sample whose later turn did not fit was cut mid-answer, failed the masking
    self-check and blamed --template. It keeps the exchanges that fit, whole, with their images."""
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "b.png")
    long = "red green blue " * 40
    turns = [Turn("human", "<image>\nWhat color is the shape?"), Turn("gpt", "red"),
             Turn("human", "How many shapes are there?"), Turn("gpt", "2"),
             Turn("human", "<image>\nAnd this one?"), Turn("gpt", long)]
    full = Encoder(tiny_processor, template="vicuna_v1", max_length=10_000)
    n2 = len(full.encode(turns[:4])[0])
    enc = Encoder(tiny_processor, template="vicuna_v1", max_length=n2 + 3, truncation="truncate")
    fitted = enc.fit(turns)
    assert fitted.turns == turns[:4] and not fitted.cut and fitted.n_images == 1
    assert fitted.input_ids == full.encode(turns[:4])[0]
    assert supervised(enc, fitted.input_ids, fitted.labels).replace(" ", "") == f"red{enc.eos}2{enc.eos}".replace(" ", "")
    rec = Record("multi", turns, ["a.png", "b.png"])
    ds = LlavaDataset([rec], enc, [tmp_path])
    assert len(ds) == 1 and ds.masking_problems == [] and ds.n_truncated == 1
    assert [p.name for p in ds.samples[0].image_paths] == ["a.png"]  # the dropped turn's image goes with it
    assert ds[0]["pixel_values"].shape[0] == 1
    assert "truncated to max_length" in ds.report()
    # only when not even the first exchange fits is its answer cut short (never through image tokens)
    one = [Turn("human", "<image>\nWhat?"), Turn("gpt", long)]
    f = enc.fit(one)
    assert f.cut and len(f.input_ids) == enc.max_length and check_masking(enc, f.turns, f.labels, cut=True) is None
    drop = Encoder(tiny_processor, template="vicuna_v1", max_length=n2 + 3)
    ds = LlavaDataset([rec], drop, [tmp_path])
    assert len(ds) == 0 and list(ds.skipped) == ["too-long"]

"""The tiny model behaves like a pretrained one (issue 15, item 5): its language model is warm-started on the
data's text and can put a confident probability on an answer and on the end-of-turn token (the random model
gives every token ~1/vocabulary, so LoRA's loss stalls near log(vocabulary)); its vision tower is warm-started
on the images alone; neither warm start sees an image together with its answer; everything is deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration

from llavatune.config import parse_config
from llavatune.data.records import Turn, load_records
from llavatune.model.tiny import build_tiny, warm_start_texts
from llavatune.train.run import SECTIONS, train

# Each question has one answer, as in a pretrained LM's knowledge: the warm-started model must be sure of it.
QA = [("What color is the sky?", "blue"), ("What color is grass?", "green"), ("How many legs has a cat?", "4"),
      ("What shape is a ball?", "round")]


def conversations(n_repeat: int = 8) -> list[list[Turn]]:
    return [[Turn("human", f"<image>\n{q}"), Turn("gpt", a)] for q, a in QA * n_repeat]


def answer_probabilities(model, processor, question: str, answer: str) -> list[tuple[str, float]]:
    """Teacher-forced probability of each answer token and of the end of turn after the prompt, text only."""
    tok = processor.tokenizer
    doc = warm_start_texts(processor, [[Turn("human", question), Turn("gpt", answer)]])[0]
    prompt = doc[: doc.index("ASSISTANT:") + len("ASSISTANT:")]
    ids = tok(doc, return_tensors="pt").input_ids
    start = len(tok(prompt).input_ids)
    with torch.no_grad():
        probs = model(input_ids=ids).logits.softmax(-1)[0]
    return [(tok.decode([int(ids[0, i])]), float(probs[i - 1, ids[0, i]])) for i in range(start, ids.shape[1])]


def squares(n: int) -> list[Image.Image]:
    """Grey images with one white square at a varying place and size."""
    out = []
    for i in range(n):
        im = Image.new("RGB", (28, 28), (20, 20, 20))
        x, y, s = (i * 7) % 16, (i * 11) % 16, 6 + i % 6
        ImageDraw.Draw(im).rectangle([x, y, x + s, y + s], fill=(240, 240, 240))
        out.append(im)
    return out


def test_warm_started_tiny_model_is_confident_about_answers_and_end_of_turn():
    convs = conversations()
    texts = [t.value for c in convs for t in c]
    model, processor = build_tiny(texts, None, conversations=convs)
    cold, _ = build_tiny(texts, None, warm_start=False)
    eos = processor.tokenizer.eos_token
    for q, a in QA:
        warm = answer_probabilities(model, processor, q, a)
        assert warm[-1][0] == eos
        # every answer token and the end of turn: confident, as a pretrained LM is
        assert all(p > 0.5 for _, p in warm), (q, warm)
        # the random model cannot be (p ~ 1/vocabulary): what LoRA, which freezes the head, used to start from
        assert all(p < 0.05 for _, p in answer_probabilities(cold, processor, q, a)), q


def test_warm_start_texts_render_the_chat_template_without_image_placeholders(tiny_processor):
    docs = warm_start_texts(tiny_processor, [[Turn("human", "<image>\nWhat is it?"), Turn("gpt", "red")],
                                             [Turn("human", "Say hi.")]])
    # tiny's chat template (llava-hf style), answer and EOS included; a conversation without an answer is left out
    assert docs == ["USER: What is it? ASSISTANT: red</s>"]
    assert warm_start_texts(tiny_processor, [], ["a red circle", "<image>", ""]) == ["a red circle</s>"]


def _params(model, part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if part in k}


def test_warm_starts_are_deterministic_and_never_pair_images_with_answers():
    convs = conversations(4)
    texts = [t.value for c in convs for t in c]
    images = squares(24)
    a, _ = build_tiny(texts, None, conversations=convs, images=images)
    b, _ = build_tiny(texts, None, conversations=convs, images=images)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), "same inputs, same model"

    # the vision tower learns from the images alone: other answers, same tower
    other = [[c[0], Turn("gpt", "purple")] for c in convs]
    c, _ = build_tiny(texts + ["purple"], None, conversations=other, images=images)
    for k, v in _params(a, "vision_tower").items():
        assert torch.equal(v, c.state_dict()[k]), k
    # the language model learns from the text alone: other images, same language model
    d, _ = build_tiny(texts, None, conversations=convs, images=squares(30)[6:])
    for k, v in _params(a, "language_model").items():
        assert torch.equal(v, d.state_dict()[k]), k
    # and both did train: not the random initialisation
    cold, _ = build_tiny(texts, None, warm_start=False)
    for part in ("vision_tower.embeddings", "language_model.embed_tokens", "multi_modal_projector.linear_1"):
        assert any(not torch.equal(v, cold.state_dict()[k]) for k, v in _params(a, part).items()), part


def test_projector_starts_at_the_scale_of_the_token_embeddings():
    convs = conversations(2)
    texts = [t.value for c in convs for t in c]
    model, processor = build_tiny(texts, None, conversations=convs, images=squares(16))
    pixels = processor.image_processor(squares(16), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        pre = model.model.multi_modal_projector.linear_1(feats)
        out = model.model.multi_modal_projector(feats)
    emb_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt()
    assert pre.std().item() == pytest.approx(1.0, rel=0.05)
    assert out.pow(2).mean().sqrt().item() == pytest.approx(emb_rms.item(), rel=0.05)


def test_train_model_tiny_builds_its_base_warm_started_on_the_training_records(shapes, tmp_path):
    """Through the command: the saved base model (what training starts from) is the warm-started one."""
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--data", str(shapes["train"]), "--output_dir", str(out), "--max_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0"]
    train(*parse_config(SECTIONS, argv))
    base = LlavaForConditionalGeneration.from_pretrained(out / "base_model")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out / "base_model")
    rec = load_records(str(shapes["train"]))[0]
    q = rec.conversations[0].value.replace("<image>\n", "")
    probs = answer_probabilities(base, processor, q, rec.conversations[1].value)
    assert probs[-1][0] == processor.tokenizer.eos_token and probs[-1][1] > 0.5, probs  # it knows when to stop
    from llavatune.data.records import collect_texts

    # what the base was before its warm start: same texts, same seed (build_base's)
    cold, _ = build_tiny(collect_texts(load_records(str(shapes["train"]))), None, warm_start=False)
    key = "model.vision_tower.embeddings.patch_embedding.weight"
    assert not torch.equal(base.state_dict()[key], cold.state_dict()[key]), "vision tower warm-started on the images"
    assert json.loads((out / "base_model" / "config.json").read_text())["model_type"] == "llava"

"""`--model compose` (new LLaVA from a vision encoder + a causal LM) and `--smoke` on a real model's files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from llavatune.config import parse_config
from llavatune.model.tiny import train_tokenizer
from llavatune.train.run import SECTIONS, train

FAST = ["--report_to", "none", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--max_steps", "2"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny CLIP vision encoder and a tiny Llama LM saved as separate checkpoints (no <image> token yet)."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    vis = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8))
    vis.save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "vision")
    tok = train_tokenizer(["What color is the shape? red green blue yes no"], image_token=False)
    assert "<image>" not in tok.get_vocab()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root, vis, lm


def test_compose_keeps_pretrained_weights_and_trains(shapes, tmp_path, parts):
    root, vis, lm = parts
    out = tmp_path / "composed"
    argv = ["--model", "compose", "--vision_model", root / "vision", "--language_model", root / "lm",
            "--projector", "linear", "--data", shapes["captions"], "--stage", "pretrain", "--output_dir", out, *FAST]
    train(*parse_config(SECTIONS, [str(a) for a in argv]))
    base = LlavaForConditionalGeneration.from_pretrained(out / "base_model")
    assert base.config.projector_hidden_act == "linear" and base.config.vision_feature_layer == -2
    for k, v in vis.state_dict().items():
        assert torch.equal(base.model.vision_tower.state_dict()[k], v), k
    assert torch.equal(base.model.language_model.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight)
    # <image> was added and the embeddings resized to match
    assert base.config.text_config.vocab_size == lm.config.vocab_size + 1
    assert (out / "model.safetensors").is_file()


def test_smoke_swaps_in_a_tiny_model_of_the_same_family(shapes, tmp_path):
    # a "real" llava-hf model on disk (here: built from the tiny builder but with 4 layers, 96 wide)
    from llavatune.model.tiny import build_tiny

    real = tmp_path / "real"
    build_tiny(["What color is the shape? red"], real, hidden_size=96, num_layers=4)
    out = tmp_path / "smoke"
    trainer = train(*parse_config(SECTIONS, [str(a) for a in ["--model", real, "--smoke", "--data", shapes["train"],
                                                               "--output_dir", out, "--report_to", "none",
                                                               "--lora_r", "4", "--lora_alpha", "8"]]))
    cfg = json.loads((out / "base_model" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 2 and cfg["text_config"]["hidden_size"] == 64
    assert cfg["model_type"] == "llava"
    assert trainer.state.global_step == 3


def test_smoke_with_compose_builds_from_both_models(shapes, tmp_path, parts):
    """--smoke --model compose: a tiny random LLaVA with the language model's tokenizer (plus <image>) and the vision
    model's image processor and family (it used to hand the language model to build_smoke: AttributeError
    'LlamaConfig' object has no attribute 'vision_config')."""
    from transformers import AutoProcessor

    root, vis, lm = parts
    out = tmp_path / "smoke"
    argv = ["--model", "compose", "--vision_model", root / "vision", "--language_model", root / "lm", "--smoke",
            "--data", shapes["captions"], "--stage", "pretrain", "--output_dir", out, "--report_to", "none"]
    trainer = train(*parse_config(SECTIONS, [str(a) for a in argv]))
    assert trainer.state.global_step == 3
    cfg = json.loads((out / "base_model" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["text_config"]["model_type"] == "llama" and cfg["text_config"]["num_hidden_layers"] == 2
    assert cfg["vision_config"]["image_size"] == vis.config.image_size  # the vision model's own geometry
    proc = AutoProcessor.from_pretrained(out / "base_model")
    vocab = proc.tokenizer.get_vocab()
    assert "<image>" in vocab and cfg["image_token_index"] == vocab["<image>"]
    assert len(vocab) == lm.config.vocab_size + 1  # the language model's tokenizer, plus <image>

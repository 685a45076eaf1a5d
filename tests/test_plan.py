"""`llavatune plan`: parameter counts from configs, monotonicity, a live CPU step within 25 %, CLI output."""

from __future__ import annotations

import json

import pytest

from llavatune.cli import main
from llavatune.plan import PlanArgs, suggestions
from llavatune.plan.estimate import GiB, Settings, estimate, layer_bytes, supervised_tokens
from llavatune.plan.spec import TINY, load_spec, spec_from_config

# llava-hf/llava-1.5-7b-hf and -13b-hf (config.json values; everything else is the transformers default)
LLAVA_15 = {
    "7b": {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
           "vision_feature_select_strategy": "default",
           "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096,
                           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                           "num_key_value_heads": 32},
           "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                             "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                             "patch_size": 14, "projection_dim": 768}},
}
LLAVA_15["13b"] = json.loads(json.dumps(LLAVA_15["7b"]))
LLAVA_15["13b"]["text_config"].update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40)
ONE_B = json.loads(json.dumps(LLAVA_15["7b"]))
ONE_B["text_config"].update(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=32)
ONE_B["vision_config"].update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16, projection_dim=512)


def write_config(tmp_path, cfg, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("cfg", [TINY, ONE_B, LLAVA_15["7b"]], ids=["tiny", "1b", "7b"])
def test_parameter_counts_match_the_real_modules(cfg):
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    spec = spec_from_config(cfg)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(AutoConfig.for_model(**json.loads(json.dumps(cfg))))
    real = {"vision": 0, "projector": 0, "llm": 0}
    for name, p in model.named_parameters():
        key = "vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name else "llm"
        real[key] += p.numel()
    c = spec.count()
    assert c["vision"] == real["vision"]
    assert c["projector"] == real["projector"]
    assert c["llm_linear"] + c["llm_other"] + c["embed"] + c["lm_head"] == real["llm"]
    if cfg is LLAVA_15["7b"]:
        assert abs(spec.total_params() / 1e9 - 7.06) < 0.01 and spec.image_tokens == 576


def test_estimate_is_monotonic():
    spec = spec_from_config(LLAVA_15["7b"])
    base = Settings(method="lora", batch=8, max_length=2048)
    peak = lambda **kw: estimate(spec, base.replace(**kw)).peak  # noqa: E731
    assert peak(batch=4) < peak(batch=8) < peak(batch=16)
    assert peak(max_length=1024) < peak(max_length=2048)
    assert peak(gradient_checkpointing=True) < peak()
    gc = {"gradient_checkpointing": True}
    assert peak(method="qlora", **gc) < peak(method="lora", **gc) < peak(method="full", **gc)
    assert peak(method="lora", batch=1) < peak(method="full", batch=1)
    # LoRA dropout keeps a mask + a dropped copy of the input for each of the 7 adapted layers
    assert peak(lora_dropout=0.0) < peak()
    # under fp16, without checkpointing, QLoRA's fp32 residual stream (peft upcasts norms and embeddings) costs
    # more than the 4-bit weights save at this batch: the planner must not pretend otherwise. Under bf16 the
    # frozen weights go back to bf16 and so does the stream: QLoRA is then the smaller
    assert peak(method="qlora", dtype="fp16") > peak(method="lora", dtype="fp16")
    assert peak(method="qlora") < peak(method="lora")
    e_bf16, e_fp16 = (estimate(spec, base.replace(method="qlora", dtype=d)) for d in ("bf16", "fp16"))
    w = {d: next(i.bytes for i in e.items if i.name == "weights") for d, e in (("bf16", e_bf16), ("fp16", e_fp16))}
    c = spec.count()
    # fp16 keeps the embeddings and norms fp32: 2 more bytes for each of those parameters
    assert w["fp16"] - w["bf16"] == 2 * (sum(c.values()) - c["llm_linear"] - spec.vision_matmul_params()
                                         - c["lm_head"] - c["projector"])
    assert peak(method="full", zero=3, gpus=8) < peak(method="full", zero=2, gpus=8) < peak(method="full", zero=0)
    assert peak(method="full", zero=2, gpus=8) < peak(method="full", zero=2, gpus=2)
    assert peak(method="full", zero=3, gpus=8, offload=True) < peak(method="full", zero=3, gpus=8)
    assert peak(lora_r=16) < peak(lora_r=128)
    assert peak(padding_mask=False) < peak()
    assert peak(device="cpu", lora_dropout=0.0) < peak(lora_dropout=0.0)  # no CUDA context or fragmentation
    # the logits buffer: 12 bytes x supervised tokens x vocab; by default every text token (the worst case),
    # and far less for short answers, since llavatune computes logits only at supervised positions
    e = estimate(spec, base.replace(batch=16))
    assert e.row("logits") == 12 * 16 * (2048 - 576) * 32064
    assert estimate(spec, base.replace(batch=16, supervised_tokens=8)).row("logits") == 12 * 16 * 8 * 32064
    assert peak(supervised_tokens=8) < peak()
    # QLoRA: NF4 + double-quant constants ~0.516 byte per LLM linear weight; under fp16 autocast the frozen
    # linear/conv weights (vision tower, lm_head, the projector's frozen original) in 16 bit, the rest in fp32
    # (peft upcast); under bf16 every unquantized frozen weight in 16 bit; plus fp32 LoRA and the trainable
    # projector copy
    c = spec.count()
    nf4 = c["llm_linear"] * (0.5 + 1 / 64 + 4 / 64 / 256)
    trained = spec.lora_params(128) * 4 + c["projector"] * 4
    q = estimate(spec, base.replace(method="qlora", dtype="fp16")).row("weights")
    kept16 = spec.vision_matmul_params() + c["lm_head"] + c["projector"]
    assert 0.9 * c["vision"] < spec.vision_matmul_params() < c["vision"]
    assert q == pytest.approx(nf4 + kept16 * 2 + (sum(c.values()) - c["llm_linear"] - kept16) * 4 + trained)
    q = estimate(spec, base.replace(method="qlora")).row("weights")
    assert q == pytest.approx(nf4 + (sum(c.values()) - c["llm_linear"]) * 2 + trained)
    q32 = estimate(spec, base.replace(method="qlora", dtype="fp32")).row("weights")  # no autocast: all fp32
    assert q32 == pytest.approx(c["llm_linear"] * (0.5 + 1 / 64 + 4 / 64 / 256) + (sum(c.values()) - c["llm_linear"]) * 4
                                + spec.lora_params(128) * 4 + c["projector"] * 4)


def test_layer_formula_counts_lora_inputs_per_adapted_layer():
    spec = spec_from_config(ONE_B)
    s = Settings(method="lora", dtype="fp32", device="cpu", lora_r=8, padding_mask=False, max_length=512)
    parts = layer_bytes(spec, s)
    h, i = 2048, 5632
    assert parts["lora"] == 8 * (6 * h + i) + 7 * 8 * 4  # float dropout mask + dropped input, 4 bytes each
    assert parts["mlp"] == 3 * i * 4 and parts["norms"] == 2 * (4 * h + 4)
    gpu = layer_bytes(spec, s.replace(device="cuda", dtype="bf16"))
    assert gpu["lora"] == 3 * (6 * h + i) + 7 * 8 * 2  # bool mask + bf16 input


def test_tiny_estimate_is_within_25_percent_of_a_measured_cpu_step(tmp_path):
    from llavatune.model.tiny import build_tiny
    from llavatune.plan.measure import measure_in_subprocess

    texts = ["What color is the shape?", "red green blue yellow", "How many shapes are there?", "a red circle"]
    build_tiny(texts, tmp_path / "tiny")
    batch, length = 16, 256
    measured = measure_in_subprocess(tmp_path / "tiny", method="lora", dtype="fp32", batch=batch, length=length,
                                     steps=2, lora_r=8, timeout=120)
    spec = load_spec(str(tmp_path / "tiny"))
    est = estimate(spec, Settings(method="lora", dtype="fp32", device="cpu", batch=batch, max_length=length, lora_r=8))
    assert measured["trainable_params"] == spec.lora_params(8) + spec.count()["projector"]
    err = est.peak / measured["peak_bytes"] - 1
    assert abs(err) < 0.25, (est.peak, measured)
    # the activation formula itself: autograd's saved tensors = activations + the saved fp32 log-softmax
    saved = est.row("activations") + 4 * batch * supervised_tokens(spec, est.settings) * spec.vocab
    assert saved == pytest.approx(measured["saved_tensor_bytes"], rel=0.1)


def test_cli_prints_breakdown_verdict_and_suggestions(tmp_path, capsys):
    d = write_config(tmp_path, LLAVA_15["7b"], "llava7b")
    assert main(["plan", "--model", str(d), "--method", "lora", "--batch", "16", "--max-length", "2048",
                 "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "optimizer states", "activations", "logits", "CUDA context", "576 image tokens",
                 "DOES NOT FIT in 24 GiB", "what to change"):
        assert word in out, word
    assert "7.06B total" in out
    # every suggestion is a real re-estimate, and at least one fits
    spec = load_spec(str(d))
    args = PlanArgs(model=str(d), method="lora", batch=16, max_length=2048, gpu_mem=24)
    sugg = suggestions(spec, args.settings(), 24)
    assert sugg and sugg[0].fits and all(s.estimate.peak < estimate(spec, args.settings()).peak for s in sugg)
    assert any("--gradient-checkpointing" in s.change for s in sugg)
    assert any(s.change.startswith("--method qlora") and "--gradient-checkpointing" in s.change for s in sugg)
    first = sugg[0]
    assert f"{first.estimate.peak / GiB:.2f} GiB  fits" in out


def test_cli_fits_json_and_negated_flags(tmp_path, capsys):
    js = tmp_path / "plan.json"
    assert main(["plan", "--model", "tiny", "--batch", "4", "--max-length", "256", "--gradient-checkpointing",
                 "--no-gradient-checkpointing", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "FITS in 80 GiB" in out and "no gradient checkpointing" in out
    data = json.loads(js.read_text())
    assert data["fits"] and data["settings"]["gradient_checkpointing"] is False
    direct = estimate(load_spec("tiny"), Settings(batch=4, max_length=256))
    assert data["peak_bytes"] == round(direct.peak)
    assert [i["name"] for i in data["items"]][:2] == ["weights", "optimizer states"]


def test_cli_rejects_bad_combinations(capsys):
    assert main(["plan", "--model", "tiny", "--method", "qlora", "--zero", "3"]) == 2
    assert "use --zero 2" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--offload"]) == 2
    assert "--offload needs --zero" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--zero", "4"]) == 2
    assert main(["plan", "--model", "./does/not/exist"]) == 1
    assert "./does/not/exist: no such folder" in capsys.readouterr().err


def test_published_llava15_setups_fit_where_they_were_run():
    """LLaVA-1.5 fine-tuning (haotian-liu/LLaVA scripts/v1_5/finetune.sh): full FT, ZeRO-3, 8 GPUs, 16 per GPU,
    2048 tokens, gradient checkpointing, bf16 — 13B on A100-80GB, 7B on A100-40GB (README)."""
    for size, mem in (("13b", 80), ("7b", 40)):
        spec = spec_from_config(LLAVA_15[size])
        s = Settings(method="full", zero=3, gpus=8, batch=16, max_length=2048, gradient_checkpointing=True)
        assert estimate(spec, s).peak < mem * GiB, size
        # ... and would not without checkpointing
        assert estimate(spec, s.replace(gradient_checkpointing=False)).peak > mem * GiB


# What each model card states (billions of parameters, to the precision it states them)
PUBLISHED_SIZES = {"Qwen/Qwen2-VL-2B-Instruct": 2.21, "Qwen/Qwen2-VL-7B-Instruct": 8.29,
                   "Qwen/Qwen2.5-VL-3B-Instruct": 3.75, "Qwen/Qwen2.5-VL-7B-Instruct": 8.29,
                   "Qwen/Qwen2.5-VL-72B-Instruct": 73.4, "Qwen/Qwen3-VL-4B-Instruct": 4.44,
                   "Qwen/Qwen3-VL-8B-Instruct": 8.77, "google/gemma-3-4b-it": 4.3, "google/gemma-3-12b-it": 12.2,
                   "google/gemma-3-27b-it": 27.4, "google/paligemma2-3b-pt-224": 3.0,
                   "HuggingFaceTB/SmolVLM-256M-Instruct": 0.256}


@pytest.mark.parametrize("ref", sorted(PUBLISHED_SIZES))
def test_pinned_hub_shapes_count_every_family_exactly(ref):
    """Qwen-VL's ViT and mergers, Gemma 3's and PaliGemma's projectors, Gemma's extra norms, Qwen2's q/k/v biases:
    counted in closed form, checked against the family's real modules on the meta device and its model card."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from llavatune.model.families import family
    from llavatune.plan.hub_configs import hub_config
    from llavatune.plan.spec import _auto_config

    cfg = hub_config(ref)
    spec = spec_from_config(_auto_config(hub_config(ref)))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**cfg))
    fam = family(cfg["model_type"])
    real = {"vision": 0, "projector": 0, "llm": 0}
    for name, p in model.named_parameters():
        real[fam.parameter_group(name)] += p.numel()
    c = spec.count()
    assert (c["vision"], c["projector"]) == (real["vision"], real["projector"])
    assert c["llm_linear"] + c["llm_other"] + c["embed"] + c["lm_head"] == real["llm"]
    digits = len(str(PUBLISHED_SIZES[ref]).split(".")[1])
    assert round(spec.total_params() / 1e9, digits) == PUBLISHED_SIZES[ref]


def test_plan_knows_todays_families_offline(capsys):
    """`plan --model Qwen/Qwen2.5-VL-7B-Instruct` with no network: the pinned shapes, the image tokens of a COCO photo."""
    assert main(["plan", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--method", "qlora", "--batch", "4",
                 "--max-length", "2048", "--gradient-checkpointing", "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    assert "pinned in llavatune" in out and "8.29B" in out.replace(" ", "") or "8.29" in out
    assert "391 image tokens" in out
    spec = load_spec("google/gemma-3-4b-it")
    assert spec.image_tokens == 260 and spec.tied_embeddings


@pytest.mark.parametrize("name", ["tiny-next", "tiny-llava_onevision", "tiny-paligemma", "tiny-qwen2_vl",
                                  "tiny-qwen2_5_vl", "tiny-qwen3_vl", "tiny-gemma3", "tiny-idefics3", "tiny-smolvlm"])
def test_every_tiny_familys_parameters_are_counted_exactly(name):
    from llavatune.model.families import TINY_MODELS
    from llavatune.model.tiny import build_tiny_model

    model, _ = build_tiny_model(name, ["What color is the shape? red blue"])
    fam = TINY_MODELS[name]
    real = {"vision": 0, "projector": 0, "llm": 0}
    for n, p in model.named_parameters():
        real[fam.parameter_group(n)] += p.numel()
    c = spec_from_config(model.config.to_dict()).count()
    assert (c["vision"], c["projector"]) == (real["vision"], real["projector"])
    assert c["llm_linear"] + c["llm_other"] + c["embed"] + c["lm_head"] == real["llm"]

"""`llavatune plan`: parameter counts from configs, monotonicity, a live CPU step within 25 %, CLI output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llavatune.cli import main
from llavatune.config import parse_config
from llavatune.plan import PlanArgs, recipe_values, suggestions
from llavatune.plan.estimate import GiB, Settings, estimate, layer_bytes, supervised_tokens
from llavatune.plan.hub_configs import HUB_CONFIGS, PUBLISHED_PARAMS, hub_config
from llavatune.plan.spec import TINY, load_spec, spec_from_config

ROOT = Path(__file__).resolve().parents[1]

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
    assert main(["plan", "--model", "tiny", "--method", "qlora", "--zero", "zero3"]) == 2
    assert "use zero2" in capsys.readouterr().err
    # --zero is spelled as train spells it; the old numbers are refused with the spelling to use
    assert main(["plan", "--model", "tiny", "--zero", "2"]) == 2
    assert "plan and train spell it zero2" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--zero", "zero4"]) == 2
    assert main(["plan", "--model", "./does/not/exist"]) == 1
    assert "./does/not/exist: no such folder" in capsys.readouterr().err


def test_zero_means_what_train_means(tmp_path):
    """--zero names the same DeepSpeed configs as train's (the shipped ones or a JSON file), read for its stage and
    offload settings."""
    from llavatune.zero import deepspeed_config

    base = dict(model="tiny", method="full", gpus=8, batch=4, max_length=256)
    shipped = {z: PlanArgs(**base, zero=z).settings() for z in ("zero2", "zero3", "zero3_offload")}
    assert [(s.zero, s.offload) for s in shipped.values()] == [(2, False), (3, False), (3, True)]
    own = tmp_path / "ds.json"
    cfg = json.loads(open(deepspeed_config("zero2")).read())
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    own.write_text(json.dumps(cfg))
    s = PlanArgs(**base, zero=str(own)).settings()
    assert (s.zero, s.offload) == (2, True)
    assert PlanArgs(**base).settings().zero == 0


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_plan_reads_every_shipped_recipe_offline(recipe, monkeypatch, capsys):
    """`llavatune plan RECIPE` uses the options that decide memory and lists the rest, and needs no network: the
    recipes' hub models (and compose's two halves) are in the shipped table."""
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", str(recipe), "--gpu-mem", "80"]) == 0
    out, err = capsys.readouterr()
    cfg = yaml.safe_load(recipe.read_text())
    (note,) = [x for x in err.splitlines() if "reading a training recipe" in x]
    assert "data" in note.split("ignores")[1]  # listed, not an error
    assert f"batch {cfg['per_device_train_batch_size']} x {cfg.get('max_length', 2048)} tokens" in out
    if cfg.get("zero"):
        assert f"(--zero {cfg['zero']})" in out
    if cfg.get("stage") == "pretrain":
        assert "stage pretrain (projector only)" in out and "trainable 20.98M" in out
    assert ("no gradient checkpointing" in out) != bool(cfg.get("gradient_checkpointing"))


def test_a_recipe_is_overridden_by_flags_and_typos_still_fail(tmp_path, capsys):
    recipe = ROOT / "configs" / "llava15_7b_okvqa_qlora.yaml"
    (args,) = parse_config([PlanArgs], [str(recipe), "--batch", "2"], translate=recipe_values)
    assert (args.model, args.method, args.zero, args.batch, args.dtype) == (
        "llava-hf/llava-1.5-7b-hf", "qlora", "zero2", 2, "bf16")
    bad = tmp_path / "r.yaml"
    bad.write_text(recipe.read_text() + "\nper_device_train_bach_size: 4\n")
    assert main(["plan", str(bad)]) == 2
    assert "unknown option(s) per_device_train_bach_size" in capsys.readouterr().err


@pytest.mark.parametrize("ref", sorted(HUB_CONFIGS))
def test_shipped_shapes_are_the_published_models(ref):
    """Each shipped entry, built by transformers' own classes on the meta device, has the parameter count its hub
    page publishes, and the planner counts the same parameters (closed form for LLaVA, on modules otherwise)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, CLIPModel

    cfg = AutoConfig.for_model(**hub_config(ref))
    with torch.device("meta"):
        model = (CLIPModel(cfg) if cfg.model_type == "clip" else AutoModelForCausalLM.from_config(cfg)
                 if cfg.model_type == "llama" else AutoModelForImageTextToText.from_config(cfg))
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(PUBLISHED_PARAMS[ref], rel=0.005)
    if cfg.model_type in ("clip", "llama"):  # the halves of --model compose
        return
    spec = load_spec(ref)
    assert spec.total_params() == n
    assert spec.image_tokens > 0 and spec.count()["projector"] > 0 and spec.count()["vision"] > 0


def test_shipped_and_unknown_hub_ids_offline(monkeypatch, capsys):
    """A shipped model is planned without the hub; an unknown hub id offline fails at once, in one line."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["plan", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--method", "qlora", "--batch", "4",
                 "--gradient-checkpointing", "--supervised-tokens", "8", "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    assert "model     Qwen/Qwen2.5-VL-7B-Instruct" in out and "8.29B total" in out and "FITS in 24 GiB" in out
    assert "640x480 photo (resized to 644x476: 391 tokens)" in out  # dynamic resolution: what was assumed, and how to change it
    t = time.perf_counter()
    assert main(["plan", "--model", "someone/unknown-vlm-7b"]) == 1
    err = capsys.readouterr().err
    assert time.perf_counter() - t < 5
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("llavatune plan: error: --model someone/unknown-vlm-7b: a hub id, not in the local")


def test_stage_pretrain_trains_the_projector_only():
    spec = spec_from_config(LLAVA_15["7b"])
    s = Settings(method="projector", batch=16, max_length=2048, gradient_checkpointing=True)
    e = estimate(spec, s)
    c = spec.count()
    assert e.trainable == c["projector"]
    assert e.row("weights") == sum(c.values()) * 2  # one bf16 copy of everything, the projector trains in place
    assert e.row("optimizer states") == 2 * 2 * c["projector"]
    assert "lora" not in layer_bytes(spec, s)
    assert e.peak < estimate(spec, s.replace(method="lora")).peak


def test_published_llava15_setups_fit_where_they_were_run():
    """LLaVA-1.5 fine-tuning (haotian-liu/LLaVA scripts/v1_5/finetune.sh): full FT, ZeRO-3, 8 GPUs, 16 per GPU,
    2048 tokens, gradient checkpointing, bf16 — 13B on A100-80GB, 7B on A100-40GB (README)."""
    for size, mem in (("13b", 80), ("7b", 40)):
        spec = spec_from_config(LLAVA_15[size])
        s = Settings(method="full", zero=3, gpus=8, batch=16, max_length=2048, gradient_checkpointing=True)
        assert estimate(spec, s).peak < mem * GiB, size
        # ... and would not without checkpointing
        assert estimate(spec, s.replace(gradient_checkpointing=False)).peak > mem * GiB


def test_plan_knows_todays_families_offline(capsys):
    """`plan --model Qwen/Qwen2.5-VL-7B-Instruct` with no network: the pinned shapes, the image tokens of a COCO photo."""
    assert main(["plan", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--method", "qlora", "--batch", "4",
                 "--max-length", "2048", "--gradient-checkpointing", "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    assert "8.29" in out
    assert "391 image tokens" in out
    spec = load_spec("google/gemma-3-4b-it")
    assert spec.image_tokens == 260 and spec.tied_embeddings


@pytest.mark.parametrize("name", ["tiny-next", "tiny-llava_onevision", "tiny-paligemma", "tiny-qwen2_vl",
                                  "tiny-qwen2_5_vl", "tiny-qwen3_vl", "tiny-gemma3", "tiny-idefics3", "tiny-smolvlm",
                                  "tiny-internvl", "tiny-mistral3", "tiny-mllama"])
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


def test_plan_warns_when_one_image_fills_the_sequence(capsys):
    """Idefics3 splits a 640 x 480 photo into 13 crops (2,226 tokens): at --max-length 2048 every image sample would be
    dropped by train, so plan says so; at 4096 it does not."""
    assert main(["plan", "--model", "HuggingFaceM4/Idefics3-8B-Llama3", "--max-length", "2048", "--batch", "1"]) == 0
    assert "warning: one image takes 2226 tokens, not less than --max-length 2048" in capsys.readouterr().out
    assert main(["plan", "--model", "HuggingFaceM4/Idefics3-8B-Llama3", "--max-length", "4096", "--batch", "1"]) == 0
    assert "warning: one image" not in capsys.readouterr().out

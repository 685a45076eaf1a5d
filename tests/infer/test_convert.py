"""`llavatune convert --from-original`: tiny synthetic checkpoints written in haotian-liu/LLaVA's own layout
(full model, linear projector without vision weights, LoRA output with non_lora_trainables.bin) become
llava-hf models whose every tensor is accounted for and whose logits match the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.infer.convert import ConvertConfig, convert

QUESTION = "What color is the shape?"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest (and avoids thread contention on busy 2-core machines)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
TEXTS = ["What color is the shape?", "red green blue circle square", "How many shapes are there?"]


# ---------------------------------------------------------------------------------------------------
# Writing original-layout checkpoints (independent of the converter: the inverse mapping written out)


def to_original_key(hf_key: str) -> str:
    if hf_key.startswith("model.language_model."):
        return "model." + hf_key[len("model.language_model."):]
    if hf_key.startswith("model.multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + hf_key.rsplit(".", 1)[1]
    if hf_key.startswith("model.multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + hf_key.rsplit(".", 1)[1]
    if hf_key.startswith("model.vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + hf_key[len("model.vision_tower."):]
    assert hf_key.startswith("lm_head."), hf_key
    return hf_key


def original_config(text_config, vision_dir: Path, **mm) -> dict:
    t = text_config
    cfg = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": "silu", "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False, "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id, "pad_token_id": 0, "torch_dtype": "float32", "use_cache": True,
        "mm_vision_tower": str(vision_dir), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
    }
    cfg.update(mm)
    return cfg


def save_vision_dir(vision_model, d: Path, size: int = 32) -> Path:
    from transformers import CLIPImageProcessor

    vision_model.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(d)
    return d


def shape_image(path: Path, color=(220, 30, 30), size=(40, 28)) -> Path:
    img = Image.new("RGB", size, (245, 245, 245))
    img.paste(Image.new("RGB", (16, 12), color), (6, 8))
    img.save(path)
    return path


def vicuna_like_tokenizer():
    """A Llama-style BPE tokenizer without <image> and <pad> (as a base LLM ships)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llavatune.model.tiny import TEMPLATE_TEXT

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS + [TEMPLATE_TEXT], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llm_and_vision(vocab: int, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).eval()
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8,
                                              projection_dim=32)).eval()
    return llm, vision


def reference_logits(llm, vision, project, pixel_values, before: list[int], after: list[int]):
    """What the original LlavaLlamaForCausalLM computes: CLIP hidden_states[-2] without CLS -> projector, spliced
    into the text embeddings where the image placeholder stood."""
    with torch.no_grad():
        feats = vision(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        img = project(feats)[0]
        emb = llm.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor(before)), img, emb(torch.tensor(after))])[None]
        return llm(inputs_embeds=embeds).logits


def hf_logits(model_dir: Path, pixel_values, before, after):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    n = model.config.image_seq_length
    ids = torch.tensor([before + [model.config.image_token_index] * n + after])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits, model


def prompt_pieces(tokenizer) -> tuple[list[int], list[int]]:
    before = [tokenizer.bos_token_id] + tokenizer("USER: ", add_special_tokens=False).input_ids
    after = tokenizer(f"\n{QUESTION} ASSISTANT:", add_special_tokens=False).input_ids
    return before, after


# ---------------------------------------------------------------------------------------------------
# Full checkpoint with vision weights, mlp2x_gelu projector (the llava-v1.5 layout)


@pytest.fixture(scope="module")
def full_original(tmp_path_factory):
    """A tiny llava-hf model written back in the original layout (pytorch_model.bin, as published)."""
    from llavatune.model.tiny import build_tiny

    root = tmp_path_factory.mktemp("orig_full")
    model, processor = build_tiny(TEXTS, root / "source_hf")
    model.eval()
    src = root / "llava-v1.5-tiny"
    src.mkdir()
    state = {to_original_key(k): v.clone() for k, v in model.state_dict().items()}
    # older transformers saved these non-parameter buffers with the weights
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, src / "pytorch_model.bin")
    vision_dir = save_vision_dir(model.model.vision_tower, root / "clip-tiny")
    cfg = original_config(model.config.text_config, vision_dir)
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    processor.tokenizer.save_pretrained(src)
    return {"src": src, "model": model, "processor": processor, "state": state, "root": root}


def test_full_checkpoint_maps_every_tensor_once(full_original, tmp_path):
    out, report = convert(ConvertConfig(from_original=str(full_original["src"]), out=str(tmp_path / "hf")))
    source = full_original["model"].state_dict()
    state = full_original["state"]
    # every original tensor maps to exactly one llava-hf tensor; the two buffers are dropped, nothing else
    assert sorted(report.dropped) == sorted(k for k in state if k.endswith(("inv_freq", "position_ids")))
    assert set(report.mapped) | set(report.dropped) == set(state)
    assert len(set(report.mapped.values())) == len(report.mapped)
    assert set(report.mapped.values()) == set(source), "nothing missing, nothing left over"
    assert not report.synthesized and not report.resized and not report.lora_merged
    for orig, hf in report.mapped.items():
        assert to_original_key(hf) == orig

    from transformers import LlavaForConditionalGeneration

    converted = LlavaForConditionalGeneration.from_pretrained(out).eval()
    got = converted.state_dict()
    assert set(got) == set(source)
    for k, v in source.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v), k
    assert converted.config.vision_feature_layer == -2
    assert converted.config.vision_feature_select_strategy == "default"
    assert converted.config.image_token_index == full_original["processor"].tokenizer.convert_tokens_to_ids("<image>")

    # same image preprocessing (pad to square, as image_aspect_ratio: pad) and same logits
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(out)
    assert proc.image_processor.do_pad
    img = Image.open(shape_image(tmp_path / "a.png"))
    px = proc.image_processor(img, return_tensors="pt")["pixel_values"]
    px_src = full_original["processor"].image_processor(img, return_tensors="pt")["pixel_values"]
    assert torch.allclose(px, px_src)
    before, after = prompt_pieces(proc.tokenizer)
    with torch.no_grad():
        n = converted.config.image_seq_length
        ids = torch.tensor([before + [converted.config.image_token_index] * n + after])
        a = converted(input_ids=ids, pixel_values=px).logits
        b = full_original["model"](input_ids=ids, pixel_values=px).logits
    assert torch.equal(a, b)
    meta = json.loads((out / "llavatune_checkpoint.json").read_text())
    assert meta["template"] == "vicuna_v1" and meta["method"] == "converted"


def test_converted_model_generates_through_cli(full_original, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli_main(["convert", "--from-original", str(full_original["src"]), "--out", str(out)]) == 0
    assert "tensors mapped" in capsys.readouterr().out
    import yaml

    saved = yaml.safe_load((out / "llavatune_config.yaml").read_text())  # the resolved options, as every command
    assert saved["convert"]["from_original"] == str(full_original["src"]) and saved["convert"]["out"] == str(out)
    img = shape_image(tmp_path / "a.png")
    assert cli_main(["predict", "--model", str(out), "--image", str(img), "--question", QUESTION,
                     "--max_new_tokens", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["question"] == QUESTION and isinstance(row["answer"], str)
    # an existing output folder is refused without --overwrite, replaced with it
    assert cli_main(["convert", "--from-original", str(full_original["src"]), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["convert", "--from-original", str(full_original["src"]), "--out", str(out), "--overwrite"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")], "no temp folders left behind"


# ---------------------------------------------------------------------------------------------------
# Linear projector, no vision weights in the checkpoint, tokenizer without <image>: vocabulary grows


def test_linear_projector_vision_from_mm_vision_tower(tmp_path):
    tok = vicuna_like_tokenizer()
    n_vocab = len(tok)
    llm, vision = tiny_llm_and_vision(n_vocab, seed=1)
    torch.manual_seed(2)
    proj = torch.nn.Linear(32, 64)
    src = tmp_path / "llava-v1-linear"
    src.mkdir()
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in llm.state_dict().items()}
    state["model.mm_projector.weight"] = proj.weight.detach().clone()
    state["model.mm_projector.bias"] = proj.bias.detach().clone()
    save_file(state, str(src / "model.safetensors"))
    vision_dir = save_vision_dir(vision, tmp_path / "clip")
    cfg = original_config(llm.config, tmp_path / "elsewhere", mm_projector_type="linear", image_aspect_ratio="square")
    (src / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(src)

    # mm_vision_tower points nowhere: the error says what to pass
    with pytest.raises(Exception, match="--vision_tower"):
        convert(ConvertConfig(from_original=str(src), out=str(tmp_path / "x")))
    out, report = convert(ConvertConfig(from_original=str(src), out=str(tmp_path / "hf"), vision_tower=str(vision_dir)))
    assert set(report.mapped) == set(state)
    vision_keys = {k for k, v in report.synthesized.items() if v.startswith("vision tower")}
    assert len(vision_keys) == len(vision.state_dict())
    assert {k for k, v in report.synthesized.items() if v.startswith("identity")} == {
        "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"}
    assert report.resized["model.embed_tokens.weight"] == (n_vocab, n_vocab + 2)  # <image> and <pad>

    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(out)
    assert not proc.image_processor.do_pad
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == n_vocab and proc.tokenizer.pad_token == "<pad>"
    px = proc.image_processor(Image.open(shape_image(tmp_path / "a.png")), return_tensors="pt")["pixel_values"]
    before, after = prompt_pieces(tok)
    assert prompt_pieces(proc.tokenizer) == (before, after), "text tokenizes as before"
    got, model = hf_logits(out, px, before, after)
    assert model.config.projector_hidden_act == "linear" and model.config.text_config.vocab_size == n_vocab + 2
    want = reference_logits(llm, vision, proj, px, before, after)
    assert torch.allclose(got[..., :n_vocab], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The original repo's LoRA output: adapter + non_lora_trainables.bin on a base LLM


def test_original_lora_output_merges_into_base(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    tok = vicuna_like_tokenizer()
    llm, vision = tiny_llm_and_vision(len(tok), seed=3)
    base_dir = tmp_path / "vicuna-tiny"
    llm.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    vision_dir = save_vision_dir(vision, tmp_path / "clip")

    lora_dir = tmp_path / "llava-v1.5-tiny-task-lora"
    llm_keys = set(llm.state_dict())
    peft_model = get_peft_model(llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                "o_proj", "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(4)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(lora_dir)  # keys base_model.model.model.layers.N....lora_A.weight, as LLaVA wrote them
    peft_model.eval()
    acfg = json.loads((lora_dir / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = "lmsys/vicuna-7b-v1.5"  # what the original training recorded: not here
    (lora_dir / "adapter_config.json").write_text(json.dumps(acfg))
    torch.manual_seed(5)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    torch.save({f"base_model.model.model.mm_projector.{i}.{w}": getattr(mlp[i], w).detach().clone()
                for i in (0, 2) for w in ("weight", "bias")}, lora_dir / "non_lora_trainables.bin")
    (lora_dir / "config.json").write_text(json.dumps(original_config(llm.config, vision_dir)))

    # the recorded base (a hub id) is not available offline: a clear error naming --base_model
    rc = cli_main(["convert", "--from-original", str(lora_dir), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 1 and "--base_model" in err and len([x for x in err.splitlines() if "error:" in x]) == 1
    out, report = convert(ConvertConfig(from_original=str(lora_dir), out=str(tmp_path / "hf"), base_model=str(base_dir)))
    assert len(report.lora_merged) == 2 * 7
    assert set(report.mapped) == llm_keys | {f"model.mm_projector.{i}.{w}" for i in (0, 2)
                                                          for w in ("weight", "bias")}

    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(out)
    px = proc.image_processor(Image.open(shape_image(tmp_path / "a.png")), return_tensors="pt")["pixel_values"]
    before, after = prompt_pieces(tok)
    got, _ = hf_logits(out, px, before, after)
    want = reference_logits(peft_model, vision, mlp, px, before, after)
    assert torch.allclose(got[..., : len(tok)], want, atol=1e-4)
    with peft_model.disable_adapter():
        without = reference_logits(peft_model, vision, mlp, px, before, after)
    assert not torch.allclose(without, want, atol=1e-3), "the LoRA must matter for this test to mean anything"


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_original_checkpoints_give_clear_errors(full_original, tmp_path, capsys):
    import shutil

    def run(src: Path) -> str:
        rc = cli_main(["convert", "--from-original", str(src), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc in (1, 2)
        lines = [x for x in err.splitlines() if ": error:" in x]
        assert len(lines) == 1, err
        return lines[0]

    assert "no such folder" in run(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(full_original["src"], bad)
    cfg = json.loads((bad / "config.json").read_text())

    (bad / "config.json").write_text(json.dumps({**cfg, "mm_use_im_start_end": True}))
    assert "mm_use_im_start_end" in run(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "mlp3x_gelu"}))
    assert "mlp3x_gelu" in run(bad)
    (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("mm_")}))
    assert "not an original LLaVA checkpoint" in run(bad)
    (bad / "config.json").write_text(json.dumps(cfg))

    state = dict(full_original["state"])
    state["model.some_new_module.weight"] = torch.zeros(2)
    torch.save(state, bad / "pytorch_model.bin")
    assert "model.some_new_module.weight" in run(bad)
    state = {k: v for k, v in full_original["state"].items() if not k.startswith("model.mm_projector")}
    torch.save(state, bad / "pytorch_model.bin")
    assert "mm_projector" in run(bad)
    state = {k: v for k, v in full_original["state"].items() if k != "model.layers.1.mlp.up_proj.weight"}
    torch.save(state, bad / "pytorch_model.bin")
    assert "have no source" in run(bad)
    # pickles that need more than weights_only=True are refused, not executed
    torch.save({"model.norm.weight": torch.ones(2), "obj": Path("x")}, bad / "pytorch_model.bin")
    assert "weights_only" in run(bad)

"""`llavatune convert --from-original`: tiny synthetic checkpoints written in haotian-liu/LLaVA's own layout
(full model, linear projector without vision weights, LoRA output with non_lora_trainables.bin, and a v1.5-style
release with only a SentencePiece tokenizer.model, float16 .bin shards and CLIP loaded by path) become llava-hf
models whose every tensor is accounted for, whose logits match the source, and whose prompt, token ids and pixels
are the original code's (written down below from llava/conversation.py, llava/mm_utils.py and CLIPImageProcessor)."""

from __future__ import annotations

import json
import re
import sys
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
    model, processor = build_tiny(TEXTS, root / "source_hf", vision_hidden_size=32)  # original_config: mm_hidden_size 32
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


# ---------------------------------------------------------------------------------------------------
# A v1.5-style release: only a SentencePiece tokenizer.model, float16 weights in .bin shards (with float16 copies of
# the frozen CLIP), model_type llava, CLIP loaded by path (mm_vision_tower). The facts checked against it:
#   - prompt: conv_templates["vicuna_v1"].get_prompt() (system prompt with "user"/"user's")
#   - ids: llava.mm_utils.tokenizer_image_token with the slow (legacy) LlamaTokenizer
#   - pixels: expand2square(image, mean colour) + CLIPImageProcessor (PIL bicubic resize, centre crop, normalize)

VICUNA_V1_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: <image>\nWhat is the man holding? ASSISTANT:"
)
SP_TEXTS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is the man holding? ASSISTANT: an umbrella",
    "What color is the shape? red green blue. How many shapes are there? 2 3",
    "Answer the question using a single word or phrase.",
]


def train_sentencepiece(path: Path) -> Path:
    """A tiny SentencePiece BPE model with Llama's settings (byte fallback, dummy prefix, no normalization)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXTS * 20), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def original_ids(prompt: str, sp, image_id: int, n_image: int) -> list[int]:
    """llava.mm_utils.tokenizer_image_token with the slow legacy LlamaTokenizer, <image> expanded as llava-hf does:
    the prompt is split on <image>, each chunk tokenized on its own (BOS kept for the first only); the slow tokenizer
    splits a chunk on its special tokens and SentencePiece-encodes each piece (dummy prefix included)."""
    ids = [sp.bos_id()]
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            ids += [image_id] * n_image
        for piece in re.split(r"(</s>|<s>)", chunk):
            if piece in ("</s>", "<s>"):
                ids.append(sp.piece_to_id(piece))
            elif piece:
                ids += sp.encode(piece)
    return ids


def expand2square(img, background):
    """llava.mm_utils.expand2square."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return out


def original_pixels(img, ip) -> torch.Tensor:
    """process_images(image_aspect_ratio='pad'): expand2square with the mean colour, then CLIPImageProcessor on PIL
    (bicubic resize of the shortest edge, centre crop, x/255 in float64 -> float32, (x - mean) / std)."""
    import numpy as np

    mean, std = np.array(ip.image_mean, dtype=np.float32), np.array(ip.image_std, dtype=np.float32)
    img = expand2square(img.convert("RGB"), tuple(int(x * 255) for x in ip.image_mean))
    edge, (w, h) = ip.size["shortest_edge"], img.size
    size = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)
    img = img.resize(size, Image.BICUBIC)
    ch, cw = ip.crop_size["height"], ip.crop_size["width"]
    top, left = (img.height - ch) // 2, (img.width - cw) // 2
    a = np.asarray(img)[top:top + ch, left:left + cw].astype(np.float64) * (1 / 255)
    a = (a.astype(np.float32) - mean) / std
    return torch.from_numpy(a.transpose(2, 0, 1).copy())[None]


def noise_image(path: Path, size=(57, 41), seed=0) -> Path:
    """Fine detail, not square: padding and a downscaling resize both matter."""
    import numpy as np

    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def release_tokenizer_config(d: Path) -> None:
    """tokenizer_config.json as the releases ship it next to tokenizer.model (legacy false, pad = unk)."""
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "legacy": False, "model_max_length": 2048, "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}}))


@pytest.fixture(scope="module")
def sp_original(tmp_path_factory):
    import sentencepiece as spm
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("orig_sp")
    sp_path = train_sentencepiece(root / "spm" / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    torch.manual_seed(7)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                       tie_word_embeddings=False)).eval()
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8,
                                              projection_dim=32)).eval()
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    with torch.no_grad():  # the released weights are float16: the reference computes with the same values
        for m in (llm, mlp):
            for prm in m.parameters():
                prm.copy_(prm.half().float())
    vision_dir = save_vision_dir(vision, root / "clip-tiny")  # float32, as OpenAI's CLIP
    src = root / "llava-v1.5-tiny"
    src.mkdir()
    state = {k: v.half() for k, v in llm.state_dict().items()}
    state.update({f"model.mm_projector.{i}.{w}": getattr(mlp[i], w).detach().half() for i in (0, 2)
                  for w in ("weight", "bias")})
    # as the original writes them (CLIPVisionModel's keys under vision_model.)
    vision_copies = {f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v.half()
                     for k, v in vision.state_dict().items()}
    state.update(vision_copies)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, src / name)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}))
    cfg = original_config(llm.config, vision_dir, model_type="llava", torch_dtype="float16")
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    (src / "tokenizer.model").write_bytes(sp_path.read_bytes())  # the only tokenizer file
    return {"src": src, "sp": sp, "llm": llm, "vision": vision, "mlp": mlp, "vision_dir": vision_dir, "root": root,
            "vision_copies": vision_copies}


@pytest.fixture(scope="module")
def sp_converted(sp_original, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "llava-v1.5-tiny-hf"
    convert(ConvertConfig(from_original=str(sp_original["src"]), out=str(out),
                          vision_tower=str(sp_original["vision_dir"])))
    return out


def test_converted_chat_template_renders_the_original_prompt(sp_converted):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(sp_converted)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the man holding?"}]}
    # stock apply_chat_template, no system message: the vicuna_v1 system prompt is there
    assert proc.apply_chat_template([user], add_generation_prompt=True) == VICUNA_V1_PROMPT
    # a system message replaces it
    system = {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}
    assert proc.apply_chat_template([system, user], add_generation_prompt=True) == (
        "Answer briefly. USER: <image>\nWhat is the man holding? ASSISTANT:")
    # a multi-turn conversation: conv_templates["vicuna_v1"].get_prompt() with the last message None
    turns = [user, {"role": "assistant", "content": [{"type": "text", "text": "an umbrella"}]},
             {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]}]
    assert proc.apply_chat_template(turns, add_generation_prompt=True) == (
        VICUNA_V1_PROMPT + " an umbrella</s>USER: What color is it? ASSISTANT:")


@pytest.mark.parametrize("with_config", [False, True], ids=["tokenizer.model-only", "with-release-tokenizer_config"])
def test_stock_processor_ids_equal_original_tokenizer_image_token(sp_original, tmp_path, with_config):
    import shutil

    from transformers import AutoProcessor

    from llavatune.data.encode import Encoder
    from llavatune.data.records import Turn

    src = sp_original["src"]
    if with_config:
        src = tmp_path / "release"
        shutil.copytree(sp_original["src"], src)
        release_tokenizer_config(src)
    out = tmp_path / "hf"
    convert(ConvertConfig(from_original=str(src), out=str(out), vision_tower=str(sp_original["vision_dir"])))
    # a generic class, so transformers loads this tokenizer.json as is (a LlamaTokenizer would be rebuilt non-legacy)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    proc = AutoProcessor.from_pretrained(out)
    img = Image.open(noise_image(tmp_path / "a.png"))
    image_id, n = proc.tokenizer.convert_tokens_to_ids("<image>"), 16
    sp = sp_original["sp"]
    stock = proc(images=img, text=VICUNA_V1_PROMPT, return_tensors="pt")["input_ids"][0].tolist()
    want = original_ids(VICUNA_V1_PROMPT, sp, image_id, n)
    after = want.index(image_id) + n
    assert sp.id_to_piece(want[after]) == "▁" and sp.id_to_piece(want[after + 1]) == "<0x0A>"  # the fact at stake
    assert stock == want
    # a multi-turn training text, special tokens inside a chunk
    full = VICUNA_V1_PROMPT + " an umbrella</s>USER: What color is it? ASSISTANT: red</s>"
    assert proc(images=img, text=full)["input_ids"][0] == original_ids(full, sp, image_id, n)
    # llavatune's own prompts and training samples give the same ids, labels on the answers (+ EOS) only
    enc = Encoder(proc, template="vicuna_v1")
    q = [Turn("human", "<image>\nWhat is the man holding?")]
    assert enc.prompt_ids(q) == want
    conv = q + [Turn("gpt", "an umbrella"), Turn("human", "What color is it?"), Turn("gpt", "red")]
    ids, labels = enc.encode(conv)
    assert ids == original_ids(full, sp, image_id, n)
    # supervised: the tokens after each "ASSISTANT:" up to and including its </s>, as they sit in the whole text
    first = len(want)
    second = len(original_ids(VICUNA_V1_PROMPT + " an umbrella</s>USER: What color is it? ASSISTANT:", sp, image_id, n))
    eos = sp.eos_id()
    assert [i for i, lab in zip(ids, labels) if lab != -100] == ids[first: ids.index(eos, first) + 1] + ids[second:]
    assert ids[second:][-1] == eos and sp.id_to_piece(ids[first]).startswith("▁")


def test_converted_pixels_equal_the_original_clip_preprocessing(sp_original, sp_converted, tmp_path):
    from transformers import AutoProcessor, CLIPImageProcessor

    from llavatune.data.encode import Encoder

    clip_ip = CLIPImageProcessor.from_pretrained(sp_original["vision_dir"])
    for i, size in enumerate([(57, 41), (30, 61), (32, 32), (200, 150)]):
        img = Image.open(noise_image(tmp_path / f"{i}.png", size, seed=i))
        want = original_pixels(img, clip_ip)
        # llavatune (train, eval, predict) and stock transformers on the PIL backend
        got = Encoder(AutoProcessor.from_pretrained(sp_converted), template="vicuna_v1").pixel_inputs([img])
        assert torch.allclose(got["pixel_values"], want, atol=1e-6), size
        pil = AutoProcessor.from_pretrained(sp_converted, backend="pil")
        assert torch.allclose(pil(images=img, text="<image>", return_tensors="pt")["pixel_values"], want, atol=1e-6)


def test_vision_weights_come_from_vision_tower_and_keep_their_dtype(sp_original, sp_converted, tmp_path):
    from safetensors.torch import load_file

    def vision_and_rest(d: Path) -> tuple[dict, dict]:
        """The saved tensors as stored (dtype included): vision tower ones by their CLIP name, and the others."""
        state = {}
        for f in sorted(d.glob("*.safetensors")):
            state.update(load_file(str(f)))
        vision = {k.split("vision_tower.", 1)[1].removeprefix("vision_model."): v for k, v in state.items()
                  if "vision_tower." in k}
        return vision, {k: v for k, v in state.items() if "vision_tower." not in k}

    clip = {k.removeprefix("vision_model."): v for k, v in sp_original["vision"].state_dict().items()}
    vision, rest = vision_and_rest(sp_converted)
    assert set(vision) == set(clip)
    for k, v in clip.items():  # --vision_tower given: its float32 weights, not the checkpoint's float16 copies
        assert vision[k].dtype == torch.float32 and torch.equal(vision[k], v), k
    assert rest and all(v.dtype == torch.float16 for v in rest.values()), "the LLM and projector stay as saved"
    cfg = json.loads((sp_converted / "config.json").read_text())
    assert cfg["dtype"] == "float16", "stock from_pretrained(dtype='auto') loads the LLM's dtype, not float32"

    # without --vision_tower the checkpoint's own copies are used, in their dtype
    out, report = convert(ConvertConfig(from_original=str(sp_original["src"]), out=str(tmp_path / "own")))
    assert not report.replaced
    own, _ = vision_and_rest(out)
    copies = {k.removeprefix("model.vision_tower.vision_tower.vision_model."): v
              for k, v in sp_original["vision_copies"].items()}
    assert set(own) == set(copies) and all(torch.equal(own[k], v) for k, v in copies.items())
    # --dtype float32: everything
    out, _ = convert(ConvertConfig(from_original=str(sp_original["src"]), out=str(tmp_path / "f32"),
                                   vision_tower=str(sp_original["vision_dir"]), dtype="float32"))
    vision, rest = vision_and_rest(out)
    assert {v.dtype for v in [*vision.values(), *rest.values()]} == {torch.float32}


def test_converted_release_gives_the_original_greedy_answer(sp_original, sp_converted, tmp_path, capsys):
    """The original model's greedy answer (its ids, its pixels, its CLIP in float32) == stock transformers on the
    converted folder == llavatune predict on it."""
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration

    sp, llm, vision, mlp = (sp_original[k] for k in ("sp", "llm", "vision", "mlp"))
    path = noise_image(tmp_path / "q.png", (61, 45), seed=3)
    img = Image.open(path)
    px = original_pixels(img, CLIPImageProcessor.from_pretrained(sp_original["vision_dir"]))
    before, after = VICUNA_V1_PROMPT.split("<image>")
    before_ids, after_ids = [sp.bos_id()] + sp.encode(before), sp.encode(after)
    want: list[int] = []
    for _ in range(6):  # greedy, as the original's model.generate(do_sample=False)
        logits = reference_logits(llm, vision, mlp, px, before_ids, after_ids + want)
        want.append(int(logits[0, -1].argmax()))
        if want[-1] == sp.eos_id():
            break

    proc = AutoProcessor.from_pretrained(sp_converted, backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(sp_converted, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the man holding?"}]}]
    inputs = proc(images=img, text=proc.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=len(want), do_sample=False)
    assert gen[0, inputs["input_ids"].shape[1]:].tolist() == want

    assert cli_main(["predict", "--model", str(sp_converted), "--image", str(path), "--question",
                     "What is the man holding?", "--max_new_tokens", str(len(want)), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["answer"] == proc.tokenizer.decode(want, skip_special_tokens=True).strip()
    assert row["prompt"] == VICUNA_V1_PROMPT  # the rendered generation prompt, <image> unexpanded, no BOS


def test_sentencepiece_is_a_dependency_and_its_absence_is_explained(sp_original, tmp_path, monkeypatch, capsys):
    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert {"sentencepiece", "protobuf"} <= deps
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    rc = cli_main(["convert", "--from-original", str(sp_original["src"]), "--out", str(tmp_path / "x"),
                   "--vision_tower", str(sp_original["vision_dir"])])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if ": error:" in x]
    assert rc == 1 and len(lines) == 1, err
    assert "tokenizer.model" in lines[0] and "pip install sentencepiece" in lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llava_llama_2", "mistral_instruct"])
def test_llavatune_ids_equal_original_for_each_template(sp_original, sp_converted, template):
    """Training ids and generation-prompt ids for a two-round conversation equal tokenizer_image_token on the
    original get_prompt() text (llava_llama_2 puts a literal <s> between rounds)."""
    from transformers import AutoProcessor

    from llavatune.data.encode import Encoder
    from llavatune.data.records import Turn

    proc = AutoProcessor.from_pretrained(sp_converted)
    enc = Encoder(proc, template=template)
    image_id, n, sp = enc.image_token_id, enc.n_image_tokens, sp_original["sp"]
    turns = [Turn("human", "<image>\nWhat is the man holding?"), Turn("gpt", "an umbrella"),
             Turn("human", "What color is it?"), Turn("gpt", "red")]
    text = "".join(t for t, _ in enc.segmenter(turns, "</s>", False))
    prompt = "".join(t for t, _ in enc.segmenter(turns[:3], "</s>", True))
    ids, labels = enc.encode(turns)
    assert ids == original_ids(text, sp, image_id, n)
    assert enc.prompt_ids(turns[:3]) == original_ids(prompt, sp, image_id, n)
    assert proc(images=Image.new("RGB", (32, 32)), text=prompt)["input_ids"][0] == original_ids(prompt, sp, image_id, n)
    learned = enc.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert learned.replace(" ", "") == "anumbrella</s>red</s>"


def test_release_tokenizer_config_tokens_are_kept(sp_original, tmp_path):
    """Tokens the original training appended (a [PAD] at the first free id) keep their ids; pad is honoured."""
    from llavatune.infer.convert import sentencepiece_tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((sp_original["src"] / "tokenizer.model").read_bytes())
    n = sp_original["sp"].get_piece_size()
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "added_tokens_decoder": {
        "0": {"content": "<unk>", "special": True}, str(n): {"content": "[PAD]", "special": True}}}))
    tok = sentencepiece_tokenizer(d)
    assert tok.convert_tokens_to_ids("[PAD]") == n and tok.pad_token == "[PAD]" and len(tok) == n + 1
    assert tok("What is it?").input_ids == [1] + sp_original["sp"].encode("What is it?")
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(n + 5): {"content": "[PAD]", "special": True}}}))
    with pytest.raises(Exception, match="next free id"):
        sentencepiece_tokenizer(d)

"""Today's VLM families on their tiny models: prompts equal to what each family's own processor builds, masks, and the
whole path (prepare -> train -> eval -> merge -> stock transformers reload with identical greedy answers).

The reference is the family's processor itself: ``processor(text=processor.apply_chat_template(...), images=...)`` (for
PaliGemma, which has no chat template, ``processor(text=..., images=..., suffix=...)``), i.e. what transformers' docs and
the model cards tell users to run.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.data.encode import IGNORE_INDEX, TOKEN_KEYS, Encoder, LlavaDataset
from llavatune.data.records import Turn, load_records
from llavatune.model.families import TINY_MODELS
from llavatune.model.tiny import build_tiny_model

NEW = ["tiny-llava_onevision", "tiny-paligemma", "tiny-qwen2_vl", "tiny-qwen2_5_vl", "tiny-qwen3_vl", "tiny-gemma3",
       "tiny-idefics3", "tiny-smolvlm", "tiny-internvl", "tiny-mistral3",
       "tiny-mllama"]
TEXTS = ["What color is the shape? red blue green purple", "Is there a square? yes no"]
SIZES = [(32, 32), (40, 60), (64, 24)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            build_tiny_model(name, TEXTS, d)
            from transformers import AutoProcessor

            cache[name] = (d, AutoProcessor.from_pretrained(d))
        return cache[name]

    return get


def stock_inputs(processor, question: str, image, answer: str | None = None):
    """What a user of stock transformers feeds the model (the family's documented usage)."""
    if not processor.chat_template:  # PaliGemma: the processor builds prompt and suffix itself
        return processor(text="<image>" + question, images=image, suffix=answer, return_tensors="pt")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    text = processor.apply_chat_template(msgs, add_generation_prompt=answer is None)
    return processor(text=text, images=image, return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("name", NEW)
def test_prompt_and_inputs_are_what_the_processor_builds(bases, name):
    d, processor = bases(name)
    enc = Encoder(processor)
    fam = enc.family
    assert fam is TINY_MODELS[name]
    for h, w in SIZES:
        img = Image.new("RGB", (w, h), (200, 30, 30))
        ids = enc.prompt_ids([Turn("human", "<image>\nWhat color?")], [(h, w)])
        stock = stock_inputs(processor, "What color?", img)
        assert ids == stock["input_ids"][0].tolist(), (h, w)
        ours = enc.features(ids, images=[img])
        for key in fam.image_inputs + ((fam.token_types,) if fam.token_types else ()):
            want = stock[key][0] if key in TOKEN_KEYS else stock[key]  # per-token: ours is one sample's
            assert ours[key].shape == want.shape, key
            assert torch.allclose(ours[key].float(), want.float(), atol=1e-5), key


@pytest.mark.parametrize("name", NEW)
def test_training_sample_and_mask_match_the_processor(bases, name):
    d, processor = bases(name)
    enc = Encoder(processor)
    img = Image.new("RGB", (60, 40), "blue")
    turns = [Turn("human", "<image>\nWhat color?"), Turn("gpt", "blue")]
    ids, labels = enc.encode(turns, [(40, 60)])
    supervised = processor.tokenizer.decode([x for x in labels if x != IGNORE_INDEX])
    end = TINY_MODELS[name].end_of_turn[0]
    # the answer and its end-of-turn token, nothing before (Idefics3/SmolVLM: the space after "Assistant:" too)
    assert supervised.removeprefix(" ").startswith("blue" + end), supervised
    assert enc.eos == end and processor.tokenizer.convert_tokens_to_ids(end) in enc.stop_token_ids
    first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    prompt = enc.prompt_ids(turns[:1], [(40, 60)])
    assert ids[:first] == prompt  # trained on exactly the prompt it generates from
    stock = stock_inputs(processor, "What color?", img, answer="blue")
    if name == "tiny-paligemma":  # the processor's own labels and prefix-LM token types
        assert ids == stock["input_ids"][0].tolist()
        assert labels == stock["labels"][0].tolist()
        assert enc.features(ids, labels)["token_type_ids"].tolist() == stock["token_type_ids"][0].tolist()
    elif name == "tiny-llava_onevision":
        # its template writes a finished turn as "assistant \n"+answer but prompts with "assistant\n": llavatune trains
        # on the prompt's form; everything else is the processor's
        assert len(ids) == len(stock["input_ids"][0]) - 1
    else:
        assert ids == stock["input_ids"][0].tolist()


@pytest.mark.parametrize("name", NEW)
def test_masking_self_check_passes_on_real_data(bases, shapes, name):
    d, processor = bases(name)
    records = load_records(shapes["train"])
    ds = LlavaDataset(records, Encoder(processor), [shapes["train"].parent] * len(records))
    assert len(ds) == len(records) and not ds.masking_problems and not ds.skipped
    batch = Encoder(processor).collator()([ds[0], ds[1], ds[2]])
    assert batch["input_ids"].shape[0] == 3


def _predictions(path):
    return [json.loads(x)["prediction"] for x in path.read_text().splitlines()]


def stock_generate(model_dir, queries, max_new_tokens=4):
    """Greedy token ids (up to the first stop token) and answers of a merged folder loaded by stock transformers alone
    (no llavatune code on this path)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    ids, answers = [], []
    for image, question in queries:
        img = Image.open(image).convert("RGB")
        if proc.chat_template:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            inputs = proc(text=proc.apply_chat_template(msgs, add_generation_prompt=True), images=img,
                          return_tensors="pt", add_special_tokens=False)
        else:
            inputs = proc(text="<image>" + question, images=img, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[0, inputs["input_ids"].shape[1]:].tolist()
        ids.append(until_stop(new, stops))
        answers.append(proc.tokenizer.decode(new, skip_special_tokens=True).strip())
    return ids, answers


def until_stop(ids, stops):
    out = []
    for i in ids:
        if i in stops:
            break
        out.append(i)
    return out


def llavatune_generated_ids(model_dir, queries, max_new_tokens=4):
    """The token ids llavatune's batched generation produced for ``queries`` (captured where it decodes them)."""
    from llavatune.infer.generate import Query, stop_token_ids
    from llavatune.infer.predict import load_predictor

    predictor = load_predictor(str(model_dir))
    tok = predictor.encoder.tokenizer
    seen, decode = [], tok.decode

    def capture(ids, *args, **kwargs):
        seen.append(ids.tolist() if hasattr(ids, "tolist") else list(ids))
        return decode(ids, *args, **kwargs)

    tok.decode = capture
    qs = [Query([Turn("human", "<image>\n" + q)], [image]) for image, q in queries]
    predictor.answer(qs, batch_size=len(qs), max_new_tokens=max_new_tokens)
    stops = set(stop_token_ids(predictor.encoder, predictor.model))
    # batches are sorted by prompt length: match rows to queries through the answers' order in the batch
    return sorted(until_stop(x, stops) for x in seen)


def train_args(name, shapes, out, *extra):
    return ["train", "--model", name, "--data", str(shapes["train"]), "--output_dir", str(out), "--max_steps", "3",
            "--lora_r", "8", "--lora_alpha", "16", "--report_to", "none", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--save_strategy", "no", "--image_workers", "1", *extra]


@pytest.mark.parametrize("name", NEW)
def test_family_trains_evaluates_merges_and_stock_reloads(shapes, tmp_path, name):
    out = tmp_path / "run"
    assert cli_main(train_args(name, shapes, out, "--val_data", str(shapes["val"]), "--eval_strategy", "steps",
                               "--eval_steps", "3", "--eval_max_samples", "4", "--eval_max_new_tokens", "3")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_vqa_accuracy" in r for r in rows)  # generation between epochs ran on this family
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(x == x for x in losses)
    meta = json.loads((out / "llavatune_checkpoint.json").read_text())
    assert meta["method"] == "lora"
    assert cli_main(["eval", "--model", str(out), "--data", str(shapes["val"]), "--max_samples", "4",
                     "--max_new_tokens", "4", "--out", str(tmp_path / "ev")]) == 0
    ours = _predictions(tmp_path / "ev" / "predictions.jsonl")
    merged = tmp_path / "merged"
    assert cli_main(["merge", "--model", str(out), "--out", str(merged)]) == 0
    val = json.loads(shapes["val"].read_text())[:4]
    queries = [[str(shapes["val"].parent / r["image"]), r["conversations"][0]["value"].replace("<image>\n", "")]
               for r in val]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"image": r["image"], "question": q}) + "\n"
                                              for r, (_, q) in zip(val, queries)))
    assert cli_main(["predict", "--model", str(merged), "--input", str(tmp_path / "q.jsonl"), "--max_new_tokens", "4",
                     "--image_folder", str(shapes["val"].parent), "--out", str(tmp_path / "a.jsonl")]) == 0
    predicted = [json.loads(x)["answer"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    stock_ids, stock = stock_generate(merged, queries)
    assert predicted == stock  # llavatune predict on the merged folder == stock transformers on it
    assert ours == stock  # and == eval on the adapter checkpoint it was merged from
    # token for token (an answer can decode to nothing: special tokens, whitespace), and not all empty
    assert llavatune_generated_ids(merged, queries) == sorted(stock_ids)
    assert any(stock_ids)


def test_every_family_transformers_provides_is_supported():
    from llavatune.model.families import FAMILIES

    assert all(f.supported for f in FAMILIES.values()), [n for n, f in FAMILIES.items() if not f.supported]


@pytest.mark.parametrize("family", ["mllama", "internvl"])
def test_a_family_not_yet_supported_is_refused_in_one_line(shapes, tmp_path, capsys, monkeypatch, family):
    """A local checkpoint of a family the table marks as not trained yet (every family is supported today, so the
    entry is marked here): every command says so in one line, before anything is written."""
    import dataclasses

    import transformers

    from llavatune.model import families

    refused = dataclasses.replace(families.FAMILIES[family], supported=False,
                                  status="not yet supported: no tiny model or tests yet")
    monkeypatch.setitem(families.FAMILIES, family, refused)
    monkeypatch.setitem(families._BY_MODEL_TYPE, family, refused)
    config_cls = transformers.AutoConfig.for_model(family).__class__
    model_dir = tmp_path / family
    model_dir.mkdir()
    config_cls().to_json_file(str(model_dir / "config.json"))
    for argv in (train_args(str(model_dir), shapes, tmp_path / "run"),
                 ["check", str(shapes["val"]), "--model", str(model_dir)],
                 ["predict", "--model", str(model_dir), "--image", str(shapes["val"].parent / json.loads(
                     shapes["val"].read_text())[0]["image"]), "--question", "What?"]):
        capsys.readouterr()
        assert cli_main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert f"{family} is not yet supported" in err[0] and "supported now: llava" in err[0], err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_tiny_models_and_smoke_fallback_by_hub_id():
    from llavatune.model.tiny import tiny_family

    want = {"llava-hf/llava-1.5-7b-hf": "tiny", "llava-hf/llava-v1.6-mistral-7b-hf": "tiny-next",
            "llava-hf/llava-onevision-qwen2-7b-ov-hf": "tiny-llava_onevision", "google/paligemma2-3b-pt-224":
            "tiny-paligemma", "Qwen/Qwen2-VL-7B-Instruct": "tiny-qwen2_vl", "Qwen/Qwen2.5-VL-7B-Instruct":
            "tiny-qwen2_5_vl", "Qwen/Qwen3-VL-8B-Instruct": "tiny-qwen3_vl", "google/gemma-3-4b-it": "tiny-gemma3",
            "HuggingFaceM4/Idefics3-8B-Llama3": "tiny-idefics3", "HuggingFaceTB/SmolVLM-256M-Instruct": "tiny-smolvlm",
            "OpenGVLab/InternVL3-1B-hf": "tiny-internvl",
            "mistralai/Mistral-Small-3.1-24B-Instruct-2503": "tiny-mistral3",
            "meta-llama/Llama-3.2-11B-Vision-Instruct": "tiny-mllama"}
    assert {ref: tiny_family(ref) for ref in want} == want
    assert set(TINY_MODELS) == {"tiny", "tiny-next", *NEW}


@pytest.mark.parametrize("name", ["tiny-qwen2_5_vl", "tiny-gemma3", "tiny-paligemma"])
def test_predict_chat_and_shared_prefix_fallback(bases, tmp_path, name):
    """The same greedy answer through batched generation (shared prefixes asked for, and declined with the reason:
    M-RoPE / bidirectional image blocks / prefix-LM), through chat (one conversation), and for every question of a
    batch about one image."""
    from llavatune.infer.chat import ChatSession
    from llavatune.infer.generate import Query
    from llavatune.infer.predict import load_predictor

    d, _ = bases(name)
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "g.png")
    predictor = load_predictor(str(d))
    questions = ["What color?", "Is there a square?", "What color?"]
    stats: dict = {}
    from llavatune.infer.generate import generate

    answers = generate(predictor.model, predictor.encoder,
                       [Query([Turn("human", "<image>\n" + q)], [tmp_path / "g.png"]) for q in questions],
                       batch_size=3, max_new_tokens=4, share_prefix=True, stats=stats)
    assert TINY_MODELS[name].name in stats["share_prefix_off"] and answers[0] == answers[2]
    alone = predictor.answer([Query([Turn("human", "<image>\nWhat color?")], [tmp_path / "g.png"])], 1, 4)
    session = ChatSession(predictor, tmp_path / "g.png", max_new_tokens=4)
    assert session.ask("What color?") == alone[0] == answers[0]
    session.ask("And the shape?")  # a second turn: the first answer, its end-of-turn token, the new question
    assert [t.role for t in session.turns] == ["human", "gpt", "human", "gpt"]


@pytest.mark.parametrize("name", ["tiny-next", "tiny-qwen2_5_vl", "tiny-gemma3"])
def test_check_counts_each_familys_image_tokens(bases, tmp_path, name):
    from llavatune.data.check import check_dataset

    d, processor = bases(name)
    Image.new("RGB", (90, 30), "red").save(tmp_path / "wide.png")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "w", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]}]))
    report = check_dataset(data, model=str(d))
    enc = Encoder(processor)
    n_image = enc.image_token_counts([(30, 90)], 1)[0]
    text = len(processor.tokenizer("\nColor?\nred", add_special_tokens=True)["input_ids"])  # as check joins turns
    assert report.lengths["max"] == text + n_image and n_image > 0
    if name != "tiny-next":  # the families whose processor expands the placeholder say so
        assert report.lengths["image_tokens_note"] == "counted per image from its size, as the processor expands it"
    if name in ("tiny-next", "tiny-qwen2_5_vl"):  # anyres / dynamic resolution: the count follows the image size
        assert enc.image_token_counts([(64, 64)], 1)[0] > enc.image_token_counts([(32, 32)], 1)[0]


def test_supported_models_table_in_the_docs_is_the_family_table():
    """docs/models.md lists every family of the table, with its status and example hub ids, and each tiny model."""
    from pathlib import Path

    from llavatune.model.families import FAMILIES

    doc = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| ") and "`" in line}
    assert set(FAMILIES) <= set(rows)
    for name, fam in FAMILIES.items():
        assert ("not yet supported" in rows[name]) == (not fam.supported), name
        assert all(f"`{ref}`" in rows[name] for ref in fam.hub_examples), name
        if fam.tiny and fam.tiny != "tiny":
            assert f"`{fam.tiny}`" in rows[name], name


def test_what_a_familys_processor_imports_is_an_extra():
    from pathlib import Path

    import tomllib

    from llavatune.model.families import FAMILIES

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, fam in FAMILIES.items():
        for pkg in fam.pip_extras:
            assert any(dep.startswith(pkg) for dep in extras.get(name, [])), (name, pkg)


@pytest.mark.parametrize("name", ["tiny-qwen2_5_vl", "tiny-gemma3"])
def test_truncation_keeps_whole_turns_and_never_cuts_image_tokens(bases, name):
    from llavatune.data.encode import SampleSkipped, check_masking

    d, processor = bases(name)
    turns = [Turn("human", "<image>\nWhat color?"), Turn("gpt", "red"), Turn("human", "And the shape? " * 8),
             Turn("gpt", "a circle " * 8)]
    full = Encoder(processor).encode(turns, [(64, 64)])[0]
    first = Encoder(processor).encode(turns[:2], [(64, 64)])[0]
    enc = Encoder(processor, max_length=len(full) - 1, truncation="truncate")
    fitted = enc.fit(turns, [(64, 64)])
    assert fitted.turns == turns[:2] and fitted.input_ids == first  # the first exchange, whole
    assert check_masking(enc, fitted.turns, fitted.labels) is None
    image_positions = [i for i, x in enumerate(first) if x in enc.image_token_ids]
    tight = Encoder(processor, max_length=image_positions[-1], truncation="truncate")  # would cut the image's end
    with pytest.raises(SampleSkipped) as e:
        tight.fit(turns[:2], [(64, 64)])
    assert e.value.kind == "image-tokens-cut"


@pytest.mark.parametrize("ref", ["Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct",
                                 "Qwen/Qwen3-VL-8B-Instruct", "google/gemma-3-4b-it",
                                 "google/paligemma2-3b-pt-224"])
def test_smoke_shrinks_a_real_sized_checkpoint_of_each_family(bases, shapes, tmp_path, ref):
    """--smoke on a local folder holding a released model's config.json (its real shapes) and processor: a 2-layer
    model of the same classes is built from that config and trains 3 steps."""
    from llavatune.model.families import family
    from llavatune.plan.hub_configs import hub_config

    cfg = hub_config(ref)
    name = family(cfg["model_type"]).tiny
    d, processor = bases(name)
    tiny_cfg = json.loads((d / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "image_token_index", "boi_token_index", "eoi_token_index"):  # the tiny tokenizer's ids
        if key in tiny_cfg:
            cfg[key] = tiny_cfg[key]
    cfg["text_config"].update(vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id)
    # the tiny processor's image geometry (8-pixel patches of 32-pixel images), so that its images fit the config
    cfg["vision_config"]["patch_size"] = tiny_cfg["vision_config"]["patch_size"]
    for key in ("image_size",):
        if key in cfg["vision_config"]:
            cfg["vision_config"][key] = tiny_cfg["vision_config"][key]
    if "mm_tokens_per_image" in cfg:
        cfg["mm_tokens_per_image"] = tiny_cfg["mm_tokens_per_image"]
    model_dir = tmp_path / ref.replace("/", "--")
    processor.save_pretrained(model_dir)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert cli_main(train_args(str(model_dir), shapes, out, "--smoke")) == 0
    base = json.loads((out / "base_model" / "config.json").read_text())
    assert base["model_type"] == cfg["model_type"] and base["text_config"]["hidden_size"] == 64
    assert base["text_config"]["num_hidden_layers"] == 2


@pytest.mark.parametrize("name", ["tiny-qwen2_5_vl", "tiny-gemma3", "tiny-llava_onevision", "tiny-internvl",
                                  "tiny-mistral3", "tiny-mllama"])
def test_several_images_text_only_samples_and_named_templates(bases, tmp_path, name):
    """Two images in one question, a text-only sample and an image sample in one batch: one forward pass; a named
    template's <image> becomes the family's own placeholder."""
    from transformers import AutoModelForImageTextToText

    from llavatune.data.records import Record

    d, processor = bases(name)
    Image.new("RGB", (60, 20), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (30, 30), "blue").save(tmp_path / "sq.png")
    recs = [Record("w", [Turn("human", "<image>\nColor?"), Turn("gpt", "red")], ["wide.png"]),
            Record("s", [Turn("human", "<image> and <image>: colors?"), Turn("gpt", "blue red")], ["sq.png", "wide.png"]),
            Record("t", [Turn("human", "Hi"), Turn("gpt", "hello")])]
    enc = Encoder(processor)
    ds = LlavaDataset(recs, enc, [tmp_path] * 3)
    assert len(ds) == 3 and not ds.masking_problems
    batch = enc.collator()([ds[0], ds[1], ds[2]])
    labels = batch.pop("labels")
    model = AutoModelForImageTextToText.from_pretrained(d)
    out = model(**batch)
    assert out.logits.shape[:2] == labels.shape
    named = Encoder(processor, template="chatml")
    ids = named.prompt_ids([Turn("human", "<image>\nColor?")], [(20, 60)])
    assert sum(x in named.image_token_ids for x in ids) == sum(x in enc.image_token_ids for x in
                                                                enc.prompt_ids([Turn("human", "<image>\nColor?")],
                                                                               [(20, 60)]))


def test_an_image_size_the_processor_refuses_is_reported_not_a_traceback(bases, tmp_path, capsys):
    from llavatune.data.check import check_dataset

    d, processor = bases("tiny-qwen2_5_vl")
    Image.new("RGB", (900, 2), "red").save(tmp_path / "strip.png")  # Qwen-VL refuses aspect ratios over 200
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.png")
    rows = [{"id": "strip", "image": "strip.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                                     {"from": "gpt", "value": "red"}]},
            {"id": "ok", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                               {"from": "gpt", "value": "red"}]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    report = check_dataset(tmp_path / "d.json", model=str(d))
    assert any("aspect ratio" in p.message for e in report.entries for p in e.problems)
    from llavatune.data.records import load_records

    ds = LlavaDataset(load_records(tmp_path / "d.json"), Encoder(processor), [tmp_path] * 2)
    assert len(ds) == 1 and list(ds.skipped) == ["image-size"]


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2_5_vl", "tiny-mllama"])
def test_check_takes_a_built_in_tiny_model_name(tmp_path, capsys, name):
    """`check DATA --model tiny-<family>` (what a user trains with) counts tokens with the processor train would build
    from the same text, instead of refusing the name as neither a folder nor a hub id."""
    from llavatune.data.check import check_dataset
    from llavatune.data.records import collect_texts
    from llavatune.model.tiny import tiny_processor

    Image.new("RGB", (90, 30), "red").save(tmp_path / "wide.png")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "w", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]}]))
    assert cli_main(["check", str(data), "--model", name]) == 0
    out = capsys.readouterr()
    assert f"tokens (estimate, {name}" in out.out + out.err and "no such folder" not in out.err
    report = check_dataset(data, model=name)
    processor = tiny_processor(name, collect_texts(load_records(str(data))))
    n_image = Encoder(processor).image_token_counts([(30, 90)], 1)[0]
    text = len(processor.tokenizer("\nColor?\nred", add_special_tokens=True)["input_ids"])  # as check joins turns
    assert n_image > 0 and report.lengths["max"] == text + n_image

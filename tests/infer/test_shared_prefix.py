"""Shared image prefixes: one prefill per image, and exactly the answers of the unshared path.

The tiny models are random, so their greedy answers are long strings of arbitrary tokens: any difference in the
computation (a wrong position, an unmasked pad, a cache row of the wrong image) changes them, which makes
"identical on a few hundred questions" a sharp check.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavatune.cli import main as cli_main
from llavatune.data.encode import Encoder
from llavatune.infer import generate as G
from llavatune.infer.generate import Query, generate
from llavatune.infer.predict import question_turns
from llavatune.model.tiny import build_tiny

QUESTIONS = ["What color is the shape?", "How many shapes are there?", "Where is the circle?",
             "Is there a red shape?", "What shape is on the left?", "What color is the background?"]
MAX_NEW = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    """48 images of several sizes (LLaVA-NeXT tiles them differently: prefixes of different lengths)."""
    d = tmp_path_factory.mktemp("shared_prefix_images")
    rng = random.Random(0)
    out = []
    for i in range(48):
        w, h = rng.choice([(32, 32), (64, 32), (32, 64), (48, 40), (70, 30)])
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        img.paste(Image.new("RGB", (10, 10), tuple(rng.randrange(256) for _ in range(3))), (rng.randrange(w - 10), 3))
        img.save(d / f"p{i}.png")
        out.append(d / f"p{i}.png")
    return out


def workload(pictures: list[Path], seed: int = 0) -> list[Query]:
    """~220 questions: most images asked 2-8 questions (in shuffled order), some once, two text-only questions."""
    rng = random.Random(seed)
    queries = []
    for i, p in enumerate(pictures):
        n = 1 if i % 7 == 0 else rng.randint(2, 9)
        for q in rng.sample(QUESTIONS * 2, n):
            queries.append(Query(question_turns(q + f" ({rng.randint(0, 99)})" * rng.randint(0, 2), 1), [p]))
    queries += [Query(question_turns("How are you?", 0), []), Query(question_turns("Name a color.", 0), [])]
    rng.shuffle(queries)
    return queries


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def tiny(request):
    # random weights (no warm start): varied answers, so that a wrong shared prefix shows up as a different one
    model, processor = build_tiny(QUESTIONS + ["red green blue left right top bottom circle square"],
                                  next=request.param == "llava-next", warm_start=False)
    return model.eval(), Encoder(processor)


def test_shared_prefix_gives_identical_answers(tiny, pictures):
    model, encoder = tiny
    queries = workload(pictures)
    assert len(queries) > 200
    plain = generate(model, encoder, queries, batch_size=8, max_new_tokens=MAX_NEW, share_prefix=False)
    for batch_size in (8, 3):  # 3: most images' questions split across batches
        stats: dict = {}
        shared = generate(model, encoder, queries, batch_size=batch_size, max_new_tokens=MAX_NEW, stats=stats)
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(plain, shared)) if a != b]
        assert not diff, f"batch {batch_size}: {len(diff)} answers differ, e.g. {diff[:3]}"
        alone = sum(1 for p in pictures[::7])
        assert stats["shared_questions"] == len(queries) - alone - 2
        if batch_size == 8:
            assert stats["images_encoded"] == len(pictures)  # the vision tower once per image
    assert len(set(plain)) > 50  # the answers are not all alike: the comparison can fail
    if encoder.variable_image_tokens:
        lengths = {len(encoder.prompt_ids(q.turns[:1], [G.image_size(q.images[0])])) for q in queries if q.images}
        assert len(lengths) > 2  # prefixes of several lengths were padded against each other


def test_shared_prefix_prefills_far_fewer_tokens(tiny, pictures):
    model, encoder = tiny
    queries = [q for q in workload(pictures) if q.images]
    plain, shared = {}, {}
    generate(model, encoder, queries, batch_size=16, max_new_tokens=1, share_prefix=False, stats=plain)
    generate(model, encoder, queries, batch_size=16, max_new_tokens=1, stats=shared)
    assert plain["images_encoded"] == len(queries) and shared["images_encoded"] == len(pictures)
    sizes = [[G.image_size(q.images[0])] if encoder.variable_image_tokens else None for q in queries]
    prompts = [encoder.prompt_ids(q.turns, s) for q, s in zip(queries, sizes)]
    prefix = {str(q.images[0]): ids[: max(j for j, t in enumerate(ids) if t == encoder.image_token_id) + 1]
              for q, ids in zip(queries, prompts)}
    assert plain["prefill_tokens"] == sum(map(len, prompts))
    # each image prefix once, plus every question's own text
    assert shared["prefill_tokens"] == sum(map(len, prompts)) - sum(
        len(prefix[str(q.images[0])]) for q in queries) + sum(map(len, prefix.values()))


def test_one_question_per_image_runs_exactly_the_unshared_batches(tiny, pictures, monkeypatch):
    """OK-VQA layout (nothing to share): the default path makes the very same generate calls as the unshared one,
    so it cannot be slower by more than grouping the prompts (well under a millisecond)."""
    model, encoder = tiny
    queries = [Query(question_turns(QUESTIONS[i % len(QUESTIONS)], 1), [p]) for i, p in enumerate(pictures)]
    calls: list = []
    real = type(model).generate

    def spy(self, *args, **kwargs):
        calls.append((kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist(), kwargs["pixel_values"].sum()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    plain = generate(model, encoder, queries, batch_size=8, max_new_tokens=2, share_prefix=False)
    plain_calls, calls[:] = list(calls), []
    stats: dict = {}
    shared = generate(model, encoder, queries, batch_size=8, max_new_tokens=2, stats=stats)
    assert shared == plain and stats["shared_questions"] == 0
    assert len(calls) == len(plain_calls) == 6
    assert all(a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) for a, b in zip(calls, plain_calls))


def test_unsupported_models_fall_back_with_a_log_line(tiny, pictures, monkeypatch):
    model, encoder = tiny
    queries = workload(pictures)[:30]
    want = generate(model, encoder, queries, batch_size=8, max_new_tokens=MAX_NEW, share_prefix=False)
    monkeypatch.setattr(G, "SHARED_PREFIX_MODEL_TYPES", ("qwen2_vl",))
    stats: dict = {}
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("llavatune")  # the CLI stops its propagation, so listen on it directly
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        got = generate(model, encoder, queries, batch_size=8, max_new_tokens=MAX_NEW, stats=stats)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert got == want
    assert stats["shared_questions"] == 0 and "is not one of qwen2_vl" in stats["share_prefix_off"]
    assert any(m.startswith("shared image prefixes off: model type 'llava") for m in seen), seen
    monkeypatch.undo()
    assert G.shared_prefix_unsupported(model) is None
    text_config = model.config.get_text_config(decoder=True)
    monkeypatch.setattr(text_config, "_attn_implementation", "flash_attention_2")
    assert "attention implementation 'flash_attention_2'" in G.shared_prefix_unsupported(model)


def test_lora_model_shares_prefixes_too(tiny, pictures):
    """Evaluation between epochs and adapter checkpoints generate through a PEFT wrapper."""
    from peft import LoraConfig, get_peft_model

    model, encoder = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        queries = workload(pictures, seed=1)[:60]
        want = generate(peft_model, encoder, queries, batch_size=8, max_new_tokens=MAX_NEW, share_prefix=False)
        stats: dict = {}
        got = generate(peft_model, encoder, queries, batch_size=8, max_new_tokens=MAX_NEW, stats=stats)
        assert got == want and stats["shared_questions"] > 30
        with peft_model.disable_adapter():
            plain = generate(peft_model, encoder, queries, batch_size=8, max_new_tokens=MAX_NEW)
        assert plain != want  # the adapter takes part in the shared path's prefill and decoding
    finally:
        peft_model.unload()


# ------------------------------------------------------------------------------------------------ commands


@pytest.fixture(scope="module")
def vqav2_eval(tmp_path_factory):
    """A VQAv2-layout validation set (5 questions per image), prepared flat and grouped, and a tiny model."""
    from llavatune.data.shapes import make_shapes_vqa

    root = tmp_path_factory.mktemp("vqav2_eval")
    paths = make_shapes_vqa(root / "src", n_train_images=0, n_val_images=12, questions_per_image=5, image_size=32,
                            layout="vqav2")
    args = ["--questions", paths["val_questions"], "--annotations", paths["val_annotations"], "--images",
            paths["images_dir"]]
    for name, extra in (("flat", []), ("grouped", ["--group-by-image"])):
        assert cli_main(["prepare", "vqav2", *map(str, args), "--out", str(root / name), *extra]) == 0
    texts = [t["value"] for r in json.loads((root / "flat" / "data.json").read_text()) for t in r["conversations"]]
    build_tiny(texts, root / "model")
    return root


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_eval_command_shares_prefixes_and_reports_speed(vqav2_eval, capsys):
    root = vqav2_eval
    runs = {}
    for name, data, extra in (("shared", "flat", []), ("plain", "flat", ["--share_image_prefix", "false"]),
                              ("grouped", "grouped", [])):
        out = root / f"eval-{name}"
        rc = cli_main(["eval", "--model", str(root / "model"), "--data", str(root / data / "data.json"), "--out",
                       str(out), "--max_new_tokens", "4", "--batch_size", "8", *extra])
        assert rc == 0
        runs[name] = (read_jsonl(out / "predictions.jsonl"), json.loads((out / "metrics.json").read_text()))
    capsys.readouterr()
    preds = {k: {r["question_id"]: r["prediction"] for r in v[0]} for k, v in runs.items()}
    assert len(preds["plain"]) == 60
    assert preds["shared"] == preds["plain"] == preds["grouped"]
    for name, (_, metrics) in runs.items():
        assert metrics["n"] == 60 and metrics["generation_seconds"] > 0 and metrics["samples_per_second"] > 0
        assert metrics["share_image_prefix"] is (name != "plain")
        assert metrics["images_encoded"] == (60 if name == "plain" else 12)
    # a grouped record's questions are scored one by one, each against its own answers
    flat_rows = {r["question_id"]: r for r in runs["plain"][0]}
    for r in runs["grouped"][0]:
        f = flat_rows[r["question_id"]]
        assert (r["id"], r["question"], r["answers"], r["score"], r["question_type"]) == (
            f["id"], f["question"], f["answers"], f["score"], f["question_type"])
        assert r["record"].startswith("vqav2-")
    assert runs["grouped"][1]["vqa_accuracy"] == runs["plain"][1]["vqa_accuracy"]
    assert runs["grouped"][1]["by_question_type"] == runs["plain"][1]["by_question_type"]
    # --max_samples counts questions
    rc = cli_main(["eval", "--model", str(root / "model"), "--data", str(root / "grouped" / "data.json"),
                   "--max_samples", "7", "--max_new_tokens", "2"])
    assert rc == 0 and capsys.readouterr().out.startswith("7 samples")


def test_predict_input_shares_prefixes(vqav2_eval, tmp_path, capsys):
    root = vqav2_eval
    rows = []
    for r in json.loads((root / "flat" / "data.json").read_text())[:25]:
        q = r["conversations"][0]["value"].replace("<image>\n", "")
        rows.append({"id": r["id"], "image": r["image"], "question": q})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    outs = {}
    for flag in ("true", "false"):
        out = tmp_path / f"a-{flag}.jsonl"
        rc = cli_main(["predict", "--model", str(root / "model"), "--input", str(tmp_path / "q.jsonl"), "--out",
                       str(out), "--image_folder", str(root / "flat"), "--max_new_tokens", "5",
                       "--share_image_prefix", flag])
        assert rc == 0
        outs[flag] = read_jsonl(out)
    assert [r["id"] for r in outs["true"]] == [r["id"] for r in rows]  # input order kept
    assert outs["true"] == outs["false"]

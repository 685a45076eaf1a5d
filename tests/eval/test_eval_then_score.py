"""The README's evaluate -> score path as written, and the outputs that promise a resolved configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from llavatune.cli import main


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    rc = main(["train", "--model", "tiny", "--data", str(shapes["train"]), "--output_dir", str(out), "--max_steps", "2",
               "--lora_r", "4", "--lora_alpha", "8", "--save_strategy", "no", "--report_to", "none"])
    assert rc == 0
    return out


def test_score_reads_evals_predictions_and_agrees_with_eval(trained, shapes, tmp_path, capsys, monkeypatch):
    from llavatune.eval import evaluate

    # A tiny model trained for two steps answers everything wrong; scoring agreement needs right, partly right and
    # wrong answers, so generation is replaced by answers of each kind (annotators' answers, case and punctuation
    # that the VQA normalization removes, and a wrong one). Everything after generation is eval's own code.
    records = json.loads(Path(shapes["val"]).read_text())  # eval's queries come in the data file's order

    def answers(model, encoder, queries, *args, **kwargs):
        assert len(queries) == len(records)
        return [[r["answers"][0].upper() + ".", r["answers"][-1], "definitely wrong"][i % 3]
                for i, r in enumerate(records)]

    monkeypatch.setattr(evaluate, "sharded_generate", answers)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(trained), "--data", str(shapes["val"]), "--out", "runs/eval"]) == 0
    reported = json.loads(Path("runs/eval/metrics.json").read_text())
    src = Path(shapes["src"])
    capsys.readouterr()
    assert main(["score", "--questions", str(src / "OpenEnded_mscoco_val2014_questions.json"), "--annotations",
                 str(src / "mscoco_val2014_annotations.json"), "--predictions", "runs/eval/predictions.jsonl",
                 "--out", "score.json"]) == 0
    out = capsys.readouterr().out
    scored = json.loads(Path("score.json").read_text())
    rows = [json.loads(x) for x in Path("runs/eval/predictions.jsonl").read_text().splitlines()]
    assert 0 < reported["vqa_accuracy"] < 100 and len({r["score"] for r in rows}) >= 2
    assert scored["vqa_accuracy"] == reported["vqa_accuracy"] and scored["n"] == reported["n"] == len(rows)
    assert f"VQA accuracy: {reported['vqa_accuracy']:.2f}" in out
    assert {str(r["question_id"]): r["score"] for r in rows} == scored["per_question"]
    assert scored["by_question_type"] == reported["by_question_type"]


def test_score_reads_predicts_output(trained, shapes, tmp_path, capsys):
    """predict --input questions.jsonl --out answers.jsonl keeps question_id and adds "answer": score takes it."""
    records = json.loads(Path(shapes["val"]).read_text())
    root = Path(shapes["val"]).parent
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": r["question_id"], "image": str(root / r["image"]),
                                             "question": r["conversations"][0]["value"].replace("<image>\n", "")}) + "\n"
                                 for r in records))
    answers = tmp_path / "answers.jsonl"
    assert main(["predict", "--model", str(trained), "--input", str(questions), "--image_folder", "/", "--out",
                 str(answers), "--max_new_tokens", "4"]) == 0
    src = Path(shapes["src"])
    capsys.readouterr()
    assert main(["score", "--questions", str(src / "OpenEnded_mscoco_val2014_questions.json"), "--annotations",
                 str(src / "mscoco_val2014_annotations.json"), "--predictions", str(answers)]) == 0
    assert "VQA accuracy:" in capsys.readouterr().out


def test_eval_stem_checks_nltk_before_loading_or_generating(shapes, tmp_path, capsys, monkeypatch):
    from llavatune.eval import evaluate, vqa_metric

    monkeypatch.setitem(sys.modules, "nltk", None)  # as if not installed (import raises ImportError)
    monkeypatch.setitem(sys.modules, "nltk.stem", None)
    monkeypatch.setitem(sys.modules, "nltk.stem.porter", None)
    vqa_metric._porter.cache_clear()

    def never(*a, **k):
        raise AssertionError("generation started before the --stem dependency was checked")

    monkeypatch.setattr(evaluate, "sharded_generate", never)
    monkeypatch.setattr("llavatune.infer.predict.load_predictor", never)
    rc = main(["eval", "--model", "tiny-not-needed", "--data", str(shapes["val"]), "--stem"])
    vqa_metric._porter.cache_clear()
    err = capsys.readouterr().err
    # the model reference is checked first (cheap), then nltk: use an existing folder to reach the nltk check
    assert rc == 1 and "no such folder" in err
    rc = main(["eval", "--model", str(tmp_path), "--data", str(shapes["val"]), "--stem"])
    vqa_metric._porter.cache_clear()
    err = capsys.readouterr().err
    assert rc == 1 and "needs NLTK" in err and "pip install nltk" in err and "Traceback" not in err


def test_every_output_directory_holds_the_resolved_configuration(trained, shapes, tmp_path):
    assert main(["eval", "--model", str(trained), "--data", str(shapes["val"]), "--out", str(tmp_path / "eval"),
                 "--max_samples", "2", "--max_new_tokens", "2"]) == 0
    saved = yaml.safe_load((tmp_path / "eval" / "llavatune_config.yaml").read_text())
    assert saved["eval"]["model"] == str(trained) and saved["eval"]["max_samples"] == 2
    assert main(["merge", "--model", str(trained), "--out", str(tmp_path / "merged")]) == 0
    saved = yaml.safe_load((tmp_path / "merged" / "llavatune_config.yaml").read_text())
    assert saved["merge"]["model"] == str(trained) and saved["merge"]["out"] == str(tmp_path / "merged")
    # the saved file feeds back into the command, like train's
    cfg = tmp_path / "again.yaml"
    cfg.write_text(yaml.safe_dump({**yaml.safe_load((tmp_path / "eval" / "llavatune_config.yaml").read_text())["eval"],
                                   "out": str(tmp_path / "eval2")}))
    assert main(["eval", str(cfg)]) == 0
    assert (tmp_path / "eval2" / "metrics.json").is_file()

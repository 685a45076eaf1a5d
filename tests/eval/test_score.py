import json
import sys

import pytest

from llavatune import cli
from llavatune.config import ConfigError
from llavatune.eval import score as score_mod
from llavatune.eval import vqa_metric
from llavatune.eval.score import aggregate, main, score_predictions
from llavatune.utils import UserError

# question_id: (question_type, answer_type, answers, prediction, expected score)
CASES = {
    101: ("what color is the", "other", ["red"] * 3 + ["blue"] * 7, "Red.", 0.9),
    102: ("is this", "yes/no", ["yes"] * 10, "yes", 1.0),
    103: ("how many", "number", ["2"] * 2 + ["3"] * 8, "two", 0.6),
    104: ("what is the", "other", ["cat"] * 10, "dog", 0.0),
}


def _answers(texts):
    return [{"answer": t, "raw_answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


@pytest.fixture
def files(tmp_path):
    q = tmp_path / "OpenEnded_mscoco_val2014_questions.json"
    a = tmp_path / "mscoco_val2014_annotations.json"
    q.write_text(
        json.dumps(
            {
                "questions": [
                    {"image_id": 9000 + qid, "question": f"question {qid}?", "question_id": qid} for qid in CASES
                ]
            }
        )
    )
    a.write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "image_id": 9000 + qid,
                        "question_id": qid,
                        "question_type": qtype,
                        "answer_type": atype,
                        "confidence": 3,
                        "answers": _answers(answers),
                    }
                    for qid, (qtype, atype, answers, _, _) in CASES.items()
                ]
            }
        )
    )
    return tmp_path, q, a


def _write_preds(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _good_preds(tmp_path, name="preds.jsonl"):
    return _write_preds(tmp_path / name, [{"question_id": qid, "answer": c[3]} for qid, c in CASES.items()])


@pytest.fixture
def run(monkeypatch):
    """Run through the real CLI entry point (registers 'score' for the test only)."""
    monkeypatch.setitem(cli.COMMANDS, "score", ("llavatune.eval.score", "score predictions"))

    def _run(*args):
        return cli.main(["score", *map(str, args)])

    return _run


def test_score_predictions_library(files):
    tmp, q, a = files
    result = score_predictions(q, a, _good_preds(tmp))
    assert result["vqa_accuracy"] == 62.5
    assert result["n"] == 4
    assert result["by_answer_type"] == {
        "number": {"vqa_accuracy": 60.0, "n": 1},
        "other": {"vqa_accuracy": 45.0, "n": 2},
        "yes/no": {"vqa_accuracy": 100.0, "n": 1},
    }
    assert result["by_question_type"]["what color is the"] == {"vqa_accuracy": 90.0, "n": 1}
    assert len(result["by_question_type"]) == 4
    assert result["per_question"] == pytest.approx({str(qid): c[4] for qid, c in CASES.items()})
    assert result["coverage"] == {"questions": 4, "predictions": 4, "scored": 4, "missing": 0, "extra": 0}


def test_cli_prints_and_writes_out(files, run, capsys):
    tmp, q, a = files
    out = tmp / "sub" / "metrics.json"
    rc = run("--questions", q, "--annotations", a, "--predictions", _good_preds(tmp), "--out", out)
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "VQA accuracy: 62.50" in stdout
    assert "by answer type:" in stdout and "yes/no" in stdout and "100.00" in stdout
    assert "by question type:" in stdout and "how many" in stdout
    data = json.loads(out.read_text())
    assert data["vqa_accuracy"] == 62.5
    assert data["n"] == 4
    assert data["by_answer_type"]["other"] == {"vqa_accuracy": 45.0, "n": 2}
    assert data["per_question"] == pytest.approx({"101": 0.9, "102": 1.0, "103": 0.6, "104": 0.0})
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_main_directly_and_yaml_config(files, capsys):
    tmp, q, a = files
    cfg = tmp / "score.yaml"
    cfg.write_text(f"questions: {q}\nannotations: {a}\npredictions: {_good_preds(tmp)}\n")
    assert main([str(cfg)], "llavatune score") == 0
    assert "VQA accuracy: 62.50" in capsys.readouterr().out


def test_json_list_predictions_and_string_ids(files):
    tmp, q, a = files
    rows = [{"question_id": str(qid), "answer": c[3]} for qid, c in CASES.items()]
    p = tmp / "results.json"
    p.write_text(json.dumps(rows, indent=2))
    assert score_predictions(q, a, p)["vqa_accuracy"] == 62.5


def test_jsonl_predictions_keep_a_line_separator_inside_strings(files):
    # U+2028 ends a line for str.splitlines() but not for JSON Lines: each prediction must stay one record
    tmp, q, a = files
    rows = [{"question_id": qid, "answer": c[3], "note": "a\u2028b"} for qid, c in CASES.items()]
    path = tmp / "u2028.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert score_predictions(q, a, path)["vqa_accuracy"] == 62.5


def test_json_list_bad_element_reports_line(files):
    tmp, q, a = files
    p = tmp / "results.json"
    p.write_text('[\n  {"question_id": 101, "answer": "red"},\n  {"question_id": 102}\n]\n')
    with pytest.raises(UserError, match=r'results\.json:3: prediction has no "answer"'):
        score_predictions(q, a, p)
    p.write_text('[\n  {"question_id": 101, "answer": "red"},\n  {"question_id": 102, answer}\n]\n')
    with pytest.raises(UserError, match=r"results\.json:3: not valid JSON"):
        score_predictions(q, a, p)


def test_missing_ids_error_and_allow_partial(files, run, capsys):
    tmp, q, a = files
    p = _write_preds(tmp / "p.jsonl", [{"question_id": 101, "answer": "red"}, {"question_id": 102, "answer": "no"}])
    rc = run("--questions", q, "--annotations", a, "--predictions", p)
    err = capsys.readouterr().err
    assert rc == 1
    assert "2 of 4 questions have no prediction (e.g. 103, 104)" in err
    assert "--allow-partial" in err
    rc = run("--questions", q, "--annotations", a, "--predictions", p, "--allow-partial")
    out = capsys.readouterr().out
    assert rc == 0
    assert "VQA accuracy: 45.00  (2 questions)" in out  # (0.9 + 0) / 2
    assert "partial: scored 2 of 4 questions" in out
    result = score_predictions(q, a, p, allow_partial=True)
    assert set(result["per_question"]) == {"101", "102"}
    assert result["coverage"]["missing"] == 2


def test_extra_ids_error_names_lines(files, run, capsys):
    tmp, q, a = files
    rows = [{"question_id": qid, "answer": c[3]} for qid, c in CASES.items()]
    rows += [{"question_id": 999, "answer": "x"}, {"question_id": 998, "answer": "y"}]
    p = _write_preds(tmp / "p.jsonl", rows)
    assert run("--questions", q, "--annotations", a, "--predictions", p) == 1
    err = capsys.readouterr().err
    assert "2 of 6 predictions are for question ids not in" in err
    assert "999 (line 5), 998 (line 6)" in err
    result = score_predictions(q, a, p, allow_partial=True)
    assert result["vqa_accuracy"] == 62.5 and result["coverage"]["extra"] == 2


def test_no_overlap_is_an_error_even_when_partial(files):
    tmp, q, a = files
    p = _write_preds(tmp / "p.jsonl", [{"question_id": 1, "answer": "x"}])
    with pytest.raises(UserError, match="none of the 1 predictions"):
        score_predictions(q, a, p, allow_partial=True)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"3: not valid JSON"),
        ('{"answer": "red"}', r'3: prediction has no "question_id"'),
        ('{"question_id": 103}', r'3: prediction has no "answer"'),
        ('{"question_id": 103, "answer": "  "}', r"3: empty answer for question_id 103"),
        ('{"question_id": 103, "answer": 2}', r"3: answer for question_id 103 must be a string"),
        ('{"question_id": 101, "answer": "blue"}', r"3: duplicate question_id 101 \(first at line 1\)"),
        ('{"question_id": true, "answer": "x"}', r"3: invalid question_id True"),
        ('["question_id", 103]', r"3: expected an object"),
    ],
)
def test_bad_prediction_lines(files, run, capsys, bad_line, message):
    tmp, q, a = files
    # line 2 is blank (skipped, but still counted), line 3 is the bad one
    p = _write_preds(tmp / "p.jsonl", [{"question_id": 101, "answer": "red"}, "", bad_line])
    with pytest.raises(UserError, match=r"p\.jsonl:" + message):
        score_predictions(q, a, p)
    assert run("--questions", q, "--annotations", a, "--predictions", p) == 1
    assert "llavatune score: error: " in capsys.readouterr().err


def test_bad_questions_and_annotations(files, tmp_path):
    tmp, q, a = files
    preds = _good_preds(tmp)
    with pytest.raises(UserError, match=r"nope\.json: file not found \(--questions\)"):
        score_predictions(tmp / "nope.json", a, preds)
    bad = tmp / "bad.json"
    bad.write_text('{\n"questions": [\n  {"question_id": 1,}\n]}')
    with pytest.raises(UserError, match=r"bad\.json:3: not valid JSON \(column \d+\)"):
        score_predictions(bad, a, preds)
    bad.write_text(json.dumps([{"question_id": 101}]))
    with pytest.raises(UserError, match=r'official questions format \{"questions": \[...\]\}'):
        score_predictions(bad, a, preds)
    bad.write_text(json.dumps({"questions": [{"question_id": 101}, {"question_id": 101}]}))
    with pytest.raises(UserError, match=r"questions\[1\]: duplicate question_id 101"):
        score_predictions(bad, a, preds)
    bad.write_text(json.dumps({"questions": [{"question_id": 101}, {"question_id": 5}]}))
    with pytest.raises(UserError, match=r"1 of 2 questions in .* have no annotation \(e.g. 5\)"):
        score_predictions(bad, a, preds)
    bad.write_text(json.dumps({"annotations": [{"question_id": 101, "answers": []}]}))
    with pytest.raises(UserError, match=r"annotations\[0\] \(question_id 101\) has no answers list"):
        score_predictions(q, bad, preds)
    bad.write_text(json.dumps({"annotations": [{"question_id": 101, "answers": [{"answer_id": 1}]}]}))
    with pytest.raises(UserError, match=r'answers\[0\] needs an "answer" string'):
        score_predictions(q, bad, preds)


def test_extra_annotations_are_ignored(files):
    tmp, q, a = files
    data = json.loads(a.read_text())
    data["annotations"].append(
        {"question_id": 555, "question_type": "x", "answer_type": "y", "answers": _answers(["z"])}
    )
    a.write_text(json.dumps(data))
    assert score_predictions(q, a, _good_preds(tmp))["n"] == 4


def test_missing_required_flags(run, capsys):
    assert run("--questions", "q.json") == 2
    assert "--annotations, --predictions" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        main([], "llavatune score")


def test_stem_without_nltk(files, run, capsys, monkeypatch):
    tmp, q, a = files
    vqa_metric._porter.cache_clear()
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.stem", None)
    monkeypatch.setitem(sys.modules, "nltk.stem.porter", None)
    try:
        assert run("--questions", q, "--annotations", a, "--predictions", _good_preds(tmp), "--stem") == 1
    finally:
        vqa_metric._porter.cache_clear()
    assert "pip install nltk" in capsys.readouterr().err


def test_aggregate_for_reuse():
    result = aggregate({"a": 1.0, "b": 0.6, "c": 0.0}, {"a": {"answer_type": "yes/no"}, "b": {"answer_type": "other"}})
    assert result["vqa_accuracy"] == pytest.approx(53.33)
    assert result["n"] == 3
    assert result["by_answer_type"] == {
        "other": {"vqa_accuracy": 60.0, "n": 1},
        "yes/no": {"vqa_accuracy": 100.0, "n": 1},
    }
    assert result["by_question_type"] == {}
    assert list(result["per_question"]) == ["a", "b", "c"]
    assert aggregate({1: 0.3})["per_question"] == {"1": 0.3}
    with pytest.raises(ValueError):
        aggregate({})


def test_format_summary_is_exposed():
    text = score_mod.format_summary(aggregate({"a": 0.5}, {"a": {"question_type": "what", "answer_type": "other"}}))
    assert text.splitlines()[0] == "VQA accuracy: 50.00  (1 questions)"

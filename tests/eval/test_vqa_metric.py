import sys
import types

import pytest

from llavatune.eval import vqa_metric
from llavatune.eval.vqa_metric import (
    exact_match,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    token_f1,
    vqa_score,
)
from llavatune.utils import UserError


@pytest.mark.parametrize(
    "raw, expected",
    [
        # contractions table (whole words, after lowercasing)
        ("dont", "don't"),
        ("Dont", "don't"),
        ("isnt", "isn't"),
        ("Don't", "don't"),  # apostrophe is not punctuation to the evaluator
        ("Im", "im"),  # the table's capitalised keys never match after lowercasing (as in the original)
        # number words (manualMap), whole words only
        ("ten", "10"),
        ("none", "0"),
        ("Two dogs", "2 dogs"),
        ("twenty", "twenty"),
        ("someone", "someone"),
        # articles dropped
        ("the cat", "cat"),
        ("A dog and an apple", "dog and apple"),
        ("the", ""),
        ("theater", "theater"),
        # commas: deleted before anything else, so digits stay together
        ("2,000", "2000"),
        ("red, white", "red white"),
        # periods: removed unless followed by a digit
        ("yes.", "yes"),
        ("Yes.", "yes"),
        ("3.5", "3.5"),
        ("3.", "3"),
        ("e.g.", "eg"),
        # punctuation: deleted when next to a space, else replaced by a space
        ("red - white", "red white"),
        ("red-white", "red white"),
        ("t-shirt", "t shirt"),
        ("(yes)", "yes"),
        ("yes!", "yes"),
        ("black/white", "black white"),
        ("10:30", "10:30"),  # ':' is not in the list
        # question marks and case
        ("What?", "what"),
        ("YES", "yes"),
        # whitespace: newlines, tabs, runs of spaces
        ("\tYes\n", "yes"),
        ("fire\nhydrant", "fire hydrant"),
        ("  stop   sign  ", "stop sign"),
        # possessive split of the EvalAI word_tokenize step
        ("man's", "man 's"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_process_punctuation_comma_rule():
    # With a digit,digit pattern every punctuation mark is deleted rather than spaced out.
    assert process_punctuation("2,000-3") == "20003"
    assert process_punctuation("a-b") == "a b"
    assert process_punctuation("a - b") == "a  b"
    # The period rule only spares periods followed by a digit.
    assert process_punctuation("1.5 m.") == "1.5 m"


def test_process_digit_article():
    assert process_digit_article("The Three dont") == "3 don't"


def test_normalize_rejects_non_string():
    with pytest.raises(TypeError):
        normalize_answer(3)


def _brute_force(pred, answers):
    """The official loop, literally: for each answer, count matches among the others."""
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(o == p for o in others) / 3))
    return sum(accs) / len(accs)


EXPECTED_10 = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0, 9: 1.0, 10: 1.0}


@pytest.mark.parametrize("k", range(11))
def test_leave_one_out_ten_answers(k):
    answers = ["cat"] * k + [f"other{i}" for i in range(10 - k)]
    assert vqa_score("cat", answers) == pytest.approx(EXPECTED_10[k], abs=1e-12)
    assert vqa_score("cat", answers) == pytest.approx(_brute_force("cat", answers), abs=1e-12)


def test_exact_values_without_float_drift():
    assert vqa_score("cat", ["cat"] * 2 + ["dog"] * 8) == 0.6
    assert vqa_score("cat", ["cat"] * 3 + ["dog"] * 7) == 0.9
    assert vqa_score("cat", ["cat"] * 1 + ["dog"] * 9) == 0.3


def test_okvqa_duplicated_answers():
    # OK-VQA: 5 annotators, each answer stored twice.
    def answers(*five):
        return [a for a in five for _ in range(2)]

    gts = answers("umbrella", "umbrella", "parasol", "rain", "shade")
    assert vqa_score("umbrella", gts) == 1.0  # 2 annotators -> 4 copies
    assert vqa_score("parasol", gts) == 0.6  # 1 annotator -> 2 copies
    assert vqa_score("sun", gts) == 0.0


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_fewer_than_ten_answers_same_definition(n):
    for k in range(n + 1):
        answers = ["cat"] * k + [f"x{i}" for i in range(n - k)]
        assert vqa_score("cat", answers) == pytest.approx(_brute_force("cat", answers), abs=1e-12)


def test_single_answer_scores_zero():
    assert vqa_score("cat", ["cat"]) == 0.0
    assert exact_match("cat", ["cat"]) == 1.0


def test_normalization_applies_to_both_sides():
    assert vqa_score("Two.", ["2", "2", "two", "3"]) == pytest.approx(_brute_force("2", ["2"] * 3 + ["3"]))
    assert vqa_score("The Dog!", ["dog"] * 10) == 1.0
    assert vqa_score("dont know", ["don't know"] * 10) == 1.0


def test_vqa_score_bad_arguments():
    with pytest.raises(ValueError):
        vqa_score("cat", [])
    with pytest.raises(TypeError):
        vqa_score("cat", "cat")


def test_exact_match():
    assert exact_match("The Red Car.", "red car") == 1.0
    assert exact_match("red car", "blue car") == 0.0
    assert exact_match("ten", ["9", "10"]) == 1.0
    with pytest.raises(ValueError):
        exact_match("a", [])


def test_token_f1():
    assert token_f1("red and white", "white") == pytest.approx(0.5)  # p=1/3, r=1
    assert token_f1("a red car", "the red car") == 1.0
    assert token_f1("red car", "blue bike") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalization
    assert token_f1("the", "cat") == 0.0
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # clipped counts
    assert token_f1("red car", ["blue car", "red car"]) == 1.0


@pytest.fixture
def fresh_stemmer_cache():
    vqa_metric._porter.cache_clear()
    vqa_metric._stem.cache_clear()
    yield
    vqa_metric._porter.cache_clear()
    vqa_metric._stem.cache_clear()


def test_stem_without_nltk_is_a_user_error(monkeypatch, fresh_stemmer_cache):
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.stem", None)
    monkeypatch.setitem(sys.modules, "nltk.stem.porter", None)
    with pytest.raises(UserError, match="pip install nltk"):
        vqa_score("dogs", ["dog"] * 10, stem=True)
    assert vqa_score("dogs", ["dog"] * 10) == 0.0  # no stemming requested: nltk not needed


def test_stem_applies_to_prediction_and_answers(monkeypatch, fresh_stemmer_cache):
    class FakePorter:
        def stem(self, word):
            return word[:-1] if word.endswith("s") and len(word) > 3 else word

    porter = types.ModuleType("nltk.stem.porter")
    porter.PorterStemmer = FakePorter
    monkeypatch.setitem(sys.modules, "nltk", types.ModuleType("nltk"))
    monkeypatch.setitem(sys.modules, "nltk.stem", types.ModuleType("nltk.stem"))
    monkeypatch.setitem(sys.modules, "nltk.stem.porter", porter)
    assert normalize_answer("Two Dogs", stem=True) == "2 dog"
    assert vqa_score("dogs", ["dog"] * 10, stem=True) == 1.0
    assert vqa_score("dog", ["dogs"] * 10, stem=True) == 1.0


def test_stem_with_real_nltk(fresh_stemmer_cache):
    pytest.importorskip("nltk")
    # OK-VQA v1.1 stores stemmed answers ("ride"); the raw prediction is "riding".
    assert vqa_score("riding", ["ride"] * 10, stem=True) == 1.0
    assert vqa_score("yes", ["yes"] * 10, stem=True) == 1.0
    assert vqa_score("tennis", ["tennis"] * 10, stem=True) == 1.0

"""VQA accuracy, exactly as the standard evaluators compute it, plus exact match and token F1.

Answer normalization (``normalize_answer``) is the EvalAI answer processor: the one in
facebookresearch/mmf (``EvalAIAnswerProcessor``), copied into LLaVA as ``llava/eval/m4c_evaluator.py``
and into lmms-eval as ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py``. It wraps the two steps of the
official GT-Vision-Lab evaluator, ``vqaEval.py``:

* official evaluator: https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py
* EvalAI processor:   https://github.com/facebookresearch/mmf/blob/main/mmf/datasets/processors/processors.py
  (``EvalAIAnswerProcessor``; LLaVA: https://github.com/haotian-liu/LLaVA/blob/main/llava/eval/m4c_evaluator.py)
* lmms-eval:          https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/main/lmms_eval/tasks/_task_utils/vqa_eval_metric.py

The steps, in order (each reproduced as written there, quirks included):

1. ``word_tokenize``: lowercase; delete every ``,`` and ``?``; ``'s`` -> `` 's``; strip.
   So ``"2,000"`` -> ``"2000"`` and ``"what?"`` -> ``"what"``, ``"man's"`` -> ``"man 's"``.
2. newline and tab -> space; strip.
3. ``process_punctuation``: for each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: if it stands next
   to a space anywhere in the text (``p + " "`` or ``" " + p``), or the text matches the comma rule
   ``(\\d)(\\,)(\\d)``, the character is deleted, otherwise it is replaced by a space
   (``"t-shirt"`` -> ``"t shirt"``, ``"red - white"`` -> ``"red  white"``). Then the period rule
   ``(?!<=\\d)(\\.)(?!\\d)`` deletes every period not followed by a digit (``"yes."`` -> ``"yes"``,
   ``"3.5"`` kept). The ``(?!<=\\d)`` is a typo'd look-behind in the original and is a no-op; the
   originals also pass ``re.UNICODE`` (32) as ``sub``'s *count*, so at most 32 periods go: kept as is.
   ``:`` and ``'`` are not in the list, so ``"10:30"`` and ``"don't"`` survive.
4. ``process_digit_article``: lowercase, split on whitespace, number words ``none zero one ... ten`` ->
   ``0 0 1 ... 10``, drop the articles ``a an the``, then map whole words through the contractions table
   (``"dont"`` -> ``"don't"``; its capitalised keys such as ``"Im"`` never match after lowercasing, as in
   the original), and join with single spaces.

**Choice: prediction and ground truths go through the same full processor.** This is what lmms-eval's
OK-VQA task does and what the EvalAI processor is for. The official ``vqaEval.py`` differs in two corner
cases: it skips step 1 for the prediction, and applies only step 3 to the ground truths (and only when
the 10 answers are not all identical), relying on the released ``answer`` fields being pre-normalized.
On the released VQAv2/OK-VQA annotations the results agree except for rare answers containing ``,``,
``?`` or ``'s``, which the official code can then never match (its ground truth keeps ``"man's"`` while a
word-tokenized prediction becomes ``"man 's"``). Normalizing both sides identically removes that
asymmetry and makes ``vqa_score`` usable on user data whose answers are not pre-normalized.

VQA accuracy (``vqa_score``): with the normalized prediction and the n normalized ground-truth answers,
for each answer i count the matches m_i among the *other* n-1 answers, take min(1, m_i/3), and average
over i. With the usual 10 answers and k matches this gives k=0: 0, 1: 0.3, 2: 0.6, 3: 0.9, >=4: 1.0.
OK-VQA stores each of its 5 annotators' answers twice, so its scores are mostly 0, 0.6 (one annotator)
or 1.0 (two or more). The same leave-one-out formula is used for any n >= 1; note that with a single
answer it is always 0 (the other answers are an empty set), so single-reference data should be scored
with ``exact_match`` / ``token_f1`` instead.

OK-VQA v1.1 stores stemmed answers (``raw_answer`` keeps the original). ``stem=True`` runs NLTK's
Porter stemmer over every token of the normalized prediction *and* ground truths, so a free-form
prediction ("riding", "leaves", "yes") meets the stemmed answers in one space; stemming only the
prediction would turn a correct "yes" into "ye" against a ground truth "yes". It approximates (and is not
identical to) OpenFlamingo's OK-VQA post-processing (WordNet lemmatizer + ``inflection`` + a manual
table, which needs NLTK corpora downloaded). Needs ``pip install nltk``; without it a ``UserError`` says so.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Sequence

from llavatune.utils import UserError

__all__ = [
    "CONTRACTIONS",
    "NUMBER_MAP",
    "ARTICLES",
    "PUNCTUATIONS",
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "vqa_score",
    "exact_match",
    "token_f1",
]

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
"""Whole-word contraction fixes of the official evaluator (the original's capitalised keys included)."""

NUMBER_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
"""The official ``manualMap``: number words to digits, whole words only."""

ARTICLES: tuple[str, ...] = ("a", "an", "the")

PUNCTUATIONS: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
"""Deleted (next to a space, or when the comma rule matches) or else replaced by a space."""

# Both regexes exactly as in vqaEval.py (the look-behind typo included: it is a no-op look-ahead).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the originals pass re.UNICODE (=32) as sub()'s count


def process_punctuation(text: str) -> str:
    """Step 3 of the official evaluator: punctuation deleted or spaced out, periods stripped."""
    out = text
    comma_rule = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATIONS:
        # The test looks at the *input* text, not the progressively edited one, as in the original.
        if (p + " " in text or " " + p in text) or comma_rule:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Step 4 of the official evaluator: number words -> digits, articles dropped, contractions fixed."""
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _word_tokenize(text: str) -> str:
    text = text.lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


@lru_cache(maxsize=1 << 16)
def _normalize(text: str) -> str:
    text = _word_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    return process_digit_article(text)


@lru_cache(maxsize=1)
def _porter():
    try:
        from nltk.stem.porter import PorterStemmer
    except ImportError:
        raise UserError(
            "stemming (--stem, for OK-VQA v1.1's stemmed answers) needs NLTK, which is not installed; "
            "run: pip install nltk"
        ) from None
    return PorterStemmer()


def check_stemmer() -> None:
    """Raise the ``UserError`` that ``stem=True`` would raise, now (before hours of generation, not after)."""
    _porter()


@lru_cache(maxsize=1 << 16)
def _stem(normalized: str) -> str:
    stemmer = _porter()
    return " ".join(stemmer.stem(tok) for tok in normalized.split())


def normalize_answer(s: str, stem: bool = False) -> str:
    """Normalize an answer as the EvalAI processor / official VQA evaluator does (see module docstring).

    ``stem=True`` additionally Porter-stems each token (needs NLTK).
    """
    if not isinstance(s, str):
        raise TypeError(f"answer must be a string, got {type(s).__name__}: {s!r}")
    out = _normalize(s)
    return _stem(out) if stem else out


def vqa_score(prediction: str, answers: Sequence[str], stem: bool = False) -> float:
    """VQA accuracy of one prediction against its ground-truth answers, in [0, 1].

    Mean over the n leave-one-out subsets of ``min(1, matches / 3)``, matches counted after normalizing
    both sides with ``normalize_answer``. Needs at least one answer; a single answer always scores 0.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a single string")
    n = len(answers)
    if n == 0:
        raise ValueError("vqa_score needs at least one ground-truth answer")
    pred = normalize_answer(prediction, stem=stem)
    k = sum(normalize_answer(a, stem=stem) == pred for a in answers)
    # Leaving out one of the k matching answers leaves k-1 matches; leaving out any other leaves k.
    # Integer numerator over 3n: exactly mean_i min(1, m_i / 3), without float drift (2 of 10 -> 0.6).
    return (k * min(3, k - 1) + (n - k) * min(3, k)) / (3 * n) if k else 0.0


def _best(pred: str, target: str | Sequence[str], fn) -> float:
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("need at least one target answer")
    return max(fn(pred, t) for t in targets)


def exact_match(pred: str, target: str | Sequence[str], stem: bool = False) -> float:
    """1.0 if ``pred`` equals ``target`` after ``normalize_answer`` (best over a list of targets), else 0.0."""

    def one(p: str, t: str) -> float:
        return float(normalize_answer(p, stem=stem) == normalize_answer(t, stem=stem))

    return _best(pred, target, one)


def token_f1(pred: str, target: str | Sequence[str], stem: bool = False) -> float:
    """SQuAD-style token F1 on ``normalize_answer``-ed whitespace tokens (best over a list of targets).

    Two empty answers score 1.0; one empty answer scores 0.0.
    """

    def one(p: str, t: str) -> float:
        pt = normalize_answer(p, stem=stem).split()
        tt = normalize_answer(t, stem=stem).split()
        if not pt or not tt:
            return float(pt == tt)
        same = sum((Counter(pt) & Counter(tt)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(pt), same / len(tt)
        return 2 * precision * recall / (precision + recall)

    return _best(pred, target, one)

"""``llavatune predict`` — answer questions about images with any checkpoint.

    llavatune predict --model runs/okvqa --image cat.jpg --question "What is the cat doing?"
    llavatune predict --model runs/okvqa --image cat.jpg --question "..." --json
    llavatune predict --model runs/okvqa/checkpoint-500 --input questions.jsonl --out answers.jsonl

Any checkpoint kind works: a training output or ``checkpoint-N`` folder (LoRA / QLoRA adapter or full
weights), a merged or converted model, a llava-hf model folder or hub id. Batch mode reads JSON lines
``{"image": "a.jpg", "question": "..."}`` (extra fields such as ``id`` are copied to the output) and
writes the same rows with an ``answer`` field, in input order; answers are generated in left-padded
batches with the KV cache, through the same prompt builder (``Encoder``) as training, and the questions about
one image share one prefill of its image prefix (``--share_image_prefix``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llavatune.config import config, parse_config
from llavatune.data.images import ImageError, open_image
from llavatune.data.records import IMAGE_TOKEN, MAX_BAD_RECORDS, Turn, image_root, validate_data
from llavatune.infer.options import LoadOptions
from llavatune.utils import UserError, atomic_write_jsonl, check_output_file, resolve_under

logger = logging.getLogger("llavatune")


@dataclass
class Predictor:
    """A loaded checkpoint plus the prompt builder it was trained with."""

    model: Any
    processor: Any
    encoder: Any
    info: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def answer(self, queries: list, batch_size: int = 8, max_new_tokens: int = 128, stop: tuple[str, ...] = (),
               progress: Any = None, share_prefix: bool = True) -> list[str]:
        from llavatune.infer.generate import generate

        return generate(self.model, self.encoder, queries, batch_size, max_new_tokens, stop, progress=progress,
                        share_prefix=share_prefix)


def load_predictor(model: str, base_model: str | None = None, dtype: str = "auto", template: str | None = None,
                   quantized: bool | None = None, device: str = "auto") -> Predictor:
    """Load any checkpoint kind (see ``load_checkpoint``) and its prompt template, on ``device`` (``auto``: the
    GPU when there is one; 4-bit QLoRA bases are already placed by bitsandbytes and stay where they are)."""
    import torch

    from llavatune.data.encode import Encoder
    from llavatune.model.bnb import is_quantized
    from llavatune.model.loader import load_checkpoint

    if not model:
        raise UserError("--model is required (a training output, checkpoint-N folder, merged model or llava-hf id)")
    if device != "auto" and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    m, processor, info = load_checkpoint(model, dtype=dtype, base_model=base_model, quantized=quantized)
    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if not is_quantized(m):
        m = m.to(target)
    if getattr(processor, "image_processor", None) is None:
        raise UserError(f"{model}: no image processor found (processor_config.json / preprocessor_config.json); "
                        "re-export the model with 'llavatune merge' or copy the processor files from its base model")
    try:
        encoder = Encoder(processor, template=template or info.get("template", "auto"),
                          max_length=int(info.get("max_length", 4096)))
    except ValueError as e:
        raise UserError(f"{model}: {e}") from None
    return Predictor(m, processor, encoder, info)


def question_turns(question: str, n_images: int, history: list[tuple[str, str]] = ()) -> list[Turn]:
    """Conversation turns for a question (plus earlier ``(question, answer)`` pairs about the same image).

    The image placeholder goes at the start of the first question (``<image>\\n...``, the LLaVA-1.5
    convention) unless the question already places its ``<image>`` tokens itself.
    """
    questions = [q for q, _ in history] + [question]
    if not question or not question.strip():
        raise UserError("the question is empty")
    placed = sum(q.count(IMAGE_TOKEN) for q in questions)
    if placed and placed != n_images:
        raise UserError(f"the question holds {placed} {IMAGE_TOKEN} placeholder(s) for {n_images} image(s)")
    turns: list[Turn] = []
    for i, q in enumerate(questions):
        if i == 0 and n_images and not placed:
            q = (IMAGE_TOKEN + "\n") * n_images + q.strip()
        turns.append(Turn("human", q))
        if i < len(history):
            turns.append(Turn("gpt", history[i][1]))
    return turns


def open_checked_image(path: str | Path, what: str = "--image"):
    """The decoded image; a missing or unreadable one is a one-line error naming ``what`` and the file."""
    try:
        return open_image(path)
    except ImageError as e:
        raise UserError(f"{what}: {e}; pass a readable image file (JPEG, PNG, WebP, ...)") from None


def check_image(path: str | Path, what: str = "--image") -> Path:
    """Fail early, with the file named, on a missing or unreadable image."""
    open_checked_image(path, what)
    return Path(path)


def read_batch(path: str | Path, image_folder: str | Path | None = None,
               max_bad_records: float = MAX_BAD_RECORDS) -> tuple[list[dict], list, list[dict]]:
    """Rows of a ``{image, question}`` JSONL file, the queries of the usable ones, and the skipped rows.

    The rows go through the same validation as ``llavatune check`` / ``train`` (``purpose="predict"``): every image
    verified before the model loads, a row with problems skipped (it comes back with ``"answer": null`` and its
    ``"error"``, in input order) up to ``max_bad_records``, the file refused past that. Errors name ``file:line``.
    """
    from llavatune.infer.generate import Query

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--input: {p} does not exist")
    v = validate_data(p, image_folder, purpose="predict")
    usable = {id(r) for r in v.accept(max_bad_records)}
    for line in v.skip_report("predict --input"):
        logger.warning(line)
    root = image_root(p, image_folder)
    rows, queries, skipped = [], [], []
    for e in v.entries:
        if e.record is not None and id(e.record) in usable:
            rows.append(e.raw)
            queries.append(Query(e.record.conversations, [resolve_under(root, x) for x in e.record.images],
                                 str(e.raw.get("id", e.line))))
        else:
            raw = e.raw if isinstance(e.raw, dict) else {"input": e.raw}
            skipped.append({"order": e.index, **raw, "answer": None, "error": str(e.errors[0])})
    return rows, queries, skipped


@config
class PredictConfig(LoadOptions):
    image: Optional[str] = None
    """Image file to ask about (single mode)."""
    question: Optional[str] = None
    """Question about --image (single mode)."""
    input: Optional[str] = None
    """Batch mode: JSONL file of {"image": PATH, "question": TEXT} objects (other fields are copied to the output)."""
    out: Optional[str] = None
    """Batch mode: JSONL file to write the rows with their "answer" to (default: print them)."""
    image_folder: Optional[str] = None
    """Batch mode: folder image paths are relative to (default: the --input file's folder)."""
    json: bool = False
    """Single mode: print {"image", "question", "answer", "prompt"} as JSON instead of the bare answer ("prompt": the
    rendered generation prompt, as given to the tokenizer: no BOS, <image> unexpanded)."""
    batch_size: int = 8
    """Generation batch size in batch mode (left-padded, KV cache)."""
    share_image_prefix: bool = True
    """Batch mode: questions about the same image are answered from one prefill of the prompt up to and including
    its image tokens (vision tower once per image, KV cache reused; same greedy answers). 'false': each question
    from its full prompt."""
    max_new_tokens: int = 128
    """Maximum tokens generated per answer."""
    stop: Optional[str] = None
    """Comma-separated stop strings: the answer is cut at the first one."""
    overwrite: bool = False
    """Replace an existing --out file."""
    max_bad_records: float = MAX_BAD_RECORDS
    """Batch mode: rows with problems (a bad image, an empty question, ...) are skipped, answered with null and their
    error, up to this fraction of the file; past it the file is refused before the model loads."""


def predict(cfg: PredictConfig) -> list[dict]:
    """Run single or batch prediction; returns the output rows (each with an ``answer``)."""
    from llavatune.infer.generate import Query, parse_stop

    single = cfg.image is not None or cfg.question is not None
    if single == (cfg.input is not None):
        raise UserError("give either --question (with --image) for one answer, or --input JSONL for a batch")
    if cfg.out:
        check_output_file(cfg.out, {"--input": cfg.input, "--image": cfg.image}, "--out")
        if Path(cfg.out).exists() and not cfg.overwrite:
            raise UserError(f"--out: {cfg.out} exists; pass --overwrite to replace it")
    stop = parse_stop(cfg.stop)
    # Check every input before the (slow) model load.
    if single:
        if not cfg.question:
            raise UserError("--question is required with --image")
        paths = [check_image(cfg.image)] if cfg.image else []
        rows = [{"image": cfg.image, "question": cfg.question}] if cfg.image else [{"question": cfg.question}]
        queries = [Query(question_turns(cfg.question, len(paths)), paths)]
        skipped = []
    else:
        rows, queries, skipped = read_batch(cfg.input, cfg.image_folder, cfg.max_bad_records)
        if cfg.out:
            check_output_file(cfg.out, {"an image of --input": [q for qs in queries for q in qs.images]}, "--out")
    predictor = cfg.load_predictor()
    if single:
        answers = predictor.answer(queries, 1, cfg.max_new_tokens, stop)
    else:
        from tqdm.auto import tqdm

        with tqdm(total=len(queries), desc="predict", unit="question", disable=None) as bar:
            answers = predictor.answer(queries, cfg.batch_size, cfg.max_new_tokens, stop, progress=bar,
                                       share_prefix=cfg.share_image_prefix)
    out = [{**row, "answer": a} for row, a in zip(rows, answers)]
    if single and cfg.json:
        from llavatune.data.show import prompt_text

        out[0]["prompt"] = prompt_text(predictor.encoder, queries[0].turns)
    if not single and skipped:  # back in input order, with their error: nothing is dropped silently
        for row in skipped:
            out.insert(row.pop("order"), row)
    if cfg.out:
        atomic_write_jsonl(cfg.out, out)
    return out


def main(argv: list[str], prog: str) -> int:
    (cfg,) = parse_config([PredictConfig], argv, prog=prog, description=__doc__.split("\n\n")[0])
    rows = predict(cfg)
    if cfg.out:
        print(f"wrote {len(rows)} answers to {cfg.out}")
    elif cfg.input is not None:
        for r in rows:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif cfg.json:
        print(json.dumps(rows[0], ensure_ascii=False))
    else:
        print(rows[0]["answer"])
    return 0

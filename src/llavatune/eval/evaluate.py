"""``llavatune eval --model CKPT --data DATA [--out DIR]`` — generate answers in batches and score them.

    llavatune eval --model runs/okvqa/checkpoint-500 --data prepared/val/data.json --out runs/okvqa/eval
    torchrun --nproc_per_node 8 -m llavatune.cli eval --model ... --data ... --out ...   # sharded, gathered

Any checkpoint works: a final or intermediate adapter checkpoint, a merged model, a llava-hf model.
The data goes through the same validation as ``llavatune check`` (and ``train``) before the model loads: every
image is verified, records with problems are skipped and listed (in the log, in ``metrics.json`` and in
``OUT/skipped_records.jsonl``) up to ``--max_bad_records``, and a file past that, or one that is itself wrong, is
refused. A record is scored with VQA accuracy against its ``answers`` (as ``prepare okvqa`` keeps them) when it
has them, else by exact match against its last gpt turn. Writes ``predictions.jsonl`` and
``metrics.json`` (``vqa_accuracy`` in percent, 0-100, like the official evaluator). The same code runs
between epochs during ``train`` (``LlavaTrainer.evaluation_loop``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llavatune.config import CONFIG_FILE, ConfigError, config, parse_config, save_resolved
from llavatune.data.encode import Encoder
from llavatune.data.records import (
    IMAGE_TOKEN,
    MAX_BAD_RECORDS,
    Record,
    Turn,
    image_root,
    normalize_image_placement,
    validate_data,
)
from llavatune.eval.score import aggregate
from llavatune.eval.vqa_metric import check_stemmer, exact_match, token_f1, vqa_score
from llavatune.files import (
    EVAL_METRICS_FILE,
    EVAL_PREDICTIONS_DIR,
    IMAGE_CHECKS_FILE,
    PREDICTIONS_FILE,
    SKIPPED_FILE,
)
from llavatune.infer.generate import Query, generate, parse_stop
from llavatune.infer.options import LoadOptions
from llavatune.model.refs import resolve_model
from llavatune.utils import (
    UserError,
    atomic_write_json,
    atomic_write_jsonl,
    check_output_file,
    finish_distributed,
    resolve_under,
)

logger = logging.getLogger("llavatune")


@dataclass
class EvalSet:
    """Records ready for generation: prompts, image files and references."""

    records: list[Record]
    queries: list[Query]
    references: list[str | None]

    @classmethod
    def from_records(cls, records: list[Record], image_root: Path, max_questions: int | None = None) -> EvalSet:
        """One query per question: a grouped record (``prepare --group_by_image``) gives one per turn (see
        ``question_records``). ``max_questions``: keep the first N questions."""
        queries, refs = [], []
        records = [q for r in records for q in question_records(r)][:max_questions or None]
        for r in records:
            turns, ref = split_for_eval(r)
            if not turns or turns[-1].role != "human":
                raise UserError(f"record {r.ref}: nothing to answer (the conversation does not end with a question)")
            images = [resolve_under(image_root, p) for p in r.images]
            queries.append(Query(turns, images, r.ref))
            refs.append(ref)
        return cls(records, queries, refs)


def split_for_eval(rec: Record) -> tuple[list[Turn], str | None]:
    """Prompt turns (everything before the last answer) and that answer (the reference), for a record."""
    last = max((i for i, t in enumerate(rec.conversations) if t.role == "gpt"), default=None)
    if last is None:
        return list(rec.conversations), None
    return list(rec.conversations[:last]), rec.conversations[last].value


def question_records(rec: Record) -> list[Record]:
    """The questions of a record, each as its own single-question record for evaluation.

    A record written by ``prepare --group_by_image`` holds several questions about one image as turns, and each
    question's id and scoring fields (``question_id``, ``answers``, ``question_type``, ...) in its ``turns`` list.
    Evaluation asks each question on its own -- the image, then only that question, exactly the prompt the
    ungrouped record would give -- as VQA evaluation does (one question per query; the earlier answers are not
    shown), and scores it against its own answers. Any other record is one question: its last answer.
    """
    per_turn = rec.extra.get("turns")
    if per_turn is None:
        return [rec]
    system = [t for t in rec.conversations if t.role == "system"]
    turns = [t for t in rec.conversations if t.role != "system"]
    pairs = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    if (not isinstance(per_turn, list) or len(per_turn) != len(pairs) or len(turns) % 2
            or not all(isinstance(m, dict) for m in per_turn)
            or any(h.role != "human" or g.role != "gpt" for h, g in pairs)):
        raise UserError(f"{rec.source or 'data'}: record {rec.ref}: field 'turns' must hold one object per "
                        f"question/answer pair ({len(pairs)} here); re-create the file with 'llavatune prepare "
                        "--group_by_image' or remove the field")
    out = []
    n_images = len(rec.images)
    for k, ((h, g), meta) in enumerate(zip(pairs, per_turn)):
        question = h.value
        if IMAGE_TOKEN not in question:
            question = (IMAGE_TOKEN + "\n") * n_images + question
        meta = dict(meta)
        rid = str(meta.pop("id", f"{rec.id}-{k}"))
        out.append(Record(rid, system + [Turn("human", question), Turn(g.role, g.value)], list(rec.images),
                          {**meta, "record": rec.id}, rec.source, rec.index))
    return out


def score_record(rec: Record, prediction: str, reference: str | None, stem: bool = False) -> dict[str, Any]:
    answers = rec.extra.get("answers")
    row: dict[str, Any] = {}
    if isinstance(answers, list) and answers:
        answers = [a if isinstance(a, str) else str(a.get("answer", "")) for a in answers]
        row["score"] = vqa_score(prediction, answers, stem=stem)
        row["scored_by"] = "vqa"
    if reference is not None:
        em = exact_match(prediction, reference, stem=stem)
        if "score" not in row:  # no VQA answers: exact match is the score
            row.update(score=em, scored_by="exact_match")
        row["exact_match"] = em
        row["token_f1"] = token_f1(prediction, reference, stem=stem)
    return row


def score_predictions(eset: EvalSet, predictions: list[str], stem: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Per-record rows (for predictions.jsonl) and aggregate metrics."""
    rows, scores, meta = [], {}, {}
    em, f1 = [], []
    for rec, pred, ref in zip(eset.records, predictions, eset.references):
        s = score_record(rec, pred, ref, stem)
        row = {"id": rec.id, "question": eset.queries[len(rows)].turns[-1].value, "prediction": pred, "reference": ref}
        for k in ("question_id", "answers", "question_type", "answer_type", "record"):
            if k in rec.extra:
                row[k] = rec.extra[k]
        if rec.images:
            row["image"] = rec.images[0] if len(rec.images) == 1 else rec.images
        row.update(s)
        rows.append(row)
        if "score" in s:
            scores[rec.id] = s["score"]
            meta[rec.id] = {k: rec.extra[k] for k in ("question_type", "answer_type") if k in rec.extra}
        if "exact_match" in s:
            em.append(s["exact_match"])
            f1.append(s["token_f1"])
    metrics: dict[str, Any] = {"n": len(rows)}
    if scores:
        agg = aggregate(scores, meta)
        metrics.update({k: agg[k] for k in ("vqa_accuracy", "by_question_type", "by_answer_type")})
        metrics["n_scored"] = agg["n"]
    if em:
        metrics["exact_match"] = round(100 * sum(em) / len(em), 2)
        metrics["token_f1"] = round(100 * sum(f1) / len(f1), 2)
    return rows, metrics


def _init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@config
class EvalConfig(LoadOptions):
    data: Optional[str] = None
    """Evaluation data (LLaVA-format .json/.jsonl, e.g. the output of 'llavatune prepare')."""
    out: Optional[str] = None
    """Folder for predictions.jsonl and metrics.json (default: print metrics only)."""
    image_folder: Optional[str] = None
    """Folder image paths are relative to (default: the data file's folder)."""
    batch_size: int = 16
    """Generation batch size (left-padded, KV cache)."""
    max_new_tokens: int = 16
    """Maximum tokens generated per answer."""
    stop: Optional[str] = None
    """Comma-separated stop strings: the answer is cut at the first one."""
    max_samples: Optional[int] = None
    """Evaluate only the first N questions (each question of a grouped record counts)."""
    share_image_prefix: bool = True
    """Answer the questions about one image from one prefill of the prompt up to and including its image tokens
    (vision tower once per image, its KV cache reused; same greedy answers as without). 'false': every question
    from its full prompt."""
    stem: bool = False
    """Stem predictions and answers before matching (OK-VQA v1.1 answers are stemmed; needs nltk)."""
    overwrite: bool = False
    """Replace existing predictions/metrics in --out."""
    max_bad_records: float = MAX_BAD_RECORDS
    """Records with problems (what 'llavatune check' calls errors) are skipped and listed, up to this fraction of the
    file; past it the file is refused before the model loads."""
    image_workers: Optional[int] = None
    """Processes that verify the images before evaluation (default: one per available CPU core); with --out, the
    verdicts are remembered in OUT/image_checks.json."""

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.max_bad_records <= 1:
            raise ConfigError(f"--max_bad_records: a fraction in [0, 1], got {self.max_bad_records}")


def load_eval_records(data: str, image_folder: str | None, max_bad_records: float = MAX_BAD_RECORDS,
                      out: str | None = None, workers: int | None = None):
    """The usable records of an evaluation file, validated as ``check`` does (images verified), and the validation.
    Refuses the file past ``max_bad_records``."""
    from llavatune.data.images import VerdictCache

    cache = VerdictCache(Path(out) / IMAGE_CHECKS_FILE) if out else None
    v = validate_data(data, image_folder, purpose="eval", cache=cache, workers=workers)
    records = [normalize_image_placement(r) for r in v.accept(max_bad_records)]
    for line in v.skip_report("eval data"):
        logger.warning(line)
    return records, v, cache


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm


    if not cfg.model or not cfg.data:
        raise UserError("--model and --data are required")
    resolve_model(cfg.model, "--model")  # a typo'd path or an unreachable hub id: one line, before any work
    if cfg.stem:
        check_stemmer()
    if cfg.out:
        out = Path(cfg.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {cfg.out}: exists and is a file; give a folder for predictions.jsonl and metrics.json")
        for name in (PREDICTIONS_FILE, EVAL_METRICS_FILE, SKIPPED_FILE, IMAGE_CHECKS_FILE):
            check_output_file(out / name, {"--data": cfg.data}, "--out")
        if (out / EVAL_METRICS_FILE).exists() and not cfg.overwrite:
            raise UserError(f"{cfg.out}/metrics.json exists; pass --overwrite to replace it")
    records, validation, cache = load_eval_records(cfg.data, cfg.image_folder, cfg.max_bad_records, cfg.out,
                                                   cfg.image_workers)
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    root = image_root(cfg.data, cfg.image_folder)
    eset = EvalSet.from_records(records, root, max_questions=cfg.max_samples)
    _init_distributed()  # launched with torchrun: every rank answers a shard, answers are gathered
    world, rank = _world()
    predictor = cfg.load_predictor()
    model, encoder = predictor.model, predictor.encoder
    stop = parse_stop(cfg.stop)
    timing: dict[str, Any] = {}
    with tqdm(total=-(-len(eset.queries) // world), desc=f"eval (rank {rank})" if world > 1 else "eval",
              unit="sample", disable=rank != 0) as bar:
        preds = sharded_generate(model, encoder, eset.queries, cfg.batch_size, cfg.max_new_tokens, stop, progress=bar,
                                 share_prefix=cfg.share_image_prefix, stats=timing)
    rows, metrics = score_predictions(eset, preds, cfg.stem)
    skipped = [e.reject_row() for e in validation.bad]
    metrics = {"model": str(cfg.model), "data": str(cfg.data), **metrics, **timing, "skipped": len(skipped)}
    if skipped:
        metrics["skipped_records"] = [{k: r[k] for k in ("index", "id", "line", "reasons") if k in r} for r in skipped]
    if cfg.out and rank == 0:
        out = Path(cfg.out)
        atomic_write_jsonl(out / PREDICTIONS_FILE, rows)
        atomic_write_json(out / EVAL_METRICS_FILE, metrics)
        if skipped or (out / SKIPPED_FILE).exists():
            atomic_write_jsonl(out / SKIPPED_FILE, skipped)
        cache.save()
        save_resolved(out / CONFIG_FILE, {"eval": cfg})
    return metrics


def format_metrics(m: dict[str, Any]) -> str:
    parts = [f"{k} {m[k]:.2f}" for k in ("vqa_accuracy", "exact_match", "token_f1") if k in m]
    skipped = f" ({m['skipped']} record(s) with problems skipped, listed in the log)" if m.get("skipped") else ""
    return f"{m['n']} samples{skipped}: " + ", ".join(parts)


def main(argv: list[str], prog: str) -> int:
    (cfg,) = parse_config([EvalConfig], argv, prog=prog, description=__doc__.split("\n\n")[0])
    metrics = evaluate(cfg)
    if _world()[1] == 0:
        print(format_metrics(metrics))
        if cfg.out:
            print(f"wrote {cfg.out}/predictions.jsonl and {cfg.out}/metrics.json")
    finish_distributed()
    return 0


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def sharded_generate(model, encoder: Encoder, queries: list, batch_size: int, max_new_tokens: int,
                     stop: tuple[str, ...] = (), synced_gpus: bool = False, progress: Any = None,
                     share_prefix: bool = True, stats: dict[str, Any] | None = None) -> list[str]:
    """``generate`` over ``queries`` split across the ranks of a distributed run, answers gathered on every rank.

    Every rank gets the same number of queries (the last shard is padded with repeats, dropped after the
    gather) so that, under ZeRO-3, ranks run ``generate`` in lockstep (``synced_gpus``). Shards are contiguous,
    so the questions about one image mostly land on one rank and still share its prefix. ``stats`` receives
    ``generation_seconds`` (this rank's wall time in generation, image loading included), ``samples_per_second``
    (questions over that time; all ranks' questions over the slowest rank's time when distributed) and what
    ``generate`` reports about prefix sharing (this rank's).
    """
    import math
    import time

    import torch.distributed as dist

    world, rank = _world()
    gen_stats: dict[str, Any] = {}
    t = time.perf_counter()
    if world == 1:
        out = generate(model, encoder, queries, batch_size, max_new_tokens, stop, progress=progress,
                       share_prefix=share_prefix, stats=gen_stats)
        seconds = time.perf_counter() - t
    else:
        n = len(queries)
        per = math.ceil(n / world)
        idx = [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]
        local = generate(model, encoder, [queries[i] for i in idx], batch_size, max_new_tokens, stop,
                         synced_gpus=synced_gpus, progress=progress, share_prefix=share_prefix, stats=gen_stats)
        seconds = time.perf_counter() - t
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (seconds, list(zip(idx, local))))
        seconds = max(part[0] for part in gathered)
        by_index = dict(pair for part in gathered for pair in part[1])
        out = [by_index[i] for i in range(n)]
    if stats is not None:
        stats.update(generation_seconds=round(seconds, 3),
                     samples_per_second=round(len(queries) / seconds, 3) if seconds > 0 else None,
                     share_image_prefix=share_prefix and "share_prefix_off" not in gen_stats, **gen_stats)
    return out


def make_generation_eval(encoder: Encoder, eset: EvalSet, batch_size: int, max_new_tokens: int,
                         stop: tuple[str, ...], out_dir: Path, shown: int = 3, synced_gpus: bool = False,
                         share_prefix: bool = True):
    """The ``generation_eval(model, step)`` hook of ``LlavaTrainer``: generate on ``eset`` (sharded across ranks,
    gathered), score, write ``OUT/eval_predictions/step-N.jsonl`` (N: the global ``step``) and return the aggregate
    metrics (with ``generation_seconds`` and ``generation_samples_per_second``)."""

    def run(model, step: int) -> dict[str, float]:
        timing: dict[str, Any] = {}
        preds = sharded_generate(model, encoder, eset.queries, batch_size, max_new_tokens, stop, synced_gpus,
                                 share_prefix=share_prefix, stats=timing)
        rows, metrics = score_predictions(eset, preds)
        # "eval_samples_per_second" is the Trainer's own (loss pass) figure: this one is the generation's
        metrics.update(generation_seconds=timing["generation_seconds"],
                       generation_samples_per_second=timing["samples_per_second"])
        if _world()[1] == 0:
            atomic_write_jsonl(out_dir / EVAL_PREDICTIONS_DIR / f"step-{step}.jsonl", rows)
            for r in rows[:shown]:
                logger.info(f"  [{r['id']}] Q: {r['question'][:80]!r} -> {r['prediction']!r} (reference {r['reference']!r})")
        keep = ("vqa_accuracy", "exact_match", "token_f1", "generation_seconds", "generation_samples_per_second")
        return {k: v for k, v in metrics.items() if k in keep}

    return run

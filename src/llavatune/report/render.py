"""Turn ``RunData`` into report.html (self-contained gallery, plots as files under report/) and report.md."""

from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from llavatune.report.data import RunData
from llavatune.report.plots import INSTALL_HINT

THUMB = 160  # longest side of a gallery thumbnail, pixels


# ---------------------------------------------------------------------------------------------- content

def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def config_rows(data: RunData) -> list[tuple[str, str]]:
    m, d, me, t, e = (data.section(k) for k in ("model", "data", "method", "training", "eval"))
    meta = data.meta
    stage = me.get("stage") or meta.get("stage")
    method = meta.get("method") or (me.get("method") if stage != "pretrain" else "projector")
    rows: list[tuple[str, str]] = [
        ("model", str(m.get("model", "?")) + (f" (base: {meta['base_model']})" if meta.get("base_model")
                                            and meta.get("base_model") != m.get("model") else "")),
        ("stage", f"{stage} ({'projector pretraining' if stage == 'pretrain' else 'fine-tuning'})" if stage else "?"),
        ("method", str(method)),
    ]
    if method in ("lora", "qlora"):
        rows.append(("LoRA", f"r={me.get('lora_r')}, alpha={me.get('lora_alpha')}, dropout={me.get('lora_dropout')}"
                             + (f", targets {me['lora_target_modules']}" if me.get("lora_target_modules") else
                                ", all LLM linear layers")))
    if method == "qlora":
        q = meta.get("quantization") or {}
        rows.append(("quantization", f"{q.get('bits', me.get('bits'))}-bit {q.get('quant_type', me.get('bnb_4bit_quant_type'))}"
                                     f", double quant {fmt(q.get('double_quant', me.get('bnb_4bit_use_double_quant')))}"))
    if me.get("train_vision") and me.get("train_vision") != "frozen":
        rows.append(("vision tower", str(me["train_vision"])))
    rows += [
        ("training data", str(d.get("data", "?"))),
        ("validation data", str(d.get("val_data") or "none")),
        ("epochs", fmt(t.get("num_train_epochs")) + (f" (max_steps {t['max_steps']})" if (t.get("max_steps") or -1) > 0 else "")),
        ("learning rate", f"{fmt(t.get('learning_rate'))}, {t.get('lr_scheduler_type', '?')}, warmup {fmt(t.get('warmup_steps'))}"
                          + (f", projector {fmt(me['projector_lr'])}" if me.get("projector_lr") else "")),
        ("batch", f"{t.get('per_device_train_batch_size', '?')} per device x {t.get('gradient_accumulation_steps', 1)} accumulation"),
        ("max length", f"{fmt(d.get('max_length'))} tokens ({d.get('truncation', 'drop')} longer samples)"),
        ("template", str(meta.get("template") or d.get("template", "?"))),
        ("precision", "bf16 mixed precision" if t.get("bf16") else "fp16 mixed precision" if t.get("fp16")
         else f"weights dtype {m.get('dtype', 'auto')}, no mixed precision"),
        ("gradient checkpointing", fmt(bool(t.get("gradient_checkpointing")))),
        ("DeepSpeed", str(me.get("zero") or "no")),
        ("weight decay / grad clip", f"{fmt(t.get('weight_decay'))} / {fmt(t.get('max_grad_norm'))}"),
        ("seed", fmt(t.get("seed"))),
    ]
    if data.has_validation:
        rows.append(("best checkpoint by", f"{t.get('metric_for_best_model') or '?'} "
                                           f"({'higher' if t.get('greater_is_better', True) else 'lower'} is better)"))
        n = e.get("eval_max_samples")  # 0 or None: the whole validation set (EvalArgs.eval_max_samples)
        rows.append(("generation eval", f"{fmt(e.get('generation_eval'))}, "
                                        + (f"up to {fmt(n)} samples" if n else "all validation samples")))
    return rows


def status(data: RunData) -> str:
    if data.finished:
        s = data.summary_row or {}
        rt = s.get("train_runtime")
        return f"finished: {fmt(s.get('step'))} steps, {fmt(s.get('epoch'))} epochs" + (f" in {rt / 60:.1f} min" if rt else "")
    if data.train_rows:
        last = data.train_rows[-1]
        return f"in progress (or stopped): last log at step {fmt(last.get('step'))}, epoch {fmt(last.get('epoch'))}"
    return "no training logged yet"


def summary_rows(data: RunData) -> list[tuple[str, str]]:
    rows = []
    if data.train_rows:
        first, last = data.train_rows[0], data.train_rows[-1]
        rows.append(("training loss", f"{fmt(first.get('loss'))} (step {first.get('step')}) → "
                                      f"{fmt(last.get('loss'))} (step {last.get('step')})"))
    if data.summary_row and "train_loss" in data.summary_row:
        rows.append(("mean training loss", fmt(data.summary_row["train_loss"])))
    if data.eval_rows:
        last = data.eval_rows[-1]
        parts = [f"{k[5:]} {fmt(last[k])}" for k in ("eval_loss", "eval_vqa_accuracy", "eval_exact_match") if k in last]
        rows.append(("last evaluation", f"epoch {fmt(last.get('epoch'))}, step {last.get('step')}: " + ", ".join(parts)))
    if data.best:
        b = data.best
        rows.append(("best evaluation", f"epoch {fmt(b.get('epoch'))} (step {b.get('step')}): {b['metric'][5:]} = "
                                        f"{fmt(b.get('value'))}  [from {b['source']}]"))
        ckpt = data.run_dir / f"checkpoint-{b.get('step')}"
        if ckpt.is_dir():
            rows.append(("best checkpoint", ckpt.name + (" (restored as the final weights)"
                                                          if data.section("training").get("load_best_model_at_end") else "")))
    flagged = [r for r in data.eval_rows if r.get("eval_overfitting")]
    if data.has_validation:
        if flagged:
            rows.append(("overfitting", "flagged at " + ", ".join(f"epoch {fmt(r.get('epoch'))} (step {r.get('step')})" for r in flagged)
                         + f": validation loss rose {data.section('eval').get('overfit_patience', 2)} evaluations in a row "
                           "while training loss fell. Consider fewer epochs, a lower learning rate or --early_stopping_patience."))
        else:
            rows.append(("overfitting", "not flagged" if data.eval_rows else "no evaluation yet"))
    if data.torn_lines:
        rows.append(("note", f"{data.torn_lines} unreadable line(s) in metrics.jsonl ignored (a run still writing it?)"))
    return rows


EVAL_COLUMNS = [("epoch", "epoch"), ("step", "step"), ("eval_loss", "val loss"), ("eval_vqa_accuracy", "VQA acc. %"),
                ("eval_exact_match", "exact match %"), ("eval_token_f1", "token F1 %"), ("eval_overfitting", "overfitting")]


def eval_table(data: RunData) -> tuple[list[str], list[list[str]], int | None]:
    cols = [(k, n) for k, n in EVAL_COLUMNS if any(k in r for r in data.eval_rows)]
    rows, best_i = [], None
    for i, r in enumerate(data.eval_rows):
        cells = []
        for k, _ in cols:
            v = r.get(k)
            if k == "eval_overfitting":
                cells.append("⚠ yes" if v else "no")
            elif k == "eval_loss" and isinstance(v, float):
                cells.append(f"{v:.4f}")
            elif k.startswith("eval_") and isinstance(v, (int, float)):
                cells.append(f"{v:.2f}")
            else:
                cells.append(fmt(v))
        rows.append(cells)
        if data.best and r.get("step") == data.best.get("step"):
            best_i = i
    return [n for _, n in cols], rows, best_i


def clean_question(q: str) -> str:
    q = q.replace("<image>", "").strip()
    q = re.sub(r"\s*Answer the question using a single word or phrase\.?\s*$", "", q)
    return q.strip()


def verdict(row: dict) -> tuple[str, str]:
    """(label, css class): right / partly right / wrong, from the VQA score (or exact match)."""
    score = row.get("score", row.get("exact_match"))
    if score is None:
        return "unscored", "unscored"
    if score >= 0.999:
        return "right", "right"
    if score > 0:
        return f"partly ({score:.2f})", "partial"
    return "wrong", "wrong"


def ground_truth(row: dict) -> str:
    answers = row.get("answers")
    if isinstance(answers, list) and answers:
        common = Counter(str(a) for a in answers).most_common(3)
        main = common[0][0]
        others = [a for a, _ in common[1:]]
        return main + (f" (also: {', '.join(others)})" if others else "")
    return str(row.get("reference") or "–")


def gallery_rows(data: RunData, limit: int) -> list[dict]:
    """Up to ``limit`` prediction rows, wrong and right mixed as they come (the first N of the fixed subset)."""
    out = []
    for r in data.predictions[:limit]:
        img = r.get("image")
        if isinstance(img, list):
            img = img[0] if img else None
        label, css = verdict(r)
        out.append({"id": r.get("id"), "question": clean_question(str(r.get("question", ""))),
                    "prediction": str(r.get("prediction", "")), "truth": ground_truth(r), "verdict": label,
                    "css": css, "image": img})
    return out


def thumbnail(data: RunData, rel: str | None, out_dir: Path, idx: int) -> tuple[Path | None, bytes | None]:
    """A JPEG thumbnail of a validation image under ``out_dir`` (and its bytes); (None, None) if unreadable."""
    if not rel or data.image_root is None:
        return None, None
    from PIL import Image

    from llavatune.utils import UserError, resolve_under

    try:
        src = resolve_under(data.image_root, rel)  # refuses paths that escape the image folder
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, UserError):
        return None, None
    raw = buf.getvalue()
    path = out_dir / "gallery" / f"{idx:03d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)
    return path, raw


# ---------------------------------------------------------------------------------------------- params

def param_rows(data: RunData) -> tuple[str, list[list[str]]]:
    p = data.params
    if not p:
        return "not available (no params.txt and no weights files yet)", []
    head = (f"{p['trainable']:,} trainable of {p['total']:,} ({100 * p['trainable'] / max(1, p['total']):.2f} %) "
            f"— from {p['source']}")
    rows = [[k, f"{g['params']:,}", f"{g['trainable']:,}"] for k, g in p["groups"].items()]
    return head, rows


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b;
line-height:1.45}
main{max-width:1080px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.7rem;margin:.2em 0}h2{font-size:1.25rem;margin:1.6em 0 .5em;border-bottom:2px solid #dde2e8;
padding-bottom:.2em}
.sub{color:#5b6673;font-size:.95rem}
table{border-collapse:collapse;background:#fff;font-size:.92rem;margin:.4em 0}
td,th{border:1px solid #dde2e8;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#eef1f5}
table.kv td:first-child{font-weight:600;white-space:nowrap;color:#38424d}
tr.best td{background:#e6f4ea;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:14px}.plots img{background:#fff;border:1px solid #dde2e8;width:calc(50% - 9px);
min-width:320px;height:auto}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px;margin:.6em 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:10px;border-top:5px solid #999}
.card.right{border-top-color:#2e9d4f}.card.wrong{border-top-color:#d03b3b}.card.partial{border-top-color:#e3a21a}
.card img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;display:block;margin:0 auto 8px;
background:#eee}
.card .q{font-weight:600}.card .lbl{color:#5b6673;font-size:.85rem}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:.8rem;color:#fff;background:#999}
.right .badge{background:#2e9d4f}.wrong .badge{background:#d03b3b}.partial .badge{background:#e3a21a}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;margin:0 auto 8px;
background:#eee;color:#888;font-size:.8rem}
pre{background:#fff;border:1px solid #dde2e8;padding:8px;overflow:auto}
"""


def _kv_html(rows: list[tuple[str, str]]) -> str:
    return '<table class="kv">' + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _table_html(head: list[str], rows: list[list[str]], best: int | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        cls = ' class="best"' if i == best else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def render_html(data: RunData, plots: dict[str, Path], plots_missing: bool, gallery: list[dict],
                thumbs: list[bytes | None]) -> str:
    run = data.run_dir
    title = f"llavatune run report: {run.resolve().name}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body><main>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='sub'>{html.escape(str(run.resolve()))} · {html.escape(status(data))} · generated "
             f"{datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]
    parts.append("<h2>Results</h2>" + _kv_html(summary_rows(data)))
    if not data.has_validation:
        parts.append("<p class='note'>This run has no validation set (--val_data not given): there is no validation "
                     "loss, no accuracy and no prediction gallery. Only the training loss is shown.</p>")
    parts.append("<h2>Plots</h2>")
    if plots_missing:
        parts.append(f"<p class='note'>Plots need matplotlib: <code>{html.escape(INSTALL_HINT)}</code>, then "
                     f"<code>llavatune report {html.escape(str(run))}</code>. The tables below have the same numbers.</p>")
    elif not plots:
        parts.append("<p class='note'>Nothing to plot yet: no training loss has been logged.</p>")
    else:
        parts.append("<div class='plots'>" + "".join(
            f"<img src='{html.escape(p.relative_to(run).as_posix())}' alt='{html.escape(k)} plot'>"
            for k, p in plots.items()) + "</div>")
    if data.eval_rows:
        head, rows, best = eval_table(data)
        parts.append("<h2>Evaluations</h2>" + _table_html(head, rows, best)
                     + "<p class='sub'>Best row highlighted. Accuracies are percentages of the validation subset.</p>")
    elif data.has_validation:
        parts.append("<h2>Evaluations</h2><p class='note'>No evaluation has finished yet.</p>")
    head, prow = param_rows(data)
    parts.append("<h2>Trainable parameters</h2><p>" + html.escape(head) + "</p>")
    if prow:
        parts.append(_table_html(["group", "parameters", "trainable"], prow))
    parts.append("<h2>Configuration</h2>" + _kv_html(config_rows(data))
                 + "<p class='sub'>Everything else: llavatune_config.yaml in the run directory.</p>")
    if gallery:
        src = data.predictions_file.name if data.predictions_file else ""
        n_right = sum(1 for g in gallery if g["css"] == "right")
        parts.append(f"<h2>Validation gallery</h2><p class='sub'>{len(gallery)} predictions from eval_predictions/"
                     f"{html.escape(src)} ({n_right} right). Ground truth: the most common annotator answer (others in "
                     "brackets); right / partly / wrong is the VQA score, where an answer given by 3 or more "
                     "annotators counts as fully right.</p>"
                     "<div class='gallery'>")
        for g, raw in zip(gallery, thumbs):
            img = (f"<img src='data:image/jpeg;base64,{base64.b64encode(raw).decode()}' alt='{html.escape(str(g['image']))}'>"
                   if raw else "<div class='missing'>image not found</div>")
            parts.append(
                f"<div class='card {g['css']}'>{img}<div class='q'>{html.escape(g['question'])}</div>"
                f"<div><span class='lbl'>prediction:</span> {html.escape(g['prediction']) or '<i>(empty)</i>'}</div>"
                f"<div><span class='lbl'>ground truth:</span> {html.escape(g['truth'])}</div>"
                f"<div><span class='badge'>{html.escape(g['verdict'])}</span></div></div>")
        parts.append("</div>")
    elif data.has_validation:
        parts.append("<h2>Validation gallery</h2><p class='note'>No predictions yet (eval_predictions/ is empty; "
                     "generation eval runs at each evaluation when --generation_eval is on).</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- Markdown

def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]], best: int | None = None) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [_md_escape(c) for c in r]
        if i == best:
            cells = [f"**{c}**" for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_md(data: RunData, plots: dict[str, Path], plots_missing: bool, gallery: list[dict],
              thumb_paths: list[Path | None]) -> str:
    run = data.run_dir
    lines = [f"# llavatune run report: {run.resolve().name}", "", f"{status(data)} · `{run.resolve()}`", "",
             "## Results", "", _md_table(["", ""], [list(r) for r in summary_rows(data)]), ""]
    if not data.has_validation:
        lines += ["> This run has no validation set (--val_data not given): no validation loss, accuracy or "
                  "prediction gallery.", ""]
    lines += ["## Plots", ""]
    if plots_missing:
        lines += [f"> Plots need matplotlib: `{INSTALL_HINT}`, then `llavatune report {run}`.", ""]
    for k, p in plots.items():
        lines += [f"![{k}]({p.relative_to(run).as_posix()})", ""]
    if data.eval_rows:
        head, rows, best = eval_table(data)
        lines += ["## Evaluations", "", _md_table(head, rows, best), ""]
    head, prow = param_rows(data)
    lines += ["## Trainable parameters", "", head, ""]
    if prow:
        lines += [_md_table(["group", "parameters", "trainable"], prow), ""]
    lines += ["## Configuration", "", _md_table(["", ""], [list(r) for r in config_rows(data)]), ""]
    if gallery:
        lines += ["## Validation gallery", "", "| image | question | prediction | ground truth | verdict |",
                  "|---|---|---|---|---|"]
        for g, p in zip(gallery, thumb_paths):
            img = f"![{_md_escape(str(g['image']))}]({p.relative_to(run).as_posix()})" if p else "(image not found)"
            lines.append(f"| {img} | {_md_escape(g['question'])} | {_md_escape(g['prediction']) or '(empty)'} | "
                         f"{_md_escape(g['truth'])} | {g['verdict']} |")
        lines.append("")
    return "\n".join(lines)

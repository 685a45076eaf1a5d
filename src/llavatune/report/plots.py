"""PNG plots of a run (matplotlib, Agg backend; matplotlib is the optional ``report`` extra)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llavatune.report.data import RunData

INSTALL_HINT = "pip install 'llavatune[report]'"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _save(fig, path: Path) -> None:
    """Save atomically: a temp file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _x(rows: list[dict]) -> tuple[list[float], str]:
    """Epochs when the run logs them (fractional per step), else steps."""
    if rows and all(isinstance(r.get("epoch"), (int, float)) for r in rows):
        return [float(r["epoch"]) for r in rows], "epoch"
    return [float(r.get("step", i)) for i, r in enumerate(rows)], "step"


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str | None = None,
            best=None, legend: bool = False) -> Path:
    """Mark the best epoch, label the axes, add a grid (and a legend), save and close."""
    if best is not None:
        ax.axvline(float(best), color="#55a868", linestyle="--", linewidth=1, label="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


def make_plots(data: RunData, out_dir: Path) -> dict[str, Path]:
    """Write loss.png, accuracy.png (with validation) and learning_rate.png into ``out_dir``.

    Returns {name: path} of what was written; empty when matplotlib is missing. Raises nothing for a
    partial run: whatever rows exist are plotted.
    """
    if not have_matplotlib():
        return {}
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written: dict[str, Path] = {}
    series: dict[str, dict[str, list[float]]] = {}  # what each plot shows, also written as plot_data.json
    style = {"linewidth": 1.6}
    best = data.best.get("epoch") if data.best else None  # the best epoch, marked on loss and accuracy
    train = [r for r in data.train_rows if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in data.eval_rows if isinstance(r.get("eval_loss"), (int, float))]
    if train or evals:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
        if train:
            x, label = _x(train)
            series["training loss"] = {"x": x, "y": [r["loss"] for r in train], "step": [r.get("step") for r in train]}
            ax.plot(x, series["training loss"]["y"], color="#4c72b0", alpha=0.85, label="training loss", **style)
        if evals:
            x, label = _x(evals)
            series["validation loss"] = {"x": x, "y": [r["eval_loss"] for r in evals], "step": [r.get("step") for r in evals]}
            ax.plot(x, series["validation loss"]["y"], "o-", color="#dd8452", label="validation loss", **style)
            flagged = [(xi, r["eval_loss"]) for xi, r in zip(x, evals) if r.get("eval_overfitting")]
            if flagged:
                ax.scatter(*zip(*flagged), s=120, facecolors="none", edgecolors="#c44e52", linewidths=2,
                           label="overfitting flagged", zorder=5)
        written["loss"] = _finish(plt, fig, ax, out_dir / "loss.png", label, "loss", "Loss", best if evals else None,
                                    legend=True)
    metrics = [("eval_vqa_accuracy", "VQA accuracy", "#4c72b0"), ("eval_exact_match", "exact match", "#dd8452"),
               ("eval_token_f1", "token F1", "#8172b3")]
    present = [(k, n, c) for k, n, c in metrics if any(isinstance(r.get(k), (int, float)) for r in data.eval_rows)]
    if present:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
        for key, name, color in present:
            rows = [r for r in data.eval_rows if isinstance(r.get(key), (int, float))]
            x, label = _x(rows)
            series[name] = {"x": x, "y": [r[key] for r in rows], "step": [r.get("step") for r in rows]}
            ax.plot(x, series[name]["y"], "o-", color=color, label=name, **style)
        ax.set_ylim(-2, 102)
        written["accuracy"] = _finish(plt, fig, ax, out_dir / "accuracy.png", label, "% of validation answers",
                                      "Validation accuracy per evaluation", best, legend=True)
    lr = [r for r in data.train_rows if isinstance(r.get("learning_rate"), (int, float))]
    if lr:
        fig, ax = plt.subplots(figsize=(6.4, 2.4), layout="constrained")
        x, label = _x(lr)
        series["learning rate"] = {"x": x, "y": [r["learning_rate"] for r in lr], "step": [r.get("step") for r in lr]}
        ax.plot(x, series["learning rate"]["y"], color="#937860", **style)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        written["learning_rate"] = _finish(plt, fig, ax, out_dir / "learning_rate.png", label, "learning rate")
    from llavatune.utils import atomic_write_json

    atomic_write_json(out_dir / "plot_data.json", series)
    return written

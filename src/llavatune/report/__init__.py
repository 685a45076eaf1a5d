"""``llavatune report RUN_DIR``: the run report (report.html + report.md) of a training run.

    llavatune report runs/okvqa-lora
    llavatune report runs/okvqa-lora --gallery 48
    llavatune report report.yaml              # run_dir: runs/okvqa-lora, gallery: 48

``llavatune train`` writes it at the end of every run; this command regenerates it, also while a run is
still training (partial metrics.jsonl) or after it stopped. The report holds the config summary, trainable
parameters, loss / accuracy / learning-rate plots (PNG files under RUN_DIR/report/, needs matplotlib:
``pip install 'llavatune[report]'``), the evaluation table with the best epoch and overfitting flags, and a
gallery of validation images with question, prediction, ground truth and right/wrong.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from llavatune.config import ConfigError, config, parse_config
from llavatune.files import CONFIG_FILE, METRICS_FILE

logger = logging.getLogger("llavatune")

__all__ = ["write_report", "ReportArgs", "main"]


@config
class ReportArgs:
    run_dir: Optional[str] = None
    """The training output directory (the positional argument, or run_dir: in a YAML file)."""
    gallery: int = 24
    """Validation predictions shown in the gallery (from the latest eval_predictions/step-N.jsonl)."""


def write_report(run_dir: str | Path, params: str | None = None, gallery: int = 24) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/report.md`` (atomically) with plots under ``RUN_DIR/report/``.

    ``params``: ``loader.parameter_summary(model)`` of the live model (written to ``RUN_DIR/params.txt``);
    without it the counts come from params.txt of an earlier call, else from the weights files' headers.
    Returns the path of report.html.
    """
    from llavatune.report.data import load_run
    from llavatune.report.plots import have_matplotlib, make_plots
    from llavatune.report.render import gallery_rows, render_html, render_md, thumbnail
    from llavatune.utils import UserError, atomic_write_text

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run} is not a directory")
    if params:
        atomic_write_text(run / "params.txt", params.rstrip() + "\n")
    data = load_run(run)
    if not data.config and not data.train_rows and not data.eval_rows:
        raise UserError(f"{run} has neither {CONFIG_FILE} nor {METRICS_FILE}; is it a 'llavatune train' "
                        "output directory?")
    out = run / "report"
    out.mkdir(exist_ok=True)
    plots_missing = not have_matplotlib()
    plots = {} if plots_missing else make_plots(data, out)
    for stale in ("loss", "accuracy", "learning_rate"):  # a plot that no longer applies must not linger
        if stale not in plots and (out / f"{stale}.png").exists() and not plots_missing:
            (out / f"{stale}.png").unlink()
    rows = gallery_rows(data, gallery)
    thumbs = [thumbnail(data, g["image"], out, i) for i, g in enumerate(rows)]
    atomic_write_text(run / "report.html", render_html(data, plots, plots_missing, rows, [t[1] for t in thumbs]))
    atomic_write_text(run / "report.md", render_md(data, plots, plots_missing, rows, [t[0] for t in thumbs]))
    for name in ("report.html", "report.md", "params.txt"):  # temp files are created 0600; a report is for sharing
        if (run / name).exists():
            os.chmod(run / name, 0o644)
    return run / "report.html"


def main(argv: Sequence[str], prog: str) -> int:
    argv = list(argv)
    # llavatune report RUN_DIR [...] or, like every command, llavatune report CONFIG.yaml [RUN_DIR] [--flag ...]
    first = 1 if argv and argv[0].endswith((".yaml", ".yml")) and not Path(argv[0]).is_dir() else 0
    if len(argv) > first and not argv[first].startswith("-"):
        argv = [*argv[:first], "--run_dir", argv[first], *argv[first + 1:]]
    (args,) = parse_config([ReportArgs], argv, prog=prog, description=__doc__.split("\n\n")[0])
    if not args.run_dir:
        raise ConfigError("RUN_DIR: the training output directory is required (llavatune report RUN_DIR)")
    path = write_report(args.run_dir, gallery=args.gallery)
    from llavatune.report.plots import INSTALL_HINT, have_matplotlib

    print(f"wrote {path} and {path.with_suffix('.md')}")
    if not have_matplotlib():
        print(f"plots skipped: matplotlib is not installed ({INSTALL_HINT})")
    return 0

"""The names of the files llavatune writes into its output folders, in one place.

A training run (``train --output_dir RUN``)::

    RUN/llavatune_output.json     OUTPUT_MARKER: written first into every folder a command creates
    RUN/llavatune_run.json        RUN_FILE: the run's fingerprint and status (resume / finished / refused)
    RUN/llavatune_config.yaml     CONFIG_FILE: the resolved options (also in every checkpoint and every output)
    RUN/metrics.jsonl             METRICS_FILE: every log row (loss, lr, eval metrics), appended as it happens
    RUN/image_checks.json         IMAGE_CHECKS_FILE: remembered image verdicts (also eval's)
    RUN/skipped_records.jsonl     SKIPPED_FILE: every record skipped for a problem, with its reasons (also eval's)
    RUN/eval_predictions/step-N.jsonl   EVAL_PREDICTIONS_DIR: generated answers of each evaluation
    RUN/base_model/               BASE_MODEL_DIR: the built starting model (--model tiny / compose / --smoke)
    RUN/checkpoint-N/             each with META_FILE (llavatune_checkpoint.json: method, template, base model) and,
                                  for an adapter, BASE_CONFIG_FILE (the base model's config.json)

``eval --out`` writes PREDICTIONS_FILE and EVAL_METRICS_FILE; ``prepare --out`` PREPARE_REPORT_FILE and
PREPARE_REJECTS_FILE beside its ``data.json``.
"""

OUTPUT_MARKER = "llavatune_output.json"
CONFIG_FILE = "llavatune_config.yaml"
RUN_FILE = "llavatune_run.json"
META_FILE = "llavatune_checkpoint.json"
METRICS_FILE = "metrics.jsonl"
IMAGE_CHECKS_FILE = "image_checks.json"
SKIPPED_FILE = "skipped_records.jsonl"
EVAL_PREDICTIONS_DIR = "eval_predictions"
BASE_MODEL_DIR = "base_model"
BASE_CONFIG_FILE = "base_config.json"
PREDICTIONS_FILE = "predictions.jsonl"
EVAL_METRICS_FILE = "metrics.json"
PREPARE_REPORT_FILE = "prepare_report.json"
PREPARE_REJECTS_FILE = "rejects.jsonl"

"""The ``llavatune`` command line: one registry of subcommands.

    llavatune --help
    llavatune COMMAND --help

Each entry points at a module-level ``main(argv, prog) -> int`` that parses its config dataclasses
(see ``llavatune.config``) and calls a typed library function. Modules are imported only when their
command runs, so ``llavatune --help`` is instant and never imports torch. A command is listed here only
once it works end to end.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from typing import Sequence

# name -> (module with main(argv, prog), one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("llavatune.data.prepare", "convert OK-VQA / VQAv2 / CSV / JSONL / local HF datasets to LLaVA JSON"),
    "check": ("llavatune.data.check", "validate a dataset (images, records, placeholders, lengths) and report"),
    "train": ("llavatune.train.run", "train: stage 1 projector pretraining or stage 2 LoRA / QLoRA / full fine-tuning"),
    "eval": ("llavatune.eval.evaluate", "generate answers for a dataset with any checkpoint and score them (VQA accuracy)"),
    "score": ("llavatune.eval.score", "VQA accuracy of predictions against official VQA / OK-VQA annotations"),
    "report": ("llavatune.report", "regenerate a run's report.html / report.md: config, parameters, plots, best epoch, gallery"),
    "plan": ("llavatune.plan", "estimate peak GPU memory per device for a training setup, and what to change if it does not fit"),
    "synth": ("llavatune.data.synth", "generate LLaVA-Instruct-style conversations from captions and boxes with an OpenAI-compatible LLM"),
    "predict": ("llavatune.infer.predict", "answer a question about an image, or a JSONL batch of them, with any checkpoint"),
    "chat": ("llavatune.infer.chat", "interactive multi-turn chat about an image in the terminal, streamed"),
    "merge": ("llavatune.infer.merge", "merge a LoRA/QLoRA adapter into its base: a standalone llava-hf model"),
    "convert": ("llavatune.infer.convert", "convert an original haotian-liu/LLaVA checkpoint (or its LoRA output) to llava-hf"),
    "serve": ("llavatune.infer.serve", "local web chat (upload an image, ask) with a JSON API, on 127.0.0.1"),
    "demo": ("llavatune.demo", "the whole pipeline offline on built-in data: prepare, stage 1, stage 2 with eval, merge, predict"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: llavatune COMMAND [CONFIG.yaml] [--flag value ...]",
        "",
        "Fine-tune LLaVA-style vision-language models on your own image-question data.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run 'llavatune COMMAND --help' for a command's options."]
    return "\n".join(lines)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=K`` (or ``--local_rank K``) that DeepSpeed's launcher inserts before the
    command name (``deepspeed --num_gpus N --module llavatune.cli train ...`` runs ``llavatune.cli --local_rank=0
    train ...``); the rank goes to ``LOCAL_RANK`` if the launcher did not set it, where torch and accelerate read it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", argv[i])
        if m is None:
            out.append(argv[i])
            i += 1
            continue
        value = m.group(1)
        if value is None and i + 1 < len(argv) and argv[i + 1].isdigit():
            value = argv[i + 1]
            i += 1
        if value is not None:
            os.environ.setdefault("LOCAL_RANK", value)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from llavatune import __version__

        print(f"llavatune {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        hint = difflib.get_close_matches(name, COMMANDS, n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
        sys.stderr.write(f"llavatune: error: unknown command '{name}'{extra} (see 'llavatune --help')\n")
        return 2
    module_name, _ = COMMANDS[name]
    prog = f"llavatune {name}"
    from llavatune.config import ConfigError
    from llavatune.utils import UserError, setup_logging

    setup_logging()
    try:
        module = importlib.import_module(module_name)
        return int(module.main(rest, prog) or 0)
    except ConfigError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 2
    except UserError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 1
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2), already printed on one line
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

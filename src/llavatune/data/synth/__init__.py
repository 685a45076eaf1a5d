"""``llavatune synth``: LLaVA-Instruct-style instruction data from captions and boxes with any OpenAI-compatible LLM.

    llavatune synth --input captions_train2017.json --images train2017/ --kind conversation \\
                    --endpoint http://localhost:8000/v1 --model Qwen2.5-7B-Instruct --out synth/data.json

The LLaVA recipe: a text-only LLM never sees the image. Per image it gets a system message, a few
example (context -> ideal reply) pairs, then this image's captions and, for ``detail`` and ``complex``,
its object boxes as ``category: [x1, y1, x2, y2]`` normalized to 0-1 with 3 decimals. Its reply becomes
human/gpt turns with ``<image>`` at the start of the first human turn:

* ``conversation``: multi-turn Q&A parsed from ``Question: ... === Answer: ...`` blocks;
* ``detail``: the reply is the answer to one of :data:`DETAIL_INSTRUCTIONS` (chosen per image, always the
  same one for the same image);
* ``complex``: one reasoning question and its answer, from the same block format.

Inputs: COCO ``captions_*.json`` (+ ``instances_*.json`` for boxes; found beside the captions file when
not given) or JSONL ``{"image": ..., "captions": [...], "boxes": [{"category": ..., "bbox": [...]}]}``.

Robustness: ``--concurrency`` worker threads; retries with exponential backoff and jitter on 429, 5xx,
timeouts and dropped connections, honouring ``Retry-After``; every reply is appended to a JSONL cache
(flush + fsync per line) keyed by image, kind and a hash of the full request, so a rerun (after a kill,
Ctrl-C or failure) only asks for what is missing and a torn last line is ignored. Replies that cannot be
parsed go to ``OUT.rejects.jsonl`` with the reason; they never stop the run. The output is written once,
atomically, when every item has been tried.

Modules: ``prompts`` (system messages, few-shot examples, each image's context), ``inputs`` (COCO / JSONL images,
captions and boxes), ``replies`` (reply -> turns), ``cache`` (the reply cache), ``client`` (the HTTP client and its
retries), ``run`` (the options, the requests, the output); this one holds the command.
"""

from __future__ import annotations

import sys
from typing import Sequence

from llavatune.config import parse_config
from llavatune.data.synth.cache import ReplyCache
from llavatune.data.synth.client import (
    ChatClient,
    FatalRequestError,
    RequestFailed,
    Usage,
    chat_url,
    retry_after_seconds,
)
from llavatune.data.synth.inputs import Item, ItemError, Reject, load_items, normalize_box
from llavatune.data.synth.prompts import DETAIL_INSTRUCTIONS, KINDS, PromptSet, load_prompts, parse_examples
from llavatune.data.synth.replies import ReplyError, detail_instruction, parse_qa, reply_to_turns, strip_reasoning
from llavatune.data.synth.run import SynthArgs, SynthReport, run_synth

__all__ = ["KINDS", "DETAIL_INSTRUCTIONS", "SynthArgs", "SynthReport", "run_synth", "main", "PromptSet", "load_prompts",
           "parse_examples", "Item", "ItemError", "Reject", "load_items", "normalize_box", "ReplyError", "parse_qa", "reply_to_turns",
           "strip_reasoning", "detail_instruction", "ReplyCache", "ChatClient", "FatalRequestError", "RequestFailed",
           "Usage", "chat_url", "retry_after_seconds"]


def main(argv: Sequence[str], prog: str = "llavatune synth") -> int:
    (args,) = parse_config(
        [SynthArgs],
        argv,
        prog=prog,
        description="Generate LLaVA-Instruct-style instruction data (conversation, detail or complex) from image "
        "captions and object boxes with any OpenAI-compatible chat-completions server. Rerunning the same command "
        "resumes: finished replies are cached. Exit 0 when every item got a reply (malformed replies are listed in "
        "the .rejects.jsonl file), 1 when some requests failed.",
    )
    report = run_synth(args)
    if args.dry_run:
        return 0
    print(report.format())
    return 1 if report.failed else 0


if __name__ == "__main__":  # pragma: no cover
    from llavatune.cli import main as _cli

    raise SystemExit(_cli(["synth", *sys.argv[1:]]))

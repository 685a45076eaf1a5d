"""The ``synth`` run: its options, the requests (worker threads, the cache, the stop rules), and the output:
records the same validation ``train`` runs accepts, every other item in the rejects file with its reason."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llavatune.config import ConfigError, config
from llavatune.data.records import Record, record_problems, write_records
from llavatune.data.synth.cache import CACHE_VERSION, ReplyCache
from llavatune.data.synth.client import ChatClient, FatalRequestError, RequestFailed, Stopped, Usage, chat_url
from llavatune.data.synth.inputs import Item, Reject, load_items
from llavatune.data.synth.prompts import PromptSet, format_context, load_prompts
from llavatune.data.synth.replies import ReplyError, reply_to_turns
from llavatune.utils import (
    UserError,
    atomic_write_json,
    atomic_write_text,
    check_output_file,
    image_path_mode,
    logger,
    progress,
    rebase_image_path,
)


@config
class SynthArgs:
    input: str | None = None
    """captions to generate from (required): a COCO captions_*.json file, or a .jsonl file (or a .json list) of
    {"image": PATH, "captions": [...], "boxes": [{"category": NAME, "bbox": [...]}]} objects"""
    images: str | None = None
    """folder the image paths (COCO file_name, JSONL image) are relative to; paths escaping it are refused
    (default: the --input file's folder)"""
    kind: Literal["conversation", "detail", "complex"] = "conversation"
    """what to generate: 'conversation' (multi-turn Q&A from captions), 'detail' (a detailed description from
    captions and boxes) or 'complex' (one reasoning question and answer from captions and boxes)"""
    instances: str | None = None
    """COCO instances_*.json with the object boxes for --kind detail/complex (default: instances_SPLIT.json
    beside a captions_SPLIT.json input, when it exists)"""
    box_format: Literal["xywh", "xyxy", "xyxy_norm"] = "xywh"
    """JSONL boxes only: 'xywh' (pixels, COCO style), 'xyxy' (pixel corners) or 'xyxy_norm' (corners already
    in 0-1). Pixel boxes are normalized with the image size from the JSONL 'width'/'height' keys, else read
    from the image file"""
    out: str | None = None
    """output LLaVA JSON file (required, .json). Rejected items go to OUT with suffix .rejects.jsonl"""
    endpoint: str | None = None
    """base URL of an OpenAI-compatible server, e.g. http://localhost:8000/v1 (vLLM), http://localhost:8080/v1
    (llama.cpp), http://localhost:11434/v1 (Ollama), https://api.openai.com/v1 (default: $OPENAI_BASE_URL).
    A URL ending in /chat/completions is used as is"""
    api_key: str | None = None
    """API key sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY; none for local servers). Never
    written to any file"""
    model: str | None = None
    """model name sent to the server (required)"""
    system_prompt: str | None = None
    """text file replacing the built-in system message of --kind"""
    examples: str | None = None
    """file replacing the built-in few-shot examples of --kind: text with <<<user>>> / <<<assistant>>> marker
    lines, or a .json list of {"user": ..., "assistant": ...}; an empty file means no examples"""
    temperature: float = 0.7
    """sampling temperature sent to the server"""
    max_tokens: int = 1024
    """maximum reply length in tokens sent to the server"""
    seed: int | None = None
    """sampling seed sent to the server (servers that support it reply more reproducibly)"""
    concurrency: int = 8
    """requests in flight at once"""
    timeout: float = 120.0
    """seconds to wait for the server (per connect / read) before retrying"""
    max_retries: int = 6
    """retries per item on 429, 5xx, timeouts and dropped connections, after which the item is reported as
    failed (and asked again on the next run)"""
    backoff: float = 1.0
    """first retry delay in seconds; doubles each retry (with jitter) up to --max-backoff. A server's
    Retry-After header wins"""
    max_backoff: float = 60.0
    """longest retry delay in seconds (Retry-After excepted)"""
    max_consecutive_failures: int = 10
    """stop the run when this many items in a row failed after all retries (the server is probably down);
    finished items stay cached"""
    cache: str | None = None
    """append-only reply cache (default: OUT with suffix .synth-cache.jsonl). Rerunning with the same cache asks
    only for items without a reply; changing the prompts, captions, model or sampling options asks again"""
    retry_rejects: bool = False
    """ask again for items whose cached reply could not be parsed (by default such replies stay rejected and
    cost nothing on a rerun)"""
    limit: int | None = None
    """use only the first N usable images of the input (a quick trial run)"""
    price_in: float = 0.0
    """price per 1M prompt tokens, for the cost summary (in your currency, e.g. USD)"""
    price_out: float = 0.0
    """price per 1M completion tokens, for the cost summary"""
    dry_run: bool = False
    """build the prompts, print the first one and the counts, and stop without calling the server"""
    json: str | None = None
    """also write the run summary (counts, tokens, cost, reject reasons) to this JSON file"""

    def __post_init__(self):
        if not self.input:
            raise ConfigError("--input is required: a COCO captions_*.json file or a JSONL file of captions")
        if not self.out and not self.dry_run:
            raise ConfigError("--out is required: the LLaVA JSON file to write")
        if self.out and not self.out.endswith(".json"):
            raise ConfigError(f"--out {self.out}: the output is a LLaVA JSON list; give a path ending in .json")
        if not self.model:
            raise ConfigError("--model is required: the model name the server serves")
        for name in ("concurrency", "max_tokens", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries: must be 0 or more, got {self.max_retries}")
        for name in ("timeout", "backoff", "max_backoff", "price_in", "price_out", "temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must not be negative, got {getattr(self, name)}")
        if self.timeout == 0:
            raise ConfigError("--timeout: must be more than 0 seconds")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit: must be a positive number of images, got {self.limit}")


@dataclass
class Job:
    item: Item
    body: dict
    hash: str


def request_body(args: SynthArgs, messages: list[dict]) -> dict:
    body: dict[str, Any] = {
        "model": args.model,
        "messages": messages,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
    }
    if args.seed is not None:
        body["seed"] = args.seed
    return body


def request_hash(body: dict) -> str:
    """Hash of everything that shapes the reply (model, messages, sampling options)."""
    blob = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def build_jobs(args: SynthArgs, prompts: PromptSet, items: list[Item]) -> list[Job]:
    head = [{"role": "system", "content": prompts.system}]
    for user, assistant in prompts.examples:
        head += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    with_boxes = args.kind != "conversation"
    jobs = []
    for it in items:
        body = request_body(args, [*head, {"role": "user", "content": format_context(it, with_boxes)}])
        jobs.append(Job(it, body, request_hash(body)))
    return jobs


class _Requests:
    """One batch of requests: the worker's job (:meth:`ask`), and what the main thread keeps (:meth:`settle`):
    failures, failures in a row, usage, the reason to stop."""

    def __init__(self, args: SynthArgs, client: ChatClient, cache: ReplyCache, usage: Usage):
        self.args, self.client, self.cache, self.usage = args, client, cache, usage
        self.stop = threading.Event()
        self.failures: dict[str, str] = {}
        self.fatal: list[str] = []
        self.consecutive = 0

    def ask(self, job: Job) -> dict:
        """The server's reply to ``job``, appended to the cache here, in the worker: a reply that arrived is never
        lost, even on Ctrl-C."""
        try:
            resp = self.client.complete(job.body, self.stop)
        except FatalRequestError:
            self.stop.set()  # here, not in the main thread: no queued job may start after this
            raise
        choice = resp["choices"][0] if isinstance(resp["choices"][0], dict) else {}
        msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = msg.get("content") or choice.get("text")  # "text": legacy completions-style servers
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        entry = {
            "v": CACHE_VERSION,
            "kind": self.args.kind,
            "image": job.item.key,
            "hash": job.hash,
            "reply": content if isinstance(content, str) else "",
            "finish_reason": choice.get("finish_reason"),
            "usage": resp.get("usage"),
            "model": resp.get("model"),
            "time": round(time.time(), 3),
        }
        self.cache.append(entry)
        return entry

    def settle(self, fut, job: Job) -> None:
        """Record a finished request; stop the run on a fatal error or after too many failures in a row."""
        try:
            entry = fut.result()
        except Stopped:
            return
        except FatalRequestError as e:
            self.fatal.append(str(e))
            self.stop.set()
            return
        except RequestFailed as e:
            self.failures[job.item.key] = str(e)
            self.consecutive += 1
            if self.consecutive >= self.args.max_consecutive_failures and not self.stop.is_set():
                self.fatal.append(f"{self.consecutive} items in a row failed; the last: {e}")
                self.stop.set()
            return
        self.consecutive = 0
        self.usage.add(entry.get("usage"))

    def show(self, bar) -> None:
        bar.update(1)
        cost = self.usage.cost(self.args.price_in, self.args.price_out)
        post = {"tok_in": self.usage.prompt, "tok_out": self.usage.completion, "failed": len(self.failures)}
        if cost:
            post["cost"] = f"{cost:.4f}"
        bar.set_postfix(post, refresh=False)


def run_requests(
    args: SynthArgs, client: ChatClient, cache: ReplyCache, jobs: list[Job], usage: Usage
) -> dict[str, str]:
    """Ask the server for every job (``--concurrency`` in flight, at most twice as many queued); cache each reply as
    it arrives. Returns {image key: failure message}.

    Raises :class:`UserError` (after caching whatever finished) on a fatal server error or too many failures
    in a row.
    """
    if not jobs:
        return {}
    run = _Requests(args, client, cache, usage)
    bar = progress(total=len(jobs), desc=f"synth {args.kind}", unit="img")
    pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="synth")
    pending = iter(jobs)
    inflight: dict[Any, Job] = {}

    def fill() -> None:
        while len(inflight) < 2 * args.concurrency and not run.stop.is_set():
            job = next(pending, None)
            if job is None:
                return
            inflight[pool.submit(run.ask, job)] = job

    try:
        fill()
        while inflight:
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in done:
                run.settle(fut, inflight.pop(fut))
                run.show(bar)
            fill()
    except BaseException:  # Ctrl-C: let requests in flight land in the cache (a second Ctrl-C quits at once)
        run.stop.set()
        if inflight:
            logger.info(f"stopping: waiting for {len(inflight)} request(s) in flight (Ctrl-C again to quit now)")
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    if run.fatal:
        raise UserError(
            f"stopped: {run.fatal[0]}. {len(cache.entries)} replies are saved in {cache.path}; fix the problem and rerun "
            "the same command to continue where it stopped"
        )
    return run.failures


def _image_mode(out: Path, root: Path) -> tuple[str, str | None]:
    mode = image_path_mode(out.parent.resolve(), root)
    if mode != "keep":
        return mode, None
    return mode, (
        f"image paths in {out} are relative to {root} (not to {out.parent}): train and check with "
        f"--image-folder {root}, or write the output inside that folder"
    )


@dataclass
class SynthReport:
    out: str | None
    rejects: str | None
    cache: str | None
    kind: str
    model: str
    items: int = 0
    records: int = 0
    from_cache: int = 0
    requested: int = 0
    failed: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    http_requests: int = 0
    retries: int = 0
    http_errors: dict[str, int] = field(default_factory=dict)
    usage_run: dict[str, Any] = field(default_factory=dict)
    usage_all: dict[str, Any] = field(default_factory=dict)
    image_paths: str = ""
    image_folder_note: str | None = None
    prompts: str = "built-in"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def format(self) -> str:
        n_rej = sum(self.reject_reasons.values())
        lines = [f"synth {self.kind}: {self.items} image(s) -> {self.records} record(s) in {self.out}"]
        lines.append(
            f"  replies: {self.requested} new, {self.from_cache} from the cache ({self.cache}); "
            f"{self.http_requests} HTTP request(s), {self.retries} retr{'y' if self.retries == 1 else 'ies'}"
            + (f" ({', '.join(f'{k} x{v}' for k, v in sorted(self.http_errors.items()))})" if self.http_errors else "")
        )
        for label, u in (("this run", self.usage_run), ("every reply, cached included", self.usage_all)):
            line = f"  tokens ({label}): {u['prompt_tokens']:,} prompt + {u['completion_tokens']:,} completion"
            if u["cost"]:
                line += f", cost {u['cost']:.4f}"
            if u["replies_without_usage"]:
                line += f" ({u['replies_without_usage']} repl(ies) had no usage field)"
            lines.append(line)
        if n_rej:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reject_reasons.items(), key=lambda x: (-x[1], x[0])))
            lines.append(f"  rejected: {n_rej} ({reasons}) -> {self.rejects}")
        if self.failed:
            lines.append(f"  {self.failed} item(s) failed at the server; rerun the same command to ask for them again")
        lines.append(f"  image paths: {self.image_paths}")
        if self.image_folder_note:
            lines.append(f"  note: {self.image_folder_note}")
        return "\n".join(lines)


def _resolve_endpoint(args: SynthArgs) -> tuple[str, str | None]:
    endpoint = args.endpoint or os.environ.get("OPENAI_BASE_URL")
    if not endpoint and args.dry_run:
        return "(no --endpoint given)", None
    if not endpoint:
        raise ConfigError("--endpoint is required (or set OPENAI_BASE_URL), e.g. --endpoint http://localhost:8000/v1")
    return chat_url(endpoint), args.api_key or os.environ.get("OPENAI_API_KEY") or None


def _print_dry_run(args: SynthArgs, url: str, jobs: list[Job], todo: list[Job], rejects: list[Reject]) -> None:
    print(
        f"dry run: {len(jobs)} image(s) usable, {len(rejects)} rejected before asking, {len(todo)} to request from {url}"
    )
    if rejects:
        reasons = Counter(r.reason for r in rejects)
        print("  rejected: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    chars = sum(len(m["content"]) for j in todo for m in j.body["messages"])
    print(f"  prompts still to send: {chars:,} characters (roughly {chars // 4:,} tokens)")
    if jobs:
        j = (todo or jobs)[0]
        print(f"\nprompt for {j.item.key} (model {j.body['model']}):")
        for m in j.body["messages"]:
            print(f"----- {m['role']}\n{m['content']}")


def _usable_items(args: SynthArgs) -> tuple[list[Item], list[Reject]]:
    """The input's usable images and the ones rejected before asking; none usable is an error saying why."""
    items, pre_rejects = load_items(args)
    if not items:
        reasons = Counter(r.reason for r in pre_rejects)
        first = f"; first: {pre_rejects[0].where}: {pre_rejects[0].message}" if pre_rejects else ""
        summary = ", ".join(f"{k} {v}" for k, v in reasons.most_common()) or "the input is empty"
        raise UserError(f"no usable images in {args.input} ({summary}){first}")
    return items, pre_rejects


def _records_from_replies(args: SynthArgs, cache: ReplyCache, jobs: list[Job], failures: dict[str, str],
                          root: Path, out: Path, mode: str) -> tuple[list[Record], list[Reject], Usage]:
    """Every job's cached reply as a record (image path as the output needs it), or a reject with its reason; and the
    usage of every reply, cached ones included."""
    records: list[Record] = []
    rejects: list[Reject] = []
    usage_all = Usage()
    out_dir = out.parent.resolve()
    for job in jobs:
        it = job.item
        entry = cache.get(args.kind, it.key, job.hash)
        if entry is None:
            rejects.append(Reject("request-failed", failures.get(it.key, "no reply"), image=it.key, id=it.id,
                                  where=it.where))
            continue
        usage_all.add(entry.get("usage"))
        reply = entry.get("reply")
        try:
            turns = reply_to_turns(args.kind, it.key, reply or "", entry.get("finish_reason"))
        except ReplyError as e:
            rejects.append(Reject(e.reason, e.message, image=it.key, id=it.id, where=it.where, reply=reply))
            continue
        rec = Record(id=f"{it.id}-{args.kind}", conversations=turns,
                     images=[rebase_image_path(it.key, root, out_dir) if mode == "relative" else it.key])
        problems = record_problems(rec)
        if problems:  # defensive: never write a record `train` would refuse
            msg = "; ".join(f"{q.field}: {q.message}" for q in problems)
            rejects.append(Reject("invalid-record", msg, image=it.key, id=it.id, where=it.where, reply=reply))
            continue
        records.append(rec)
    return records, rejects, usage_all


def run_synth(args: SynthArgs) -> SynthReport:
    """Generate ``args.kind`` records for every image of ``args.input``; write ``args.out`` and its rejects."""
    url, api_key = _resolve_endpoint(args)
    prompts = load_prompts(args.kind, args.system_prompt, args.examples)
    out = Path(args.out) if args.out else None
    if out is not None:  # neither the output nor its rejects file may be the input (or a link to it)
        check_output_file(out, {"--input": args.input}, "--out")
        check_output_file(out.with_suffix(".rejects.jsonl"), {"--input": args.input}, f"--out {out} (its rejects file)")
    items, pre_rejects = _usable_items(args)
    jobs = build_jobs(args, prompts, items)
    cache_path = Path(args.cache) if args.cache else (out.with_suffix(".synth-cache.jsonl") if out else None)

    if args.dry_run:
        todo = jobs
        if cache_path and cache_path.is_file():
            with ReplyCache(cache_path) as cache:
                todo = [j for j in jobs if _needs_request(args, cache, j)]
        _print_dry_run(args, url, jobs, todo, pre_rejects)
        return SynthReport(out=None, rejects=None, cache=str(cache_path), kind=args.kind, model=str(args.model))

    assert out is not None and cache_path is not None
    root = (Path(args.images) if args.images else Path(args.input).parent).resolve()  # type: ignore[arg-type]
    mode, note = _image_mode(out, root)
    rejects_path = out.with_suffix(".rejects.jsonl")
    report = SynthReport(out=str(out), rejects=str(rejects_path), cache=str(cache_path), kind=args.kind,
                         model=str(args.model), prompts=prompts.source, image_folder_note=note)
    client = ChatClient(url, api_key, args.timeout, args.max_retries, args.backoff, args.max_backoff)
    usage_run = Usage()
    with ReplyCache(cache_path) as cache:
        todo = [j for j in jobs if _needs_request(args, cache, j)]
        report.from_cache = len(jobs) - len(todo)
        logger.info(
            f"{len(jobs)} image(s): {report.from_cache} from the cache, {len(todo)} to request from {url} "
            f"(model {args.model}, concurrency {args.concurrency})"
        )
        try:
            failures = run_requests(args, client, cache, todo, usage_run)
        finally:
            report.http_requests, report.retries = client.requests, client.retries
            report.http_errors = dict(client.errors)
        report.requested, report.failed = len(todo) - len(failures), len(failures)
        records, rejects, usage_all = _records_from_replies(args, cache, jobs, failures, root, out, mode)

    rejects = pre_rejects + rejects
    write_records(out, records)
    atomic_write_text(rejects_path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects))
    report.items, report.records = len(jobs), len(records)
    report.reject_reasons = dict(Counter(r.reason for r in rejects))
    report.usage_run = usage_run.to_dict(args.price_in, args.price_out)
    report.usage_all = usage_all.to_dict(args.price_in, args.price_out)
    report.image_paths = {
        "same": f"relative to {out.parent} (the image folder)",
        "relative": f"relative to {out.parent}",
        "keep": f"relative to {root}",
    }[mode]
    if args.json:
        atomic_write_json(args.json, report.to_dict())
    return report


def _needs_request(args: SynthArgs, cache: ReplyCache, job: Job) -> bool:
    entry = cache.get(args.kind, job.item.key, job.hash)
    if entry is None:
        return True
    if not args.retry_rejects:
        return False
    try:
        reply_to_turns(args.kind, job.item.key, entry.get("reply") or "", entry.get("finish_reason"))
    except ReplyError:
        return True
    return False

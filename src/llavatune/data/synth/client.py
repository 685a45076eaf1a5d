"""The HTTP client of ``synth``: chat-completion requests to any OpenAI-compatible server with the standard library,
retried with exponential backoff and jitter on 429, 5xx, timeouts and dropped connections, honouring
``Retry-After``; errors every request would hit (a bad key, a wrong URL or model) stop the run."""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any

from llavatune.config import ConfigError
from llavatune.utils import UserError

_RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
_FATAL_STATUS = {401, 402, 403, 404}  # bad key, no credit, no access, wrong URL or model: every item would fail
_MAX_RETRY_AFTER = 600.0

class Stopped(Exception):
    """The run is stopping (Ctrl-C or a fatal error elsewhere)."""


class FatalRequestError(UserError):
    """An error every request would hit (bad key, wrong URL or model, no credit): stop the run."""


class RequestFailed(Exception):
    """One item failed after all retries (or with a non-retryable status)."""


def chat_url(endpoint: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000/v1/chat/completions`` (a bare host gets ``/v1``)."""
    url = endpoint.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--endpoint {endpoint!r}: give an http(s) URL such as http://localhost:8000/v1")
    if url.endswith("/chat/completions"):
        return url
    if not parts.path:
        url += "/v1"
    return url + "/chat/completions"


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        err = json.loads(text).get("error")
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    text = " ".join(text.split())
    return text[:300] + ("..." if len(text) > 300 else "")


@dataclass
class Usage:
    prompt: int = 0
    completion: int = 0
    without_usage: int = 0  # replies whose response had no usage field

    def add(self, usage: Any) -> None:
        try:
            prompt, completion = int(usage["prompt_tokens"] or 0), int(usage.get("completion_tokens") or 0)
        except (TypeError, KeyError, ValueError, AttributeError):
            self.without_usage += 1
            return
        self.prompt += prompt
        self.completion += completion

    def cost(self, price_in: float, price_out: float) -> float:
        return (self.prompt * price_in + self.completion * price_out) / 1e6

    def to_dict(self, price_in: float, price_out: float) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "replies_without_usage": self.without_usage,
            "cost": round(self.cost(price_in, price_out), 6),
        }


class ChatClient:
    """POSTs chat-completion requests with the stdlib; retries with backoff. Thread-safe."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        backoff: float,
        max_backoff: float,
    ):
        self.url, self.timeout, self.max_retries = url, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.errors: Counter[str] = Counter()  # "429", "500", "timeout", ... over all attempts

    def _count(self, error: str | None = None, retry: bool = False) -> None:
        with self._lock:
            if error is None:
                self.requests += 1
            else:
                self.errors[error] += 1
            if retry:
                self.retries += 1

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, _MAX_RETRY_AFTER)
        base = min(self.max_backoff, self.backoff * (2**attempt))
        return base / 2 + random.uniform(0, base / 2)  # "equal jitter": spread retries of parallel workers

    def complete(self, body: dict, stop: threading.Event) -> dict:
        """The server's JSON response to ``body``; raises RequestFailed, FatalRequestError or Stopped."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise Stopped()
            self._count()
            retry_after = None
            req = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    out = json.loads(raw)
                    if not isinstance(out, dict) or not isinstance(out.get("choices"), list) or not out["choices"]:
                        raise ValueError("no 'choices' in the response")
                    return out
                except ValueError as e:
                    last, kind = f"unusable response ({e}): {_error_text(raw)}", "bad-response"
            except urllib.error.HTTPError as e:
                status = e.code
                try:
                    detail = _error_text(e.read())
                except Exception:  # noqa: BLE001 - the body is only for the message
                    detail = ""
                last, kind = f"HTTP {status}: {detail or e.reason}", str(status)
                if status in _FATAL_STATUS or (status == 429 and "insufficient_quota" in detail):
                    self._count(kind)
                    raise FatalRequestError(f"{self.url} refused the request: {last}") from None
                if status not in _RETRY_STATUS and status < 500:
                    self._count(kind)
                    raise RequestFailed(last) from None
                retry_after = retry_after_seconds(e.headers)
            except (TimeoutError, socket.timeout):
                last, kind = f"no response within --timeout {self.timeout:g} s", "timeout"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last, kind = f"no response within --timeout {self.timeout:g} s", "timeout"
                else:
                    last, kind = f"connection failed: {reason}", "connection"
            retry = attempt < self.max_retries
            self._count(kind, retry=retry)
            if not retry:
                break
            if stop.wait(self.delay(attempt, retry_after)):
                raise Stopped()
        raise RequestFailed(f"{last} (after {self.max_retries + 1} attempt(s))")

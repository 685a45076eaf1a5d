"""``llavatune serve --model CKPT [--host 127.0.0.1] [--port 7860]`` — a local web chat.

    llavatune serve --model runs/okvqa
    # open http://127.0.0.1:7860, upload an image, ask

A dependency-free page served by the standard library (``http.server``): upload an image, ask, read the
answer, ask follow-up questions about the same image. Bound to 127.0.0.1 unless ``--host`` says otherwise
(there is no authentication: expose it to a network only behind something that adds it).

Endpoints:

- ``GET /`` the chat page;
- ``GET /api/health`` -> ``{"status": "ok", "model": ...}``;
- ``POST /api/predict`` with ``multipart/form-data`` (``image`` file, ``question``, optional ``history``
  as a JSON list of ``[question, answer]`` pairs, optional ``max_new_tokens``) or JSON
  ``{"image": BASE64 or data: URL, "question": ..., "history": [...]}`` -> ``{"answer": ...}``;
  errors -> ``{"error": ...}`` with status 400 (bad input), 413 (too large) or 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import socket
import tempfile
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from llavatune.config import config, parse_config
from llavatune.infer.options import LoadOptions
from llavatune.infer.predict import Predictor, check_image, question_turns
from llavatune.utils import UserError

logger = logging.getLogger("llavatune")
MAX_BODY = 32 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llavatune chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:52rem;margin:1.5rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.3rem} #model{color:#666;font-size:.85rem}
 #wrap{display:flex;gap:1rem;flex-wrap:wrap} #left{flex:0 0 16rem} #right{flex:1 1 20rem}
 #preview{max-width:16rem;max-height:16rem;border:1px solid #ccc;display:none;margin-top:.5rem}
 #log{border:1px solid #ddd;border-radius:6px;min-height:12rem;padding:.5rem;margin-bottom:.5rem;overflow-y:auto;max-height:28rem}
 .q{margin:.4rem 0;font-weight:600} .a{margin:.2rem 0 .8rem 0;white-space:pre-wrap} .err{color:#b00}
 form{display:flex;gap:.5rem} #question{flex:1;padding:.4rem} button{padding:.4rem .8rem}
</style></head>
<body>
<h1>llavatune chat</h1><div id="model">model: __MODEL__</div>
<div id="wrap">
 <div id="left"><label>Image <input type="file" id="image" name="image" accept="image/*" form="ask"></label>
  <img id="preview" alt="uploaded image"><p><button type="button" id="reset">New conversation</button></p></div>
 <div id="right"><div id="log"></div>
  <form id="ask" method="post" action="/predict" enctype="multipart/form-data">
   <input id="question" name="question" placeholder="Ask about the image..." autocomplete="off">
   <button id="send" type="submit">Ask</button></form></div>
</div>
<script>
let history = [];
const $ = (id) => document.getElementById(id);
function add(cls, text){const d=document.createElement('div');d.className=cls;d.textContent=text;$('log').appendChild(d);
 $('log').scrollTop=$('log').scrollHeight;return d;}
$('image').addEventListener('change', () => {const f=$('image').files[0]; history=[]; $('log').innerHTML='';
 if(f){$('preview').src=URL.createObjectURL(f);$('preview').style.display='block';}});
$('reset').addEventListener('click', () => {history=[]; $('log').innerHTML='';});
$('ask').addEventListener('submit', async (ev) => {
 ev.preventDefault(); const q=$('question').value.trim(); if(!q) return;
 const fd=new FormData(); const f=$('image').files[0]; if(f) fd.append('image', f);
 fd.append('question', q); fd.append('history', JSON.stringify(history));
 add('q', q); const a=add('a','...'); $('question').value=''; $('send').disabled=true;
 try{const r=await fetch('/api/predict',{method:'POST',body:fd}); const j=await r.json();
  if(r.ok){a.textContent=j.answer; history.push([q,j.answer]);} else {a.textContent=j.error; a.className='a err';}}
 catch(e){a.textContent=String(e); a.className='a err';}
 $('send').disabled=false; $('question').focus();
});
</script></body></html>
"""


def _parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """``multipart/form-data`` -> {name: str, or bytes for file parts} (stdlib ``email`` parser)."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise BadRequest("malformed multipart/form-data body")
    fields: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            fields[name] = payload
        else:
            fields[name] = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
    return fields


def _decode_b64_image(value: str) -> bytes:
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        raise BadRequest("field 'image' is not valid base64") from None


def _history(value: Any) -> list[tuple[str, str]]:
    if value in (None, ""):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRequest("field 'history' must be a JSON list of [question, answer] pairs") from None
    ok = isinstance(value, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value)
    if not ok:
        raise BadRequest("field 'history' must be a list of [question, answer] pairs")
    return [(q, a) for q, a in value]


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, predictor: Predictor, max_new_tokens: int = 256, model_name: str = ""):
        self.predictor = predictor
        self.max_new_tokens = max_new_tokens
        self.model_name = model_name
        self.lock = threading.Lock()  # one generation at a time: the model is shared
        self.tmp = tempfile.TemporaryDirectory(prefix="llavatune-serve-")
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def server_close(self):
        super().server_close()
        self.tmp.cleanup()

    def answer(self, image: bytes | None, question: str, history: list[tuple[str, str]],
               max_new_tokens: int | None = None) -> str:
        from llavatune.infer.generate import Query

        paths = []
        if image:
            fd, name = tempfile.mkstemp(dir=self.tmp.name, suffix=".img")
            with os.fdopen(fd, "wb") as f:
                f.write(image)
            try:
                paths = [check_image(name, "image")]
            except UserError as e:
                os.unlink(name)
                raise BadRequest(str(e).replace(name, "uploaded image")) from None
        try:
            try:
                turns = question_turns(question, len(paths), history)
            except UserError as e:
                raise BadRequest(str(e)) from None
            n = max(1, min(int(max_new_tokens or self.max_new_tokens), 4096))
            with self.lock:
                return self.predictor.answer([Query(turns, paths)], 1, n)[0]
        finally:
            for p in paths:
                Path(p).unlink(missing_ok=True)


class Handler(BaseHTTPRequestHandler):
    server: ChatServer
    server_version = "llavatune"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            import html

            page = PAGE.replace("__MODEL__", html.escape(self.server.model_name))
            self._send(200, page.encode(), "text/html; charset=utf-8")
        elif path == "/api/health":
            self._json(200, {"status": "ok", "model": self.server.model_name})
        else:
            self._json(404, {"error": f"no such page: {path}"})

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in ("/api/predict", "/predict"):
            self._json(404, {"error": f"no such endpoint: {path}"})
            return
        try:
            fields = self._read_fields()
            question = fields.get("question")
            if not isinstance(question, str) or not question.strip():
                raise BadRequest("field 'question' is missing or empty")
            image = fields.get("image")
            if isinstance(image, str):
                image = _decode_b64_image(image) if image else None
            mnt = fields.get("max_new_tokens")
            try:
                mnt = int(mnt) if mnt not in (None, "") else None
            except (TypeError, ValueError):
                raise BadRequest("field 'max_new_tokens' must be an integer") from None
            answer = self.server.answer(image, question, _history(fields.get("history")), mnt)
        except BadRequest as e:
            self._reply_error(path, e.status, str(e))
            return
        except Exception as e:  # keep serving; tell the client
            logger.exception("generation failed")
            self._reply_error(path, 500, f"generation failed: {type(e).__name__}: {e}")
            return
        if path == "/predict":  # plain HTML form without JavaScript
            import html

            body = (f"<!doctype html><meta charset='utf-8'><title>answer</title><p><b>Q:</b> {html.escape(question)}"
                    f"<p><b>A:</b> {html.escape(answer)}<p><a href='/'>ask another</a>")
            self._send(200, body.encode(), "text/html; charset=utf-8")
        else:
            self._json(200, {"answer": answer})

    def _reply_error(self, path: str, status: int, message: str) -> None:
        if path == "/predict":
            import html

            self._send(status, f"<!doctype html><p>error: {html.escape(message)}".encode(), "text/html; charset=utf-8")
        else:
            self._json(status, {"error": message})

    def _read_fields(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if length > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY // (1024 * 1024)} MiB", 413)
        body = self.rfile.read(length) if length > 0 else b""
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            return _parse_multipart(ctype, body)
        if ctype.startswith("application/json") or body[:1] == b"{":
            try:
                obj = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequest("body is not valid JSON") from None
            if not isinstance(obj, dict):
                raise BadRequest("JSON body must be an object like {\"image\": BASE64, \"question\": ...}")
            return obj
        if ctype.startswith("application/x-www-form-urlencoded"):
            from urllib.parse import parse_qs

            return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        raise BadRequest("send multipart/form-data (image file + question) or JSON {\"image\": BASE64, \"question\": ...}")


def make_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 7860, max_new_tokens: int = 256,
                model_name: str = "") -> ChatServer:
    """Bind (port 0 picks a free port; see ``server.url``). Call ``serve_forever()`` to run it."""
    cls = ChatServer
    if ":" in host:
        cls = type("ChatServer6", (ChatServer,), {"address_family": socket.AF_INET6})
    try:
        return cls((host, port), predictor, max_new_tokens, model_name)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None


@config
class ServeConfig(LoadOptions):
    host: str = "127.0.0.1"
    """Address to listen on. The default accepts connections from this machine only; 0.0.0.0 exposes the
    (unauthenticated) page to the network."""
    port: int = 7860
    """Port to listen on (0: any free port)."""
    max_new_tokens: int = 256
    """Default maximum tokens per answer (a request may ask for fewer or more, up to 4096)."""


def main(argv: list[str], prog: str) -> int:
    (cfg,) = parse_config([ServeConfig], argv, prog=prog, description=__doc__.split("\n\n")[0])
    if not cfg.model:
        raise UserError("--model is required")
    predictor = cfg.load_predictor()
    server = make_server(predictor, cfg.host, cfg.port, cfg.max_new_tokens, str(cfg.model))
    if cfg.host not in LOOPBACK:
        logger.warning(f"listening on {cfg.host}: anyone who can reach this machine can use the model")
    print(f"llavatune serve: {cfg.model} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


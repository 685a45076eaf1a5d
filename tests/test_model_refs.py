"""Model references in every command: a path that does not exist, an unreachable or offline hub, a cached hub id.

A reference that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, or ``runs/x`` when ``runs/`` exists) is
local and fails at once with "no such folder" (it used to be sent to the hub: ~53 s of retries, then a traceback);
a hub id the hub cannot serve fails in one attempt with one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from llavatune.cli import main
from llavatune.model import refs

HUB = "llava-hf/llava-1.5-7b-hf"
UNSHIPPED = "someone/llava-7b-copy"  # plan knows HUB's shapes offline (plan.hub_configs): it asks the hub for this one


@pytest.fixture(autouse=True)
def _fresh_probe_cache():
    refs._hub_problem.cache_clear()
    yield
    refs._hub_problem.cache_clear()


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode with the hub at a local port nobody listens on: every request is refused at once (no network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


@pytest.fixture
def inputs(shapes, tmp_path) -> dict:
    img = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), "red").save(img)
    return {"train": str(shapes["train"]), "val": str(shapes["val"]), "image": str(img), "tmp": tmp_path}


def commands(ref: str, x: dict) -> dict[str, list[str]]:
    t = x["tmp"]
    return {
        "train": ["train", "--model", ref, "--data", x["train"], "--output_dir", str(t / "o"), "--report_to", "none"],
        "train compose": ["train", "--model", "compose", "--vision_model", ref, "--language_model", ref, "--data",
                          x["train"], "--output_dir", str(t / "o2"), "--report_to", "none"],
        "eval": ["eval", "--model", ref, "--data", x["val"], "--out", str(t / "e")],
        "predict": ["predict", "--model", ref, "--image", x["image"], "--question", "What color?"],
        "predict --base_model": ["predict", "--model", str(t / "adapter"), "--base_model", ref, "--image", x["image"],
                                 "--question", "What color?"],
        "chat": ["chat", "--model", ref, "--image", x["image"]],
        "serve": ["serve", "--model", ref, "--port", "0"],
        "merge": ["merge", "--model", ref, "--out", str(t / "m")],
        "convert": ["convert", "--from-original", ref, "--out", str(t / "c")],
        "check": ["check", x["val"], "--model", ref],
        "plan": ["plan", "--model", UNSHIPPED if ref == HUB else ref],
    }


def _adapter(tmp: Path) -> None:
    """A minimal adapter folder, so that --base_model is what gets resolved."""
    (tmp / "adapter").mkdir(exist_ok=True)
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": HUB}))


def _run(argv, capsys) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err, time.perf_counter() - t0


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if ": error:" in x]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name", list(commands("x", {"train": "", "val": "", "image": "", "tmp": Path()})))
def test_a_relative_path_that_does_not_exist_fails_at_once(name, inputs, capsys, monkeypatch):
    monkeypatch.chdir(inputs["tmp"])
    Path("runs").mkdir()  # runs/ exists, runs/typo_model does not: a path, never a hub id
    _adapter(inputs["tmp"])
    rc, err, seconds = _run(commands("runs/typo_model", inputs)[name], capsys)
    line = _one_line(err)
    assert rc != 0 and "runs/typo_model: no such folder" in line, line
    assert seconds < 20


@pytest.mark.parametrize("ref", ["./no/such/model", "~/no-such-model-dir-xyz", "a/b/c"])
def test_path_like_references_are_local(ref, capsys):
    assert refs.looks_local(ref)
    with pytest.raises(refs.UserError, match="no such folder"):
        refs.resolve_model(ref)


def test_hub_ids_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refs.is_hub_id(HUB) and not refs.looks_local(HUB)
    (tmp_path / "llava-hf").mkdir()  # a local folder with the owner's name: the reference is now a local path
    assert refs.looks_local(HUB)
    with pytest.raises(refs.UserError, match="no such folder, and not a hub id"):
        refs.resolve_model("no-such-bare-name")


@pytest.mark.parametrize("name", list(commands("x", {"train": "", "val": "", "image": "", "tmp": Path()})))
def test_unreachable_hub_is_one_line_in_one_attempt(name, inputs, capsys, unreachable_hub):
    _adapter(inputs["tmp"])
    rc, err, seconds = _run(commands(HUB, inputs)[name], capsys)
    line = _one_line(err)
    ref = UNSHIPPED if name == "plan" else HUB
    assert rc != 0 and ref in line and "cannot be reached" in line and "HF_HUB_OFFLINE" in line, line
    assert seconds < 20  # transformers alone retries for ~26 s per file before its OSError traceback


def test_plan_answers_shipped_models_without_the_hub(capsys, unreachable_hub):
    """The question "does it fit?" comes before any download: a model the recipes and docs name needs no request."""
    rc, err, seconds = _run(["plan", "--model", HUB, "--method", "qlora", "--batch", "1"], capsys)
    assert rc == 0 and "cannot be reached" not in err and "cached copy" not in err, err


@pytest.mark.parametrize("name", ["train", "eval", "predict", "merge", "check", "plan", "convert"])
def test_offline_hub_id_not_cached_is_one_line(name, inputs, capsys):
    # conftest sets HF_HUB_OFFLINE=1
    _adapter(inputs["tmp"])
    rc, err, seconds = _run(commands(HUB, inputs)[name], capsys)
    line = _one_line(err)
    ref = UNSHIPPED if name == "plan" else HUB
    assert rc != 0 and ref in line and "HF_HUB_OFFLINE=1" in line and "cache" in line, line


def test_cached_hub_id_is_used_when_the_hub_is_unreachable(tmp_path, capsys, monkeypatch, unreachable_hub):
    """The hub down, the model in the local cache: llavatune says so and uses the cache (and goes offline)."""
    from huggingface_hub import constants

    from test_plan import LLAVA_15

    cache = tmp_path / "hub"
    repo = cache / ("models--" + UNSHIPPED.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAVA_15["7b"]))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    rc = main(["plan", "--model", UNSHIPPED, "--method", "qlora", "--batch", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "using the cached copy" in captured.err and "7.06B total" in captured.out
    assert constants.HF_HUB_OFFLINE is True


@pytest.fixture
def hub_without_the_repo(monkeypatch):
    """A local stand-in for the hub that answers every request like huggingface.co for an unknown repository."""
    import http.server
    import threading

    from huggingface_hub import constants

    class NotFound(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield
    server.shutdown()
    server.server_close()


def test_unknown_repository_is_an_error_even_for_smoke(inputs, capsys, hub_without_the_repo):
    """--smoke falls back to the tiny model when the hub is unreachable, not when it says the model does not exist."""
    rc, err, _ = _run(["train", "--model", "llava-hf/llava-1.5-7b-hf-typo", "--smoke", "--data", inputs["train"],
                       "--output_dir", str(inputs["tmp"] / "s"), "--report_to", "none"], capsys)
    line = _one_line(err)
    assert rc == 1 and "no such repository on the Hugging Face hub" in line
    assert not (inputs["tmp"] / "s").exists()  # refused before anything was written
    rc, err, _ = _run(["plan", "--model", "llava-hf/llava-1.5-7b-hf-typo"], capsys)
    assert rc == 1 and "no such repository" in _one_line(err)


def test_a_hub_model_of_a_family_llavatune_cannot_train_is_refused_before_the_run_folder_exists(
        tmp_path, capsys, monkeypatch, unreachable_hub):
    """`train --model org/text-only-llm` (in the cache, hub down): one line about the model, and no run folder left
    behind that would make the corrected command refuse as 'holds a different run'."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + UNSHIPPED.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    rc = main(["train", "--model", UNSHIPPED, "--data", str(tmp_path / "d.json"), "--output_dir",
               str(tmp_path / "run")])
    line = _one_line(capsys.readouterr().err)
    assert rc != 0 and UNSHIPPED in line, line
    assert not (tmp_path / "run").exists()


def test_a_mistyped_tiny_model_name_lists_the_built_in_ones(tmp_path, capsys, monkeypatch):
    """`check DATA --model tiny-qwen` (the family's name half typed): one line that names the built-in tiny models."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text(json.dumps([{"id": "a", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    assert main(["check", "d.json", "--model", "tiny-qwen"]) != 0
    line = _one_line(capsys.readouterr().err)
    assert "--model tiny-qwen: no such folder" in line and "tiny-qwen2_5_vl" in line, line

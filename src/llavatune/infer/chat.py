"""``llavatune chat --model CKPT [--image PATH]`` — interactive multi-turn chat in the terminal.

    llavatune chat --model runs/okvqa --image cat.jpg

Tokens are printed as they are generated. Commands: ``/image PATH`` switches to another image (and starts
a new conversation: LLaVA-1.5 models see one image per conversation), ``/reset`` forgets the conversation,
``/exit`` (or end of input) quits, ``/help`` lists them. Ctrl-C stops the answer being generated.
Prompts are built from the whole conversation with the checkpoint's own template (``Encoder``).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from llavatune.config import config, parse_config
from llavatune.data.records import Turn
from llavatune.infer.options import LoadOptions
from llavatune.infer.predict import Predictor, check_image, open_checked_image
from llavatune.utils import UserError

HELP = "commands: /image PATH (new image, new conversation), /reset (forget the conversation), /exit"


class ChatSession:
    """A conversation with one model: the turns so far and the current image."""

    def __init__(self, predictor: Predictor, image: str | Path | None = None, system: str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0):
        self.predictor = predictor
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.image: Path | None = None
        self._image = None
        self._size: list[tuple[int, int]] | None = None
        self.turns: list[Turn] = []
        if image:
            self.set_image(image)

    def set_image(self, path: str | Path) -> None:
        """Switch to ``path`` (checked first: a bad path leaves the session as it was) and start over."""
        img = open_checked_image(path, "image")
        path = Path(path)
        self._image = img
        self._size = [(img.height, img.width)]
        self.image = path
        self.reset()

    def reset(self) -> None:
        self.turns = [Turn("system", self.system)] if self.system else []

    def prompt_turns(self, question: str) -> list[Turn]:
        from llavatune.data.records import IMAGE_TOKEN

        first = not any(t.role == "human" for t in self.turns)
        value = question.strip()
        if first and self.image is not None and IMAGE_TOKEN not in value:
            value = IMAGE_TOKEN + "\n" + value
        elif not first or self.image is None:
            value = value.replace(IMAGE_TOKEN, "")
        return self.turns + [Turn("human", value)]

    def ask(self, question: str, on_text: Callable[[str], None] = lambda s: None,
            stop_event: threading.Event | None = None) -> str:
        """Generate the answer to ``question`` in a thread, passing text pieces to ``on_text`` as they come.

        The answer (decoded from the generated ids in one go) is added to the conversation, unless the
        generation was stopped through ``stop_event``.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from llavatune.infer.generate import stop_token_ids, to_device

        if not question.strip():
            raise UserError("the question is empty")
        turns = self.prompt_turns(question)
        model, encoder = self.predictor.model, self.predictor.encoder
        tok = encoder.tokenizer
        ids = encoder.prompt_ids(turns, self._size if self.image is not None else None)
        with_image = self.image is not None and any(i in encoder.image_token_ids for i in ids)
        feats = encoder.features(ids, images=[self._image] if with_image else None)
        inputs = to_device(encoder.collator(padding_side="left")([feats]), model)
        stop_event = stop_event or threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if self.temperature > 0 \
            else {"do_sample": False, "num_beams": 1}
        result: dict[str, Any] = {}

        def run():
            try:
                result["ids"] = model.generate(
                    **inputs, **sampling, max_new_tokens=self.max_new_tokens, streamer=streamer, use_cache=True,
                    eos_token_id=stop_token_ids(encoder, model), pad_token_id=tok.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([_Stop()]),
                )
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, name="llavatune-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                on_text(piece)
        except KeyboardInterrupt:
            stop_event.set()
            raise
        finally:
            thread.join()
        if "error" in result:
            raise result["error"]
        answer = tok.decode(result["ids"][0, len(ids):], skip_special_tokens=True).strip()
        if not stop_event.is_set():
            self.turns = turns + [Turn("gpt", answer)]
        return answer


def run_chat(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The read-answer loop. Reads lines from ``stdin`` until ``/exit`` or end of input."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and stdin is sys.stdin

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    def read() -> str | None:
        if interactive:
            try:
                return input("you> ")
            except EOFError:
                return None
        say("you> ", end="")
        line = stdin.readline()
        if not line:
            return None
        return line.rstrip("\n")

    say(f"chatting with {session.predictor.info.get('base_model', 'the model')}"
        + (f" about {session.image}" if session.image else " (no image: /image PATH to add one)"))
    say(HELP)
    while True:
        line = read()
        if line is None:
            say()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip().strip("'\"")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                session.reset()
                say("(conversation reset)")
            elif cmd == "/image":
                if not arg:
                    say("usage: /image PATH")
                    continue
                try:
                    session.set_image(Path(arg).expanduser())
                except UserError as e:
                    say(f"error: {e}")
                    continue
                say(f"(image: {session.image}; new conversation)")
            else:
                say(HELP)
            continue
        say("llava> ", end="")
        try:
            session.ask(line, on_text=lambda s: (stdout.write(s), stdout.flush()))
        except KeyboardInterrupt:
            say(" (stopped)")
            continue
        except UserError as e:
            say(f"error: {e}")
            continue
        say()


@config
class ChatConfig(LoadOptions):
    image: Optional[str] = None
    """Image to talk about (switch later with /image PATH)."""
    system: Optional[str] = None
    """System prompt (default: the template's own)."""
    max_new_tokens: int = 512
    """Maximum tokens generated per answer."""
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling threshold (with --temperature > 0)."""


def main(argv: list[str], prog: str, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    (cfg,) = parse_config([ChatConfig], argv, prog=prog, description=__doc__.split("\n\n")[0])
    if cfg.image:
        check_image(cfg.image)
    predictor = cfg.load_predictor()
    session = ChatSession(predictor, cfg.image, cfg.system, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    return run_chat(session, stdin, stdout)

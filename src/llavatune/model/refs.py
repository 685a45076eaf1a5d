"""What a model reference (``--model``, ``--base_model``, ``--vision_model``, ...) points at, decided in one place.

    resolve_model("runs/okvqa", "--model")              # a local folder: returned as is, or "no such folder"
    resolve_model("llava-hf/llava-1.5-7b-hf", "--model")  # a hub id: one quick request, or one line saying why not

Every command that takes a model goes through :func:`resolve_model` before anything is loaded:

- **Local** when the reference looks like a path (starts with ``.``, ``/`` or ``~``, or has more than one ``/``),
  exists, or starts with a folder that exists here (``runs/typo_model`` when ``runs/`` exists). A local reference
  that does not exist fails at once with "no such folder" (instead of being sent to the hub, retried for a minute
  and ending in a traceback).
- **A hub id** (``owner/name``) otherwise. Before transformers touches it, one request without retries asks the hub
  for its ``config.json``. Unreachable hub, unknown or gated repository: one line naming the flag, the id and
  what to do. With ``HF_HUB_OFFLINE=1`` only the local cache is consulted. When the hub cannot be reached but the
  model is in the cache, the process switches to offline mode (so transformers does not retry either) and uses it.

Torch-free: ``plan`` and ``check`` use it without importing torch.
"""

from __future__ import annotations

import logging
import os
import re
from functools import lru_cache
from pathlib import Path

from llavatune.utils import UserError

logger = logging.getLogger("llavatune")

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
EXAMPLE = "llava-hf/llava-1.5-7b-hf"
PROBE_TIMEOUT_S = 10.0


def looks_local(ref: str) -> bool:
    """True when ``ref`` names a local path rather than a hub id (see the module docstring)."""
    ref = str(ref)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref:
        return True
    if os.path.exists(ref):
        return True
    head = ref.split("/", 1)[0]
    return "/" in ref and os.path.isdir(head)


def is_hub_id(ref: str) -> bool:
    return not looks_local(ref) and bool(HUB_ID.match(str(ref)))


def resolve_model(ref: str, what: str = "--model", files_ok: bool = False) -> str:
    """``ref`` checked: an existing local folder (``~`` expanded) or a hub id the hub (or the cache) can serve.

    ``files_ok``: a local file is acceptable too (``plan --model config.json``). Raises ``UserError`` (one line)."""
    ref = str(ref)
    if not ref.strip():
        raise UserError(f"{what}: empty model reference")
    if looks_local(ref):
        p = Path(ref).expanduser()
        if not p.exists():
            raise UserError(f"{what} {ref}: no such folder")
        if p.is_file() and not files_ok:
            raise UserError(f"{what} {ref}: is a file; pass the model's folder")
        return str(p)
    if not HUB_ID.match(ref):
        hint = ""
        if ref.startswith("tiny"):  # a mistyped built-in name: say which ones there are
            from llavatune.model.families import TINY_MODELS

            hint = f" (built-in tiny models: {', '.join(TINY_MODELS)})"
        raise UserError(f"{what} {ref}: no such folder, and not a hub id like '{EXAMPLE}'{hint}")
    ensure_hub(ref, what)
    return ref


def offline() -> bool:
    """``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) is in force, or the hub was found unreachable."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Make this process (and the processes it starts) use the local cache only, without network retries."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def cached(ref: str) -> bool:
    """Whether the local Hugging Face cache holds ``ref``'s config.json."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id or cache: not cached
        return False


def hub_available(ref: str, what: str = "--model") -> bool:
    """Whether hub id ``ref`` can be loaded here: False when the hub cannot be reached (or ``HF_HUB_OFFLINE=1``) and
    the cache lacks it; a ``UserError`` when the hub says the repository does not exist or is gated (``--smoke``
    falls back to a tiny model only for the first, never for a typo)."""
    problem = _hub_problem(ref)
    if problem is None:
        return True
    kind, message = problem
    if kind == "unavailable":
        return False
    raise UserError(f"{what} {ref}: {message}")


def ensure_hub(ref: str, what: str = "--model") -> None:
    """Check, with one request and no retries, that hub id ``ref`` can be loaded; raise a one-line ``UserError``."""
    problem = _hub_problem(ref)
    if problem:
        raise UserError(f"{what} {ref}: {problem[1]}")


@lru_cache(maxsize=None)
def _hub_problem(ref: str) -> tuple[str, str] | None:
    """``(kind, why)`` hub id ``ref`` cannot be loaded here, or None; kind "unavailable" (no network, not cached)
    or "refused" (no such repository, gated, an HTTP error). Asked once per process and id."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    where = f"download it where there is network (hf download {ref}) or pass a local folder"
    if offline():
        if cached(ref):
            return None
        return "unavailable", f"a hub id, not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it; {where}"
    try:
        get_hf_file_metadata(hf_hub_url(ref, "config.json"), timeout=PROBE_TIMEOUT_S, retry_on_errors=False)
    except GatedRepoError:
        return "refused", "a gated repository; accept its terms on huggingface.co and log in (hf auth login)"
    except RepositoryNotFoundError:
        return "refused", (f"no such folder here, and no such repository on the Hugging Face hub (a typo? a private "
                           f"repository needs hf auth login); pass a local folder or a hub id like '{EXAMPLE}'")
    except EntryNotFoundError:
        return None  # the repository exists; it just has no config.json (a tokenizer-only repository)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        return "refused", f"the Hugging Face hub answered HTTP {status or '?'} ({_first_line(e)})"
    except Exception as e:  # noqa: BLE001 - DNS, connection refused, timeout, proxy: the hub is unreachable
        if cached(ref):
            logger.warning(f"the Hugging Face hub is unreachable ({_first_line(e)}); using the cached copy of {ref} "
                           "(offline from now on)")
            go_offline()
            return None
        return "unavailable", (f"a hub id, but the Hugging Face hub cannot be reached ({type(e).__name__}: "
                               f"{_first_line(e)}) and it is not in the local cache; {where} "
                               "(HF_HUB_OFFLINE=1 uses the cache only)")
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__

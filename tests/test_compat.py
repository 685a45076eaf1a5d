"""Third-party private internals are reached only through ``llavatune._compat``, and work with the installed versions."""

from __future__ import annotations

import re
from pathlib import Path

import llavatune
from llavatune import _compat

PRIVATE = ("_hf_deepspeed_config_weak_ref", "_get_num_multimodal_tokens", "_get_number_of_features",
           "_resolve_features")


def test_private_internals_are_used_only_in_compat():
    src = Path(llavatune.__file__).parent
    found = {}
    for f in src.rglob("*.py"):
        if f.name == "_compat.py":
            continue
        hits = [name for name in PRIVATE if re.search(rf"\b{name}\b", f.read_text(encoding="utf-8"))]
        if hits:
            found[str(f.relative_to(src))] = hits
    assert found == {}


def test_zero3_init_switch_is_restored():
    from transformers.integrations import deepspeed as hf_ds

    sentinel = object()
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = sentinel
    try:
        with _compat.deepspeed_zero3_init_disabled():
            assert hf_ds._hf_deepspeed_config_weak_ref is None
            assert not hf_ds.is_deepspeed_zero3_enabled()
        assert hf_ds._hf_deepspeed_config_weak_ref is sentinel
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def test_streaming_features_resolves_a_schemaless_stream():
    import datasets

    def rows():
        yield {"question": "q?", "answer": "a"}

    ds = datasets.IterableDataset.from_generator(rows)
    assert ds.features is None
    assert list(_compat.streaming_features(ds).features) == ["question", "answer"]

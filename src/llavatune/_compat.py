"""Every use of a third-party library's private internals, in one place.

llavatune depends on the field's libraries through their public APIs; where a public API does not exist, the
private name it uses instead is reached only through a function here, which says why and against which versions
it was checked. When a library renames one of these, this is the file to change (and the test in
``tests/test_compat.py`` fails first).

Checked against transformers 5.24, datasets 5.2, deepspeed 0.19.8.

Not here, because they are overrides rather than calls: ``LlavaTrainer._get_train_sampler`` (``transformers.Trainer``'s
hook for the training sampler, the documented way to change it; checked against transformers 5.24).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def deepspeed_zero3_init_disabled() -> Iterator[None]:
    """Build a model on one rank without DeepSpeed's ``zero.Init`` (which expects every rank to take part).

    transformers decides whether ``from_pretrained`` / ``from_config`` partition weights as they are created by
    looking at ``transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref`` (set when ``TrainingArguments``
    holds a ZeRO-3 config); there is no public switch. Only used for writing the tiny/composed base to disk on the
    main process; loading for training then runs on all ranks with ZeRO-3 partitioning as usual.
    """
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def has_variable_image_tokens(processor: Any) -> bool:
    """Whether the processor tiles each image by its size (LLaVA-NeXT "any resolution"), so that an image's token
    count depends on the image: such processors have ``_get_number_of_features`` (``LlavaNextProcessor``,
    ``LlavaOnevisionProcessor``), the method they expand ``<image>`` with."""
    return hasattr(processor, "_get_number_of_features")


def processor_image_tokens(processor: Any, image_sizes) -> list[int]:
    """Tokens of each image, from each image's (height, width), as the processor itself expands them.

    ``ProcessorMixin._get_num_multimodal_tokens(image_sizes=...)`` is what vLLM and transformers' own serving code
    call to size image placeholders; it is private in transformers 5.24 (no public equivalent).
    """
    out = processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in image_sizes])
    return list(out.num_image_tokens)


def streaming_features(ds: Any) -> Any:
    """A streaming ``datasets.IterableDataset`` whose ``features`` are known: when the files carry no schema
    (``features is None``), resolved from the first rows with ``IterableDataset._resolve_features`` (the public
    alternative, iterating the rows ourselves, would decode them all twice)."""
    if ds.features is None:
        ds = ds._resolve_features()
    return ds

"""Shared fixtures. Every asset is built by code (Pillow images, a tokenizer trained with `tokenizers`,
the synthetic shapes VQA set in the official OK-VQA layout); no test touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models: one thread is fastest, and two threads per process on a shared 2-core machine can make OpenMP
# spin-waits dominate (generation was ~15x slower in a loaded run). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries the hub fails fast instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# Subprocess tests (launchers, CLI runs) often run in a temporary cwd: a relative PYTHONPATH=src would then silently
# import another checkout's llavatune.
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)


def prepare_shapes(root: Path, n_train_images: int, n_val_images: int, questions_per_image: int = 3,
                   image_size: int = 32, seed: int = 0) -> dict[str, Path]:
    """Synthetic shapes VQA -> `llavatune prepare okvqa` for train and val. Returns data.json paths."""
    from llavatune.cli import main
    from llavatune.data.shapes import make_shapes_vqa

    paths = make_shapes_vqa(root / "src", n_train_images=n_train_images, n_val_images=n_val_images,
                            questions_per_image=questions_per_image, image_size=image_size, seed=seed)
    out = {"captions": paths["train_captions"], "src": paths["root"]}
    for split in ("train", "val"):
        rc = main(["prepare", "okvqa", "--questions", str(paths[f"{split}_questions"]),
                   "--annotations", str(paths[f"{split}_annotations"]), "--images", str(paths["images_dir"]),
                   "--out", str(root / split)])
        assert rc == 0
        out[split] = root / split / "data.json"
    return out


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """A small prepared shapes set: 16 train images x 2 questions, 6 val images x 2 questions."""
    return prepare_shapes(tmp_path_factory.mktemp("shapes"), 16, 6, questions_per_image=2)


@pytest.fixture(scope="session")
def tiny_processor(tmp_path_factory):
    """The built-in tiny LLaVA's processor (tokenizer trained on a few sentences), saved to disk."""
    from llavatune.model.tiny import build_tiny

    d = tmp_path_factory.mktemp("tiny")
    texts = ["What color is the shape?", "red green blue", "How many shapes are there?", "a red circle on the left"]
    _, processor = build_tiny(texts, d)
    processor.path = d
    return processor


LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_launcher_env_leaks():
    """A test that runs `train --zero` in-process gets a one-process DeepSpeed world (RANK, WORLD_SIZE, ... set in
    os.environ); the next test must not believe it was started by a launcher."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

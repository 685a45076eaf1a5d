"""Shared pieces of the benchmark scripts: machine description, the benchmark data and models, timing helpers.

Not a benchmark itself. The scripts import it as ``_common`` (they run as ``python benchmarks/NAME.py``, so
this folder is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# The CPU model of the training and evaluation benchmarks: real CLIPVisionModel + LlamaForCausalLM classes
# (llavatune.model.tiny.build_tiny), 224 px images, 16 px patches -> 196 image tokens per sample.
CPU_MODEL = dict(image_size=224, patch_size=16, hidden_size=512, vision_hidden_size=512, num_layers=4)

# The demo's model (llavatune demo): 32 px, 8 px patches -> 16 image tokens, hidden 128, 2 layers; small enough to
# learn the shapes task on a CPU in minutes.
SMALL_MODEL = dict(image_size=32, patch_size=8, hidden_size=128, vision_hidden_size=64)

# The demo's model at 112 px (8 px patches -> 196 image tokens, as many as the CPU model): small enough to learn the
# shapes task on a CPU, with the image taking as large a share of each sample as in the CPU model, so that grouping
# questions by image saves about as much (the equal-budget comparison of train_grouped.py).
SMALL196_MODEL = dict(SMALL_MODEL, image_size=112)

# --device cuda: LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px -> 576 image tokens, Llama-2-7B / Vicuna-7B,
# vocabulary 32064), random weights in bf16.
LLAVA15_7B = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768),
    "text": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 tie_word_embeddings=False),
}

# The QLoRA memory benchmark's ~1B LLaVA: a Llama of ~0.95B (hidden 2048, 16 layers, intermediate 5632, vocab
# 32000) + a CLIP ViT-B/16 vision tower at 224 px (196 image tokens); ~1.05B parameters in all.
LLAVA_1B = {
    "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, projection_dim=512),
    "text": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 tie_word_embeddings=False),
}

# Peak dense bf16 tensor-core FLOP/s by GPU name (datasheet numbers, no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def machine(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        info["mem_total_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        info["affinity_cores"] = len(os.sched_getaffinity(0))
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
        if device == "cuda" and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    except ImportError:
        pass
    for pkg in ("peft", "trl", "bitsandbytes", "accelerate"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            pass
    return info


def peak_flops(device: str, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of the GPU (for MFU), from --peak-tflops or the table above; None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def set_threads(n: int) -> int:
    """``torch.set_num_threads(n)`` (0: leave torch's default, one per core). Returns the thread count in use.

    The CPU benchmarks default to 1 thread: on a shared machine whose cores are busy with other work, OpenMP
    threads that spin-wait on each other made step times 2-10x longer and scattered (measured here), which
    buries any difference between the two sides in noise. One thread per process is stable."""
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def matmul_params(base: Path) -> dict[str, int]:
    """Weights that take part in matrix multiplies, per token (for FLOP counts): ``llm`` (decoder layers +
    lm_head), ``vision`` (encoder layers), ``patches`` per image (incl. CLS), ``layers``/``hidden`` of the LLM."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    t, v = cfg.text_config, cfg.vision_config
    h, L, i, V = t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size
    kv = t.num_key_value_heads * (h // t.num_attention_heads)
    return {
        "llm": L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * V,
        "vision": v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size),
        "patches": (v.image_size // v.patch_size) ** 2 + 1,
        "layers": L,
        "hidden": h,
    }


def write_result(name: str, result: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path


def chat_messages(turns: Iterable[Any]) -> list[dict[str, Any]]:
    """A record's turns as chat-template messages (``{"role", "content": [parts]}``), the layout of llava-hf's
    ``apply_chat_template`` and TRL's VLM datasets: the image token becomes an ``{"type": "image"}`` part."""
    from llavatune.data.records import IMAGE_TOKEN

    msgs = []
    for t in turns:
        parts, text = [], t.value
        if IMAGE_TOKEN in text:
            parts.append({"type": "image"})
            text = text.replace(IMAGE_TOKEN, "").strip("\n")
        parts.append({"type": "text", "text": text})
        msgs.append({"role": {"human": "user", "gpt": "assistant", "system": "system"}[t.role], "content": parts})
    return msgs


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def quiet() -> None:
    """Keep library chatter (progress bars, info logs, deprecation warnings) out of the benchmark output."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    for name in ("llavatune", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def shapes_data(work: Path, n_images: int, questions_per_image: int = 3, image_size: int = 224,
                split: str = "train", layout: str = "okvqa", group_by_image: bool = False, seed: int = 0) -> Path:
    """The synthetic shapes set in OK-VQA or VQAv2 layout, drawn at ``image_size`` px and converted with
    ``llavatune prepare okvqa|vqav2`` (LLaVA-1.5's short-answer prompt; ``group_by_image``: one multi-turn record
    per image). Cached under ``work``; returns data.json."""
    from llavatune.cli import main as cli
    from llavatune.data.shapes import make_shapes_vqa

    name = f"shapes-{n_images}x{questions_per_image}-{image_size}px" + ("" if layout == "okvqa" else f"-{layout}")
    root = work / (name + ("" if seed == 0 else f"-seed{seed}"))
    out = root / ("prepared-grouped" if group_by_image else "prepared") / split
    if (out / "data.json").is_file():
        return out / "data.json"
    t = time.perf_counter()
    n_train, n_val = (n_images, 0) if split == "train" else (0, n_images)
    raw = root / f"raw-{split}"  # one set of images per split: the same name may be asked for as train and as val
    key = "train_questions" if split == "train" else "val_questions"
    if not (raw / "images").is_dir():
        make_shapes_vqa(raw, n_train_images=n_train, n_val_images=n_val, questions_per_image=questions_per_image,
                        image_size=image_size, seed=seed, layout=layout)
    from llavatune.data.shapes import LAYOUT_FILES

    sub = f"{split}"
    files = LAYOUT_FILES[layout]
    rc = cli(["prepare", layout, "--questions", str(raw / files["questions"].format(split=sub)),
              "--annotations", str(raw / files["annotations"].format(split=sub)), "--images", str(raw / "images"),
              "--out", str(out), "--overwrite"] + (["--group-by-image"] if group_by_image else []))
    if rc:
        raise SystemExit(f"prepare {layout} failed ({rc}) for {key}")
    import logging

    logging.getLogger("llavatune").setLevel(logging.WARNING)  # the CLI turned its progress logging on
    print(f"data: {n_images} images x {questions_per_image} questions at {image_size}px ({layout} layout"
          f"{', grouped by image' if group_by_image else ''}) in {time.perf_counter() - t:.1f}s -> {out / 'data.json'}",
          flush=True)
    return out / "data.json"


def build_model(work: Path, kind: str, data_json: Path, warm_start: bool = False) -> Path:
    """A benchmark model, saved once as a llava-hf folder (with processor) under ``work``; returns the folder.

    ``tiny``: ``build_tiny``'s own shapes (32 px, 16 image tokens; for ``gpu_suite.py --dry-run``). ``small``:
    :data:`SMALL_MODEL` (the demo's); ``small196``: :data:`SMALL196_MODEL` (the demo's at 196 image tokens). ``cpu``:
    ``build_tiny`` with :data:`CPU_MODEL` (fp32, ~20M parameters). ``1b``: :data:`LLAVA_1B`, ``7b``:
    :data:`LLAVA15_7B` -- random weights saved in bf16, with the tiny model's processor and tokenizer (trained
    on the data's text, image size and patch size of the config); the embedding is sized like the real
    model's, larger than the tokenizer, which only means unused rows.

    The ``build_tiny`` kinds are all-random (``warm_start=False``) unless ``warm_start``: then ``build_tiny``'s
    warm starts run on ``data_json``'s conversations (language model) and images (vision tower, projector), the
    miniature of a pretrained LLaVA that the accuracy comparisons start from. The speed benchmarks keep random
    weights: their recorded figures (and generation lengths) were measured on them.
    """
    from llavatune.data.records import collect_texts, load_records
    from llavatune.model.tiny import build_tiny

    names = {"cpu": "model-cpu-" + "-".join(str(v) for v in CPU_MODEL.values()), "tiny": "model-tiny",
             "small": "model-small-" + "-".join(str(v) for v in SMALL_MODEL.values()),
             "small196": "model-small-" + "-".join(str(v) for v in SMALL196_MODEL.values())}
    name = names.get(kind, f"model-llava-{kind}-random")
    if warm_start and kind in names:
        name += "-warm"
    out = work / name
    if (out / "config.json").is_file():
        return out
    records = load_records(str(data_json))
    texts = collect_texts(records)
    t = time.perf_counter()
    if kind in ("cpu", "tiny", "small", "small196"):
        shape = {"cpu": CPU_MODEL, "small": SMALL_MODEL, "small196": SMALL196_MODEL, "tiny": {}}[kind]
        warm = {}
        if warm_start:
            from llavatune.data.records import image_root
            from llavatune.utils import resolve_under

            root = image_root(data_json)
            warm = dict(conversations=[r.conversations for r in records],
                        images=sorted({resolve_under(root, p) for r in records for p in r.images}))
        build_tiny(texts, out, warm_start=warm_start, **warm, **shape)
    else:
        import torch
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        shape = {"1b": LLAVA_1B, "7b": LLAVA15_7B}[kind]
        v = shape["vision"]
        _, processor = build_tiny(texts, None, image_size=v["image_size"], patch_size=v["patch_size"])
        tok = processor.tokenizer
        text = LlamaConfig(**shape["text"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=text,
                          image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_seq_length=(v["image_size"] // v["patch_size"]) ** 2,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.device(device):
                model = LlavaForConditionalGeneration(cfg)
            model.generation_config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            model.save_pretrained(out)
        finally:
            torch.set_default_dtype(prev)
        processor.save_pretrained(out)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"model: {out} built in {time.perf_counter() - t:.1f}s", flush=True)
    return out


def model_params(base: Path) -> int:
    """Parameters stored in a saved model folder (read from the safetensors headers)."""
    import math

    from safetensors import safe_open

    n = 0
    for f in base.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            n += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    return n


def progress(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)

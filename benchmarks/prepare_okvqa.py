"""Benchmark ``llavatune prepare okvqa`` on an OK-VQA-sized synthetic set.

    python benchmarks/prepare_okvqa.py [--questions 14000] [--image-sizes 64 224] [--work DIR]

Builds (once, cached under --work) a synthetic OK-VQA set with one question per image in the official
layout, then runs ``llavatune prepare okvqa`` in a fresh process per image size and records wall time
and that process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at exit). Running two
image sizes shows that memory does not grow with image bytes (images are linked, never read). Results go to
``benchmarks/results/prepare_okvqa.json`` with a description of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine, write_result  # benchmarks/_common.py (scripts run as python benchmarks/X.py)


def build(work: Path, n: int, size: int) -> dict:
    from llavatune.data.shapes import make_shapes_vqa

    root = work / f"okvqa-{n}-{size}px"
    marker = root / ".complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        make_shapes_vqa(root, n_train_images=0, n_val_images=n, questions_per_image=1, image_size=size, seed=0)
        marker.write_text("ok")
        print(f"built {n} images of {size}px in {time.perf_counter() - t:.1f}s under {root}")
    image_bytes = sum(e.stat().st_size for e in os.scandir(root / "images" / "val2014"))
    return {"root": root, "image_bytes": image_bytes}


# Runs the CLI in a fresh interpreter and prints that process's own peak RSS (KiB) as the last line.
_CHILD = (
    "import resource, sys\n"
    "from llavatune.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def run_once(data: dict, out: Path) -> dict:
    root = data["root"]
    cmd = [
        sys.executable,
        "-c",
        _CHILD,
        "prepare",
        "okvqa",
        "--questions",
        str(root / "OpenEnded_mscoco_val2014_questions.json"),
        "--annotations",
        str(root / "mscoco_val2014_annotations.json"),
        "--images",
        str(root / "images"),
        "--out",
        str(out),
        "--overwrite",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"prepare failed with exit code {proc.returncode}")
    peak_kib = int(proc.stdout.strip().splitlines()[-1].split()[-1])
    report = json.loads((out / "prepare_report.json").read_text())
    return {
        "seconds_wall_incl_startup": round(seconds, 2),
        "seconds_in_prepare": report["seconds"],
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "records": report["counts"]["records"],
        "images": report["counts"]["images"],
        "images_linked": report["counts"]["images_linked"],
        "images_copied": report["counts"]["images_copied"],
        "image_bytes_total_mib": round(data["image_bytes"] / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=14000, help="questions (= images, one question each)")
    ap.add_argument("--image-sizes", type=int, nargs="+", default=[64, 224], help="image sizes to run, px")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llavatune-bench")
    ap.add_argument("--results", type=Path, default=RESULTS / "prepare_okvqa.json")
    args = ap.parse_args()

    runs = []
    for size in sorted(args.image_sizes):
        data = build(args.work, args.questions, size)
        r = {"image_size": size, **run_once(data, args.work / f"out-{size}px")}
        runs.append(r)
        print(
            f"{size}px: {r['records']} records, {r['images']} images ({r['image_bytes_total_mib']} MiB) in "
            f"{r['seconds_wall_incl_startup']}s wall ({r['seconds_in_prepare']}s in prepare), "
            f"peak RSS {r['peak_rss_mib']} MiB"
        )
    result = {
        "benchmark": "llavatune prepare okvqa (synthetic OK-VQA-sized set, one question per image)",
        "command": "python benchmarks/prepare_okvqa.py " + " ".join(sys.argv[1:]),
        "questions": args.questions,
        "target": "<= 15 s on a 2-core machine; memory independent of image bytes",
        "runs": runs,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_result("prepare_okvqa", result, args.results)


if __name__ == "__main__":
    main()

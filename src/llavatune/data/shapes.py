"""A synthetic "shapes" VQA dataset in the official OK-VQA / VQAv2 file layout.

Each image is a plain background with one to three coloured shapes (circle / square / triangle) at
distinct positions (left / right / top / bottom). Every question is answerable from the pixels alone, so
a tiny model can learn it in minutes, which makes the set useful for demos, smoke tests and benchmarks::

    paths = make_shapes_vqa("shapes", n_train_images=200, n_val_images=50)
    # llavatune prepare okvqa --questions {paths['val_questions']} --annotations
    #     {paths['val_annotations']} --images {paths['images_dir']} --out prepared

Files written (``layout="okvqa"``; VQAv2 uses its own official names, see :data:`LAYOUT_FILES`)::

    OUT/OpenEnded_mscoco_{train,val}2014_questions.json
    OUT/mscoco_{train,val}2014_annotations.json
    OUT/images/{train2014,val2014}/COCO_{split}2014_{image_id:012d}.jpg
    OUT/captions_{train,val}.json     # LLaVA format, "<image>" -> "a red circle on the left ..."

Answers mimic the annotators: most of the 10 agree, a few give a variant ("two" for "2", "navy" for
"blue", "rectangle" for "square"), so the VQA metric's leave-one-out averaging matters. Everything is
deterministic for a given ``seed``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavatune.data.prepare import majority_answer

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# What a minority of annotators answer instead of the canonical answer.
VARIANTS: dict[str, list[str]] = {
    "1": ["one"], "2": ["two", "3"], "3": ["three", "2", "4"],
    "red": ["dark red", "maroon"], "green": ["lime", "dark green"], "blue": ["navy", "light blue"],
    "yellow": ["gold"], "purple": ["violet", "magenta"], "orange": ["red", "dark orange"],
    "white": ["light gray"], "black": ["dark"], "gray": ["grey", "silver"],
    "circle": ["ball", "round"], "square": ["rectangle", "box"], "triangle": ["pyramid"],
    "left": ["on left", "left side"], "right": ["on right", "right side"],
    "top": ["up", "top middle"], "bottom": ["down", "bottom middle"],
    "yes": ["no"], "no": ["yes"],
}  # fmt: skip

CAPTION_PROMPTS = (
    "Give a short description of the image.",
    "Describe the image briefly.",
    "What is in this picture? Answer in a short sentence.",
)

LAYOUT_FILES: dict[str, dict[str, str]] = {
    "okvqa": {
        "questions": "OpenEnded_mscoco_{split}2014_questions.json",
        "annotations": "mscoco_{split}2014_annotations.json",
    },
    "vqav2": {
        "questions": "v2_OpenEnded_mscoco_{split}2014_questions.json",
        "annotations": "v2_mscoco_{split}2014_annotations.json",
    },
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        parts = [f"{_article(s.color)} {s.color} {s.kind} on the {s.position}" for s in self.shapes]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{text}, on a {self.background} background"


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice((1, 1, 2, 2, 3))
    positions = rng.sample(sorted(POSITIONS), n)
    shapes = tuple(Shape(rng.choice(SHAPES), rng.choice(sorted(COLORS)), p) for p in positions)
    return Scene(rng.choice(sorted(BACKGROUNDS)), shapes)


def draw_scene(scene: Scene, size: int, rng: random.Random):
    """Render ``scene`` as a ``size`` x ``size`` RGB PIL image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fx, fy = POSITIONS[s.position]
        half = size * rng.uniform(0.09, 0.12)
        cx = size * (fx + rng.uniform(-0.01, 0.01))
        cy = size * (fy + rng.uniform(-0.01, 0.01))
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


def scene_questions(scene: Scene) -> list[tuple[str, str, str, str]]:
    """Every (question, answer, question_type, answer_type) answerable from the pixels of ``scene``."""
    qs: list[tuple[str, str, str, str]] = [
        ("How many shapes are there?", str(len(scene.shapes)), "how many", "number"),
        ("What color is the background?", scene.background, "what color is the", "other"),
    ]
    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        qs += [
            ("What color is the shape?", s.color, "what color is the", "other"),
            ("What shape is in the image?", s.kind, "what", "other"),
            ("Where is the shape?", s.position, "where is the", "other"),
        ]
    else:
        for s in scene.shapes:
            qs += [
                (f"What color is the shape on the {s.position}?", s.color, "what color is the", "other"),
                (f"What shape is on the {s.position}?", s.kind, "what", "other"),
            ]
    colors = {s.color for s in scene.shapes}
    for color in sorted(COLORS):
        qs.append(
            (f"Is there {_article(color)} {color} shape?", "yes" if color in colors else "no", "is there a", "yes/no")
        )
    kinds = {s.kind for s in scene.shapes}
    for kind in SHAPES:
        qs.append((f"Is there a {kind}?", "yes" if kind in kinds else "no", "is there a", "yes/no"))
    return qs


def sample_questions(scene: Scene, n: int, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """``n`` distinct questions about ``scene``, balanced over question types and yes/no answers."""
    groups: dict[str, list[tuple[str, str, str, str]]] = {}
    for q in scene_questions(scene):
        key = q[2] + ("/" + q[1] if q[3] == "yes/no" else "")  # "is there a/yes" and "is there a/no"
        groups.setdefault(key, []).append(q)
    for g in groups.values():
        rng.shuffle(g)
    keys = sorted(groups)
    out: list[tuple[str, str, str, str]] = []
    while len(out) < n and keys:
        order = keys[:]
        rng.shuffle(order)
        for key in order:
            if len(out) < n and groups[key]:
                out.append(groups[key].pop())
        keys = [k for k in keys if groups[k]]
    return out


def annotator_answers(answer: str, n: int, rng: random.Random, min_agree: int) -> list[str]:
    """``n`` raw annotator answers: at least ``min_agree`` give ``answer``, others may give a variant."""
    out = [answer] * n
    variants = VARIANTS.get(answer, [])
    if variants:
        for i in rng.sample(range(n), n - min_agree):
            if rng.random() < 0.5:
                out[i] = rng.choice(variants)
    for i in range(n):  # annotators sometimes capitalise; the official `answer` field is normalised
        if rng.random() < 0.1:
            out[i] = out[i].capitalize()
    return out


def _info(layout: str) -> dict[str, Any]:
    return {
        "description": f"llavatune synthetic shapes VQA ({layout} layout)",
        "version": "1.0",
        "year": 2014,
        "contributor": "llavatune",
        "url": "",
        "date_created": "2014-01-01 00:00:00",
    }


_LICENSE = {
    "name": "Creative Commons Attribution 4.0 International License",
    "url": "http://creativecommons.org/licenses/by/4.0/",
}


def make_shapes_vqa(
    out_dir: str | os.PathLike,
    n_train_images: int = 64,
    n_val_images: int = 16,
    questions_per_image: int = 3,
    image_size: int = 96,
    seed: int = 0,
    layout: str = "okvqa",
    images_dir: str | os.PathLike | None = None,
    jpeg_quality: int = 90,
) -> dict[str, Path]:
    """Write the synthetic dataset under ``out_dir``; return the paths of what was written.

    Keys: ``root``, ``images_dir``, ``{train,val}_questions``, ``{train,val}_annotations``,
    ``{train,val}_captions``. ``questions_per_image`` is at most 10 (question ids are
    ``image_id * 10 + k`` for OK-VQA and ``image_id * 1000 + k`` for VQAv2, as in the official sets).
    """
    if layout not in LAYOUT_FILES:
        raise ValueError(f"layout must be one of {', '.join(LAYOUT_FILES)}, got {layout!r}")
    if not 1 <= questions_per_image <= 10:
        raise ValueError("questions_per_image must be between 1 and 10")
    if image_size < 16:
        raise ValueError("image_size must be at least 16 pixels")
    root = Path(out_dir)
    img_root = Path(images_dir) if images_dir is not None else root / "images"
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"root": root, "images_dir": img_root}
    rng = random.Random(seed)
    id_base = {"train": 100_000, "val": 500_000}
    for split, n_images in (("train", n_train_images), ("val", n_val_images)):
        subtype = f"{split}2014"
        split_dir = img_root / subtype
        split_dir.mkdir(parents=True, exist_ok=True)
        questions, annotations, captions = [], [], []
        for i in range(n_images):
            image_id = id_base[split] + 7 * i + 1
            scene = random_scene(rng)
            name = f"COCO_{subtype}_{image_id:012d}.jpg"
            draw_scene(scene, image_size, rng).save(split_dir / name, format="JPEG", quality=jpeg_quality)
            rel_image = os.path.relpath(split_dir / name, root).replace(os.sep, "/")
            captions.append(
                {
                    "id": f"shapes-caption-{image_id}",
                    "image": rel_image,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                        {"from": "gpt", "value": scene.caption()},
                    ],
                }
            )
            for k, (question, answer, qtype, atype) in enumerate(sample_questions(scene, questions_per_image, rng)):
                qid = image_id * (10 if layout == "okvqa" else 1000) + k
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append(_annotation(layout, image_id, qid, qtype, atype, answer, rng))
        files = LAYOUT_FILES[layout]
        q_file = root / files["questions"].format(split=split)
        a_file = root / files["annotations"].format(split=split)
        common = {"info": _info(layout), "license": _LICENSE, "data_subtype": subtype, "data_type": "mscoco"}
        q_obj = {**common, "task_type": "Open-Ended", "questions": questions}
        a_obj = {**common, "annotations": annotations}
        q_file.write_text(json.dumps(q_obj), encoding="utf-8")
        a_file.write_text(json.dumps(a_obj), encoding="utf-8")
        c_file = root / f"captions_{split}.json"
        c_file.write_text(json.dumps(captions, indent=1), encoding="utf-8")
        paths[f"{split}_questions"] = q_file
        paths[f"{split}_annotations"] = a_file
        paths[f"{split}_captions"] = c_file
    return paths


def _annotation(layout: str, image_id: int, qid: int, qtype: str, atype: str, answer: str, rng: random.Random):
    if layout == "okvqa":
        # OK-VQA: 5 annotators, each answer stored twice; `answer` is the normalised `raw_answer`.
        raws = annotator_answers(answer, 5, rng, min_agree=3)
        answers = [
            {"answer_id": 2 * j + r + 1, "raw_answer": raw, "answer_confidence": "yes", "answer": raw.lower()}
            for j, raw in enumerate(raws)
            for r in range(2)
        ]
        return {
            "image_id": image_id,
            "question_id": qid,
            "question_type": qtype,
            "answer_type": atype,
            "confidence": rng.choice((3, 4, 5)),
            "answers": answers,
        }
    raws = [a.lower() for a in annotator_answers(answer, 10, rng, min_agree=6)]
    answers = [
        {"answer": a, "answer_confidence": rng.choice(("yes", "yes", "yes", "maybe")), "answer_id": j + 1}
        for j, a in enumerate(raws)
    ]
    return {
        "question_type": qtype,
        "multiple_choice_answer": majority_answer(raws),
        "answers": answers,
        "image_id": image_id,
        "answer_type": atype,
        "question_id": qid,
    }

"""A synthetic visual task with exact answers: coloured shapes on a 3 x 3 grid.

A scene puts 1-4 shapes (square, cross, diamond, triangle; red, green, blue, yellow) in distinct
cells of a 24 x 24 image (8 x 8 pixel cells). From a scene come a caption (stage 1 of LLaVA-style
training aligns image tokens with it) and questions whose answers the scene fixes: counts,
colours and shapes at a position, presence, and arithmetic on a count. The split of a scene
(train or held-out eval) is decided by the hash of its caption, so no held-out image is trained on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from data_pipeline.synthetic.splits import draw

IMAGE_SIZE, CELL = 24, 8
COLOURS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 80, 230), "yellow": (230, 200, 30)}
SHAPES = ("square", "cross", "diamond", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class Shape:
    cell: int  # 0..8, row by row
    colour: str
    shape: str


def _mask(shape: str) -> np.ndarray:
    """(6, 6) bool: the shape drawn inside a cell's 1-pixel margin."""
    y, x = np.mgrid[0:6, 0:6]
    if shape == "square":
        return np.ones((6, 6), bool)
    if shape == "cross":
        return (abs(x - 2.5) < 1.5) | (abs(y - 2.5) < 1.5)
    if shape == "diamond":
        return abs(x - 2.5) + abs(y - 2.5) <= 3
    return abs(x - 2.5) <= y / 2 + 0.5  # triangle, apex up


def render(scene: tuple[Shape, ...]) -> np.ndarray:
    """The scene as a (24, 24, 3) uint8 RGB image on a white background."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
    for s in scene:
        r, c = divmod(s.cell, 3)
        patch = img[r * CELL + 1 : r * CELL + 7, c * CELL + 1 : c * CELL + 7]
        patch[_mask(s.shape)] = COLOURS[s.colour]
    return img


def random_scene(rng: random.Random) -> tuple[Shape, ...]:
    cells = sorted(rng.sample(range(9), rng.randint(1, 4)))
    return tuple(Shape(c, rng.choice(list(COLOURS)), rng.choice(SHAPES)) for c in cells)


def caption(scene: tuple[Shape, ...]) -> str:
    parts = [f"a {s.colour} {s.shape} at the {POSITIONS[s.cell]}" for s in scene]
    return "There " + ("is " if len(scene) == 1 else "are ") + ", ".join(parts) + "."


def questions(scene: tuple[Shape, ...], rng: random.Random) -> list[tuple[str, str]]:
    """(question, exact answer) pairs about the scene, one of each kind."""
    n = len(scene)
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    here = rng.choice(scene)
    k = rng.randint(1, 5)
    has = any(s.colour == colour and s.shape == shape for s in scene)
    return [
        ("How many shapes are there?", str(n)),
        (f"How many {colour} shapes are there?", str(sum(s.colour == colour for s in scene))),
        (f"What colour is the shape at the {POSITIONS[here.cell]}?", here.colour),
        (f"What shape is at the {POSITIONS[here.cell]}?", here.shape),
        (f"Is there a {colour} {shape}?", "yes" if has else "no"),
        (f"How many shapes are there plus {k}?", str(n + k)),
    ]


def image_message(text: str) -> dict:
    """A user turn with one image first (OpenAI content parts; the image itself travels beside the row)."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def make_examples(n_scenes: int, split: str, kind: str, seed: int = 0) -> list[dict]:
    """Rows ``{"messages": [...], "image": (24, 24, 3) uint8}`` for ``n_scenes`` distinct scenes of
    ``split`` ("train" or "eval"). kind "caption": one captioning turn per scene (stage 1);
    "qa": one row per question (stage 2 and eval; each row's last turn is the question's answer)."""
    rng = random.Random(f"visual-{split}-{seed}")
    buckets = ("eval",) if split == "eval" else ("val", "sft", "rl")
    scenes = draw(lambda: random_scene(rng), caption, buckets, n_scenes)
    rows = []
    for scene in scenes:
        image = render(scene)
        if kind == "caption":
            rows.append({"messages": [image_message("Describe the image."),
                                      {"role": "assistant", "content": caption(scene)}], "image": image})
            continue
        for q, a in questions(scene, rng):
            rows.append({"messages": [image_message(q), {"role": "assistant", "content": a}], "image": image})
    return rows


def corpus_text(n_scenes: int = 400, seed: int = 0) -> list[str]:
    """Text of captions, questions and answers (for a tokenizer that knows the task's words)."""
    out = []
    for kind in ("caption", "qa"):
        for row in make_examples(n_scenes, "train", kind, seed):
            out += [part["text"] if isinstance(c, list) else c
                    for m in row["messages"] for c in [m["content"]]
                    for part in (c if isinstance(c, list) else [{"text": c}]) if "text" in part]
    return out

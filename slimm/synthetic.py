"""The demo model's synthetic visual task: seeded scenes of coloured shapes (and one moving shape as a
short video), drawn with Pillow, each with a question and a short answer that is right by construction.

`make_sample(seed, index, split)` gives one sample; `write_heldout` writes a JSONL set for `slimm eval`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Pure palette colours, no anti-aliasing: a rendered scene can be checked pixel by pixel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 190, 20),
}
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 240, 225))
KINDS = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_COUNT = 3
# Every shape of a still scene lies inside one 28 x 28 cell of the image, the pixels of one LLM token
# (2 x 2 patches of 14 after the merger), at a random size and offset. Shapes of 16-34 pixels placed
# anywhere straddled 2-4 tokens, and the tower had to piece a shape together across them: a probe on
# the merger's output told circle / square / triangle apart only 64% of the time after 400 steps
# (colour 97%); inside one cell, 96% after 100 steps and 100% after 300.
CELL = 28
SHAPE_SIZES = (18, 26)  # smallest and largest side, pixels
# (width, height), multiples of 28 (one LLM token per 28 x 28 pixels): 16 to 36 visual tokens, square,
# wide and tall, so the model sees the dynamic-resolution grid in every shape it takes
IMAGE_SIZES = ((112, 112), (168, 112), (112, 168), (196, 112), (112, 196), (140, 140), (168, 168), (224, 112))
VIDEO_SIZES = ((112, 112), (140, 112), (112, 140))
VIDEO_FRAMES = 4  # two temporal patches of two frames
# colour / shape questions about a scene of one shape: the easy end of the task, which is what first
# teaches a model trained from scratch to look at the image at all (position questions are about
# the two-shape scenes, where "left" and "top" cannot both hold)
SINGLE_SHAPE_SHARE = 0.3
QUESTION_TYPES = ("colour", "shape", "position", "count", "describe", "motion")
# separate random streams: held-out scenes (and the shipped example) are never trained on
SPLITS = {"train": 0, "heldout": 1, "example": 2}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Sample:
    id: str
    type: str
    question: str
    answer: str
    image: Image.Image | None = None  # one RGB image, or
    frames: list[Image.Image] | None = None  # the frames of a video
    shapes: list[Shape] = field(default_factory=list)  # what was drawn (first frame for a video)


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(kind: str) -> str:
    return kind + "s"


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill = COLOURS[shape.colour]
    if shape.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape.kind == "triangle":  # pointing up
        draw.polygon(((x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}: one of {', '.join(KINDS)}")


def render(size: tuple[int, int], shapes: list[Shape], background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        draw_shape(draw, s)
    return image


def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _in_cell(rng: np.random.Generator, row: int, col: int, kind: str, colour: str) -> Shape:
    """A shape of SHAPE_SIZES drawn inside cell (row, col) with a margin of at least one pixel, at a
    random offset: whatever its size and offset, all of it lies in one LLM token's pixels."""
    s = int(rng.integers(SHAPE_SIZES[0], SHAPE_SIZES[1] + 1))
    x = CELL * col + int(rng.integers(1, CELL - s))
    y = CELL * row + int(rng.integers(1, CELL - s))
    return Shape(kind, colour, (x, y, x + s, y + s))


def _pair_scene(rng: np.random.Generator) -> tuple[tuple[int, int], list[Shape], bool]:
    """Two shapes of different kinds and colours, one in each half (left/right in one row of cells, or
    top/bottom in one column), so that only one relation holds.
    Returns (size, [first, second], horizontal): first is the left (or upper) one."""
    w, h = _choice(rng, IMAGE_SIZES)
    cols, rows = w // CELL, h // CELL
    horizontal = bool(rng.integers(2))
    k1, k2 = rng.choice(len(KINDS), 2, replace=False)
    c1, c2 = rng.choice(len(COLOURS), 2, replace=False)
    names = list(COLOURS)
    along = cols if horizontal else rows
    # the cells wholly in each half (the middle cell of an odd count is in neither)
    a1, a2 = int(rng.integers(0, along // 2)), int(rng.integers((along + 1) // 2, along))
    b = int(rng.integers(0, rows if horizontal else cols))
    shapes = []
    for k, c, a in ((k1, c1, a1), (k2, c2, a2)):
        row, col = (b, a) if horizontal else (a, b)
        shapes.append(_in_cell(rng, row, col, KINDS[k], names[c]))
    return (w, h), shapes, horizontal


def _single_scene(rng: np.random.Generator) -> tuple[tuple[int, int], list[Shape]]:
    """One shape in any cell."""
    w, h = _choice(rng, IMAGE_SIZES)
    cell = int(rng.integers((w // CELL) * (h // CELL)))
    row, col = divmod(cell, w // CELL)
    return (w, h), [_in_cell(rng, row, col, _choice(rng, KINDS), _choice(rng, list(COLOURS)))]


def _count_scene(rng: np.random.Generator) -> tuple[tuple[int, int], list[Shape], str, int]:
    """1..MAX_COUNT shapes of one kind among 0..2 of other kinds, any colours, each in its own cell."""
    w, h = _choice(rng, IMAGE_SIZES)
    cols, rows = w // CELL, h // CELL
    target = _choice(rng, KINDS)
    n = int(rng.integers(1, MAX_COUNT + 1))
    others = [k for k in KINDS if k != target]
    kinds = [target] * n + [_choice(rng, others) for _ in range(int(rng.integers(0, 3)))]
    cells = rng.choice(cols * rows, len(kinds), replace=False)
    shapes = [
        _in_cell(rng, int(cell) // cols, int(cell) % cols, k, _choice(rng, list(COLOURS)))
        for k, cell in zip(kinds, cells, strict=True)
    ]
    order = rng.permutation(len(shapes))  # drawing order carries no hint of the answer
    return (w, h), [shapes[i] for i in order], target, n


def _motion_video(rng: np.random.Generator) -> tuple[tuple[int, int], list[list[Shape]], str]:
    """One shape moving in a straight line over VIDEO_FRAMES frames; returns per-frame shapes."""
    w, h = _choice(rng, VIDEO_SIZES)
    direction = _choice(rng, ("left", "right", "up", "down"))
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    s = int(rng.integers(20, 31))
    step = int(rng.integers(10, 15))
    travel = step * (VIDEO_FRAMES - 1)
    margin = 3
    # start so that the whole path stays inside the frame
    x_lo, x_hi = margin + max(0, -dx) * travel, w - margin - s - max(0, dx) * travel
    y_lo, y_hi = margin + max(0, -dy) * travel, h - margin - s - max(0, dy) * travel
    x, y = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
    kind, colour = _choice(rng, KINDS), _choice(rng, list(COLOURS))
    frames = []
    for t in range(VIDEO_FRAMES):
        x0, y0 = x + dx * step * t, y + dy * step * t
        frames.append([Shape(kind, colour, (x0, y0, x0 + s, y0 + s))])
    return (w, h), frames, direction


def make_sample(seed: int, index: int, split: str = "train", qtype: str | None = None) -> Sample:
    """Sample `index` of the `split` stream of `seed` (random access: each has its own generator).
    `qtype` forces a question type; by default the types take turns (index mod 6), so any run of
    samples is balanced."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    qtype = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    sid = f"{split}-{seed}-{index:06d}"
    background = _choice(rng, BACKGROUNDS)
    if qtype == "motion":
        size, frames, direction = _motion_video(rng)
        return Sample(
            sid,
            qtype,
            "Which way does it move?",
            direction.capitalize() + ".",
            frames=[render(size, f, background) for f in frames],
            shapes=frames[0],
        )
    if qtype == "count":
        size, shapes, target, n = _count_scene(rng)
        question = f"How many {plural(target)} are there?"
        return Sample(
            sid,
            qtype,
            question,
            number_word(n).capitalize() + ".",
            render(size, shapes, background),
            shapes=shapes,
        )
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}: one of {', '.join(QUESTION_TYPES)}")
    # drawn for every type but describe, so that colour, shape and position questions of one index
    # are about one scene whenever it has two shapes (the shipped example relies on it)
    single = qtype != "describe" and rng.random() < SINGLE_SHAPE_SHARE
    if single and qtype in ("colour", "shape"):
        size, shapes = _single_scene(rng)
        first = second = pick = shapes[0]
        horizontal, which = True, 0
    else:
        size, shapes, horizontal = _pair_scene(rng)
        first, second = shapes
        which = int(rng.integers(2))
        pick = shapes[which]
    if qtype == "colour":
        question, answer = f"What colour is the {pick.kind}?", pick.colour.capitalize() + "."
    elif qtype == "shape":
        question, answer = f"Which shape is {pick.colour}?", f"The {pick.kind}."
    elif qtype == "position":
        where = (("left", "right") if horizontal else ("top", "bottom"))[which]
        question, answer = f"Where is the {pick.colour} {pick.kind}?", where.capitalize() + "."
    else:  # describe
        relation = "left of" if horizontal else "above"
        question = "Describe the image."
        answer = f"A {first.colour} {first.kind} {relation} a {second.colour} {second.kind}."
    return Sample(sid, qtype, question, answer, render(size, shapes, background), shapes=shapes)


def all_texts() -> list[str]:
    """Every question and answer the task can ask or give (the tokens the demo model may use)."""
    texts = ["Which way does it move?", "Describe the image."]
    texts += [d.capitalize() + "." for d in ("left", "right", "up", "down", "top", "bottom")]
    texts += [f"How many {plural(k)} are there?" for k in KINDS]
    texts += [number_word(n).capitalize() + "." for n in range(1, MAX_COUNT + 1)]
    for k in KINDS:
        texts += [f"What colour is the {k}?", f"The {k}."]
        for c in COLOURS:
            texts += [f"Which shape is {c}?", f"Where is the {c} {k}?", c.capitalize() + "."]
            for k2 in KINDS:
                for c2 in COLOURS:
                    for rel in ("left of", "above"):
                        texts.append(f"A {c} {k} {rel} a {c2} {k2}.")
    return texts


def write_heldout(out_dir: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` held-out samples as `out_dir/data.jsonl` with images (PNG) and video frame folders
    beside it; paths in the JSONL are relative to its folder. Returns the JSONL path.
    The folder appears whole (written beside, then renamed)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "media").mkdir(parents=True)
    rows = []
    for i in range(n):
        s = make_sample(seed, i, "heldout")
        row = {"id": s.id, "type": s.type, "question": s.question, "answer": s.answer}
        if s.frames is not None:
            folder = tmp / "media" / f"{i:05d}"
            folder.mkdir()
            for t, frame in enumerate(s.frames):
                frame.save(folder / f"frame_{t}.png")
            row["video"] = f"media/{i:05d}"
        else:
            s.image.save(tmp / "media" / f"{i:05d}.png")
            row["image"] = f"media/{i:05d}.png"
        rows.append(row)
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir / "data.jsonl"

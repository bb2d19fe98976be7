"""Synthetic "shapes" task for the bundled tiny demo VLM.

Every sample is generated on the fly from ``(seed, index)`` with its own ``random.Random`` (no
global RNG), so splits are reproducible and need no storage. An image is 84x84 RGB with 1 to 4
filled shapes (4 colours x 3 kinds) on a white or black background; each shape sits in its own
cell of a drawn 3x3 grid, and no two shapes share both colour and kind, so "the red circle" always
names one shape. The attribute set is deliberately small: the demo model is trained from scratch
in minutes on a CPU, and every attribute it must perceive costs accuracy.

The image size is chosen so that each 28x28 grid cell is exactly one merged vision token of the
Qwen2.5-VL tower (14-pixel patches, 2x2 spatial merge): 9 vision tokens per image, one per cell.
A scaled-down model then reads a cell from one token instead of assembling it from shapes that
straddle token borders, which is what lets it learn the task within the CPU training budget.

Answers are templated and canonical (exact-match gradable). Descriptions walk the nine cells in
reading order (top row first, left to right), naming what each one holds, and are long (over 48
tokens on average with the 512-token demo tokenizer), so that they span two or three 32-token
diffusion blocks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "GRID_COLOR",
    "IMAGE_SIZE",
    "KINDS",
    "POSITIONS",
    "SHAPES",
    "SHAPE_RADIUS",
    "Sample",
    "ShapeSpec",
    "answers_match",
    "corpus_for_tokenizer",
    "make_sample",
    "make_split",
    "render_scene",
]

IMAGE_SIZE = 84  # 3 x 28: one merged vision token per grid cell

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_RADIUS = 10  # half-extent in pixels: with 1 pixel of jitter a shape stays inside its 28-pixel cell
# Black, not gray: the vision tower's patch embedding has no bias and every block starts with an
# RMSNorm, so a gray background (nearly a scaled-down white) is almost invisible to a model
# trained from scratch, while black points the opposite way.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
# The 3x3 grid is drawn (tic-tac-toe lines) so that every cell looks different at its edges: the
# vision tower has only relative (rotary) positions, so on a plain background a cell's token could
# not tell where it is, and "what is at the top left" would need the language model to count
# tokens. With the lines, a cell's token carries its position in its content.
GRID_COLOR = (128, 128, 128)

# 3x3 grid cells in reading order: (name, phrase used in answers).
POSITIONS: tuple[tuple[str, str], ...] = (
    ("top left", "at the top left"),
    ("top", "at the top"),
    ("top right", "at the top right"),
    ("left", "on the left"),
    ("center", "in the center"),
    ("right", "on the right"),
    ("bottom left", "at the bottom left"),
    ("bottom", "at the bottom"),
    ("bottom right", "at the bottom right"),
)

NUMBER_WORDS = ("no", "one", "two", "three", "four")

# Prompt kinds and their share of the default mixture (descriptions dominate on purpose).
KINDS: tuple[tuple[str, float], ...] = (
    ("describe", 0.45),
    ("count", 0.10),
    ("color", 0.08),
    ("where", 0.09),
    ("yesno", 0.10),
    ("arithmetic", 0.06),
    ("spelling", 0.05),
    ("multiturn", 0.07),
)

DESCRIBE_PROMPTS = (
    "Describe the image.",
    "Describe all the shapes in the image.",
    "What is in this image?",
)
SPELLING_WORDS = (
    "apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "melon", "plum",
    "house", "river", "mountain", "forest", "garden", "window", "table", "chair", "pencil", "paper",
    "circle", "square", "triangle", "diamond", "shape", "color", "purple", "yellow", "green", "blue",
    "water", "light", "music", "happy", "little", "animal", "rabbit", "tiger", "horse", "zebra",
    "quick", "jumps", "dozen", "vivid", "box", "sky", "cloud", "night", "dream", "ocean",
)  # fmt: skip


@dataclass(frozen=True)
class ShapeSpec:
    shape: str  # one of SHAPES
    color: str  # key of COLORS
    cell: int  # index into POSITIONS (row-major 3x3)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell][0]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[ShapeSpec, ...]  # sorted by cell (reading order)


@dataclass(frozen=True)
class Sample:
    kind: str
    image: Image.Image | None
    messages: list[dict]  # full conversation including every assistant turn
    prompt_messages: list[dict]  # everything before the last assistant turn
    answer: str  # the last assistant turn
    scene: Scene | None = None  # the drawn scene (None for text-only samples)


# ----------------------------------------------------------------------------------------------
# Scenes and rendering
# ----------------------------------------------------------------------------------------------


SHAPE_COUNT_WEIGHTS = (1, 2, 3, 3)  # of 1, 2, 3, 4 shapes per image


def _make_scene(rng: random.Random, max_shapes: int = 4) -> Scene:
    counts = tuple(range(1, max_shapes + 1))
    n_shapes = rng.choices(counts, weights=SHAPE_COUNT_WEIGHTS[:max_shapes])[0]
    cells = sorted(rng.sample(range(9), n_shapes))
    combos = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_shapes)
    shapes = tuple(
        ShapeSpec(shape=s, color=c, cell=cell)
        for cell, (c, s) in zip(cells, combos)
    )
    return Scene(background=rng.choice(tuple(BACKGROUNDS)), shapes=shapes)


def render_scene(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene``; ``rng`` (if given) jitters positions by up to 1 pixel."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = IMAGE_SIZE / 3
    for k in (1, 2):  # a 2-pixel line on each inner cell border: one pixel in each neighbouring cell
        b = round(k * cell)
        draw.rectangle((b - 1, 0, b, IMAGE_SIZE - 1), fill=GRID_COLOR)
        draw.rectangle((0, b - 1, IMAGE_SIZE - 1, b), fill=GRID_COLOR)
    for spec in scene.shapes:
        row, col = divmod(spec.cell, 3)
        dx, dy = (rng.randint(-1, 1), rng.randint(-1, 1)) if rng is not None else (0, 0)
        cx, cy = (col + 0.5) * cell + dx, (row + 0.5) * cell + dy
        r = SHAPE_RADIUS
        fill = COLORS[spec.color]
        if spec.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif spec.shape == "square":
            k = r * 0.9
            draw.rectangle((cx - k, cy - k, cx + k, cy + k), fill=fill)
        elif spec.shape == "triangle":
            pts = [
                (cx + r * math.cos(a), cy - r * math.sin(a))
                for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
            ]
            draw.polygon([(x, y + r * 0.2) for x, y in pts], fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(spec.shape)
    return img


# ----------------------------------------------------------------------------------------------
# Canonical answers
# ----------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    """Indefinite article + word ("an orange circle", "a red circle")."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape: str) -> str:
    return shape + "s"


def _count_answer(n: int, noun: str = "shape") -> str:
    if n == 1:
        return f"There is one {noun}."
    return f"There are {NUMBER_WORDS[n]} {_plural(noun)}."


def describe(scene: Scene) -> str:
    """Count and background, then every cell in reading order: "Top left: red circle." or
    "Top: empty." (a fixed walk over the grid, so each entry is read from one vision token)."""
    n = len(scene.shapes)
    head = "There is one shape" if n == 1 else f"There are {NUMBER_WORDS[n]} shapes"
    parts = [f"{head} on a {scene.background} background."]
    by_cell = {s.cell: s for s in scene.shapes}
    for cell, (name, _) in enumerate(POSITIONS):
        s = by_cell.get(cell)
        parts.append(f"{name.capitalize()}: {s.name if s else 'empty'}.")
    return " ".join(parts)


def _where_answer(s: ShapeSpec) -> str:
    return f"The {s.name} is {POSITIONS[s.cell][1]}."


def _image_turn(image: Image.Image, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def _qa_about_scene(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str, str]:
    """(kind, question, answer) for a single-turn question about ``scene``; falls back to
    ``where`` when a ``color`` question would be ambiguous."""
    shapes = scene.shapes
    if kind == "count":
        if rng.random() < 0.5:
            return kind, "How many shapes are there?", _count_answer(len(shapes))
        noun = rng.choice(SHAPES)
        n = sum(s.shape == noun for s in shapes)
        answer = f"There are no {_plural(noun)}." if n == 0 else _count_answer(n, noun)
        return kind, f"How many {_plural(noun)} are there?", answer
    if kind == "color":
        unique = [s for s in shapes if sum(t.shape == s.shape for t in shapes) == 1]
        if unique:
            s = rng.choice(unique)
            return kind, f"What color is the {s.shape}?", f"The {s.shape} is {s.color}."
        kind = "where"
    if kind == "where":
        s = rng.choice(shapes)
        return kind, f"Where is the {s.name}?", _where_answer(s)
    if kind == "yesno":
        present = {(s.color, s.shape) for s in shapes}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return kind, f"Is there {_a(color)} {shape}?", f"Yes, there is {_a(color)} {shape}."
        absent = sorted((c, s) for c in COLORS for s in SHAPES if (c, s) not in present)
        color, shape = rng.choice(absent)
        return kind, f"Is there {_a(color)} {shape}?", f"No, there is no {color} {shape}."
    raise ValueError(kind)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."


def _spelling(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(SPELLING_WORDS)
    return f"Spell the word {word}.", "-".join(word)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _rng(seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random(f"fast-dvlm-shapes:{int(seed)}:{int(index)}")


def make_sample(seed: int, index: int, max_shapes: int = 4) -> Sample:
    """The ``index``-th sample of the split generated from ``seed`` (pure function).

    ``max_shapes`` < 4 draws simpler scenes (the training curriculum); 4 is the task itself.
    """
    if not 1 <= max_shapes <= 4:
        raise ValueError(f"max_shapes must be in [1, 4], got {max_shapes}")
    rng = _rng(seed, index)
    kinds, weights = zip(*KINDS)
    kind = rng.choices(kinds, weights=weights)[0]

    if kind in ("arithmetic", "spelling"):
        question, answer = _arithmetic(rng) if kind == "arithmetic" else _spelling(rng)
        prompt = [{"role": "user", "content": question}]
        return Sample(kind, None, prompt + [_assistant(answer)], prompt, answer, None)

    scene = _make_scene(rng, max_shapes)
    image = render_scene(scene, rng)
    if kind == "describe":
        prompt = [_image_turn(image, rng.choice(DESCRIBE_PROMPTS))]
        answer = describe(scene)
        return Sample(kind, image, prompt + [_assistant(answer)], prompt, answer, scene)
    if kind == "multiturn":
        _, q1, a1 = _qa_about_scene(rng, scene, "count")
        _, q2, a2 = _qa_about_scene(rng, scene, rng.choice(("color", "where", "yesno")))
        prompt = [_image_turn(image, q1), _assistant(a1), {"role": "user", "content": q2}]
        return Sample(kind, image, prompt + [_assistant(a2)], prompt, a2, scene)
    kind, question, answer = _qa_about_scene(rng, scene, kind)
    prompt = [_image_turn(image, question)]
    return Sample(kind, image, prompt + [_assistant(answer)], prompt, answer, scene)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def make_split(seed: int, n: int) -> list[Sample]:
    return [make_sample(seed, i) for i in range(n)]


def corpus_for_tokenizer(seed: int, n: int) -> Iterator[str]:
    """Texts to train the demo tokenizer on: every turn of ``n`` samples as the chat template
    renders it (role line + content, special tokens left out), plus the default system turn."""
    yield "system\nYou are a helpful assistant."
    for i in range(n):
        sample = make_sample(seed, i)
        yield "system\nYou are a helpful assistant."
        for msg in sample.messages:
            content = msg["content"]
            if not isinstance(content, str):
                content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            yield f"{msg['role']}\n{content}"


def answers_match(pred: str, ref: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return pred.strip() == ref.strip()

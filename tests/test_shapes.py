"""The synthetic shapes dataset: determinism, answer consistency, answer lengths."""

from __future__ import annotations

import collections
import re
import statistics

import numpy as np
import pytest

from fast_dvlm_sglang import tokenizer as tk
from fast_dvlm_sglang.demo import shapes

N = 400


@pytest.fixture(scope="module")
def split():
    return shapes.make_split(7, N)


def _image_bytes(sample):
    return None if sample.image is None else sample.image.tobytes()


def _texts(messages):
    out = []
    for m in messages:
        c = m["content"]
        out.append((m["role"], c if isinstance(c, str) else [p.get("text", "<image>") for p in c]))
    return out


def test_deterministic_per_seed(split):
    again = shapes.make_split(7, 50)
    for a, b in zip(split, again):
        assert (a.kind, a.answer, a.scene) == (b.kind, b.answer, b.scene)
        assert _texts(a.messages) == _texts(b.messages)
        assert _image_bytes(a) == _image_bytes(b)
    # any index on its own gives the same sample (no hidden state between samples)
    assert _image_bytes(shapes.make_sample(7, 33)) == _image_bytes(split[33])
    other = shapes.make_split(8, 50)
    assert [s.answer for s in other] != [s.answer for s in split[:50]]
    img_a = [_image_bytes(s) for s in split[:50] if s.image is not None]
    img_b = [_image_bytes(s) for s in other if s.image is not None]
    assert set(img_a).isdisjoint(img_b)


def test_images_and_scenes(split):
    for s in split:
        if s.image is None:
            assert s.kind in ("arithmetic", "spelling") and s.scene is None
            continue
        assert s.image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and s.image.mode == "RGB"
        specs = s.scene.shapes
        assert 1 <= len(specs) <= 4
        assert len({p.cell for p in specs}) == len(specs)
        assert len({(p.color, p.shape) for p in specs}) == len(specs)
        assert [p.cell for p in specs] == sorted(p.cell for p in specs)
        arr = np.asarray(s.image)
        background = shapes.BACKGROUNDS[s.scene.background]
        cell = shapes.IMAGE_SIZE // 3
        occupied = {p.cell: p for p in specs}
        for index in range(9):  # a shape lies entirely inside its own cell (one vision token)
            row, col = divmod(index, 3)
            # the drawn grid: a line on each edge shared with another cell, none on the image border
            top, bottom = arr[row * cell, col * cell : (col + 1) * cell], arr[(row + 1) * cell - 1, col * cell : (col + 1) * cell]
            left, right = arr[row * cell : (row + 1) * cell, col * cell], arr[row * cell : (row + 1) * cell, (col + 1) * cell - 1]
            for edge, inner in ((top, row > 0), (bottom, row < 2), (left, col > 0), (right, col < 2)):
                expected = shapes.GRID_COLOR if inner else background
                assert (edge[1:-1] == expected).all(), (index, edge)
            inside = arr[row * cell + 1 : (row + 1) * cell - 1, col * cell + 1 : (col + 1) * cell - 1].reshape(-1, 3)
            if index in occupied:
                assert (inside == shapes.COLORS[occupied[index].color]).all(axis=1).sum() > 100, (s.answer, index)
                assert ((inside == shapes.COLORS[occupied[index].color]) | (inside == background)).all(axis=1).all()
            else:
                assert (inside == background).all(), (s.answer, index)


def test_mixture(split):
    counts = collections.Counter(s.kind for s in split)
    assert set(counts) == {k for k, _ in shapes.KINDS}
    assert 0.35 <= counts["describe"] / N <= 0.55


def test_answers_match_scene(split):
    words = {w: i for i, w in enumerate(shapes.NUMBER_WORDS)}
    for s in split:
        question = s.prompt_messages[-1]["content"]
        question = question if isinstance(question, str) else question[-1]["text"]
        specs = s.scene.shapes if s.scene else ()
        if question == "How many shapes are there?":
            m = re.fullmatch(r"There (?:is|are) (\w+) shapes?\.", s.answer)
            assert words[m.group(1)] == len(specs)
        if s.kind == "count" and question != "How many shapes are there?":
            noun = re.fullmatch(r"How many (\w+)s are there\?", question).group(1)
            m = re.fullmatch(r"There (?:is|are) (\w+) \w+\.", s.answer)
            assert words[m.group(1)] == sum(p.shape == noun for p in specs)
        if s.kind == "describe":
            assert s.answer == shapes.describe(s.scene)
            assert s.answer.count(": empty.") == 9 - len(specs)
            for p in specs:
                name = shapes.POSITIONS[p.cell][0].capitalize()
                assert re.search(rf"(^| ){name}: {p.color} {p.shape}\.", s.answer), (s.answer, p)
        if s.kind == "color" or (s.kind == "multiturn" and question.startswith("What color")):
            shape = re.fullmatch(r"What color is the (\w+)\?", question).group(1)
            (only,) = [p for p in specs if p.shape == shape]  # asked only when unambiguous
            assert s.answer == f"The {shape} is {only.color}."
        if question.startswith("Where is the"):
            color, shape = re.fullmatch(r"Where is the (\w+) (\w+)\?", question).groups()
            (p,) = [p for p in specs if (p.color, p.shape) == (color, shape)]
            assert s.answer == f"The {color} {shape} is {shapes.POSITIONS[p.cell][1]}."
        if question.startswith("Is there"):
            color, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", question).groups()
            present = any((p.color, p.shape) == (color, shape) for p in specs)
            assert s.answer.startswith("Yes," if present else "No,")
        if s.kind == "arithmetic":
            a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
            assert s.answer == f"{a} {op} {b} = {int(a) + int(b) if op == '+' else int(a) - int(b)}."
        if s.kind == "spelling":
            word = re.fullmatch(r"Spell the word (\w+)\.", question).group(1)
            assert s.answer == "-".join(word)
        if s.kind == "multiturn":
            assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
            assert s.prompt_messages == s.messages[:-1]
        else:
            assert s.prompt_messages == s.messages[:-1] and s.messages[-1]["role"] == "assistant"
        assert s.messages[-1]["content"] == s.answer


def test_description_length_with_trained_tokenizer(split):
    tok = tk.train_tokenizer(shapes.corpus_for_tokenizer(0, 2000), 512)
    lengths = [len(tok.encode(s.answer, add_special_tokens=False)) for s in split if s.kind == "describe"]
    assert statistics.mean(lengths) >= 48
    assert min(lengths) > 32  # every description spans more than one 32-token block


def test_answers_match():
    assert shapes.answers_match(" The square is red.\n", "The square is red.")
    assert not shapes.answers_match("The square is blue.", "The square is red.")

"""``scenes_vqa``: deterministic, well-formed, answers consistent with the scene, fixed disjoint splits."""

import numpy as np
import pytest
import torch

from training.data import Benchmark, load_benchmark
from training.data.scenes import (
    ALL_FAMILIES,
    ANSWERS,
    CELLS,
    COLORS,
    FAMILIES,
    LETTERS,
    QUESTIONS,
    SHAPES,
    Obj,
    VqaDomain,
    VqaSamples,
    _letter_fonts,
    make_family,
    random_scene,
)

#: the answers each family may give (a family never answers outside its own subset)
FAMILY_ANSWERS = {
    "color": set(COLORS),
    "shape": set(SHAPES),
    "count": {str(i) for i in range(len(COLORS) + 1)},
    "where": set(CELLS),
    "relation": set(COLORS),
    "text": set(LETTERS),
    "exist": {"yes", "no"},
    "rel_shape": set(SHAPES),
    "rel_exist": {"yes", "no"},
    "color_at": set(COLORS),
    "shape_at": set(SHAPES),
}


def test_answer_vocabulary_is_fixed_and_unique():
    assert len(ANSWERS) == len(set(ANSWERS)) == 35
    assert set().union(*FAMILY_ANSWERS.values()) == set(ANSWERS)
    assert list(QUESTIONS) == ALL_FAMILIES and ALL_FAMILIES[: len(FAMILIES)] == FAMILIES  # old seeds kept


def test_the_original_families_generate_what_they_did():
    """Appending families keeps every original family's generator (the committed tables' data)."""
    s = make_family("where", 3, seed=0)
    assert s.questions == [QUESTIONS_BEFORE[0], QUESTIONS_BEFORE[1], QUESTIONS_BEFORE[2]]


# what main@8c0fb86 generated
QUESTIONS_BEFORE = ["where is the blue object?", "where is the yellow object?", "where is the purple object?"]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_is_deterministic_and_well_formed(family):
    a, b = make_family(family, 40, seed=5), make_family(family, 40, seed=5)
    assert torch.equal(a.images, b.images) and a.questions == b.questions and torch.equal(a.answers, b.answers)
    assert a.images.dtype == torch.uint8 and a.images.shape == (40, 3, 64, 64)
    assert a.answers.dtype == torch.int64 and len(a) == 40
    assert {ANSWERS[i] for i in a.answers.tolist()} <= FAMILY_ANSWERS[family]
    other = make_family(family, 40, seed=5, stream=1)  # the pretraining stream differs from the benchmark's
    assert not torch.equal(a.images, other.images)


def test_scenes_have_unique_colours_and_cells():
    rng = np.random.RandomState(0)
    for _ in range(200):
        s = random_scene(rng)
        assert 2 <= len(s) <= len(COLORS)
        assert len({o.color for o in s}) == len(s) and len({o.cell for o in s}) == len(s)


def test_questions_follow_the_scene():
    # cells:  0 1 2 / 3 4 5 / 6 7 8
    scene = [
        Obj("red", "circle", 0, "A"),
        Obj("blue", "square", 2, "K"),
        Obj("green", "circle", 4, "M"),
        Obj("orange", "triangle", 8, "X"),
    ]
    rng = np.random.RandomState(0)
    seen: dict[str, set] = {}
    for fam, (ask, _) in QUESTIONS.items():
        for _ in range(60):
            q, a = ask(scene, rng)
            seen.setdefault(fam, set()).add((q, a))
    assert seen["color"] <= {("what color is the square?", "blue"), ("what color is the triangle?", "orange")}
    assert ("how many circles are there?", "2") in seen["count"]
    assert ("how many squares are there?", "1") in seen["count"]
    assert ("where is the green object?", "center") in seen["where"]
    # nearest along the row / column; "left of" blue skips the empty cell 1
    assert ("what color is the object left of the blue object?", "red") in seen["relation"]
    assert ("what color is the object below the blue object?", "orange") in seen["relation"]
    assert ("which letter is on the green object?", "M") in seen["text"]
    assert ("what shape is the object left of the blue object?", "circle") in seen["rel_shape"]
    assert ("what shape is the object above the orange object?", "square") in seen["rel_shape"]
    assert ("is there an object left of the blue object?", "yes") in seen["rel_exist"]
    assert ("is there an object left of the red object?", "no") in seen["rel_exist"]
    assert ("what color is the object in the top-right?", "blue") in seen["color_at"]
    assert ("what shape is the object in the bottom-right?", "triangle") in seen["shape_at"]
    for q, a in seen["exist"]:
        words = q.removesuffix("?").split()
        assert a == ("yes" if (words[-2], words[-1]) in {(o.color, o.shape) for o in scene} else "no")
        assert words[2] == ("an" if words[3] == "orange" else "a")


def test_exist_is_balanced():
    s = make_family("exist", 200)
    yes = (s.answers == ANSWERS.index("yes")).float().mean().item()
    assert 0.4 < yes < 0.6


def test_letter_fonts_draw_every_letter():
    assert len(_letter_fonts()) >= 3


def test_benchmark_has_fixed_disjoint_splits():
    bench = load_benchmark("scenes_vqa", domains=["shape", "text"], n_train=30, n_test=10, seed=1)
    assert isinstance(bench, Benchmark) and bench.classes == ANSWERS
    assert [d.name for d in bench.domains] == ["shape", "text"]
    d = bench.domain("text")
    assert isinstance(d, VqaDomain) and len(d.train) == 30 and len(d.test) == 10
    assert isinstance(d.train, VqaSamples) and d.train.questions == d.q_train
    train = {bytes(x.numpy()) for x in d.x_train}
    assert not any(bytes(x.numpy()) in train for x in d.x_test)
    again = load_benchmark("scenes_vqa", domains=["text"], n_train=30, n_test=10, seed=1).domain("text")
    assert torch.equal(again.x_test, d.x_test) and again.q_test == d.q_test


def test_subset():
    s = make_family("where", 10)
    sub = s.subset(torch.tensor([3, 1]))
    assert sub.questions == [s.questions[3], s.questions[1]] and torch.equal(sub.images[0], s.images[3])
    assert len(s.subset(slice(2, 5))) == 3


def test_unknown_family():
    with pytest.raises(KeyError, match="known"):
        make_family("ocr", 1)


def test_a_family_that_cannot_be_asked_fails_instead_of_looping():
    with pytest.raises(ValueError, match="relation"):
        make_family("relation", 2, objects=(1, 1))  # left/right of the X needs a second object

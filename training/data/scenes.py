"""``scenes_vqa``: Sort-of-CLEVR-style visual question answering, one question family per domain.

Each 64×64 scene holds 2–6 coloured shapes (circle, square, triangle) in distinct cells of a 3×3 grid,
every colour at most once, so "the red object" always names one object. Seven question families play the
part of CoIN's datasets (Chen et al., 2024), each with its own question template and answer subset:

==========  ==========================================================  ===========================
family      question (example)                                          answers
==========  ==========================================================  ===========================
color       what color is the triangle?  (that shape occurs once)       6 colours
shape       what shape is the blue object?                              3 shapes
count       how many circles are there?                                 0 … 6
where       where is the green object?                                  9 grid cells (top-left …)
relation    what color is the object left of the red object?            6 colours (left/right/above/below:
                                                                        nearest in the same row/column)
text        which letter is on the yellow object?  (letters drawn on    8 letters
            every object, matplotlib's bundled TTF fonts)
exist       is there a purple square?  (balanced yes/no)                yes, no
==========  ==========================================================  ===========================

All families share one fixed answer vocabulary, :data:`ANSWERS` (answer ids index it). Generation is
seeded per (seed, family, stream), so train, held-out and pretraining streams never share a generator.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from .base import Benchmark, Domain, register_benchmark
from .digits import _font, _fonts
from .images import to_chw

CANVAS = 64  # px, square
GRID = 3  # GRID × GRID cells, at most one object per cell
CELL = CANVAS / GRID
COLORS = {  # name -> RGB; jittered by ±20 per channel when drawn
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES = ["circle", "square", "triangle"]
CELLS = ["top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right"]
LETTERS = ["A", "E", "H", "K", "M", "R", "T", "X"]  # shapes distinct at ~11 px
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (drow, dcol)
MAX_OBJECTS = len(COLORS)
ANSWERS: list[str] = list(COLORS) + SHAPES + [str(i) for i in range(MAX_OBJECTS + 1)] + CELLS + LETTERS + ["yes", "no"]
ANSWER_ID = {a: i for i, a in enumerate(ANSWERS)}
FAMILIES = ["color", "shape", "count", "where", "relation", "text", "exist"]  # the domain order
# Templates no model was pretrained on (the continual-VQA benchmark's new families, ``scenes_vqa_new``):
# relation variants that answer a shape or yes/no, and position -> attribute (the inverse of ``where``).
EXTRA_FAMILIES = ["rel_shape", "rel_exist", "color_at", "shape_at"]
ALL_FAMILIES = FAMILIES + EXTRA_FAMILIES  # appended: the families above keep their generator seeds


@dataclass(frozen=True)
class Obj:
    """One object of a scene."""

    color: str
    shape: str
    cell: int  # 0..8, row-major
    letter: str | None = None  # drawn on the object in ``text`` scenes


@dataclass
class VqaSamples:
    """Stored VQA examples: what a task turns into batches."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    questions: list[str]  # N questions
    answers: torch.Tensor  # (N,) int64 indices into the benchmark's answer list
    # (N, C, h, w) float: the images through a model's frozen trunk, cached by its task (``Task.prepare``)
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: torch.Tensor | list[int] | slice) -> VqaSamples:
        """The examples at ``idx`` (a slice, index list or 1-D index tensor)."""
        f = self.features
        if isinstance(idx, slice):
            return VqaSamples(self.images[idx], self.questions[idx], self.answers[idx], None if f is None else f[idx])
        ids = torch.as_tensor(idx, dtype=torch.int64)
        return VqaSamples(self.images[ids], [self.questions[i] for i in ids.tolist()], self.answers[ids],
                          None if f is None else f[ids])

    @classmethod
    def unanswered(cls, images: torch.Tensor, questions: Sequence[str] | None) -> VqaSamples:
        """Inference samples: one question per image (N, 3, H, W uint8), answers unknown (-1).

        Raises:
            ValueError: not one question per image.
        """
        questions = list(questions or [])
        if len(questions) != len(images):
            raise ValueError(f"{len(images)} images and {len(questions)} questions: one question per image")
        return cls(images, questions, torch.full((len(questions),), -1, dtype=torch.int64))

    @classmethod
    def concat(cls, parts: list[VqaSamples]) -> VqaSamples:
        """The examples of ``parts`` one after another (features kept only when every part has them)."""
        feats = [p.features for p in parts]
        return cls(
            torch.cat([p.images for p in parts]),
            sum((p.questions for p in parts), []),
            torch.cat([p.answers for p in parts]),
            None if any(f is None for f in feats) else torch.cat(feats),
        )


@dataclass
class VqaDomain(Domain):
    """A :class:`Domain` whose examples also carry questions (``y_*`` are answer ids).

    Code that only reads ``x_*`` / ``y_*`` still runs; VQA code reads :attr:`train` / :attr:`test`.
    """

    q_train: list[str] = field(default_factory=list)  # questions aligned with x_train
    q_test: list[str] = field(default_factory=list)  # questions aligned with x_test
    f_train: torch.Tensor | None = None  # cached trunk features aligned with x_train (``Task.prepare``)
    f_test: torch.Tensor | None = None  # ... with x_test

    @classmethod
    def pooled(cls, name: str, domains: list[Domain]) -> VqaDomain:
        """One domain holding the training data (questions and cached features included) of ``domains``."""
        train, empty = VqaSamples.concat([x.train for x in domains]), torch.empty(0)
        return cls(name, train.images, train.answers, empty, empty, q_train=train.questions, f_train=train.features)

    def heldout_as_train(self) -> VqaDomain:
        """This domain with its held-out split (questions, features) in the training fields."""
        return dataclasses.replace(super().heldout_as_train(), q_train=self.q_test, f_train=self.f_test)

    @property
    def train(self) -> VqaSamples:
        """The training split."""
        return VqaSamples(self.x_train, self.q_train, self.y_train, self.f_train)

    @property
    def test(self) -> VqaSamples:
        """The held-out split."""
        return VqaSamples(self.x_test, self.q_test, self.y_test, self.f_test)


# --- scenes -------------------------------------------------------------------------------------------


def random_scene(
    rng: np.random.RandomState, letters: bool = False, objects: tuple[int, int] = (2, MAX_OBJECTS)
) -> list[Obj]:
    """``objects`` = (min, max) objects with distinct colours in distinct cells; a letter on each when ``letters``."""
    n = int(rng.randint(objects[0], objects[1] + 1))
    colors = rng.choice(list(COLORS), size=n, replace=False)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    return [
        Obj(str(c), SHAPES[rng.randint(len(SHAPES))], int(k), LETTERS[rng.randint(len(LETTERS))] if letters else None)
        for c, k in zip(colors, cells)
    ]


@functools.lru_cache(maxsize=1)
def _letter_fonts() -> tuple[str, ...]:
    """matplotlib's bundled TTFs that draw every letter of :data:`LETTERS` (some draw blank glyphs)."""

    def draws(path: str) -> bool:
        for ch in LETTERS:
            im = Image.new("L", (24, 24), 0)
            ImageDraw.Draw(im).text((12, 12), ch, fill=255, font=_font(path, 14), anchor="mm")
            if not np.asarray(im).any():
                return False
        return True

    return tuple(f for f in _fonts() if draws(f))


def render(scene: list[Obj], rng: np.random.RandomState) -> np.ndarray:
    """Draw a scene: (CANVAS, CANVAS, 3) uint8, light noisy background, positions and colours jittered."""
    bg = int(rng.randint(215, 245))
    im = Image.new("RGB", (CANVAS, CANVAS), (bg, bg, bg))
    d = ImageDraw.Draw(im)
    fonts = _letter_fonts()
    for o in scene:
        r = rng.uniform(8.0, 9.5) if o.letter else rng.uniform(6.0, 8.5)  # radius; letters need room
        row, col = divmod(o.cell, GRID)
        cx = (col + 0.5) * CELL + rng.uniform(-1.5, 1.5)
        cy = (row + 0.5) * CELL + rng.uniform(-1.5, 1.5)
        rgb = tuple(min(255, max(0, v + int(j))) for v, j in zip(COLORS[o.color], rng.randint(-20, 21, size=3)))
        box = [cx - r, cy - r, cx + r, cy + r]
        if o.shape == "circle":
            d.ellipse(box, fill=rgb)
        elif o.shape == "square":
            d.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=rgb)
        else:  # triangle, pointing up
            d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=rgb)
        if o.letter:
            ink = (0, 0, 0) if sum(rgb) > 420 else (255, 255, 255)  # dark ink on yellow/orange
            font = _font(fonts[rng.randint(len(fonts))], int(rng.randint(11, 14)))
            d.text((cx, cy + (2 if o.shape == "triangle" else 0)), o.letter, fill=ink, font=font, anchor="mm")
    img = np.asarray(im).astype(np.int16) + rng.randint(-6, 7, size=(CANVAS, CANVAS, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


# --- question families: scene -> (question, answer) or None to draw another scene ---------------------

QuestionFn = Callable[[list[Obj], np.random.RandomState], tuple[str, str] | None]


def _q_color(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str] | None:
    unique = [o for o in s if sum(p.shape == o.shape for p in s) == 1]
    if not unique:
        return None
    o = unique[rng.randint(len(unique))]
    return f"what color is the {o.shape}?", o.color


def _q_shape(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str]:
    o = s[rng.randint(len(s))]
    return f"what shape is the {o.color} object?", o.shape


def _q_count(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str]:
    shape = SHAPES[rng.randint(len(SHAPES))]
    return f"how many {shape}s are there?", str(sum(o.shape == shape for o in s))


def _q_where(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str]:
    o = s[rng.randint(len(s))]
    return f"where is the {o.color} object?", CELLS[o.cell]


def _neighbour(s: list[Obj], ref: Obj, step: tuple[int, int]) -> Obj | None:
    """The nearest object from ``ref`` in direction ``step`` along its row or column."""
    row, col = divmod(ref.cell, GRID)
    by_cell = {o.cell: o for o in s}
    for k in range(1, GRID):
        r, c = row + k * step[0], col + k * step[1]
        if not (0 <= r < GRID and 0 <= c < GRID):
            return None
        if r * GRID + c in by_cell:
            return by_cell[r * GRID + c]
    return None


def _related(s: list[Obj], rng: np.random.RandomState) -> tuple[str, Obj, Obj] | None:
    """A random ``(relation, object, the object in that relation to it)`` of the scene, or None."""
    options = [(rel, o, n) for rel, st in RELATIONS.items() for o in s if (n := _neighbour(s, o, st))]
    return options[rng.randint(len(options))] if options else None


def _q_relation(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str] | None:
    if (found := _related(s, rng)) is None:
        return None
    rel, o, n = found
    return f"what color is the object {rel} the {o.color} object?", n.color


def _q_rel_shape(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str] | None:
    if (found := _related(s, rng)) is None:
        return None
    rel, o, n = found
    return f"what shape is the object {rel} the {o.color} object?", n.shape


def _q_rel_exist(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str] | None:
    pairs = [(rel, o, _neighbour(s, o, st) is not None) for rel, st in RELATIONS.items() for o in s]
    want = bool(rng.rand() < 0.5)  # balanced yes/no where the scene allows it
    options = [(rel, o) for rel, o, has in pairs if has == want]
    if not options:
        return None
    rel, o = options[rng.randint(len(options))]
    return f"is there an object {rel} the {o.color} object?", "yes" if want else "no"


def _q_color_at(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str]:
    o = s[rng.randint(len(s))]
    return f"what color is the object in the {CELLS[o.cell]}?", o.color


def _q_shape_at(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str]:
    o = s[rng.randint(len(s))]
    return f"what shape is the object in the {CELLS[o.cell]}?", o.shape


def _q_text(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str]:
    o = s[rng.randint(len(s))]
    return f"which letter is on the {o.color} object?", str(o.letter)


def _q_exist(s: list[Obj], rng: np.random.RandomState) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in s}
    if rng.rand() < 0.5:
        c, sh = sorted(present)[rng.randint(len(present))]
        answer = "yes"
    else:
        absent = sorted({(c, sh) for c in COLORS for sh in SHAPES} - present)
        c, sh = absent[rng.randint(len(absent))]
        answer = "no"
    return f"is there {'an' if c[0] in 'aeiou' else 'a'} {c} {sh}?", answer


#: family -> (question function, whether its scenes carry letters)
QUESTIONS: dict[str, tuple[QuestionFn, bool]] = {
    "color": (_q_color, False),
    "shape": (_q_shape, False),
    "count": (_q_count, False),
    "where": (_q_where, False),
    "relation": (_q_relation, False),
    "text": (_q_text, True),
    "exist": (_q_exist, False),
    "rel_shape": (_q_rel_shape, False),
    "rel_exist": (_q_rel_exist, False),
    "color_at": (_q_color_at, False),
    "shape_at": (_q_shape_at, False),
}


def make_family(
    family: str, n: int, seed: int = 0, stream: int = 0, objects: tuple[int, int] = (2, MAX_OBJECTS)
) -> VqaSamples:
    """``n`` deterministic examples of one question family.

    Args:
        family: One of :data:`ALL_FAMILIES`.
        n: Number of examples.
        seed: Benchmark seed.
        stream: Independent generator per use (0: benchmark splits, 1: pretraining), so streams never overlap.
        objects: (min, max) objects per scene; fewer make easier scenes (the pretraining warm-up uses 1–3).

    Raises:
        KeyError: for an unknown family, listing the known ones.
        ValueError: when the family cannot ask about scenes of that many objects (``relation`` needs two).
    """
    if family not in QUESTIONS:
        raise KeyError(f"unknown question family {family!r}; known: {ALL_FAMILIES}")
    ask, letters = QUESTIONS[family]
    rng = np.random.RandomState([seed, ALL_FAMILIES.index(family), stream])
    imgs, qs, ans = [], [], []
    misses = 0
    while len(qs) < n:
        scene = random_scene(rng, letters, objects)
        qa = ask(scene, rng)
        if qa is None:  # the family cannot ask about this scene: draw another
            misses += 1
            if misses > 1000 and not qs:  # never askable at this size: fail instead of looping forever
                raise ValueError(f"{family!r} cannot be asked about scenes of {objects[0]}-{objects[1]} objects")
            continue
        imgs.append(render(scene, rng))
        qs.append(qa[0])
        ans.append(ANSWER_ID[qa[1]])
    return VqaSamples(to_chw(imgs), qs, torch.tensor(ans, dtype=torch.int64))


@register_benchmark("scenes_vqa")
def scenes_vqa(
    domains: list[str] | None = None,
    n_train: int = 2000,
    n_test: int = 300,
    seed: int = 0,
    objects: tuple[int, int] = (2, MAX_OBJECTS),
    **_: object,
) -> Benchmark:
    """The Sort-of-CLEVR VQA benchmark: one :class:`VqaDomain` per question family, fixed splits.

    Args:
        domains: Families in order (default :data:`FAMILIES`).
        n_train: Training examples per family.
        n_test: Held-out examples per family (generated together with the training ones, then split).
        seed: Generation seed.
        objects: (min, max) objects per scene (fewer: easier scenes, for models trained at CPU scale).
    """
    out = []
    for fam in domains or FAMILIES:
        s = make_family(fam, n_train + n_test, seed, stream=0, objects=tuple(objects))
        tr, te = s.subset(slice(0, n_train)), s.subset(slice(n_train, None))
        out.append(
            VqaDomain(fam, tr.images, tr.answers, te.images, te.answers, q_train=tr.questions, q_test=te.questions)
        )
    return Benchmark("scenes_vqa", list(ANSWERS), out)

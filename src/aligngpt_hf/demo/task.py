"""The demo's embedded task: small images of coloured shapes, captions that are partly wrong, and questions.

Everything is generated from a seed (no files ship with the package). A scene has a colour, a shape, a size, a side
and a count; a caption names all five, and a corrupted caption changes k of them, so a pair's true alignment is
"5 - k attributes right" — what the CLIP scores and the levels should recover.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
SIZES = ("small", "big")
SIDES = ("left", "right")
COUNTS = ("one", "two", "three")
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "side": SIDES, "count": COUNTS}

QUESTION_KINDS = ("colour", "shape", "position", "count", "yes/no")
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(SIDES), "count": 1 / len(COUNTS),
          "yes/no": 1 / 2}
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape are they?",
    "position": "Are the shapes on the left or on the right?",
    "count": "How many shapes are there?",
}
TEXT_ONLY = [
    ("What comes after one?", "two"), ("What comes after two?", "three"), ("Is a square round?", "no"),
    ("Is a circle round?", "yes"), ("Name a colour.", "red"), ("How many sides has a triangle?", "three"),
]


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    side: str
    count: str
    jitter: int = 0  # small vertical offset so equal scenes still give different images

    @classmethod
    def random(cls, rng: random.Random) -> Scene:
        return cls(*(rng.choice(values) for values in ATTRIBUTES.values()), jitter=rng.randint(-2, 2))

    def caption(self) -> str:
        plural = "" if self.count == "one" else "s"
        return f"{self.count} {self.size} {self.colour} {self.shape}{plural} on the {self.side}"

    def corrupted(self, num_wrong: int, rng: random.Random, among: tuple[str, ...] = tuple(ATTRIBUTES)) -> Scene:
        """The same scene with `num_wrong` of the attributes `among` changed to another value."""
        changes = {name: rng.choice([v for v in ATTRIBUTES[name] if v != getattr(self, name)])
                   for name in rng.sample(list(among), num_wrong)}
        return replace(self, **changes)

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "position": self.side, "count": self.count}[kind]


IMAGE_SIZE, PATCH_SIZE = 48, 12  # 16 image tokens; shapes large enough (7 / 12 px) to tell apart


def draw(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Shapes stacked vertically in one half of a light canvas."""
    image = Image.new("RGB", (size, size), (245, 245, 240))
    pen = ImageDraw.Draw(image)
    number = COUNTS.index(scene.count) + 1
    extent = size // 4 if scene.size == "big" else size // 7 + 1
    centre_x = size // 4 if scene.side == "left" else 3 * size // 4
    gap = size // (number + 1)
    for index in range(number):
        centre_y = gap * (index + 1) + scene.jitter
        box = (centre_x - extent // 2, centre_y - extent // 2, centre_x + extent // 2, centre_y + extent // 2)
        colour = COLOURS[scene.colour]
        if scene.shape == "square":
            pen.rectangle(box, fill=colour)
        elif scene.shape == "circle":
            pen.ellipse(box, fill=colour)
        else:
            pen.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
    return image


def caption_pairs(count: int, rng: random.Random, wrong_share: float) -> list[dict]:
    """Image-caption pairs; a `wrong_share` of them have 1-4 wrong attributes (`num_wrong`)."""
    pairs = []
    for _ in range(count):
        scene = Scene.random(rng)
        num_wrong = rng.randint(1, 4) if rng.random() < wrong_share else 0
        pairs.append({"scene": scene, "caption": scene.corrupted(num_wrong, rng).caption(), "num_wrong": num_wrong})
    return pairs


def question_rows(count: int, rng: random.Random, kind_weights: dict[str, float]) -> list[dict]:
    """Instruction rows `{scene, kind, question, answer}`; yes/no asks whether a caption matches the picture."""
    kinds, weights = zip(*kind_weights.items())
    rows = []
    for _ in range(count):
        scene, kind = Scene.random(rng), rng.choices(kinds, weights)[0]
        if kind == "yes/no":  # a short caption (colour + shape) that is right, or wrong in one of the two
            matches = rng.random() < 0.5
            shown = scene if matches else scene.corrupted(1, rng, among=("colour", "shape"))
            question = f"Does the caption match the picture: {shown.colour} {shown.shape}s?"
            answer = "yes" if matches else "no"
        else:
            question, answer = QUESTIONS[kind], scene.answer(kind)
        rows.append({"scene": scene, "kind": kind, "question": question, "answer": answer})
    return rows


def corpus() -> list[str]:
    """Words the tiny tokenizers must know: every caption word, question and answer."""
    sentences = [Scene(*values).caption() for values in itertools.product(*ATTRIBUTES.values())]
    checks = [f"Does the caption match the picture: {colour} {shape}s?" for colour in COLOURS for shape in SHAPES]
    questions = list(QUESTIONS.values()) + [q for q, _ in TEXT_ONLY] + checks
    return sentences + questions + [a for _, a in TEXT_ONLY] + ["yes no shapes squares circles triangles"]

"""The demo's embedded task: small images of coloured shapes, captions that are partly wrong, and questions.

Everything is generated from a seed (no files ship with the package). A scene has a colour, a shape, a size, a side
and a count; a caption names all five, and a corrupted caption changes k of them, so a pair's true alignment is
"5 - k attributes right" — what the CLIP scores and the levels should recover.

Held-out sets are balanced by construction (every answer value equally often, half of the caption checks true), and
chance is still measured on them, as the accuracy of the best constant answer.
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

CHECK = "caption check"  # "does this one-attribute caption match the picture?" (yes/no, balanced)
QUESTION_KINDS = ("colour", "shape", "position", "count", CHECK)
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape are they?",
    "position": "Which side are the shapes on?",  # no answer word in the prompt to copy
    "count": "How many shapes are there?",
}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": SIDES, "count": COUNTS, CHECK: ("yes", "no")}
CHECKED = ("colour", "shape")  # attributes a caption check names, one at a time
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
    def random(cls, rng: random.Random, **fixed: str) -> Scene:
        values = {name: fixed.get(name) or rng.choice(options) for name, options in ATTRIBUTES.items()}
        return cls(**values, jitter=rng.randint(-2, 2))

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


def check_phrase(attribute: str, value: str) -> str:
    """A caption that names one attribute: "red shapes", "circles"."""
    return f"{value} shapes" if attribute == "colour" else f"{value}s"


def check_question(attribute: str, value: str) -> str:
    return f"Does the caption match the picture: {check_phrase(attribute, value)}?"


def make_question(scene: Scene, kind: str, rng: random.Random, matches: bool | None = None,
                  attribute: str | None = None) -> dict:
    """One row `{scene, kind, question, answer, response}`: `response` is what the model learns to say, `answer`
    what is graded. A caption check names one attribute (`CHECKED`) with the right value or, for a "no", any other
    value; the named value alone says nothing about the answer. Its response repeats the named value, writes the
    picture's value right after it, then the verdict ("red blue no", graded: the last word). The verdict alone is an
    XOR of word and picture, which a tiny model learns only after a long, seed-dependent plateau; with the two words
    adjacent, the verdict is a function of the current and the previous token, learned early on every seed tried
    (docs/demo.md; the text-only `comparison_chats` teach the same step)."""
    if kind != CHECK:
        answer = scene.answer(kind)
        return {"scene": scene, "kind": kind, "question": QUESTIONS[kind], "answer": answer, "response": answer}
    matches = rng.random() < 0.5 if matches is None else matches
    attribute = attribute or rng.choice(CHECKED)
    truth = getattr(scene, attribute)
    value = truth if matches else rng.choice([v for v in ATTRIBUTES[attribute] if v != truth])
    response = comparison(value, truth)
    return {"scene": scene, "kind": kind, "question": check_question(attribute, value),
            "answer": response.split()[-1], "response": response}


def comparison(first: str, second: str) -> str:
    """"red blue no", "red red yes": the verdict right after the second word (no separator: see `make_question`)."""
    return f"{first} {second} {'yes' if first == second else 'no'}"


def comparison_chats() -> list[tuple[str, str]]:
    """Text-only chats that teach the check's last step on words alone: "Is it red?" -> "red green no" or "red red
    yes". As in a caption check, the prompt names the first word only, so the verdict can come from nothing but the
    two adjacent words of the answer; the second word, which a picture would supply, is every value in turn, the
    named one repeated so that yes and no are even. No picture is involved: nothing about a held-out image leaks."""
    chats = []
    for values in (ATTRIBUTES[name] for name in CHECKED):
        for named, other in itertools.product(values, values):
            chats += [(f"Is it {named}?", comparison(named, other))] * (len(values) - 1 if named == other else 1)
    return chats


def text_only_chats() -> list[tuple[str, str]]:
    """The pool stage 2's text-only rows are drawn from."""
    return TEXT_ONLY + comparison_chats()


def question_rows(count: int, rng: random.Random, kind_weights: dict[str, float]) -> list[dict]:
    """Training rows: kinds drawn by `kind_weights`, random scenes, caption checks true half of the time."""
    kinds, weights = zip(*kind_weights.items())
    return [make_question(Scene.random(rng), rng.choices(kinds, weights)[0], rng) for _ in range(count)]


def heldout_rows(per_kind: int, rng: random.Random) -> list[dict]:
    """Balanced held-out rows on fresh random scenes: each answer value equally often per kind (up to rounding);
    caption checks alternate yes/no and the attribute they name."""
    rows = []
    for kind in QUESTION_KINDS:
        for index in range(per_kind):
            if kind == CHECK:
                scene = Scene.random(rng)
                rows.append(make_question(scene, kind, rng, matches=index % 2 == 0,
                                          attribute=CHECKED[(index // 2) % len(CHECKED)]))
                continue
            value = ANSWERS[kind][index % len(ANSWERS[kind])]
            scene = Scene.random(rng, **{"side" if kind == "position" else kind: value})
            rows.append(make_question(scene, kind, rng))
    return rows


def best_constant_accuracy(answers: list[str]) -> float:
    """Chance for one kind: the accuracy of always giving its most frequent answer."""
    return max(answers.count(value) for value in set(answers)) / len(answers) if answers else 0.0


def corpus() -> list[str]:
    """Words the tiny tokenizers must know: every caption word, question and answer."""
    sentences = [Scene(*values).caption() for values in itertools.product(*ATTRIBUTES.values())]
    checks = [check_question(attribute, value) for attribute in CHECKED for value in ATTRIBUTES[attribute]]
    chats = text_only_chats()
    questions = list(QUESTIONS.values()) + [q for q, _ in chats] + checks
    return sentences + questions + [a for _, a in chats] + ["yes no shapes squares circles triangles"]


def verdict(prediction: str, kind: str) -> str:
    """The graded part of a prediction: the whole (normalised) answer, or a caption check's last word."""
    words = prediction.lower().replace(",", " ").replace(".", " ").split()
    if kind == CHECK:
        return words[-1] if words else ""
    return " ".join(words)

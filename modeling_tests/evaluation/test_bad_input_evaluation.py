"""Bad input, evaluation layer: bad question files, image paths outside the folder, half-written answers files.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from aligngpt_hf.evaluation.answer import answer_questions, answered_ids, load_image, read_questions


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from aligngpt_hf.tiny import build_model

    torch.manual_seed(0)
    return build_model(tokenizer).eval()


def questions_file(tmp_path, text: str | bytes):
    path = tmp_path / "questions.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ------------------------------------------------------------------------------------------------ question files


def test_question_line_that_is_a_bare_number(tmp_path):
    path = questions_file(tmp_path, '{"question_id": 1, "text": "Hi?"}\n42\n')
    with pytest.raises(ValueError, match=r"questions\.jsonl:2: expected a question object, got the int '42'\.$"):
        read_questions(path)


def test_question_text_that_is_not_a_string(tmp_path):
    path = questions_file(tmp_path, '{"question_id": 1, "text": ["Hi?"]}\n')
    with pytest.raises(ValueError, match=r"questions\.jsonl:1: `text` is \['Hi\?'\]; expected a string\.$"):
        read_questions(path)


def test_question_file_not_utf8(tmp_path):
    path = questions_file(tmp_path, b'{"question_id": 1, "text": "Hi?"}\n{"question_id": 2, "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"questions\.jsonl:2: not UTF-8 \(byte \d+\); re-save the file as UTF-8\.$"):
        read_questions(path)


def test_question_file_empty(tmp_path):
    with pytest.raises(ValueError, match=r"questions\.jsonl holds no questions; check the --questions file\.$"):
        read_questions(questions_file(tmp_path, "\n"))


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("image", ["../outside.png", "../../x.png", "ABSOLUTE"])
def test_question_image_outside_the_image_folder(tmp_path, image):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "outside.png")
    image = str(tmp_path / "outside.png") if image == "ABSOLUTE" else image
    question = {"question_id": "q7", "text": "Hi?", "image": image}
    with pytest.raises(ValueError, match=r"^question_id 'q7': image path .* outside the image folder .*"
                                         r"--allow-outside-image-folder"):
        load_image(question, tmp_path / "images")
    if image != "../../x.png":
        opened = load_image(question, tmp_path / "images", allow_outside_image_folder=True)
        assert opened.getpixel((0, 0)) == (1, 2, 3)


def test_answer_images_use_the_processors_conversion(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((4, 4), 4112, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert load_image({"question_id": 1, "image": "rgba.png"}, tmp_path).getpixel((0, 0)) == (255, 255, 255)
    assert load_image({"question_id": 1, "image": "deep.png"}, tmp_path).getpixel((0, 0)) == (16, 16, 16)


# ------------------------------------------------------------------------------------------------ --resume


def test_resume_with_a_half_written_last_answer(tiny, processor, tmp_path):
    questions = [{"question_id": i, "text": f"Question {i}?"} for i in range(3)]
    out = tmp_path / "answers.jsonl"
    answer_questions(tiny, processor, questions[:2], tmp_path, out, progress=False, max_new_tokens=2)
    complete = out.read_bytes()
    out.write_bytes(complete[: len(complete) - 15])  # killed while writing the second answer
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(out))}:2: removed this torn last line, cut short by an "
                                         r"interrupted run \('\{\"question_id\": 1, .*'\.\.\.\); its question is "
                                         r"answered again\.$"):
        report = answer_questions(tiny, processor, questions, tmp_path, out, resume=True, progress=False,
                                  max_new_tokens=2)
    assert (report.resumed, report.answered, report.torn_lines) == (1, 2, 1)
    assert report.summary() == "answered 2, already answered (resume) 1, torn last lines removed (resume) 1"
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [0, 1, 2]


def test_answers_reach_the_disk_line_by_line(tiny, processor, tmp_path, monkeypatch):
    """Each answer is flushed and fsynced as it is written, so a crash can tear at most the last line."""
    out, synced = tmp_path / "answers.jsonl", []

    def fsync(fd):
        synced.append(out.read_text().count("\n"))  # complete lines on disk at each sync

    monkeypatch.setattr(os, "fsync", fsync)
    questions = [{"question_id": i, "text": f"Question {i}?"} for i in range(3)]
    answer_questions(tiny, processor, questions, tmp_path, out, batch_size=3, progress=False, max_new_tokens=2)
    assert synced == [1, 2, 3]


def test_resume_with_a_corrupt_line_in_the_middle(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text('{"question_id": 0, "text": "a"}\n{"question_\n{"question_id": 2, "text": "b"}\n')
    with pytest.raises(ValueError, match=r"answers\.jsonl:2: not an answer record .*; --resume cannot trust this file\. "
                                         r"Delete that line \(or the file\) and rerun with --resume\.$"):
        answered_ids(out)


def test_resume_with_a_complete_last_answer_without_newline(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text('{"question_id": 0, "text": "a"}')
    assert answered_ids(out) == {"0"}
    assert out.read_text().endswith("}\n")  # the next answer starts on its own line


def test_duplicate_question_id(tmp_path):
    path = questions_file(tmp_path, '{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": "b"}\n'
                                    '{"question_id": 1, "text": "c"}\n')
    with pytest.raises(ValueError, match=r"questions\.jsonl:3: question_id 1 is also on line 1; ids must be unique"):
        read_questions(path)


def test_inspect_images_use_the_processors_conversion(tmp_path):
    from aligngpt_hf.evaluation.inspect_alignment import _as_rgb_image

    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "rgba.png")
    assert _as_rgb_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)


def test_lmms_eval_images_use_the_processors_conversion(tmp_path):
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (`pip install -e '.[eval]'`); the README's "
                                            "`.[test]` install does not include it")
    from aligngpt_hf.evaluation.lmms_eval_plugin import _as_images

    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "rgba.png")
    rgba = Image.open(tmp_path / "rgba.png")
    assert [image.getpixel((0, 0)) for image in _as_images([str(tmp_path / "rgba.png"), [rgba]])] == [(255,) * 3] * 2
    with pytest.raises(ValueError, match=r"^visual 0 is empty \(0x0 pixels\)"):
        _as_images([Image.new("RGB", (0, 0))])

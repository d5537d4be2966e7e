"""`aligngpt-hf answer`: LLaVA question JSONL -> model_vqa_loader-style answer JSONL, on a tiny saved model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from aligngpt_hf.cli import main
from aligngpt_hf.evaluation.answer import (
    answer_questions,
    build_prompt,
    generate_answers,
    get_chunk,
    model_id_from_path,
    read_questions,
)

ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tokenizer, processor):
    """A saved tiny model, five coloured images and a LLaVA-format question file (mixed id types, a category)."""
    root = tmp_path_factory.mktemp("answer")
    torch.manual_seed(0)
    from aligngpt_hf.tiny import build_model

    model = build_model(tokenizer).eval()
    model.save_pretrained(root / "tiny-aligngpt")
    processor.save_pretrained(root / "tiny-aligngpt")
    (root / "images").mkdir()
    questions = []
    for index, rgb in enumerate([(200, 30, 30), (30, 160, 40), (20, 40, 220), (220, 210, 30), (90, 90, 90)]):
        Image.new("RGB", (20 + 7 * index, 36 - 3 * index), rgb).save(root / "images" / f"{index}.jpg")
        text = "What colour is the shape?" + " Be brief." * index + SUFFIX
        qid = index if index % 2 else f"q{index}"
        questions.append({"question_id": qid, "image": f"{index}.jpg", "text": text, "category": "colour"})
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"root": root, "model": model, "questions": questions}


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prompt_is_the_original_vicuna_v1_prompt(processor):
    prompt = build_prompt(processor, "Is it red?" + SUFFIX)
    assert prompt == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs it red?" + SUFFIX + " ASSISTANT:"
    )


def test_cli_round_trip_writes_model_vqa_loader_schema(bench, processor):
    root = bench["root"]
    answers = root / "out" / "answers.jsonl"
    base = ["answer", str(root / "tiny-aligngpt"), "--questions", str(root / "questions.jsonl")]
    base += ["--image-folder", str(root / "images"), "--max-new-tokens", "6", "--no-progress"]
    argv = base + ["--answers", str(answers)]
    assert main(argv) == 0
    records = _read(answers)
    assert [r["question_id"] for r in records] == [q["question_id"] for q in bench["questions"]]
    for record, question in zip(records, bench["questions"]):
        assert list(record) == ANSWER_KEYS
        assert record["prompt"] == question["text"] and record["metadata"] == {}
        assert record["model_id"] == "tiny-aligngpt" and isinstance(record["text"], str)
    # the same answers as calling the model directly, batch size 1, greedy
    question = bench["questions"][3]
    with Image.open(root / "images" / question["image"]) as image:
        direct = generate_answers(
            bench["model"],
            processor,
            [build_prompt(processor, question["text"])],
            [image.convert("RGB")],
            max_new_tokens=6,
        )
    assert records[3]["text"] == direct[0]
    # deterministic answer ids: a second run writes byte-identical output
    again = root / "out" / "again.jsonl"
    assert main(base + ["--answers-file", str(again)]) == 0
    assert again.read_text() == answers.read_text()


def test_batched_answers_equal_batch_size_1(bench, processor, tmp_path):
    root = bench["root"]
    outputs = {}
    for batch_size in (1, 3):
        out = tmp_path / f"bs{batch_size}.jsonl"
        answer_questions(
            bench["model"],
            processor,
            bench["questions"],
            root / "images",
            out,
            model_id="m",
            batch_size=batch_size,
            progress=False,
            max_new_tokens=6,
        )
        outputs[batch_size] = _read(out)
    assert outputs[1] == outputs[3]


def test_fixed_alignment_level_changes_answers_only_through_the_level(bench, processor, tmp_path):
    """Level mode uses table row K for every image; level N-1 equals the `global` alignment mode."""
    from aligngpt_hf.evaluation.answer import load_for_answering

    kwargs = {"model_id": "m", "progress": False, "max_new_tokens": 4}
    fixed = tmp_path / "fixed.jsonl"
    answer_questions(
        bench["model"], processor, bench["questions"], bench["root"] / "images", fixed, alignment_level=7, **kwargs
    )
    global_model, _ = load_for_answering(str(bench["root"] / "tiny-aligngpt"), "global", "float32", "cpu")
    assert global_model.config.alignment_mode == "global"
    glob = tmp_path / "global.jsonl"
    answer_questions(global_model, processor, bench["questions"], bench["root"] / "images", glob, **kwargs)
    assert [r["text"] for r in _read(fixed)] == [r["text"] for r in _read(glob)]


def test_resume_skips_answered_ids_and_reports_them(bench, processor, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    first = answer_questions(
        bench["model"],
        processor,
        bench["questions"][:2],
        bench["root"] / "images",
        out,
        progress=False,
        max_new_tokens=3,
    )
    assert (first.answered, first.resumed) == (2, 0)
    report = answer_questions(
        bench["model"],
        processor,
        bench["questions"],
        bench["root"] / "images",
        out,
        resume=True,
        progress=False,
        max_new_tokens=3,
    )
    assert (report.answered, report.resumed) == (3, 2)
    assert [r["question_id"] for r in _read(out)] == [q["question_id"] for q in bench["questions"]]
    assert "already answered (resume) 2" in report.summary()


def test_chunks_split_like_the_original_scripts():
    items = list(range(10))
    chunks = [get_chunk(items, 3, k) for k in range(3)]
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert get_chunk(list(range(2)), 4, 3) == []
    with pytest.raises(ValueError, match="chunk-idx"):
        get_chunk(items, 2, 2)
    assert model_id_from_path("runs/aligngpt-7b/checkpoint-500") == "aligngpt-7b_checkpoint-500"
    assert model_id_from_path("org/aligngpt-7b/") == "aligngpt-7b"


def test_missing_image_names_the_question_or_is_skipped_and_counted(bench, processor, tmp_path):
    questions = [*bench["questions"][:1], {"question_id": 77, "image": "nope.jpg", "text": "Hi?"}]
    with pytest.raises(FileNotFoundError, match=r"question_id 77.*nope\.jpg"):
        answer_questions(
            bench["model"],
            processor,
            questions,
            bench["root"] / "images",
            tmp_path / "a.jsonl",
            progress=False,
            max_new_tokens=2,
        )
    report = answer_questions(
        bench["model"],
        processor,
        questions,
        bench["root"] / "images",
        tmp_path / "b.jsonl",
        skip_missing_images=True,
        progress=False,
        max_new_tokens=2,
    )
    assert report.answered == 1 and report.missing_images == [77]
    assert "skipped for missing images 1" in report.summary()


def test_bad_question_lines_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "text": "ok", "image": "a.jpg"}\n{"question_id": 2, "image": "b.jpg"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:2: .*\['text'\]"):
        read_questions(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:1: not valid JSON"):
        read_questions(path)


def test_text_only_records_get_no_image_and_mix_with_image_records(bench, processor, tmp_path):
    """ScienceQA has text-only items: no `<image>`, no alignment token; batching them with image items is fine."""
    questions = [{"question_id": "t", "text": "Which is a colour?\nA. red\nB. two"}, *bench["questions"][:2]]
    assert "<image>" not in build_prompt(processor, questions[0]["text"], with_image=False)
    outputs = {}
    for batch_size in (1, 3):
        out = tmp_path / f"{batch_size}.jsonl"
        report = answer_questions(
            bench["model"],
            processor,
            questions,
            bench["root"] / "images",
            out,
            batch_size=batch_size,
            progress=False,
            max_new_tokens=4,
        )
        assert report.answered == 3
        outputs[batch_size] = _read(out)
    assert outputs[1] == outputs[3]

"""`aligngpt-hf answer`: LLaVA/AlignGPT question JSONL in, answer JSONL out (the benchmark converters' input).

The original `model_vqa_loader.py` is the reference: each question's `text` (which already carries the benchmark's
prompt suffix) becomes `<image>\\n{text}` in one vicuna_v1 user turn ending in `ASSISTANT:`, decoding is greedy with
batch size 1 and `max_new_tokens=128`, and every answer is written as
`{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}` so `convert_*_for_submission.py`,
`eval_pope.py`, `eval_textvqa.py`, ... work unchanged. Differences on purpose: `answer_id` is a deterministic uuid5
of (model_id, question_id, answer) instead of a random shortuuid, and batches larger than 1 (left padding) exist
behind `--batch-size`, which may move scores slightly (fp16/bf16 kernels differ with padding).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aligngpt_hf.models.chat_templates_aligngpt import stop_token_ids
from aligngpt_hf.models.image_processing_utils_aligngpt import load_image as open_rgb
from aligngpt_hf.paths import check_local_or_hub, check_writable, resolve_image_path

ANSWER_ID_NAMESPACE = uuid.UUID("6f7a2b1e-4c1d-5e0a-9b2f-a11c9e7d0001")


@dataclass
class AnswerReport:
    """What a run did: answered, skipped because already in the answers file (resume), skipped for a bad image, and
    torn last lines of an interrupted earlier run removed on resume (their questions are answered again)."""

    answered: int = 0
    resumed: int = 0
    missing_images: list = field(default_factory=list)
    torn_lines: int = 0

    def summary(self) -> str:
        parts = [f"answered {self.answered}", f"already answered (resume) {self.resumed}"]
        if self.torn_lines:
            parts.append(f"torn last lines removed (resume) {self.torn_lines}")
        if self.missing_images:
            parts.append(f"skipped for missing images {len(self.missing_images)}")
        return ", ".join(parts)


def read_questions(path: str | Path) -> list[dict]:
    """Question records (`question_id`, `text`, optional `image`/`category`); errors name the line."""
    questions, seen = [], {}
    for line_number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: expected a question object, got the {type(record).__name__} "
                             f"{str(record)[:40]!r}.")
        missing = [key for key in ("question_id", "text") if key not in record]
        if missing:
            raise ValueError(
                f"{path}:{line_number}: question record lacks {missing}; the LLaVA question format is "
                '{"question_id": ..., "image": "file.jpg", "text": "question + task suffix", "category": ...}.'
            )
        if not isinstance(record["text"], str) or not isinstance(record.get("image") or "", str):
            name = "text" if not isinstance(record["text"], str) else "image"
            raise ValueError(f"{path}:{line_number}: `{name}` is {record[name]!r}; expected a string.")
        key = json.dumps(record["question_id"])
        if key in seen:
            raise ValueError(f"{path}:{line_number}: question_id {record['question_id']!r} is also on line "
                             f"{seen[key]}; ids must be unique (answers and --resume are keyed by them).")
        seen[key] = line_number
        questions.append(record)
    if not questions:
        raise ValueError(f"{path} holds no questions; check the --questions file.")
    return questions


def _lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a non-UTF-8 file is named with the line of the first bad byte."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {error.start}); re-save the file as UTF-8.") from None
    return list(enumerate(text.splitlines(), start=1))


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """The `chunk_idx`-th of `num_chunks` contiguous slices, split exactly like the original scripts."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx must be in 0..{num_chunks - 1} (got {chunk_idx} of {num_chunks} chunks).")
    size = max(1, math.ceil(len(items) / num_chunks))
    chunks = [list(items[start : start + size]) for start in range(0, len(items), size)]
    return chunks[chunk_idx] if chunk_idx < len(chunks) else []


def model_id_from_path(path: str) -> str:
    """The original's `get_model_name_from_path`: last folder name, `parent_checkpoint-N` for checkpoints."""
    parts = str(path).rstrip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def answer_id(model_id: str, question_id, text: str) -> str:
    """Deterministic stand-in for the original's random `shortuuid.uuid()` (same input, same id)."""
    return str(uuid.uuid5(ANSWER_ID_NAMESPACE, json.dumps([model_id, question_id, text], ensure_ascii=False)))


def build_prompt(processor, text: str, with_image: bool = True) -> str:
    """vicuna_v1 prompt of one user turn: `<s>SYSTEM USER: <image>\\n{text} ASSISTANT:` (image first, as original)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def load_image(question: dict, image_folder: str | Path, allow_outside_image_folder: bool = False):
    """The question's image as RGB (the package's one loader), or an error naming the question_id; None for
    text-only records. A path resolving outside `image_folder` is refused unless `allow_outside_image_folder`."""
    if not question.get("image"):
        return None
    where = f"question_id {question['question_id']!r}"
    path = Path(resolve_image_path(question["image"], image_folder, allow_outside_image_folder, where))
    if not path.is_file():
        raise FileNotFoundError(
            f"{where}: image {str(path)!r} not found "
            f"(`image` {question['image']!r} is read relative to --image-folder {str(image_folder)!r})."
        )
    return open_rgb(path, where)


def generation_kwargs(max_new_tokens: int = 128, temperature: float = 0.0, top_p=None, num_beams: int = 1) -> dict:
    """The original's decoding switches: sampling only when temperature > 0 (0 = greedy, the paper's setting)."""
    kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
    return kwargs


def generate_answers(model, processor, prompts: list[str], images: list, alignment_level=None, **gen_kwargs) -> list:
    """Greedy (by default) answers for one batch; left padding, so a batch equals its rows run one by one."""
    import torch

    nested = [[image] if image is not None else [] for image in images]
    inputs = processor(
        text=prompts,
        images=nested if any(nested) else None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if alignment_level is not None:
        inputs["alignment_levels"] = torch.full((len(prompts),), int(alignment_level), device=model.device)
    tokenizer = processor.tokenizer
    # the chat format's turn end (`<|eot_id|>`, `<|im_end|>`, ...) ends an answer as EOS does, also for models saved
    # with EOS only in their generation config
    gen_kwargs.setdefault("eos_token_id", stop_token_ids(tokenizer, processor.chat_template,
                                                         model.generation_config.eos_token_id))
    with torch.inference_mode():
        output = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def answered_ids(path: str | Path) -> set[str]:
    """question_ids already in an answers file (JSON-encoded, so 5 and "5" stay distinct); see `read_answered`."""
    return read_answered(path)[0]


def read_answered(path: str | Path) -> tuple[set[str], int]:
    """(question_ids already in an answers file, number of torn last lines removed: 0 or 1).

    A last line cut short (no newline and not an answer record: a run killed while writing it) is cut off with a
    warning naming the file and line, and its question is answered again; a bad line elsewhere is an error naming the
    file and line, since answers before it may be wrong too.
    """
    done, torn = set(), 0
    if not Path(path).is_file():
        return done, torn
    lines = _lines(path)
    ends_with_newline = Path(path).read_bytes().endswith(b"\n")
    for line_number, line in lines:
        if not line.strip():
            continue
        try:
            done.add(json.dumps(json.loads(line)["question_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            if line_number == len(lines) and not ends_with_newline:
                _drop_last_line(path, line_number, line)
                torn += 1
                continue
            raise ValueError(
                f"{path}:{line_number}: not an answer record ({line[:60]!r}); --resume cannot trust this file. "
                "Delete that line (or the file) and rerun with --resume."
            ) from None
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):  # a complete last record without its newline: the next one goes below
        with open(path, "ab") as handle:
            handle.write(b"\n")
    return done, torn


def _drop_last_line(path: str | Path, line_number: int, line: str) -> None:
    data = Path(path).read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        handle.truncate(cut)
        os.fsync(handle.fileno())
    warnings.warn(f"{path}:{line_number}: removed this torn last line, cut short by an interrupted run "
                  f"({line[:40]!r}...); its question is answered again.", stacklevel=3)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def answer_questions(
    model,
    processor,
    questions: Sequence[dict],
    image_folder: str | Path,
    answers_file: str | Path,
    *,
    model_id: str = "aligngpt",
    batch_size: int = 1,
    resume: bool = False,
    skip_missing_images: bool = False,
    alignment_level: int | None = None,
    allow_outside_image_folder: bool = False,
    progress: bool = True,
    **gen_kwargs,
) -> AnswerReport:
    """Answer `questions` into `answers_file` (one JSON line each, on disk as soon as written, so a crash can
    `resume`).

    Unlike the package's other outputs this file is appended to, not written aside and renamed: the answers of a
    run killed after hours must survive for `--resume`. Each line is flushed and fsynced as it is written, so a crash
    can only tear the last line, which `--resume` cuts off, counts and names (`read_answered`).
    """
    from tqdm.auto import tqdm

    report = AnswerReport()
    done, report.torn_lines = read_answered(answers_file) if resume else (set(), 0)
    todo = [q for q in questions if json.dumps(q["question_id"]) not in done]
    report.resumed = len(questions) - len(todo)
    check_writable(Path(answers_file).parent, "answers folder")
    Path(answers_file).parent.mkdir(parents=True, exist_ok=True)
    decoding = generation_kwargs(**gen_kwargs)
    with (
        open(answers_file, "a" if resume else "w", encoding="utf-8") as out,
        tqdm(total=len(todo), disable=not progress, desc="answering", unit="q") as bar,
    ):
        for batch in _batches(todo, batch_size):
            loaded = []
            for question in batch:
                try:
                    loaded.append((question, load_image(question, image_folder, allow_outside_image_folder)))
                except FileNotFoundError:
                    if not skip_missing_images:
                        raise
                    report.missing_images.append(question["question_id"])
            if loaded:
                prompts = [build_prompt(processor, q["text"], image is not None) for q, image in loaded]
                texts = generate_answers(
                    model, processor, prompts, [i for _, i in loaded], alignment_level, **decoding
                )
                for (question, _), text in zip(loaded, texts):
                    out.write(json.dumps(_answer_record(question, text, model_id)) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                report.answered += len(loaded)
            bar.update(len(batch))
    return report


def _answer_record(question: dict, text: str, model_id: str) -> dict:
    """The exact schema of `model_vqa_loader.py` (`prompt` is the question text as given, suffix included)."""
    return {
        "question_id": question["question_id"],
        "prompt": question["text"],
        "text": text,
        "answer_id": answer_id(model_id, question["question_id"], text),
        "model_id": model_id,
        "metadata": {},
    }


def load_for_answering(model_path: str, alignment_mode=None, dtype: str = "auto", device: str | None = None, **kwargs):
    """Model (eval mode) and processor from a local folder or Hub id; `alignment_mode` overrides the config."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import aligngpt_hf  # noqa: F401  (registers the Auto classes)

    config_kwargs = {"alignment_mode": alignment_mode} if alignment_mode else {}
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch_dtype, **config_kwargs, **kwargs)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoProcessor.from_pretrained(model_path, **kwargs)
    return model.to(device).eval(), processor


def run_cli(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    questions = get_chunk(read_questions(args.questions), args.num_chunks, args.chunk_idx)
    check_local_or_hub(args.model, "MODEL")
    check_writable(Path(args.answers).parent, "folder of --answers")
    model, processor = load_for_answering(args.model, args.alignment_mode, args.dtype, args.device)
    if args.image_aspect_ratio:
        processor.image_processor.do_pad = args.image_aspect_ratio == "pad"
    if args.batch_size > 1:
        print(f"batch size {args.batch_size}: left padding; scores may move slightly vs the paper's batch size 1.")
    report = answer_questions(
        model,
        processor,
        questions,
        args.image_folder,
        args.answers,
        model_id=args.model_id or model_id_from_path(args.model),
        batch_size=args.batch_size,
        resume=args.resume,
        skip_missing_images=args.skip_missing_images,
        alignment_level=args.alignment_level,
        allow_outside_image_folder=args.allow_outside_image_folder,
        progress=not args.no_progress,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
    )
    print(f"{args.answers}: {report.summary()}.")
    if report.missing_images:
        print(f"question_ids skipped for missing images: {report.missing_images[:20]}")
    return 0


__all__ = ["AnswerReport", "answer_questions", "build_prompt", "get_chunk", "load_for_answering", "read_questions"]

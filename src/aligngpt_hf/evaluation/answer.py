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
import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aligngpt_hf.evaluation.answers_file import (
    answered_ids,
    check_answers_file,
    read_answered,
    read_lines,
    scan_answers,
)
from aligngpt_hf.evaluation.inputs import (
    check_decoding,
    check_device,
    check_dtype,
    check_input_file,
    check_max_new_tokens,
    check_model_folder,
    check_output_file,
    check_prompt_text,
    model_files_checked,
    positive_int,
    set_image_aspect_ratio,
)
from aligngpt_hf.hub.checks import check_finite_weights
from aligngpt_hf.models.chat_templates_aligngpt import stop_token_ids
from aligngpt_hf.models.image_processing_utils_aligngpt import URL_SCHEMES
from aligngpt_hf.models.image_processing_utils_aligngpt import load_image as open_rgb
from aligngpt_hf.paths import atomic_write_text, check_local_or_hub, check_writable, resolve_image_path

ANSWER_ID_NAMESPACE = uuid.UUID("6f7a2b1e-4c1d-5e0a-9b2f-a11c9e7d0001")


@dataclass
class AnswerReport:
    """What a run did: answered (text-only among them), skipped because already in the answers file (resume), skipped
    for a missing image, torn last lines of an interrupted earlier run removed on resume (their questions are answered
    again), and answers in a resumed file to question_ids that are not among the questions (another chunk or file)."""

    answered: int = 0
    resumed: int = 0
    missing_images: list = field(default_factory=list)
    torn_lines: int = 0
    text_only: int = 0
    other_answers: int = 0

    def notes(self) -> list[str]:
        """Lines beside the summary for what a reader may not expect: text-only questions, foreign answers."""
        notes = []
        if self.text_only:
            notes.append(f"{self.text_only} question(s) without `image` answered text-only (no image, no alignment "
                         "token)")
        if self.other_answers:
            notes.append(f"the resumed answers file also holds {self.other_answers} answer(s) to question_ids not among "
                         "these questions (another chunk or question file?); they are kept")
        return notes

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
    for line_number, line in read_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            hint = (" The file looks like one JSON array over several lines; --questions takes JSONL, one question "
                    "object per line (json.dumps each element on its own line).") if line.strip() == "[" else ""
            raise ValueError(f"{where}: not valid JSON ({error.msg}).{hint}") from None
        if not isinstance(record, dict):
            hint = (" The file is one JSON array; --questions takes JSONL, one question object per line (json.dumps "
                    "each element on its own line).") if isinstance(record, list) and line_number == 1 else ""
            raise ValueError(f"{where}: expected a question object, got the {type(record).__name__} "
                             f"{str(record)[:40]!r}.{hint}")
        missing = [key for key in ("question_id", "text") if key not in record]
        if missing:
            raise ValueError(
                f"{where}: question record lacks {missing}; the LLaVA question format is "
                '{"question_id": ..., "image": "file.jpg", "text": "question + task suffix", "category": ...}.'
            )
        _check_question_fields(record, where)
        key = str(record["question_id"])  # 1 and "1": the benchmark scripts compare ids as text
        if key in seen:
            other, line = seen[key]
            raise ValueError(f"{where}: question_id {record['question_id']!r} is also on line {line}"
                             + ("" if other == record["question_id"] else f" (as {other!r})")
                             + "; ids must be unique, also as text (answers, --resume and the benchmark scripts are "
                             "keyed by them).")
        seen[key] = (record["question_id"], line_number)
        questions.append(record)
    if not questions:
        raise ValueError(f"{path} holds no questions; check the --questions file.")
    return questions


def _check_question_fields(record: dict, where: str) -> None:
    """`question_id` a string or integer (the answers and --resume key), `text` a non-empty string, `image` a
    non-empty string or absent/null (text-only question)."""
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
        raise ValueError(f"{where}: `question_id` is {json.dumps(qid, default=str)}; expected a non-empty string or "
                         "an integer (answers and --resume are keyed by it).")
    for name in ("text", "image"):
        value = record.get(name)
        if name == "image" and value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}: `{name}` is {value!r}; expected a string.")
        if not value.strip():
            fix = "give the question" if name == "text" else "leave `image` out (or null) for a text-only question"
            raise ValueError(f"{where}: `{name}` is empty; {fix}.")


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """The `chunk_idx`-th of `num_chunks` contiguous slices, split exactly like the original scripts."""
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"--num-chunks must be a positive integer, got {num_chunks!r}.")
    if not 0 <= chunk_idx < num_chunks:
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


def image_path(question: dict, image_folder: str | Path, allow_outside_image_folder: bool = False) -> Path | None:
    """The file of the question's image (None for a text-only question); a path resolving outside `image_folder` is
    refused unless `allow_outside_image_folder`, a missing file or a folder is a FileNotFoundError naming both."""
    if question.get("image") is None:
        return None
    where = f"question_id {question['question_id']!r}"
    if str(question["image"]).startswith(URL_SCHEMES):
        raise ValueError(f"{where}: `image` {question['image']!r} is a URL; answer reads images from --image-folder "
                         "only (no downloads during a benchmark run): download the images into it and give their "
                         "file names.")
    path = Path(resolve_image_path(question["image"], image_folder, allow_outside_image_folder, where))
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "not found"
        raise FileNotFoundError(
            f"{where}: image {str(path)!r} {what} "
            f"(`image` {question['image']!r} is read relative to --image-folder {str(image_folder)!r})."
        )
    return path


def load_image(question: dict, image_folder: str | Path, allow_outside_image_folder: bool = False):
    """The question's image as RGB (the package's one loader), or an error naming the question_id; None for
    text-only records (see `image_path`)."""
    path = image_path(question, image_folder, allow_outside_image_folder)
    return None if path is None else open_rgb(path, f"question_id {question['question_id']!r}")


def check_questions(questions: Sequence[dict], image_folder: str | Path, allow_outside_image_folder: bool = False,
                    skip_missing_images: bool = False, processor=None) -> list:
    """Every check that needs no decoding, before any answer is written (or a model is loaded): the image folder,
    each image path, and (with `processor`) no image placeholder or alignment token inside a question's text.
    Returns the question_ids whose image is missing when `skip_missing_images`, else raises for the first."""
    folder = Path(image_folder)
    if any(q.get("image") is not None for q in questions) and not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"--image-folder {folder} {what}; give the folder the questions' `image` paths are "
                                "relative to.")
    missing = []
    for question in questions:
        if processor is not None:
            check_prompt_text(question["text"], processor, f"question_id {question['question_id']!r}")
        try:
            image_path(question, image_folder, allow_outside_image_folder)
        except FileNotFoundError:
            if not skip_missing_images:
                raise
            missing.append(question["question_id"])
    return missing


def generation_kwargs(max_new_tokens: int = 128, temperature: float = 0.0, top_p=None, num_beams: int = 1) -> dict:
    """The original's decoding switches: sampling only when temperature > 0 (0 = greedy, the paper's setting).
    Values are checked first: a negative or NaN temperature, a top_p without sampling, zero beams are errors."""
    check_decoding(max_new_tokens, temperature, top_p, num_beams)
    kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
    return kwargs


def check_alignment_level(level, config, option: str = "--alignment-level") -> None:
    """A fixed level must index the model's level table (row N-1 = strongest); mode `none` has no table."""
    if level is None:
        return
    if config.alignment_mode == "none":
        raise ValueError(f"{option} needs a level table, but the model's alignment_mode is 'none' (plain LLaVA); drop "
                         f"{option} or use another alignment mode.")
    top = config.num_alignment_levels - 1
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= top:
        raise ValueError(f"{option} must be an integer in 0..{top} (this model has {config.num_alignment_levels} "
                         f"levels, {top} = strongest), got {level!r}.")


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
    overwrite: bool = False,
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
    can only tear the last line, which `--resume` cuts off, counts and names (`read_answered`). Everything that can
    be checked without decoding an image is checked before the file is opened, and an existing answers file is only
    replaced with `overwrite` (or continued with `resume`), so a bad option or question never costs earlier answers.
    """
    from tqdm.auto import tqdm

    batch_size = positive_int(batch_size, "batch_size")
    decoding = generation_kwargs(**gen_kwargs)
    check_max_new_tokens(decoding["max_new_tokens"], model.config, "max_new_tokens")
    check_alignment_level(alignment_level, model.config)
    report = AnswerReport()
    check_answers_file(answers_file, resume, overwrite, model_id)  # reads only: a torn line is removed below
    done, report.torn_lines, _ = scan_answers(answers_file) if resume else (set(), 0, {})
    todo = [q for q in questions if json.dumps(q["question_id"]) not in done]
    report.resumed = len(questions) - len(todo)
    report.other_answers = len(done - {json.dumps(q["question_id"]) for q in questions})
    report.missing_images = check_questions(todo, image_folder, allow_outside_image_folder, skip_missing_images,
                                            processor)
    skipped = {json.dumps(qid) for qid in report.missing_images}
    todo = [q for q in todo if json.dumps(q["question_id"]) not in skipped]
    report.text_only = sum(q.get("image") is None for q in todo)
    check_writable(Path(answers_file).parent, "answers folder")
    Path(answers_file).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(todo), disable=not progress, desc="answering", unit="q"))
        out = None  # opened once the first answers exist: a run failing before them leaves the file as it was
        for batch in _batches(todo, batch_size):
            records = _answer_batch(batch, model, processor, image_folder, allow_outside_image_folder, model_id,
                                    alignment_level, decoding)
            if out is None:
                out = stack.enter_context(open(answers_file, "a" if resume else "w", encoding="utf-8"))
            for record in records:  # each line flushed and fsynced: a crash tears at most the last one
                out.write(json.dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())
            report.answered += len(batch)
            bar.update(len(batch))
    if out is None and (not resume or not Path(answers_file).exists()):
        # nothing to answer (an empty chunk, every image skipped): the file still says so, and --overwrite empties it,
        # so merging the chunks of a multi-GPU run never misses a file or keeps stale answers
        atomic_write_text(answers_file, "")
    return report


def _answer_batch(batch, model, processor, image_folder, allow_outside, model_id, level, decoding) -> list[dict]:
    """The answer records of one batch, in question order."""
    loaded = [(q, load_image(q, image_folder, allow_outside)) for q in batch]
    prompts = [build_prompt(processor, q["text"], image is not None) for q, image in loaded]
    texts = generate_answers(model, processor, prompts, [image for _, image in loaded], level, **decoding)
    return [_answer_record(question, text, model_id) for (question, _), text in zip(loaded, texts)]


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


def load_processor(model_path: str, **kwargs):
    """The processor saved with a model (cheap: loaded before the model, so question texts are checked first)."""
    from transformers import AutoProcessor

    import aligngpt_hf  # noqa: F401  (registers the Auto classes)

    check_local_or_hub(model_path, "model")
    check_model_folder(model_path)
    with model_files_checked(model_path):  # the processor reads the model's config too
        return AutoProcessor.from_pretrained(model_path, **kwargs)


def load_for_answering(model_path: str, alignment_mode=None, dtype: str = "auto", device: str | None = None,
                       processor=None, **kwargs):
    """Model (eval mode) and processor from a local folder or Hub id; `alignment_mode` overrides the config, a
    given `processor` is used as is."""
    import torch
    from transformers import AutoModelForImageTextToText

    from aligngpt_hf.models.configuration_aligngpt import ALIGNMENT_MODES

    if alignment_mode and alignment_mode not in ALIGNMENT_MODES:
        raise ValueError(f"alignment_mode {alignment_mode!r} is not one of {', '.join(ALIGNMENT_MODES)}.")
    check_dtype(dtype)
    check_device(device)
    processor = load_processor(model_path, **kwargs) if processor is None else processor
    config_kwargs = {"alignment_mode": alignment_mode} if alignment_mode else {}
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    with model_files_checked(model_path):
        model, info = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch_dtype,
                                                                  output_loading_info=True, **config_kwargs, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers filled them randomly: the answers would come from another model
        raise ValueError(f"{model_path}: {len(missing)} weight(s) the model needs are not in the checkpoint "
                         f"({', '.join(missing[:3])})"
                         + (f": it was saved without what --alignment-mode {alignment_mode} uses (the level table "
                            "or the gate); use the mode it was trained with" if alignment_mode else "")
                         + ".")
    check_finite_weights(model, str(model_path), "use an earlier checkpoint")
    # `none` (plain LLaVA) takes no alignment token: the processor must not insert one
    processor.add_alignment_token = model.config.uses_alignment_token
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def check_options(args: argparse.Namespace) -> None:
    """The command line's values and files, before the questions are read or a model is loaded."""
    for name in ("batch_size", "max_new_tokens", "num_beams", "num_chunks"):
        positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    check_decoding(args.max_new_tokens, args.temperature, args.top_p, args.num_beams)
    if args.alignment_level is not None and args.alignment_mode is not None:
        raise ValueError(f"--alignment-level {args.alignment_level} puts table row {args.alignment_level} into every "
                         f"image's alignment token, which replaces what --alignment-mode {args.alignment_mode} would "
                         "compute; pass one of them.")
    if args.alignment_level is not None and args.alignment_level < 0:
        raise ValueError(f"--alignment-level must be >= 0 (a row of the level table), got {args.alignment_level}.")
    if args.model_id is not None and not args.model_id.strip():
        raise ValueError("--model-id is empty; give the name to write as each answer's model_id, or leave it out "
                         "(default: the model folder's name).")
    check_dtype(args.dtype)
    check_device(args.device)
    check_input_file(args.questions, "--questions")
    check_output_file(args.answers, "--answers", {"--questions": args.questions})
    check_local_or_hub(args.model, "MODEL")
    check_model_folder(args.model)
    check_writable(Path(args.answers).parent, "folder of --answers")


def run_cli(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    check_options(args)
    questions = get_chunk(read_questions(args.questions), args.num_chunks, args.chunk_idx)
    model_id = args.model_id or model_id_from_path(args.model)
    check_answers_file(args.answers, args.resume, args.overwrite, model_id)
    processor = load_processor(args.model)
    with model_files_checked(args.model):
        check_max_new_tokens(args.max_new_tokens, AutoConfig.from_pretrained(args.model))
    set_image_aspect_ratio(processor, args.image_aspect_ratio)
    check_questions(questions, args.image_folder, args.allow_outside_image_folder, args.skip_missing_images, processor)
    model, processor = load_for_answering(args.model, args.alignment_mode, args.dtype, args.device, processor)
    if args.batch_size > 1:
        print(f"batch size {args.batch_size}: left padding; scores may move slightly vs the paper's batch size 1.")
    report = answer_questions(
        model,
        processor,
        questions,
        args.image_folder,
        args.answers,
        model_id=model_id,
        batch_size=args.batch_size,
        resume=args.resume,
        overwrite=args.overwrite,
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
    for note in report.notes():
        print(f"note: {note}.")
    if report.missing_images:
        print(f"question_ids skipped for missing images: {report.missing_images[:20]}")
    return 0


__all__ = ["AnswerReport", "answer_questions", "answered_ids", "build_prompt", "check_questions", "get_chunk",
           "load_for_answering", "read_answered", "read_questions"]

"""Held-out answering for the demo: greedy batched generation plus the gate weights of each question.

Only torch, PIL, transformers and the standard library are imported, so `python evaluate.py MODEL QUESTIONS ANSWERS`
run as a file (not as part of the package) proves a saved folder works through remote code alone; `--compare` calls
`answer_questions` in-process on models it has just trained.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def answer_questions(model, processor, questions: list[dict], batch_size: int = 64) -> list[dict]:
    """Each question dict (`question`, `image` path, ...) plus `prediction` and `alignment_weights`
    (None for models without a gate)."""
    import torch
    from PIL import Image

    model.eval()
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        prompts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": q["question"]}]}], add_generation_prompt=True) for q in chunk]
        images = [Image.open(q["image"]).convert("RGB") for q in chunk]
        batch = processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            weights = model(**batch).alignment_weights
            generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
        texts = processor.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        rows = weights.tolist() if weights is not None else [None] * len(chunk)
        answers += [{**q, "prediction": text.strip(), "alignment_weights": w} for q, text, w in zip(chunk, texts, rows)]
    return answers


def main(model_dir: str, questions_file: str, answers_file: str) -> None:
    sys.modules["aligngpt_hf"] = None  # the saved folder must work with transformers alone (remote code)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with open(questions_file) as handle:
        questions = json.load(handle)
    answers = answer_questions(model, processor, questions)
    write_json(answers_file, {"answers": answers, "model_class": type(model).__module__})


def write_json(path: str, data: dict) -> None:
    """Whole or not at all: a temp file in the same folder, then one rename. The package's `atomic_write_text` does
    the same, but this file must run without the package (its temp names carry the same marker)."""
    folder, name = os.path.split(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(prefix=f".{name}.aligngpt-tmp-", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""The answers file of `aligngpt-hf answer`: reading it for `--resume` (torn last lines, foreign model ids) and
deciding whether an existing one may be continued or replaced.

Why apart from the answering loop: the file outlives a run (it is appended to line by line so a killed run can be
resumed), so every rule about an existing file lives in one place.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a non-UTF-8 file is named with the line of the first bad byte."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte order mark (Windows editors) is not part of the first record
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {error.start}); re-save the file as UTF-8.") from None
    return list(enumerate(text.splitlines(), start=1))


def answered_ids(path: str | Path) -> set[str]:
    """question_ids already in an answers file (JSON-encoded, so 5 and "5" stay distinct); see `read_answered`."""
    return read_answered(path)[0]


def read_answered(path: str | Path) -> tuple[set[str], int]:
    """(question_ids already in an answers file, number of torn last lines removed: 0 or 1).

    A last line cut short (no newline and not an answer record: a run killed while writing it) is cut off with a
    warning naming the file and line, and its question is answered again; a bad line elsewhere is an error naming the
    file and line, since answers before it may be wrong too.
    """
    done, torn, _ = scan_answers(path)
    return done, torn


def scan_answers(path: str | Path, repair: bool = True) -> tuple[set[str], int, dict[str, int]]:
    """`read_answered` plus the `model_id`s of the records with the first line of each (resume refuses a file
    another model wrote); `repair=False` only reads (a torn last line is counted, not removed)."""
    done, torn, model_ids = set(), 0, {}
    if not Path(path).is_file():
        return done, torn, model_ids
    lines = read_lines(path)
    ends_with_newline = Path(path).read_bytes().endswith(b"\n")
    for line_number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add(json.dumps(record["question_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            if line_number == len(lines) and not ends_with_newline:
                if repair:
                    _drop_last_line(path, line_number, line)
                torn += 1
                continue
            raise ValueError(
                f"{path}:{line_number}: not an answer record ({line[:60]!r}); --resume cannot trust this file. "
                "Delete that line (or the file) and rerun with --resume."
            ) from None
        if "model_id" in record:
            model_ids.setdefault(str(record["model_id"]), line_number)
    data = Path(path).read_bytes()
    if repair and data and not data.endswith(b"\n"):  # a complete last record without its newline: the next one goes below
        with open(path, "ab") as handle:
            handle.write(b"\n")
    return done, torn, model_ids


def _drop_last_line(path: str | Path, line_number: int, line: str) -> None:
    data = Path(path).read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        handle.truncate(cut)
        os.fsync(handle.fileno())
    warnings.warn(f"{path}:{line_number}: removed this torn last line, cut short by an interrupted run "
                  f"({line[:40]!r}...); its question is answered again.", stacklevel=3)


def check_answers_file(answers_file: str | Path, resume: bool, overwrite: bool, model_id: str) -> None:
    """An answers file that exists is continued (`resume`, and only with answers of the same model_id) or replaced
    (`overwrite`); without either it is refused, so a rerun never silently throws earlier answers away."""
    path = Path(answers_file)
    if path.is_dir():
        raise IsADirectoryError(f"the answers file {path} is a folder; give a file name (e.g. {path / 'answers.jsonl'}).")
    if resume and overwrite:
        raise ValueError("resume (--resume) keeps the answers file and overwrite (--overwrite) replaces it; pass one.")
    if not path.is_file() or not path.read_bytes().strip():
        return
    if not resume and not overwrite:
        raise FileExistsError(f"the answers file {path} already exists; pass --resume to keep its answers and answer "
                              "only the rest, or --overwrite to replace it (library: resume=True / overwrite=True).")
    if resume:
        others = {other: line for other, line in scan_answers(path, repair=False)[2].items() if other != model_id}
        if others:
            other, line = next(iter(others.items()))
            raise ValueError(f"{path}:{line}: holds answers of model_id {other!r}, but this run writes model_id "
                             f"{model_id!r}; --resume would mix two models in one file. Use another --answers file, "
                             "or the same --model-id as the earlier run.")


__all__ = ["answered_ids", "check_answers_file", "read_answered", "read_lines", "scan_answers"]

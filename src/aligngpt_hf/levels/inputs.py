"""Inputs of `aligngpt-hf levels`: LLaVA pre-training JSON or a saved dataset, and the one image loader.

Why the shape checks: a LLaVA JSON comes from strangers, and a record whose `image` is a number or whose caption is a
list must be named by its field, not reported as "no image" or "caption missing".
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from aligngpt_hf.models.image_processing_utils_aligngpt import to_rgb, upright
from aligngpt_hf.paths import DuplicateKeyError, resolve_image_path, unique_keys

CAPTION_SPEAKERS = ("gpt", "assistant")  # the answering speaker, as `load_llava_json` reads it
logger = logging.getLogger(__name__)
RECORD_PROBLEM = "record_problem"  # column of pairs_from_llava_json: why a record's shape is wrong ("" if fine)
# The columns `aligngpt-hf levels` adds to a dataset input (a scored dataset given again has them already).
SCORE_COLUMNS = ("alignment_score", "alignment_error", "alignment_image_mode", "alignment_truncated", "alignment_level")


def caption_from_conversations(conversations) -> str | None:
    """The caption of a LLaVA pre-training record is its first `gpt` (or `assistant`) turn."""
    for turn in conversations or []:
        if isinstance(turn, dict) and turn.get("from") in CAPTION_SPEAKERS:
            value = turn.get("value")
            return value if isinstance(value, str) else None
    return None


def pairs_from_llava_json(path: str | os.PathLike) -> tuple[list[dict], Any]:
    """Read a LLaVA-format JSON list; return the records and a Dataset of `id`, `image`, `caption`."""
    from datasets import Dataset

    data = Path(path).read_bytes()
    try:
        records = _parse_records(path, data.decode("utf-8-sig"))
    except DuplicateKeyError as error:
        raise ValueError(f"{path}: {error}") from None
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {error.start}); re-save the file as UTF-8.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}).") from None
    except ValueError as error:  # e.g. a number longer than Python's integer-conversion limit
        raise ValueError(f"{path}: cannot be read as JSON ({error}).") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records, got {_json_type(records)}")
    ids = [str(r.get("id", f"row {i}")) if isinstance(r, dict) else f"row {i}" for i, r in enumerate(records)]
    images = [r.get("image") if isinstance(r, dict) else None for r in records]
    images = [unwrapped(image) for image in images]
    images = [image if isinstance(image, str) else None for image in images]
    captions = [caption_from_conversations(r.get("conversations")) if isinstance(r, dict) else None for r in records]
    problems = [record_problem(r) for r in records]
    table = {"id": ids, "image": images, "caption": captions, RECORD_PROBLEM: problems}
    return records, Dataset.from_dict(table)


def _parse_records(path, text: str):
    """A JSON list, or one record per line for a `*.jsonl` file (as `load_llava_json` reads them)."""
    if Path(path).suffix != ".jsonl":
        return json.loads(text, object_pairs_hook=unique_keys)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line, object_pairs_hook=unique_keys))
            except json.JSONDecodeError as error:  # named by line, as a JSON list's error is by line:column
                raise json.JSONDecodeError(error.msg, text, sum(map(len, text.splitlines(True)[:number - 1]))
                                           + error.pos) from None
            except DuplicateKeyError as error:
                raise DuplicateKeyError(f"line {number}: {error}") from None
    return records


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def record_problem(record) -> str:
    """Why a LLaVA record's shape is wrong ("" when it is fine), so the error names the field instead of "no image"."""
    if not isinstance(record, dict):
        return f"the record is a JSON {_json_type(record)}, not an object with `image` and `conversations`"
    image = record.get("image")
    if isinstance(image, list) and len(image) != 1:
        return f"`image` lists {len(image)} images; a pre-training pair has exactly one"
    image = image[0] if isinstance(image, list) else image
    if image == "":
        return "`image` is an empty string; give the image's file name (or drop the key for a text-only record)"
    if image is not None and not isinstance(image, str):
        return f"`image` must be one file name (a string), got a JSON {_json_type(image)} ({str(image)[:40]})"
    conversations = record.get("conversations")
    if conversations is not None and not isinstance(conversations, list):
        return f"`conversations` must be a JSON array of turns, got a JSON {_json_type(conversations)}"
    for turn in conversations or []:
        if isinstance(turn, dict) and turn.get("from") in CAPTION_SPEAKERS:
            value = turn.get("value")
            if value is not None and not isinstance(value, str):
                return f"the caption (`value` of the first `gpt` turn) must be a string, got a JSON {_json_type(value)}"
            break
    return ""


def _open_image(value, image_folder: str | None, allow_outside: bool = False):
    """Decode one image to RGB with the package's one loader; return (image, original mode) or raise ValueError.

    Paths resolve inside `image_folder`; one outside it is refused unless `allow_outside` (a hostile JSON could
    otherwise make the scorer read any file)."""
    from PIL import Image

    value = single_image(value)
    if isinstance(value, dict):  # datasets.Image(decode=False)
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise ValueError("no image")
    if not isinstance(value, (str, bytes, Image.Image)):
        raise ValueError(f"`image` must be a file path, image bytes or a PIL image, got {type(value).__name__} "
                         f"({str(value)[:40]})")
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"`image` path {value!r} contains a NUL byte")
    if isinstance(value, str) and image_folder:
        value = resolve_image_path(value, image_folder, allow_outside, "`image`")
    if isinstance(value, str) and os.path.isdir(value):
        raise ValueError(f"`image` names a folder, not an image file: {value}")
    if isinstance(value, str) and not os.path.isfile(value):
        raise ValueError(f"image file not found: {value}")
    try:
        if isinstance(value, Image.Image):
            return to_rgb(upright(value), "image"), value.mode
        with Image.open(io.BytesIO(value) if isinstance(value, bytes) else value) as image:
            image.load()
            return to_rgb(upright(image), "image"), image.mode
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"corrupt or unreadable image ({type(error).__name__}: {error})") from None



def without_old_scores(dataset):
    """A dataset scored before (a `<stem>.dataset` output) holds the columns this run writes: they are replaced, and
    the replacement is logged, not refused with a clash of column names."""
    old = [name for name in SCORE_COLUMNS if name in dataset.column_names]
    if old:
        logger.warning("the input already has the columns %s (an earlier levels run); they are replaced by this "
                       "run's scores and levels", ", ".join(old))
        dataset = dataset.remove_columns(old)
    return dataset


def caption_problem(caption, specials: list[str]) -> str:
    """Why a caption cannot be scored ("" if it can): not text, empty, or only the scorer's special tokens (it would
    be scored as an empty caption)."""
    if caption is None:
        return "caption missing or empty"
    if not isinstance(caption, str):
        return f"the caption must be a string, got {type(caption).__name__} ({str(caption)[:40]})"
    if not caption.strip():
        return "caption missing or empty"
    words = caption
    for token in specials:
        words = words.replace(token, "")
    if not words.strip():
        return f"the caption {caption[:60]!r} holds only the scorer's special tokens, no words"
    return ""


def unwrapped(value):
    """A list holding one image (a `List(Image())` column, a one-path `image` list) is that image; others as given."""
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


def single_image(value):
    """A list holding one image (a `List(Image())` column) is that image; a pair with several images is refused."""
    value = unwrapped(value)
    if isinstance(value, (list, tuple)):
        raise ValueError(f"`image` lists {len(value)} images; a pre-training pair has exactly one")
    return value


def load_input(input: Any, split: str | None):
    """LLaVA JSON -> (records, pairs dataset); saved dataset folder or Dataset -> (None, dataset)."""
    if not isinstance(input, (str, os.PathLike)):
        return None, input
    path = Path(input)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(f"input {path} is a folder but not a saved dataset (no dataset_info.json/state.json); "
                             "pass a LLaVA JSON file or a folder written by `Dataset.save_to_disk`") from None
        except IndexError:  # datasets cannot even open a saved dataset without rows
            raise ValueError(f"input {path} is empty: there are no image-caption pairs to score") from None
        if isinstance(dataset, DatasetDict):
            if split is None and len(dataset) != 1:
                raise ValueError(f"{path} holds splits {list(dataset)}: pass --split")
            if split is not None and split not in dataset:
                raise ValueError(f"{path} has no split {split!r}; it holds {list(dataset)}: pass one of them to --split")
            dataset = dataset[split or next(iter(dataset))]
        elif split is not None:
            raise ValueError(f"--split {split!r} given, but {path} holds one dataset without splits; drop --split")
        return None, dataset
    if not path.exists():
        raise ValueError(f"input {path} does not exist (expected a LLaVA JSON file or a save_to_disk folder)")
    return pairs_from_llava_json(path)


__all__ = ["RECORD_PROBLEM", "SCORE_COLUMNS", "caption_from_conversations", "caption_problem", "load_input",
           "pairs_from_llava_json", "record_problem", "single_image", "unwrapped", "without_old_scores"]

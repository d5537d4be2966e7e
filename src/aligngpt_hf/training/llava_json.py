"""LLaVA-format JSON/JSONL -> a `datasets.Dataset` in TRL's vision format, every record checked on load.

Why a module of its own: the files come from strangers and from long exports, so each way a record can be wrong
(shape, speakers, `<image>` count, paths leaving the image folder, levels, empty answers) is refused here with the
file, the record and the field, before a model is built; nothing is dropped or rounded silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from aligngpt_hf.paths import DuplicateKeyError, resolve_image_path, unique_keys

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"
ALIGNMENT_PLACEHOLDER = "<align>"
_INT64_LIMIT = 2**63  # levels are stored as int64
LEVEL_COLUMN = "alignment_level"
# `<Image>`, `< image >`, `<image/>`: meant as the placeholder, but only `<image>` is one; left as text they would be
# trained as words while the image moves to the front of the turn.
_IMAGE_TAG_LOOKALIKE = re.compile(r"<\s*/?\s*image\s*/?\s*>", re.IGNORECASE)


def load_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike | None = None, check_images: bool = True,
                    allow_outside_image_folder: bool = False, num_alignment_levels: int | None = None):
    """Load a LLaVA-format JSON/JSONL file as a `datasets.Dataset` in TRL's vision format, images decoded lazily.

    Columns: `id`, `images` (a `List(Image())` feature holding paths; files are opened on row access), `messages`
    (`<image>` placeholders become `{"type": "image"}` parts at the front of their turn) and, when the file has the
    `similarity` field (the integer level 0..N-1 of the AlignGPT pre-training JSON), `alignment_level`.
    `image_folder` defaults to the JSON's folder; an `image` path that resolves outside it (`../x.png`, an absolute
    path) is refused unless `allow_outside_image_folder=True`. With `check_images`, missing image files (or a missing
    image folder) raise here, not mid-run; with `num_alignment_levels`, levels outside 0..N-1 too. Every error names
    the file and the record; repeated ids are kept and counted in one warning.

    Example:

    ```python
    >>> from aligngpt_hf import load_llava_json
    >>> ds = load_llava_json("blip_laion_cc_sbu_558k_with_similarity_number.json", "LLaVA-Pretrain/images")  # doctest: +SKIP
    >>> ds[0]["alignment_level"], ds[0]["images"][0].size  # doctest: +SKIP
    ```
    """
    import datasets

    path = Path(path)
    records = _read_records(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    rows = [
        _convert_record(record, index, folder, path, allow_outside_image_folder, num_alignment_levels)
        for index, record in enumerate(records)
    ]
    _check_supervised(rows, path)
    _report_duplicate_ids(rows, path)
    if check_images and any(row["images"] for row in rows) and not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise NotADirectoryError(f"{path}: the image folder {folder} {state}, but the records name images. Pass the "
                                 "folder the `image` paths are relative to (`image_folder`, CLI: --image_folder).")
    if check_images:
        _check_image_files(rows, path)
    has_level = any(row[LEVEL_COLUMN] is not None for row in rows)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            **({LEVEL_COLUMN: datasets.Value("int64")} if has_level else {}),
        }
    )
    if not has_level:
        for row in rows:
            row.pop(LEVEL_COLUMN)
    return datasets.Dataset.from_list(rows, features=features)


def _read_records(path: Path) -> list[dict]:
    """JSON list or JSONL -> records; errors name the file and the line (JSONL) or line:column (JSON)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; `data_path` names the LLaVA JSON/JSONL file itself.")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (a relative path is read from the working directory {Path.cwd()})"
        where += "; environment variables (`$NAME`) in it are not expanded" if "$" in str(path) else ""
        raise FileNotFoundError(f"{path}: no such LLaVA JSON/JSONL file{where}.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {error.start}); re-save the file as UTF-8.") from None
    if not text.strip():
        raise ValueError(f"{path} is empty: it holds no LLaVA records.")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line, object_pairs_hook=unique_keys))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}).") from None
                except DuplicateKeyError as error:
                    raise ValueError(f"{path}:{number}: {error}") from None
    else:
        try:
            records = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}). A file with one record per line "
                "must be named *.jsonl."
            ) from None
        except DuplicateKeyError as error:
            raise ValueError(f"{path}: {error}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of LLaVA records, got {type(records).__name__}.")
    if not records:
        raise ValueError(f"{path} holds no records (an empty list): there is nothing to train on.")
    return records


def _convert_record(record: dict, index: int, folder: Path, path: Path, allow_outside: bool = False,
                    num_levels: int | None = None) -> dict:
    """One LLaVA record -> one TRL vision row; errors name the file, the record and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record #{index} is a {type(record).__name__}, not a JSON object.")
    name = _record_id(record.get("id"), index, path)
    where = f"{path}: record {name!r} (#{index})"
    if "images" in record and "image" not in record:  # would be read as a text-only record, its images unused
        raise ValueError(f"{where} has `images`; LLaVA JSON names the field `image` (a path or a list of paths). "
                         "Rename it.")
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise ValueError(f"{where} has `image`={record.get('image')!r}; expected a path or a list of paths.")
    if any("\x00" in image for image in images):
        raise ValueError(f"{where} has `image`={record.get('image')!r}, a path holding a NUL character.")
    if not all(image.strip() for image in images):
        raise ValueError(f"{where} has an empty path in `image`={record.get('image')!r}; name the image file, or "
                         "drop the field (and its `<image>` tag) for a text-only record.")
    level = _record_level(record.get("similarity"), where, num_levels)
    turns = record.get("conversations")
    if not turns:
        hint = (" It has `messages`: rows in TRL's `messages` format load with `datasets` (CLI: --dataset_name), not "
                "as LLaVA JSON." if "messages" in record else "")
        raise ValueError(f"{where} has no `conversations`.{hint}")
    if not isinstance(turns, list):
        raise ValueError(f"{where} has `conversations` of type {type(turns).__name__}; expected a list of turns "
                         '({"from": "human"|"gpt", "value": ...}).')
    messages, placeholders = [], 0
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: `conversations[{turn_index}]` is a {type(turn).__name__}, not an object.")
        speaker = turn.get("from")
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            shape = (' LLaVA JSON turns are {"from": ..., "value": ...}, not {"role": ..., "content": ...}.'
                     if "from" not in turn and "role" in turn else "")
            raise ValueError(f"{where}: `conversations[{turn_index}].from` is {speaker!r}; expected one of "
                             f"{sorted(ROLES)}.{shape}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"{where}: `conversations[{turn_index}].value` is {value!r}; expected a string.")
        if ALIGNMENT_PLACEHOLDER in value:
            raise ValueError(f"{where}: `conversations[{turn_index}].value` holds `<align>`, the token the processor "
                             "places after BOS of every image sample; as text it would move the alignment vector. "
                             "Remove it from the data.")
        lookalike = next((tag for tag in _IMAGE_TAG_LOOKALIKE.findall(value) if tag != IMAGE_PLACEHOLDER), None)
        if lookalike is not None:
            raise ValueError(f"{where}: `conversations[{turn_index}].value` holds {lookalike!r}; the image placeholder "
                             "is exactly `<image>` (lower case, no spaces). Write it so, or remove it.")
        count = value.count(IMAGE_PLACEHOLDER)
        _check_turn(where, turn_index, role, count, messages[-1]["role"] if messages else None)
        placeholders += count
        text = value.replace(IMAGE_PLACEHOLDER, "").strip("\n") if count else value
        content = [{"type": "image", "text": None}] * count + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] == "user" and any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: `conversations[{len(messages) - 1}]` is a human turn with no `gpt` answer after "
                         "it, so it would train on nothing. Add the answer, or drop the turn.")
    if placeholders == 0 and images:  # LLaVA puts the image at the front of the first human turn
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = [{"type": "image", "text": None}] * len(images) + first_user["content"]
            placeholders = len(images)
    if placeholders != len(images):
        raise ValueError(f"{where} has {placeholders} `<image>` placeholder(s) for {len(images)} image(s).")
    return {
        "id": name,
        "images": [resolve_image_path(image, folder, allow_outside, f"{where} `image`") for image in images],
        "messages": messages,
        LEVEL_COLUMN: level,
    }


def _check_turn(where: str, turn_index: int, role: str, images: int, previous: str | None) -> None:
    """An `<image>` in an answer would be trained as part of the answer's text; two human turns in a row would be
    glued into one prompt by the chat template; a `gpt` turn that answers no human turn (the first turn, or one after
    another answer) breaks the human/gpt alternation every LLaVA chat template assumes."""
    field = f"`conversations[{turn_index}].value`"
    if role == "assistant" and images:
        raise ValueError(f"{where}: {field} is a `gpt` turn holding `<image>`; images belong to a human turn. Move "
                         "the `<image>` tag into the question before it.")
    if role == "assistant" and previous != "user":
        what = "a second `gpt` turn in a row" if previous == "assistant" else "a `gpt` turn before any human turn"
        raise ValueError(f"{where}: `conversations[{turn_index}]` is {what}; turns alternate human, gpt, human, gpt. "
                         "Merge it into the answer before it, or add the human turn it answers.")
    if role == "user" and previous == "user":
        raise ValueError(f"{where}: {field} is a second human turn in a row; merge it into the turn before or add "
                         "the `gpt` answer between them.")
    if role == "system" and turn_index > 0:
        raise ValueError(f"{where}: {field} is a `system` turn after the start; only the first turn may be one. Move "
                         "it to the front or drop it.")


def _record_id(value, index: int, path: Path) -> str:
    """The record's `id` as a string; a missing or null id is the record's position."""
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{path}: record #{index} has `id`={value!r}; expected a string or an integer.")
    return str(value)


def _report_duplicate_ids(rows: list[dict], path: Path) -> None:
    """Shared ids are kept (LLaVA's instruction mix reuses image ids across its sources) but reported: errors then
    name a record by its position (#index) as well."""
    seen, repeated = set(), []
    for index, row in enumerate(rows):
        if row["id"] in seen:
            repeated.append(f"{row['id']!r} (#{index})")
        seen.add(row["id"])
    if repeated:
        logger.warning("%s: %d record(s) repeat the `id` of an earlier record (first: %s); all are kept. Messages "
                       "name records by id and position (#index).", path, len(repeated), ", ".join(repeated[:5]))


def _record_level(level, where: str, num_levels: int | None) -> int | None:
    """The `similarity` field: an integer level; floats, strings and negative or too-large values are refused."""
    if level is None:
        return None
    integral = isinstance(level, int) or (isinstance(level, float) and level.is_integer())
    if isinstance(level, bool) or not integral:
        raise ValueError(
            f"{where} has `similarity`={level!r}; AlignGPT's pre-training JSON stores the integer alignment level "
            "there (never rounded). Compute levels with `aligngpt-hf levels`."
        )
    if level < 0 or level >= _INT64_LIMIT or (num_levels is not None and level >= num_levels):
        top = "N-1" if num_levels is None else num_levels - 1
        raise ValueError(
            f"{where} has `similarity`={level!r}, outside the levels 0..{top}. Recompute levels with "
            f"`aligngpt-hf levels --num-levels N` for the model's N."
        )
    return int(level)


def _check_supervised(rows: list[dict], path: Path) -> None:
    """A record without an assistant turn would train on zero tokens, an empty answer on the end token alone
    (stage 1: an image captioned by "\\n"): refuse them all at once, listed."""
    empty = [row["id"] for row in rows if not any(m["role"] == "assistant" for m in row["messages"])]
    if empty:
        raise ValueError(
            f"{path}: {len(empty)} record(s) have no assistant (`gpt`) turn and would train on nothing (first: "
            f"{', '.join(map(repr, empty[:5]))}). Add the answer or caption, or remove them."
        )
    blank = [f"{row['id']!r} (#{index}) `conversations[{turn}].value`" for index, row in enumerate(rows)
             for turn, message in enumerate(row["messages"])
             if message["role"] == "assistant" and not message["content"][-1]["text"].strip()]
    if blank:
        raise ValueError(
            f"{path}: {len(blank)} `gpt` answer(s) are empty and would teach the model to answer with the end token "
            f"alone (first: {', '.join(blank[:5])}). Fill in the answer or caption, or remove the turn."
        )


def _check_image_files(rows: list[dict], path: Path | None = None) -> None:
    folders = [(row["id"], image) for row in rows for image in row["images"] if os.path.isdir(image)]
    if folders:
        shown = ", ".join(f"{name!r}: {image}" for name, image in folders[:3])
        raise IsADirectoryError(f"{path or 'dataset'}: {len(folders)} `image` path(s) name a folder, not an image "
                                f"file (first: {shown}). Name the image file inside it.")
    missing = [(row["id"], image) for row in rows for image in row["images"] if not os.path.isfile(image)]
    if missing:
        shown = ", ".join(f"{name!r}: {image}" for name, image in missing[:3])
        raise FileNotFoundError(
            f"{path or 'dataset'}: {len(missing)} image file(s) not found (first: {shown}). Check `image_folder`, or "
            "pass `check_images=False` to defer the error to the first access."
        )


__all__ = ["LEVEL_COLUMN", "load_llava_json"]

"""Alignment levels for AlignGPT stage 1: score image-caption pairs with CLIP, bucket them into N levels.

The original AlignGPT release ships the levels inside its pre-training JSON (`similarity` field) but no
script that makes them. This module is that script: the score is the raw cosine similarity of the
normalised CLIP (or SigLIP) image and text embeddings; level 0 holds the weakest-aligned pairs and level
N-1 the strongest, the row AlignGPT later uses as its "global" embedding.

Binning. The paper ranks the pairs and assigns "N equally spaced intervals", which reads both as
equal-count groups on the rank axis (`quantile`, our default: every level gets ~1/N of the data, so every
row of the level table is trained equally often) and as equal-width bins on the score axis (`uniform`:
sparse extreme levels). The per-level counts of the released file are not known, so both are offered.

Scale. Scoring runs through `datasets.map` in fixed-size chunks, each with its own deterministic cache
file: an interrupted run restarts at the first unfinished chunk. Chunks can be split across processes:
`--num-shards K --shard-index i` (or `accelerate launch`, which sets both) scores every K-th chunk; the
process with index 0 (or a later run without shard options) merges the cached chunks and writes the outputs:

    aligngpt-hf levels blip_laion_cc_sbu_558k.json levels_8.json --image-folder images/
    accelerate launch --num_processes 8 -m aligngpt_hf.cli levels blip_laion_cc_sbu_558k.json levels_8.json \
        --image-folder images/ --batch-size 256 --num-workers 8

The cache key covers the input rows, the image folder path, the scorer and the chunk size, and each chunk's file
name also carries the size and modification time of every image file in it: a chunk whose images changed under the
same names is scored again (its stale file is deleted). The cache folder is `.<output stem>.levels-cache/` by default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligngpt_hf.levels.binning import BINNINGS, DEFAULT_TIE_TOLERANCE, assign_levels  # noqa: F401 (public here)
from aligngpt_hf.levels.inputs import (  # noqa: F401 (public here)
    RECORD_PROBLEM,
    _open_image,
    caption_from_conversations,
    caption_problem,
    load_input,
    pairs_from_llava_json,
    record_problem,
    unwrapped,
    without_old_scores,
)
from aligngpt_hf.levels.scorer import DEFAULT_SCORER, Scorer, load_scorer
from aligngpt_hf.paths import atomic_path, atomic_write_text, check_apart, check_writable

SKIP_HINT = "pass --skip-bad (skip_bad=True) to skip such records; they are counted and listed in the report"
logger = logging.getLogger(__name__)
_CACHE_VERSION = "levels-v1"
_SCORE_FEATURES = {
    "alignment_score": "float64",
    "alignment_error": "string",
    "alignment_image_mode": "string",
    "alignment_truncated": "bool",
}


# ----------------------------------------------------------------------------------------------- scoring


def _batch_scorer(scorer: Scorer, source, image_column: str, text_column: str, id_column: str | None,
                  image_folder: str | None, pool: ThreadPoolExecutor, skip_bad: bool, allow_outside: bool = False):
    """The `datasets.map` function: decode + preprocess images in threads, score the good rows.

    On an accelerator the worker threads decode batch k+1 of the chunk while the model scores batch k, so the
    GPU does not wait for JPEG decoding. On CPU they do not (measured: decoding threads competing with torch's
    own threads made scoring 3x slower on 2 cores).
    """
    pending: dict[int, Any] = {}
    prefetch = scorer.device.type != "cpu"
    tokenizer = getattr(scorer.processor, "tokenizer", None)
    specials = [token for token in getattr(tokenizer, "all_special_tokens", []) if token]

    def prepare(value):
        try:
            image, mode = _open_image(value, image_folder, allow_outside)
            return scorer.preprocess_image(image), mode, ""
        except (TypeError, ValueError) as error:
            return None, "", str(error)

    def fn(batch: dict[str, list], indices: list[int], chunk_end: int) -> dict[str, list]:
        captions = batch[text_column]
        futures = [pending.pop(row, None) or pool.submit(prepare, value)
                   for row, value in zip(indices, batch[image_column])]
        pending.clear()  # a stale prefetch (e.g. after an interruption) is never reused
        ahead = range(indices[-1] + 1, min(chunk_end, indices[-1] + 1 + len(indices)))
        if prefetch and len(ahead):
            for row, value in zip(ahead, source[ahead.start:ahead.stop][image_column]):
                pending[row] = pool.submit(prepare, value)
        prepared = [future.result() for future in futures]
        problems = batch.get(RECORD_PROBLEM) or [""] * len(captions)
        errors = [problem or error for problem, (_, _, error) in zip(problems, prepared)]
        for i, caption in enumerate(captions):
            if not errors[i]:
                errors[i] = caption_problem(caption, specials)
        scores = [math.nan] * len(captions)
        for i, error in enumerate(errors):
            if error and not skip_bad:
                record = batch[id_column][i] if id_column else f"row {indices[i]}"
                raise ValueError(f"record {record!r} (row {indices[i]}): {error.rstrip('.')}. Fix the record or "
                                 f"{SKIP_HINT}.")
        good = [i for i, error in enumerate(errors) if not error]
        truncated = [False] * len(captions)
        if good:
            pixels = {key: torch.cat([prepared[i][0][key] for i in good]) for key in prepared[good[0]][0]}
            good_captions = [captions[i] for i in good]
            for i, value, cut in zip(good, scorer.score(pixels, good_captions), scorer.count_truncated(good_captions)):
                scores[i], truncated[i] = float(value), cut
                if not math.isfinite(scores[i]):  # NaN/inf weights, or an overflow in half precision
                    errors[i] = (f"the scorer gave a non-finite score ({scores[i]}); check the scorer's weights, or "
                                 "score in float32 (--device cpu)")
                    if not skip_bad:
                        record = batch[id_column][i] if id_column else f"row {indices[i]}"
                        raise ValueError(f"record {record!r} (row {indices[i]}): {errors[i]}.")
        modes = [mode for _, mode, _ in prepared]
        return {"alignment_score": scores, "alignment_error": errors, "alignment_image_mode": modes,
                "alignment_truncated": truncated}

    return fn


def _score_chunk(source, rows: range, fn, batch_size: int, features, cache_file: str | None, base: str, chunk: int,
                 num_chunks: int):
    """One chunk through `datasets.map`, cached; a cut-short cache file (a run killed while writing it) is named."""
    import pyarrow

    if cache_file is not None and os.path.isfile(cache_file):
        try:
            with pyarrow.memory_map(cache_file) as handle:
                pyarrow.ipc.open_stream(handle).read_all()
        except (pyarrow.ArrowInvalid, OSError) as error:
            raise ValueError(
                f"levels cache chunk {cache_file} is truncated or corrupt ({error}); delete that file (or the whole "
                "cache folder) and rerun: only this chunk is scored again."
            ) from None
    # The dataset is selected by contiguous row range, so `with_indices` gives global row numbers.
    return source.select(rows).map(
        lambda batch, idx, start=rows.start, end=rows.stop: fn(batch, [start + i for i in idx], end),
        batched=True, batch_size=batch_size, with_indices=True, remove_columns=source.column_names,
        features=features, cache_file_name=cache_file, load_from_cache_file=cache_file is not None,
        new_fingerprint=f"{base}{chunk:05d}", desc=f"alignment scores, chunk {chunk + 1}/{num_chunks}",
    )


def _check_run_options(batch_size, chunk_size, num_workers, num_shards, shard_index) -> None:
    """Sizes, threads and shards, refused before the scorer is loaded (a full-size CLIP takes a while)."""
    if int(chunk_size) != chunk_size or chunk_size < 1 or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be integers >= 1, got {chunk_size} and {batch_size}")
    if num_workers is not None and (int(num_workers) != num_workers or num_workers < 1):
        raise ValueError(f"num_workers (--num-workers, image decoding threads) must be an integer >= 1, got "
                         f"{num_workers}")
    if int(num_shards) != num_shards or num_shards < 1:
        raise ValueError(f"num_shards (--num-shards) must be an integer >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in 0..{num_shards - 1}, got {shard_index}"
                         + ("; pass --num-shards with --shard-index" if num_shards == 1 else ""))


def _files_signature(source, rows: range, image_column: str, image_folder: str | None) -> str:
    """A short hash of the size and modification time of every image file of `rows`: replacing a file under the
    same name changes it, so the chunk's cached scores are not reused. Embedded image bytes are covered by the
    dataset fingerprint instead."""
    digest = hashlib.sha256()
    for value in source[rows.start:rows.stop][image_column]:
        value = unwrapped(value)
        if isinstance(value, dict):
            value = None if value.get("bytes") else value.get("path")
        if isinstance(value, str):
            path = os.path.join(image_folder, value) if image_folder else value
            try:
                stat = os.stat(path)
                value = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
            except (OSError, ValueError):  # missing, or not a valid path (NUL byte): the scorer names it
                value = f"{path}:missing"
        digest.update(f"{value}\n".encode())
    return digest.hexdigest()[:12]


def _chunk_cache_file(cache_dir: Path, base: str, chunk: int, num_chunks: int, files: str) -> str:
    """The chunk's cache file; files of the same chunk made from other image files (stale) are deleted."""
    suffix = f"-{chunk:05d}-of-{num_chunks:05d}.arrow"
    current = cache_dir / f"scores-{base}-{files}{suffix}"
    if cache_dir.is_dir():
        for stale in cache_dir.glob(f"scores-{base}-*{suffix}"):
            if stale != current:
                stale.unlink(missing_ok=True)
    return str(current)


def default_cache_dir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.parent / f".{output.stem}.levels-cache"


def score_pairs(dataset, scorer: Any, *, image_column: str = "image", text_column: str = "caption",
                id_column: str | None = "id", image_folder: str | None = None, batch_size: int = 64,
                num_workers: int | None = None, chunk_size: int = 10_000, cache_dir: str | os.PathLike | None = None,
                skip_bad: bool = False, shard_index: int = 0, num_shards: int = 1, fingerprint: str | None = None,
                progress: bool = True, allow_outside_image_folder: bool = False):
    """Add `alignment_score` (raw cosine; NaN for skipped rows) plus bookkeeping columns to `dataset`.

    Rows are scored in chunks of `chunk_size`; with a `cache_dir` every finished chunk is an Arrow file
    named by a fingerprint of data + scorer, so a rerun reuses it. With `num_shards > 1` only every
    `num_shards`-th chunk starting at `shard_index` is scored and returned (merge by rerunning unsharded).
    `alignment_error` holds the reason a row was skipped (only with `skip_bad`), `alignment_image_mode` the
    image's original PIL mode (non-RGB images are converted and counted), `alignment_truncated` whether the
    caption was longer than the scorer's text context.
    """
    from datasets import Dataset, Features, Image, List, Sequence, Value, concatenate_datasets

    scorer = load_scorer(scorer) if not isinstance(scorer, Scorer) else scorer
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: there are no image-caption pairs to score")
    for column in (image_column, text_column):
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} not in dataset columns {dataset.column_names}; "
                             "pass --image-column/--text-column")
    id_column = id_column if id_column in dataset.column_names else None
    dataset = without_old_scores(dataset)
    _check_run_options(batch_size, chunk_size, num_workers, num_shards, shard_index)
    features = Features({name: Value(kind) for name, kind in _SCORE_FEATURES.items()})
    source = dataset
    feature = dataset.features[image_column]
    if isinstance(feature, Image):  # decode in our worker threads, not in datasets
        source = dataset.cast_column(image_column, Image(decode=False))
    elif isinstance(feature, (List, Sequence)) and isinstance(feature.feature, Image):  # one image in a list
        source = dataset.cast_column(image_column, List(Image(decode=False)))
    key = "|".join([_CACHE_VERSION, fingerprint or dataset._fingerprint, image_column, text_column, str(id_column),
                    os.path.abspath(image_folder) if image_folder else "", scorer.fingerprint(), str(chunk_size)])
    base = hashlib.sha256(key.encode()).hexdigest()[:16]
    num_chunks = math.ceil(len(dataset) / chunk_size)
    mine = list(range(shard_index, num_chunks, num_shards))
    workers = num_workers or min(8, os.cpu_count() or 1)
    parts = []
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    bars_were_on = is_progress_bar_enabled()
    if not progress:
        disable_progress_bar()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            fn = _batch_scorer(scorer, source, image_column, text_column, id_column, image_folder, pool, skip_bad,
                               allow_outside_image_folder)
            for chunk in mine:
                rows = range(chunk * chunk_size, min(len(dataset), (chunk + 1) * chunk_size))
                cache_file, files = None, _files_signature(source, rows, image_column, image_folder)
                if cache_dir is not None:
                    cache_file = _chunk_cache_file(Path(cache_dir), base, chunk, num_chunks, files)
                parts.append(_score_chunk(source, rows, fn, batch_size, features, cache_file, base + files, chunk,
                                          num_chunks))
        if not parts:  # more shards than chunks: this process has nothing to do
            parts = [Dataset.from_dict({name: [] for name in _SCORE_FEATURES}, features=features)]
        selected = [r for c in mine for r in range(c * chunk_size, min(len(dataset), (c + 1) * chunk_size))]
        base_rows = dataset if len(mine) == num_chunks else dataset.select(selected)
        return concatenate_datasets([base_rows, concatenate_datasets(parts)], axis=1)
    finally:
        if bars_were_on and not progress:
            enable_progress_bar()


# ----------------------------------------------------------------------------------------------- bucketing


# ----------------------------------------------------------------------------------------------- end to end


@dataclass
class LevelsResult:
    """What `compute_alignment_levels` produced; `report` is also written as JSON and markdown."""

    output: Path | None
    report: dict
    dataset: Any = None
    files: dict[str, str] = field(default_factory=dict)
    complete: bool = True


def _distributed_shard(num_shards: int | None, shard_index: int | None, device: str | None = None):
    """Under `accelerate launch` (WORLD_SIZE > 1) shard by process; otherwise use the given options.

    Without a GPU (or with `device="cpu"`) the processes join a gloo group: accelerate's GPU default would leave
    each of them alone, every one scoring everything and writing OUTPUT.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if num_shards is None and world_size > 1:
        from accelerate import PartialState

        cpu = device == "cpu" or (device is None and not torch.accelerator.is_available())
        state = PartialState(cpu=cpu)
        if state.num_processes != world_size:
            raise RuntimeError(f"WORLD_SIZE={world_size} but accelerate formed a group of {state.num_processes} "
                               f"(distributed type {state.distributed_type}); pass --device cpu, or split by hand "
                               "with --num-shards/--shard-index")
        return state, state.num_processes, state.process_index, state.device
    return None, 1 if num_shards is None else num_shards, shard_index or 0, None


def compute_alignment_levels(input: Any, output: str | os.PathLike, image_folder: str | None = None,
                             scorer: Any = DEFAULT_SCORER, num_levels: int = 8, binning: str = "quantile", *,
                             skip_bad: bool = False, image_column: str = "image", text_column: str = "caption",
                             id_column: str = "id", split: str | None = None, batch_size: int = 64,
                             num_workers: int | None = None, chunk_size: int = 10_000,
                             cache_dir: str | os.PathLike | None = None, num_shards: int | None = None,
                             shard_index: int | None = None, plot: bool = True, examples_per_level: int = 3,
                             device: str | None = None, progress: bool = True,
                             tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
                             allow_outside_image_folder: bool = False) -> LevelsResult:
    """Score, bucket and write: OUTPUT JSON (LLaVA records with `similarity` = level) + report + plot.

    `input` is a LLaVA JSON path, a `save_to_disk` folder or a `datasets.Dataset` (image + text columns).
    For dataset inputs the scored dataset is also saved next to OUTPUT (`<stem>.dataset/`).
    """
    import time

    from aligngpt_hf.levels import report as levels_report

    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    if int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    if plot:
        levels_report.require_matplotlib()
    if not (math.isfinite(tie_tolerance) and tie_tolerance >= 0):  # refused before scoring, not after it
        raise ValueError(f"tie_tolerance (--tie-tolerance) must be a finite number >= 0, got {tie_tolerance}")
    output = Path(output)
    _check_output(output, input)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(output)
    _check_cache_dir(cache_dir, output, input)
    check_writable(output.parent, "output folder")
    if image_folder is not None and not Path(image_folder).is_dir():
        what = "is a file" if Path(image_folder).exists() else "does not exist"
        raise ValueError(f"--image-folder {image_folder} {what}; pass the folder the records' `image` paths are "
                         "relative to")
    records, dataset = load_input(input, split)
    dataset = without_old_scores(dataset)
    if records is not None:
        dataset_options = {"--image-column": (image_column, "image"), "--text-column": (text_column, "caption"),
                           "--id-column": (id_column, "id"), "--split": (split, None)}
        ignored = [name for name, (value, default) in dataset_options.items() if value != default]
        if ignored:
            verb, them = ("applies", "it") if len(ignored) == 1 else ("apply", "them")
            raise ValueError(f"{', '.join(ignored)} {verb} to a saved dataset, but {input} is LLaVA JSON (its records "
                             f"always hold `id`, `image` and the caption in `conversations`); drop {them}")
        image_column, text_column, id_column = "image", "caption", "id"
        if image_folder is None:
            raise ValueError("LLaVA JSON input needs --image-folder (image_folder=...): its `image` paths are relative")
    if len(dataset) == 0:
        raise ValueError(f"input {input} is empty: there are no image-caption pairs to score")
    if records is None and id_column not in (None, "id") and id_column not in dataset.column_names:
        raise ValueError(f"--id-column {id_column!r} is not a column of the input (columns: {dataset.column_names}); "
                         "name the column holding the record ids, or drop --id-column to name records by row")
    if num_levels > len(dataset):
        raise ValueError(f"num_levels={num_levels} is larger than the number of pairs ({len(dataset)}); "
                         "lower --num-levels or add data")
    state, num_shards, shard_index, state_device = _distributed_shard(num_shards, shard_index, device)
    _check_run_options(batch_size, chunk_size, num_workers, num_shards, shard_index)
    scorer = load_scorer(scorer, device=device or state_device)
    check_writable(cache_dir, "cache folder")
    options = dict(image_column=image_column, text_column=text_column, id_column=id_column, image_folder=image_folder,
                   batch_size=batch_size, num_workers=num_workers, chunk_size=chunk_size, cache_dir=cache_dir,
                   skip_bad=skip_bad, progress=progress, allow_outside_image_folder=allow_outside_image_folder)
    start = time.perf_counter()
    scored = score_pairs(dataset, scorer, shard_index=shard_index, num_shards=num_shards, **options)
    if num_shards > 1:
        if state is None:
            return LevelsResult(output=None, report={"shard_index": shard_index, "num_shards": num_shards,
                                                     "rows_scored": len(scored)}, dataset=scored, complete=False)
        state.wait_for_everyone()
        if not state.is_main_process:
            return LevelsResult(output=None, report={}, dataset=scored, complete=False)
        scored = score_pairs(dataset, scorer, **options)  # every chunk is cached now: this only merges
    seconds = time.perf_counter() - start
    return _finish(scored, records, output, scorer, num_levels, binning, skip_bad, id_column, text_column,
                   image_column, plot, examples_per_level, seconds, levels_report, tie_tolerance)


def _check_output(output: Path, input: Any) -> None:
    """OUTPUT is a JSON file path: not a folder, not INPUT itself, not inside a saved-dataset INPUT."""
    if output.is_dir():
        raise ValueError(f"OUTPUT {output} is a folder; give the path of the JSON file to write, e.g. "
                         f"{output / 'levels.json'}")
    if isinstance(input, (str, os.PathLike)) and Path(input).exists():
        check_apart(output, input, "OUTPUT", "INPUT")
        written = [output.with_name(output.stem + suffix) for suffix in (".report.json", ".report.md", ".scores.png",
                                                                         ".dataset")]
        for path in written:
            if os.path.realpath(path) == os.path.realpath(input):
                raise ValueError(f"INPUT {input} would be overwritten by the file {path.name} that OUTPUT {output} "
                                 "writes next to it; give OUTPUT another name.")


def _check_cache_dir(cache_dir: Path, output: Path, input: Any) -> None:
    """The score cache is a folder of its own: not OUTPUT (which is written at the end), not inside a saved-dataset
    INPUT (which it would change)."""
    if os.path.realpath(cache_dir) == os.path.realpath(output):
        raise ValueError(f"--cache-dir {cache_dir} is OUTPUT itself; choose another folder (default: "
                         f"{default_cache_dir(output)})")
    if cache_dir.is_file():
        raise ValueError(f"--cache-dir {cache_dir} is a file; choose a folder")
    if isinstance(input, (str, os.PathLike)) and Path(input).is_dir():
        check_apart(cache_dir, input, "--cache-dir", "INPUT")


def _first_error(scored, id_column: str | None) -> ValueError:
    errors = scored["alignment_error"]
    row = next(i for i, error in enumerate(errors) if error)
    record = scored[row][id_column] if id_column in scored.column_names else f"row {row}"
    count = sum(1 for error in errors if error)
    return ValueError(f"record {record!r} (row {row}): {errors[row]} ({count} bad record(s) in total, found in "
                      f"cached scores). Fix the records or {SKIP_HINT}.")


def _finish(scored, records, output: Path, scorer: Scorer, num_levels, binning, skip_bad, id_column, text_column,
            image_column, plot, examples_per_level, seconds, levels_report,
            tie_tolerance: float = DEFAULT_TIE_TOLERANCE) -> LevelsResult:
    """Bucket the good rows, write OUTPUT JSON (+ dataset), report JSON/markdown and the plot."""
    errors = scored["alignment_error"]
    good = [i for i, error in enumerate(errors) if not error]
    if len(good) < len(errors) and not skip_bad:
        raise _first_error(scored, id_column)
    if not good:
        reasons = Counter(error.split(":")[0].split(" (")[0] for error in errors).most_common(3)
        listed = "; ".join(f"{reason} ({count})" for reason, count in reasons)
        raise ValueError(f"every one of the {len(errors)} records was skipped, nothing to bucket: {listed}. Fix the "
                         "records (or the --image-folder / --scorer they need) and rerun.")
    kept = scored.select(good)
    levels, edges, ties = assign_levels(kept["alignment_score"], num_levels, binning, tie_tolerance, return_ties=True)
    kept = kept.add_column("alignment_level", levels.tolist())
    scores = np.asarray(kept["alignment_score"])
    output.parent.mkdir(parents=True, exist_ok=True)
    files = {"output": str(output)}
    if records is not None:
        out_records = []
        for row, score, level in zip(good, scores.tolist(), levels.tolist()):
            record = dict(records[row])
            record.update(similarity=int(level), alignment_score=float(score), alignment_level=int(level))
            out_records.append(record)
    else:
        dataset_dir = output.with_name(output.stem + ".dataset")
        with atomic_path(dataset_dir, directory=True) as temp:
            kept.remove_columns(["alignment_error"]).save_to_disk(str(temp))
        files["dataset"] = str(dataset_dir)
        out_records = levels_report.llava_records_from_dataset(kept, image_column, text_column, id_column)
        pathless = sum(1 for record in out_records if record["image"] is None)
        if pathless:  # embedded image bytes have no file name a LLaVA JSON could point at
            logger.warning("%d of %d image(s) are embedded bytes without a file path: their records in %s have "
                           "`image: null`. Train from the saved dataset %s, which keeps the images.", pathless,
                           len(out_records), output, dataset_dir)
    atomic_write_text(output, json.dumps(out_records, ensure_ascii=False))
    ids = scored[id_column] if id_column in scored.column_names else [f"row {i}" for i in range(len(scored))]
    report = levels_report.build_report(
        scores=scores, levels=levels, edges=edges, num_levels=num_levels, binning=binning, scorer=scorer.name,
        captions=kept[text_column], ids=ids, errors=errors, modes=scored["alignment_image_mode"],
        truncated=scored["alignment_truncated"], max_length=scorer.max_length, seconds=seconds,
        examples_per_level=examples_per_level, ties=ties)
    files.update(levels_report.write_report(report, output, plot=plot, scores=scores, edges=edges, extra_files=files))
    return LevelsResult(output=output, report=report, dataset=kept, files=files)


# ----------------------------------------------------------------------------------------------- CLI


def run_cli(args: argparse.Namespace) -> int:
    from aligngpt_hf.levels import report as levels_report

    result = compute_alignment_levels(
        args.input, args.output, image_folder=args.image_folder, scorer=args.scorer, num_levels=args.num_levels,
        binning=args.binning, skip_bad=args.skip_bad, image_column=args.image_column, text_column=args.text_column,
        id_column=args.id_column, split=args.split, batch_size=args.batch_size, num_workers=args.num_workers,
        chunk_size=args.chunk_size, cache_dir=args.cache_dir, num_shards=args.num_shards,
        shard_index=args.shard_index, plot=not args.no_plot, device=args.device, tie_tolerance=args.tie_tolerance,
        allow_outside_image_folder=args.allow_outside_image_folder)
    if not result.complete:
        if result.report:
            print(f"shard {result.report['shard_index']}/{result.report['num_shards']} scored "
                  f"{result.report['rows_scored']} rows; rerun without --shard-index/--num-shards to merge")
        return 0
    report = result.report
    print(f"{report['num_scored']} pairs in {report['num_levels']} levels ({report['binning']}), "
          f"{report['num_skipped']} skipped, {report['num_truncated']} captions truncated")
    for line in levels_report.warning_lines(report):
        print(f"  note: {line}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    return 0


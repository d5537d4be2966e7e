"""LLaVA's `group_by_modality_length` sampler (as in LLaVA's training code), seeded so every rank draws the same order.

Image and text-only samples are shuffled separately, cut into megabatches of `world_size x grad_accum x batch`
samples, each sorted by length (longest first) and split into per-device batches balanced by total length; full
megabatches of both modalities are shuffled together and the two leftovers form one mixed megabatch at the end.
Net effect: almost every step is single-modality (cheap: text-only steps skip the vision tower).

`SeparateModalitySampler` is mPLUG-Owl's joint instruction tuning (its paper, §3.2): micro-batches
alternate one text-only batch and one multimodal batch, so every optimizer step sees them at 1:1 whenever
processes x gradient-accumulation steps is even.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Sampler

from aligngpt_hf.training.data import image_count, undecoded

logger = logging.getLogger(__name__)


def modality_lengths(dataset) -> list[int]:
    """Whitespace words over all turns, positive for rows with an image, negative for text-only (never 0)."""
    lengths = []
    for index, row in enumerate(undecoded(dataset)):
        words = 0
        for message in row.get("messages") or list(row.get("prompt") or []) + list(row.get("completion") or []):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and all(isinstance(part, dict) for part in content):
                content = " ".join(part.get("text") or "" for part in content if part.get("type") == "text")
            if not isinstance(content, str | None) or not isinstance(message, dict):
                name = f"{row['id']!r} (#{index})" if row.get("id") is not None else f"#{index}"
                raise ValueError(f"Row {name} of the training data has a message {message!r}; expected "
                                 "{'role': ..., 'content': text or a list of {'type': ..., 'text': ...} parts}.")
            words += len((content or "").split())
        words = max(words, 1)
        lengths.append(words if image_count(row) else -words)
    return lengths


def _split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """Greedy: each index goes to the chunk with the smallest total length that still has room."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def _length_grouped(lengths: list[int], batch_size: int, world_size: int, generator) -> list[int]:
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    megabatches = [sorted(indices[i : i + size], key=lambda j: lengths[j], reverse=True) for i in range(0, len(indices), size)]
    return [i for mb in megabatches for chunk in _split_to_even_chunks(mb, lengths, world_size) for i in chunk]


def modality_grouped_indices(lengths: list[int], batch_size: int, world_size: int, generator) -> list[int]:
    """The order of one epoch; `world_size` here is processes x gradient-accumulation steps, as in LLaVA."""
    if any(length == 0 for length in lengths):
        raise ValueError("Modality lengths must be non-zero (positive = image row, negative = text-only row).")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return _length_grouped([abs(x) for x in lengths], batch_size, world_size, generator)
    mm = [(i, x) for i, x in enumerate(lengths) if x > 0]
    text = [(i, -x) for i, x in enumerate(lengths) if x < 0]
    size = world_size * batch_size
    groups = []
    for pairs in (mm, text):
        order = _length_grouped([x for _, x in pairs], batch_size, world_size, generator)
        shuffled = [pairs[i][0] for i in order]
        groups.append([shuffled[i : i + size] for i in range(0, len(shuffled), size)])
    (*mm_full, mm_last), (*text_full, text_last) = groups
    megabatches = mm_full + text_full
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    leftover = mm_last + text_last
    if leftover:
        megabatches.append(sorted(leftover))
    return [i for megabatch in megabatches for i in megabatch]


class ModalityLengthGroupedSampler(Sampler):
    """Sampler over `lengths` (see `modality_lengths`); deterministic in (`seed`, epoch) so resumes and ranks agree.

    Example:

    ```python
    >>> sampler = ModalityLengthGroupedSampler([5, -3, 7, -2, 4, 6], batch_size=2, world_size=1, seed=0)
    >>> sorted(sampler) == list(range(6))
    True
    ```
    """

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))


EXHAUSTION_MODES = ("cycle", "stop")


def separate_modality_indices(lengths: list[int], batch_size: int, generator, on_exhausted: str = "cycle"):
    """One epoch of alternating batches [text, image, text, image, ...] of `batch_size` indices each.

    `cycle`: the shorter modality is reshuffled and drawn again until the longer one is used once (the paper's 2,000
    steps of 128 + 128 revisit its smaller multimodal set); the longer one's last partial batch is filled the same way.
    `stop`: stop when either modality cannot fill a batch. Returns (indices, counts) where counts says how many
    samples were drawn again (`repeated`) or left out this epoch (`unused`) per modality -- never dropped silently.
    """
    if on_exhausted not in EXHAUSTION_MODES:
        raise ValueError(f"`on_exhausted` must be one of {EXHAUSTION_MODES}, got {on_exhausted!r}.")
    if any(length == 0 for length in lengths):
        raise ValueError("Modality lengths must be non-zero (positive = image row, negative = text-only row).")
    pools = {"text": [i for i, x in enumerate(lengths) if x < 0], "image": [i for i, x in enumerate(lengths) if x > 0]}
    empty = [kind for kind, pool in pools.items() if not pool]
    if empty:
        raise ValueError(f"modality_batching='separate' alternates text-only and image batches, but the dataset has "
                         f"no {empty[0]} rows; use modality_batching='mixed'.")
    if on_exhausted == "cycle":
        num_pairs = -(-max(len(pool) for pool in pools.values()) // batch_size)
    else:
        num_pairs = min(len(pool) for pool in pools.values()) // batch_size
        if num_pairs == 0:
            raise ValueError(f"modality_batching='separate' with on_exhausted='stop': a modality has fewer rows "
                             f"({min(map(len, pools.values()))}) than one batch ({batch_size}).")
    streams, counts = {}, {}
    for kind, pool in pools.items():
        needed = num_pairs * batch_size
        order = []
        while len(order) < needed:
            order += [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        streams[kind] = order[:needed]
        counts[f"{kind}_repeated"] = max(needed - len(pool), 0)
        counts[f"{kind}_unused"] = max(len(pool) - needed, 0)
    indices = []
    for pair in range(num_pairs):
        for kind in ("text", "image"):
            indices += streams[kind][pair * batch_size : (pair + 1) * batch_size]
    return indices, counts


class SeparateModalitySampler(Sampler):
    """Alternating text-only / multimodal batches at 1:1 (see `separate_modality_indices`); deterministic in
    (`seed`, epoch). `counts` holds the last epoch's repeated/unused samples per modality, also logged.

    Example:

    ```python
    >>> sampler = SeparateModalitySampler([5, -3, 7, -2, 4, 6], batch_size=2, seed=0)
    >>> order = list(sampler)
    >>> [[i in (1, 3) for i in order[j : j + 2]] for j in range(0, len(order), 2)]
    [[True, True], [False, False], [True, True], [False, False]]
    >>> sampler.counts["text_repeated"], sampler.counts["image_unused"]
    (2, 0)
    ```
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, on_exhausted: str = "cycle"):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.on_exhausted = on_exhausted
        self.epoch = 0
        indices, self.counts = separate_modality_indices(self.lengths, batch_size, torch.Generator(), on_exhausted)
        self._length = len(indices)  # validates the data at construction; the same for every epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices, self.counts = separate_modality_indices(self.lengths, self.batch_size, generator, self.on_exhausted)
        if any(self.counts.values()):
            logger.warning("modality_batching='separate' (on_exhausted=%r), epoch %d: %s.", self.on_exhausted,
                           self.epoch, ", ".join(f"{k}={v}" for k, v in self.counts.items() if v))
        return iter(indices)


__all__ = [
    "ModalityLengthGroupedSampler",
    "SeparateModalitySampler",
    "modality_grouped_indices",
    "modality_lengths",
    "separate_modality_indices",
]

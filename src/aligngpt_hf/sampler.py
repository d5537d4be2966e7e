"""LLaVA's `group_by_modality_length` sampler (spec/aligngpt.md §4.5), seeded so every rank draws the same order.

Image and text-only samples are shuffled separately, cut into megabatches of `world_size x grad_accum x batch`
samples, each sorted by length (longest first) and split into per-device batches balanced by total length; full
megabatches of both modalities are shuffled together and the two leftovers form one mixed megabatch at the end.
Net effect: almost every step is single-modality (cheap: text-only steps skip the vision tower).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from .data import image_count, undecoded


def modality_lengths(dataset) -> list[int]:
    """Whitespace words over all turns, positive for rows with an image, negative for text-only (never 0)."""
    lengths = []
    for row in undecoded(dataset):
        words = 0
        for message in row.get("messages") or list(row.get("prompt") or []) + list(row.get("completion") or []):
            content = message.get("content") or ""
            if not isinstance(content, str):
                content = " ".join(part.get("text") or "" for part in content if part.get("type") == "text")
            words += len(content.split())
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


__all__ = ["ModalityLengthGroupedSampler", "modality_grouped_indices", "modality_lengths"]

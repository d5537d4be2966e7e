"""Padding-free multimodal packing for both training stages (`packing=True` / `padding_free=True`).

TRL refuses `packing`/`padding_free` for image datasets; here they work with images, text-only and multi-image rows:

* `best_fit_decreasing` bins whole samples (image tokens and `<align>` included, never cut) into packs of at most
  `max_length` tokens, as TRL's text `bfd` packing does; `PackedDataset` serves one pack per item.
* `AlignGPTPackingCollator` wraps the ordinary `AlignGPTDataCollator`: it collates every sample as usual (same tokens,
  labels, gate mask, levels, images), then lays the samples of a pack end to end in one row with `position_ids`
  restarting at 0 per sample, the first label of each sample masked (it would be predicted from the previous sample)
  and no `attention_mask`. The model finds the samples from `position_ids` (models/packing_aligngpt.py).
* `check_packed_attention` refuses, before training, a language model whose output for one packed sample depends on
  another one (e.g. an attention implementation or architecture that ignores the packed-sequence mask).
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from aligngpt_hf.models.alignment_aligngpt import gate_text_mask
from aligngpt_hf.models.packing_aligngpt import PACKED_ATTENTION, keeps_samples_apart
from aligngpt_hf.training.data import image_count, sample_token_lengths, undecoded
from aligngpt_hf.training.sampler import ModalityLengthGroupedSampler

logger = logging.getLogger(__name__)

PER_TOKEN_KEYS = ("input_ids", "labels", "gate_text_mask")


def best_fit_decreasing(lengths: list[int], capacity: int, names: list[str] | None = None) -> list[list[int]]:
    """Indices of `lengths` binned into packs of total length <= `capacity`, longest first, each into the fullest
    pack that still has room (best fit). Every index lands in exactly one pack; a longer-than-capacity one raises.

    O(n log capacity): open packs are kept by remaining room, and there are at most `capacity` distinct rooms.
    """
    too_long = [index for index, length in enumerate(lengths) if length > capacity]
    if too_long:
        index = too_long[0]
        name = names[index] if names else f"#{index}"
        raise ValueError(
            f"Sample {name} is {lengths[index]} tokens long (image tokens and `<align>` included) but packs hold "
            f"max_length={capacity}; {len(too_long)} sample(s) are too long. Image tokens are never cut: raise "
            "`max_length`, or set `skip_overlong_samples=True` to drop such samples before training (they are counted)."
        )
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    packs: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct remaining rooms that have an open pack
    open_packs: dict[int, list[int]] = defaultdict(list)  # room -> packs with that room
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(rooms, length)
        if slot == len(rooms):
            packs.append([])
            pack, room = len(packs) - 1, capacity
        else:
            room = rooms[slot]
            pack = open_packs[room].pop(0)
            if not open_packs[room]:
                rooms.pop(slot)
        packs[pack].append(index)
        room -= length
        if room > 0:
            if not open_packs[room]:
                bisect.insort(rooms, room)
            open_packs[room].append(pack)
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """One pack (a list of the source rows, in pack order) per item; the source rows are read (and their images
    decoded) only when the pack is loaded. `lengths`: token count per pack; `modality_lengths`: the same, negative
    for packs without an image, as `ModalityLengthGroupedSampler` expects."""

    def __init__(self, dataset, packs: list[list[int]], sample_lengths: list[int], has_image: list[bool]):
        self.dataset, self.packs = dataset, packs
        self.lengths = [sum(sample_lengths[index] for index in pack) for pack in packs]
        self.modality_lengths = [
            length if any(has_image[index] for index in pack) else -length for pack, length in zip(packs, self.lengths)
        ]
        self.num_samples = sum(len(pack) for pack in packs)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.dataset[int(row)] for row in self.packs[index]]


def pack_dataset(dataset, processor, max_length: int, chat_template: str | None = None,
                 by_modality: bool = False) -> PackedDataset:
    """Bin `dataset` into packs of <= `max_length` tokens (exact lengths as the collator builds them, no image
    decoded). `by_modality`: image rows and text-only rows are packed apart, so the modality-grouped sampler still
    gives single-modality steps (text-only steps skip the vision tower, as LLaVA's grouping intends)."""
    if max_length is None:
        raise ValueError("`packing=True` bins samples into packs of `max_length` tokens; set `max_length`.")
    lengths = sample_token_lengths(dataset, processor, chat_template=chat_template)
    rows = undecoded(dataset)
    has_image = [image_count(row) > 0 for row in rows]
    names = [repr(row["id"]) if row.get("id") is not None else f"#{index}" for index, row in enumerate(rows)]
    groups = [[i for i, image in enumerate(has_image) if image], [i for i, image in enumerate(has_image) if not image]]
    if not by_modality:
        groups = [list(range(len(lengths)))]
    packs = []
    for group in groups:
        binned = best_fit_decreasing([lengths[i] for i in group], max_length, [names[i] for i in group])
        packs += [[group[i] for i in pack] for pack in binned]
    packed = PackedDataset(dataset, packs, lengths, has_image)
    fill = sum(packed.lengths) / max(len(packs) * max_length, 1)
    logger.info("Packed %d samples into %d packs of <= %d tokens (%.1f%% full).", len(lengths), len(packs),
                max_length, 100 * fill)
    return packed


@dataclass
class AlignGPTPackingCollator:
    """Padding-free batches: each pack (a list of rows from `PackedDataset`) becomes one row; with plain rows
    (`padding_free=True` without packing) the whole batch becomes one row. Rows are padded at their end only to the
    longest row; that padding continues the last sample (labels -100, never in the gate), which it cannot influence
    under causal attention.

    Keys: `input_ids`, `labels`, `position_ids` [rows, T]; `gate_text_mask` [rows, T] (always: without an
    `attention_mask` the gate needs it to skip padding); `pixel_values` in pack order; `alignment_levels` per sample;
    `cu_seq_lens_q/k`, `max_length_q/k` (flash-attention varlen; other implementations ignore them).
    `max_length`: refuse a pack longer than this (packing: the lengths measured at start-up must match).
    `one_row`: all packs of the batch in a single row (no padding at all), for flash-attention varlen, whose cost
    follows each sample's own length; sdpa/eager build a dense [row x row] mask, so they get one row per pack.
    """

    collator: Any
    max_length: int | None = None
    one_row: bool = False

    def __call__(self, features: list) -> dict[str, Any]:
        groups = features if features and isinstance(features[0], list) else [features]
        batch = self.collator([row for group in groups for row in group])
        unknown = sorted(set(batch) - {*PER_TOKEN_KEYS, "attention_mask", "pixel_values", "alignment_levels"})
        if unknown:
            raise ValueError(f"The packing collator does not know how to pack the batch keys {unknown}; train "
                             "without `packing`/`padding_free`, or extend AlignGPTPackingCollator.")
        lengths = batch["attention_mask"].sum(-1).tolist()
        batch["gate_text_mask"] = self._gate_mask(batch)
        spans, start = [], 0
        for group in groups:
            spans.append(range(start, start + len(group)))
            start += len(group)
        for span in spans:
            self._check_pack(lengths, span)
        if self.one_row:
            spans = [range(0, start)]
        return self._stack([self._row(batch, lengths, span) for span in spans], batch)

    def _gate_mask(self, batch: dict) -> torch.Tensor:
        """The gate mask with the model's fallback (a sample whose mask leaves no text gets all its text) applied per
        sample here, where each sample is still its own row: a packed row has no `attention_mask`, so the model
        could no longer tell the last sample's text from the padding after it."""
        attention = batch["attention_mask"].bool()
        gate = batch.get("gate_text_mask")
        if gate is None:
            return attention
        ids, processor = batch["input_ids"], self.collator.processor
        text = gate_text_mask(ids == processor.image_token_id, ids == processor.alignment_token_id, attention, None)
        return torch.where((text & gate.bool()).any(-1, keepdim=True), gate.bool(), attention)

    def _check_pack(self, lengths: list[int], samples: range) -> None:
        total = sum(lengths[sample] for sample in samples)
        if self.max_length is not None and total > self.max_length:
            raise ValueError(
                f"A pack of samples {list(samples)} of this batch is {total} tokens long, over "
                f"max_length={self.max_length}: the lengths measured when packing disagree with the collator's. "
                "Was the processor or chat template changed after the trainer was built?"
            )

    def _row(self, batch: dict, lengths: list[int], samples: range) -> dict:
        pieces = {key: [] for key in (*PER_TOKEN_KEYS, "position_ids")}
        for sample in samples:
            length = lengths[sample]
            for key in PER_TOKEN_KEYS:
                pieces[key].append(batch[key][sample, :length])
            pieces["labels"][-1] = pieces["labels"][-1].clone()
            pieces["labels"][-1][0] = -100  # predicted from the previous sample's last token: never a target
            pieces["position_ids"].append(torch.arange(length))
        row = {key: torch.cat(values) for key, values in pieces.items()}
        row["sample_lengths"] = [lengths[sample] for sample in samples]
        return row

    def _stack(self, rows: list[dict], batch: dict) -> dict[str, Any]:
        width = max(row["input_ids"].numel() for row in rows)
        pad_id = self.collator.processor.tokenizer.pad_token_id
        fills = {"input_ids": pad_id if pad_id is not None else 0, "labels": -100, "gate_text_mask": False}
        out = {key: [] for key in (*PER_TOKEN_KEYS, "position_ids")}
        starts = []
        for number, row in enumerate(rows):
            extra = width - row["input_ids"].numel()
            for key, fill in fills.items():
                out[key].append(torch.cat([row[key], row[key].new_full((extra,), fill)]))
            last = row["position_ids"][-1] + 1 if row["position_ids"].numel() else 0
            out["position_ids"].append(torch.cat([row["position_ids"], torch.arange(extra) + last]))
            offsets = torch.tensor([0, *row["sample_lengths"][:-1]]).cumsum(0)
            starts.append(offsets + number * width)
        packed = {key: torch.stack(values) for key, values in out.items()}
        cu_seq_lens = torch.cat([*starts, torch.tensor([len(rows) * width])]).to(torch.int32)
        packed["cu_seq_lens_q"] = packed["cu_seq_lens_k"] = cu_seq_lens
        packed["max_length_q"] = packed["max_length_k"] = int(cu_seq_lens.diff().max())
        for key in ("pixel_values", "alignment_levels"):
            if key in batch:
                packed[key] = batch[key]
        return packed


def check_packed_attention(model) -> None:
    """Refuse a language model whose output for one packed sample changes with its neighbour (tested on two tiny
    packed samples, the first one varied). Flash-attention implementations are trusted (varlen over `position_ids`)
    and need a GPU, and ZeRO-3-partitioned weights cannot run outside the engine: those are not probed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = base.model.language_model
    implementation = getattr(language_model.config, "_attn_implementation", None) or "eager"
    if not keeps_samples_apart(implementation):
        raise ValueError(f"`packing`/`padding_free` need an attention implementation that keeps packed samples apart; "
                         f"the language model uses {implementation!r}. Load it with `attn_implementation=` one of "
                         f"{PACKED_ATTENTION}.")
    embeddings = language_model.get_input_embeddings().weight
    if "flash" in implementation or hasattr(embeddings, "ds_id") or embeddings.is_meta or embeddings.numel() == 0:
        return  # flash: trusted, needs a GPU; ZeRO-3-partitioned or meta weights: no forward outside the engine
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, embeddings.shape[0], (2, 8), generator=generator).to(embeddings.device)
    ids[1, 4:] = ids[0, 4:]  # same second sample, different first sample
    positions = torch.arange(4, device=ids.device).repeat(1, 2).expand(2, -1)
    was_training = language_model.training
    language_model.eval()
    try:
        with torch.no_grad():
            hidden = language_model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    finally:
        language_model.train(was_training)
    second = hidden[:, 4:].float()
    leak = (second[0] - second[1]).abs().max() / second.abs().max().clamp(min=1e-6)
    if leak > 1e-3:
        raise ValueError(
            f"The language model ({type(language_model).__name__}, attention {implementation!r}) lets packed samples "
            f"see each other: a sample's hidden states changed by {leak:.2g} (relative) when only its neighbour in the "
            "row changed. It ignores the packed-sequence mask; train it without `packing`/`padding_free`."
        )


class PackLengthGroupedSampler(ModalityLengthGroupedSampler):
    """Order of the packs for `group_by_modality_length`: each device batch holds packs of one modality and similar
    length, so rows padded to the batch's longest pack waste little. Packs are shuffled, cut into megabatches of
    `group` batches per modality, sorted by length inside each, split into batches; the full batches of both
    modalities are shuffled together and the leftovers form the last batches (as LLaVA's sampler does).
    Deterministic in (`seed`, epoch), so ranks and resumed runs agree."""

    def __init__(self, modality_lengths: list[int], batch_size: int, seed: int = 0, group: int = 16):
        super().__init__(modality_lengths, batch_size, world_size=1, seed=seed)  # epoch, len: as the row sampler
        self.group = group

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches, leftovers = [], []
        for with_image in (True, False):
            packs = [index for index in order if (self.lengths[index] > 0) == with_image]
            size = self.batch_size * self.group
            for start in range(0, len(packs), size):
                chunk = sorted(packs[start: start + size], key=lambda index: -abs(self.lengths[index]))
                split = [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
                batches += [batch for batch in split if len(batch) == self.batch_size]
                leftovers += [index for batch in split if len(batch) < self.batch_size for index in batch]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter([index for batch in shuffled for index in batch] + leftovers)


def pack_sampler(dataset, args):
    """The sampler of a `PackedDataset`: length- and modality-grouped with `group_by_modality_length`, else None
    (the trainer's default random order)."""
    if not args.group_by_modality_length:
        return None
    return PackLengthGroupedSampler(dataset.modality_lengths, args.per_device_train_batch_size, seed=args.seed)


def packing_field():
    """The `packing` field of the trainer configs."""
    return field(default=False, metadata={"help": (
        "Bin whole samples (images, text-only, multi-image; never cut) into packs of <= `max_length` tokens "
        "(best-fit decreasing), one row per pack, no padding inside (docs/packing.md). Losses and gradients equal the "
        "padded run's; `per_device_train_batch_size` then counts packs.")})


def padding_free_field():
    """The `padding_free` field of the trainer configs."""
    return field(default=False, metadata={"help": (
        "Lay each batch's samples end to end in one row (no padding, `position_ids` restart per sample); implied by "
        "`packing`. Needs sdpa/eager/flex or flash-attention (varlen).")})


def check_packing_args(args) -> None:
    """Config-time checks of `packing` / `padding_free` (called from the trainer configs' `__post_init__`)."""
    if not (args.packing or args.padding_free):
        return
    if args.packing and args.packing_strategy != "bfd":
        raise ValueError(f"AlignGPT packs whole samples (`packing_strategy='bfd'`); {args.packing_strategy!r} would "
                         "cut samples, and with them image tokens.")
    if args.packing and args.max_length is None:
        raise ValueError("`packing=True` bins samples into packs of `max_length` tokens; set `max_length`.")
    if getattr(args, "modality_batching", "mixed") == "separate":
        raise ValueError("`modality_batching='separate'` (mPLUG-Owl's 1:1 batches) does not combine with "
                         "`packing`/`padding_free`; use `group_by_modality_length` for single-modality packs.")


@contextmanager
def hidden_from_trl(args):
    """TRL's `SFTTrainer.__init__` refuses `packing`/`padding_free` for image datasets (and would build its own text
    collator); the AlignGPT trainers do both themselves, so TRL sees them off while it initialises."""
    saved = args.packing, args.padding_free
    args.packing = args.padding_free = False
    try:
        yield
    finally:
        args.packing, args.padding_free = saved


def prepare_packing(args, processor, train_dataset, data_collator, chat_template: str | None = None, model=None):
    """(collator, packed dataset or None) for a trainer: the collator wrapped for padding-free rows and, with
    `packing=True`, the training set binned into packs of <= `max_length` tokens. A flash-attention `model` gets
    all packs of a batch in one row (see `AlignGPTPackingCollator.one_row`). Neither option: nothing changes."""
    if not (args.packing or args.padding_free):
        return data_collator, None
    packed = None
    if args.packing and train_dataset is not None and not hasattr(train_dataset, "__len__"):
        raise ValueError("`packing=True` bins the whole training set before training, so it needs a map-style dataset "
                         "(not a streaming/iterable one); use `padding_free=True` to lay each batch in one row instead.")
    if args.packing and train_dataset is not None:
        packed = pack_dataset(train_dataset, processor, args.max_length, chat_template,
                              by_modality=args.group_by_modality_length)
    text_config = model.config.get_text_config() if model is not None else None
    one_row = "flash" in (getattr(text_config, "_attn_implementation", None) or "")
    collator = AlignGPTPackingCollator(data_collator, max_length=args.max_length if args.packing else None,
                                       one_row=one_row)
    return collator, packed


def finish_packing(trainer, packed_dataset) -> None:
    """After `SFTTrainer.__init__`: refuse a model that leaks across packed samples, then train on the packs."""
    if trainer.args.packing or trainer.args.padding_free:
        check_packed_attention(trainer.model)
    if packed_dataset is not None:
        trainer.train_dataset = packed_dataset


__all__ = [
    "AlignGPTPackingCollator",
    "PackLengthGroupedSampler",
    "PackedDataset",
    "best_fit_decreasing",
    "check_packed_attention",
    "check_packing_args",
    "finish_packing",
    "hidden_from_trl",
    "pack_dataset",
    "pack_sampler",
    "packing_field",
    "padding_free_field",
    "prepare_packing",
]

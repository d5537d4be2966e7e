# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""Packed (padding-free) rows for the AlignGPT forward: several samples share one row, told apart by `position_ids`.

A packed call has no `attention_mask` and `position_ids` that restart at 0 where each sample starts, as transformers'
text padding-free path: the language model keeps samples apart by itself (sdpa/eager/flex: the packed-sequence mask
`masking_utils` derives from `position_ids`; flash-attention: varlen kernels over `cu_seq_lens_*`). This file gives
every sample its own `<align>` vector: per-sample placeholder counts, the gate over its own text and images, its level.
"""

import torch

# Attention implementations that keep packed samples apart when `attention_mask` is None (transformers 5.x).
PACKED_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def keeps_samples_apart(implementation: str | None) -> bool:
    """Whether an attention implementation separates packed samples when `attention_mask` is None."""
    implementation = implementation or "eager"
    name = implementation.rsplit("/", 1)[-1].replace("-", "_")  # hub kernels, e.g. kernels-community/flash-attn2
    return implementation in PACKED_ATTENTION or name.startswith(("flash_attn", "flash_attention"))


def check_packed_call(text_config, use_cache, kwargs: dict) -> bool:
    """Refuse what would let one packed sample attend to another; returns the `use_cache` to run with (False).

    transformers builds the packed-sequence mask only without a cache, so a cache (even an empty one the language
    model makes because `use_cache` defaults to True) would silently give plain causal attention over the whole row.
    """
    implementation = getattr(text_config, "_attn_implementation", None)
    if not keeps_samples_apart(implementation):
        raise ValueError(
            f"Packed rows (no `attention_mask`, `position_ids` restarting at 0 per sample) need an attention "
            f"implementation that keeps samples apart; the language model uses {implementation!r}. Load it with "
            f"`attn_implementation=` one of {PACKED_ATTENTION}, or train without `packing`/`padding_free`.")
    if use_cache or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError(
            "Packed rows cannot use a KV cache: transformers separates packed samples only when there is none, so "
            "samples would attend to each other. Pass `use_cache=False` (generation never packs).")
    return False


def packed_call(text_config, attention_mask, position_ids, use_cache, kwargs: dict):
    """(segments, use_cache) for a forward: segments (see `packed_segments`) when several samples share a row (the
    call is then checked and runs without a cache), else (None, use_cache) and nothing is synchronised."""
    # Packed: explicit `position_ids`, no padding mask, more than one token (never a decoding step).
    if attention_mask is not None or position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return None, use_cache
    segments = packed_segments(position_ids, kwargs.get("cu_seq_lens_q"))
    if segments is None:
        return None, use_cache
    return segments, check_packed_call(text_config, use_cache, kwargs)


def positions_from_mask(attention_mask: torch.Tensor, sequence_length: int) -> torch.LongTensor:
    """Position ids that count only attended tokens, so left and right padding give identical positions."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -sequence_length:]


def placeholder_counts(image_mask, align_mask, segments):
    """`<image>` and `<align>` tokens per row, or per sample of packed rows."""
    if segments is None:
        return image_mask.sum(-1), align_mask.sum(-1)
    return segment_sum(image_mask, *segments), segment_sum(align_mask, *segments)


def packed_segments(position_ids: torch.LongTensor, cu_seq_lens: torch.Tensor | None = None):
    """(ids, S): the [R, T] global sample index of each token and the number of samples S, or None when every row
    holds one sample (the ordinary path then runs). Samples start where positions do not continue by +1, the rule of
    `transformers.masking_utils.find_packed_sequence_indices`, so the gate's samples are the attention's samples.

    S comes from `cu_seq_lens` (the packing collator sends it for flash-attention varlen) without a host sync;
    otherwise from one device-to-host copy.
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    num_segments = cu_seq_lens.numel() - 1 if cu_seq_lens is not None else int(starts.sum())
    if num_segments == position_ids.shape[0]:
        return None
    return starts.flatten().cumsum(0).view_as(position_ids) - 1, num_segments


def segment_sum(values: torch.Tensor, ids: torch.LongTensor, num_segments: int) -> torch.Tensor:
    """Sum of `values` [R, T] (or [R, T, H]) per sample -> [S] (or [S, H])."""
    flat = values.reshape(ids.numel(), *values.shape[2:])
    dtype = torch.long if flat.dtype == torch.bool else flat.dtype
    out = flat.new_zeros((num_segments, *flat.shape[1:]), dtype=dtype)
    return out.index_add_(0, ids.flatten(), flat.to(dtype))


def packed_image_text_dots(word_embeds, text_mask, image_features, images_per_segment, ids, num_segments):
    """d[s, j] = <V_j, mean text embedding of sample s>, averaged over the images of sample s -> [S, K].

    The same arithmetic as the unpacked gate input, with samples instead of rows: no sample sees a neighbour's text.
    A sample whose gate mask holds no text falls back to all its text, as an unpacked row does; that choice is made
    per sample before packing (`AlignGPTPackingCollator`), because a packed row has no `attention_mask` that would
    tell the last sample's text from the padding after it.
    """
    weights = text_mask.unsqueeze(-1).to(word_embeds.dtype)
    summed_text = segment_sum(word_embeds * weights, ids, num_segments)
    mean_text = summed_text / (segment_sum(weights, ids, num_segments) + 1e-8)
    image_segments = torch.repeat_interleave(torch.arange(num_segments, device=word_embeds.device),
                                             images_per_segment, output_size=image_features.shape[0])  # no host sync
    dots = torch.einsum("ikh,ih->ik", image_features, mean_text[image_segments])
    summed = dots.new_zeros(num_segments, dots.shape[1]).index_add_(0, image_segments, dots)
    return summed / images_per_segment.clamp(min=1).unsqueeze(-1).to(summed.dtype)


__all__ = ["PACKED_ATTENTION", "check_packed_call", "keeps_samples_apart", "packed_call", "packed_image_text_dots",
           "packed_segments", "placeholder_counts", "positions_from_mask", "segment_sum"]

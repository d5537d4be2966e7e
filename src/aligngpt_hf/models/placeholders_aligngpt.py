# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""Loud placeholder checks for the AlignGPT forward: `<image>` tokens vs image features, one `<align>` per image sample.

Remote-code file (copied next to the weights with `modeling_aligngpt.py`). The checks read the device once per
forward, so a GPU step waits on the host no more often than transformers' LLaVA.
"""

import torch


def check_no_placeholders(image_mask: torch.Tensor, align_mask: torch.Tensor) -> None:
    """Image-free input (text-only batches, every decoding step): one host sync, details only on failure."""
    if not (image_mask | align_mask).any():
        return
    if image_mask.any():
        rows = image_mask.any(-1).nonzero().flatten().tolist()
        raise ValueError(f"Samples {rows} contain `<image>` tokens but no `pixel_values` were given.")
    if align_mask.any():
        rows = align_mask.any(-1).nonzero().flatten().tolist()
        raise ValueError(
            f"Samples {rows} contain an `<align>` token but no image; text-only samples take no alignment token."
        )


def check_placeholders(image_tokens_per_row, align_per_row, feature_shape, expects_align, levels, num_levels) -> None:
    """Check `<image>`/`<align>` counts per sample (and levels) against the features, loudly and naming samples.

    One device-to-host copy of the per-sample counts (the forward's only one); the messages are built from it.
    """
    num_images, tokens_per_image = feature_shape[:2]
    batch_size = image_tokens_per_row.shape[0]
    if levels is not None and levels.numel() != batch_size:
        raise ValueError(f"`alignment_levels` has {levels.numel()} entries for a batch of {batch_size} samples.")
    rows = [image_tokens_per_row, align_per_row] + ([levels] if levels is not None else [])
    tokens_per_row, align_per_row, *level_list = torch.stack(rows).tolist()
    _check_image_tokens(tokens_per_row, num_images, tokens_per_image)
    if not expects_align and any(align_per_row):
        raise ValueError(
            "`alignment_mode='none'` takes no `<align>` token, but the input has one; build the processor "
            "with `add_alignment_token=False`."
        )
    if expects_align:
        _check_alignment_tokens(align_per_row, [count > 0 for count in tokens_per_row])
    for index, level in enumerate(level_list[0] if level_list else []):
        if tokens_per_row[index] and not 0 <= level < num_levels:
            raise ValueError(
                f"Sample {index} has alignment level {level}, outside 0..{num_levels - 1} "
                f"(N-1 = strongest). Compute levels with `aligngpt-hf levels --num-levels {num_levels}`."
            )


def _check_image_tokens(tokens_per_row: list, num_images: int, tokens_per_image: int) -> None:
    total = sum(tokens_per_row)
    partial_rows = [index for index, count in enumerate(tokens_per_row) if count % tokens_per_image]
    if total != num_images * tokens_per_image or partial_rows:
        raise ValueError(
            f"Image features and image tokens do not match: the batch has {total} `<image>` tokens (per sample: "
            f"{tokens_per_row}) but {num_images} images x {tokens_per_image} tokens = "
            f"{num_images * tokens_per_image} features."
            + (f" Samples {partial_rows} hold a partial image." if partial_rows else "")
            + f" Each image needs exactly {tokens_per_image} `<image>` tokens: build inputs with AlignGPTProcessor "
            f"(image_seq_length={tokens_per_image}) and make `max_length` long enough not to cut them."
        )


def _check_alignment_tokens(align_per_row: list, rows_with_image: list) -> None:
    """Exactly one `<align>` per sample with an image, none elsewhere."""
    for index, (count, has_image) in enumerate(zip(align_per_row, rows_with_image)):
        if count == int(has_image):
            continue
        if has_image and count == 0:
            reason = "has an image but no `<align>` token; AlignGPTProcessor inserts it right after BOS"
        elif not has_image:
            reason = "has an `<align>` token but no image; text-only samples take no alignment token"
        else:
            reason = f"has {count} `<align>` tokens; exactly one is expected"
        raise ValueError(f"Sample {index} {reason}.")

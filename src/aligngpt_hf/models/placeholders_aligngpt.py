# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""Loud placeholder checks for the AlignGPT forward: `<image>` tokens vs image features, one `<align>` per image sample.

They read the device once per forward, so a GPU step waits on the host no more often than transformers' LLaVA.
"""

import torch
from transformers.utils import torch_compilable_check


def check_no_placeholders(image_mask: torch.Tensor, align_mask: torch.Tensor, input_ids=None, vocab_size=None) -> None:
    """Image-free input (text-only batches, every decoding step): one host sync, details only on failure."""
    bad_ids = out_of_vocabulary(input_ids, vocab_size)
    if torch.compiler.is_compiling():  # traced (torch.compile, export): an in-graph check and no host copy, as LLaVA's
        valid = ~(image_mask | align_mask | bad_ids).any()
        return torch_compilable_check(valid, "`<image>`/`<align>` without images, or ids outside the embedding table")
    if not (image_mask | align_mask | bad_ids).any():
        return
    if bad_ids.any():
        raise_out_of_vocabulary(input_ids, vocab_size)
    if image_mask.any():
        rows = image_mask.any(-1).nonzero().flatten().tolist()
        raise ValueError(f"Samples {rows} contain `<image>` tokens but no `pixel_values` were given.")
    rows = align_mask.any(-1).nonzero().flatten().tolist()
    raise ValueError(f"Samples {rows} contain an `<align>` token but no image; text-only samples take no alignment "
                     "token.")


def check_placeholders(image_tokens_per_row, align_per_row, image_features, expects_align, levels, num_levels,
                       input_ids=None, vocab_size=None) -> None:
    """Check `<image>`/`<align>` counts per sample (and levels, token ids and finite image features) against the
    features, loudly and naming samples. One device-to-host copy of the per-sample counts (the forward's only one).
    """
    num_images, tokens_per_image = image_features.shape[:2]
    if torch.compiler.is_compiling():  # traced: LLaVA's in-graph count check; the named errors need a host copy
        valid = (image_tokens_per_row.sum() == num_images * tokens_per_image) & ~out_of_vocabulary(input_ids, vocab_size).any()
        return torch_compilable_check(valid, "`<image>` tokens and image features disagree, or ids outside the table")
    batch_size = image_tokens_per_row.shape[0]
    if levels is not None and levels.numel() != batch_size:
        raise ValueError(f"`alignment_levels` has {levels.numel()} entries for a batch of {batch_size} samples.")
    # Totals, broadcast to a row: packed rows count per sample, and a failure message recounts what it names.
    nonfinite = ~torch.isfinite(image_features).flatten(1).all(-1)
    totals = [nonfinite.sum()] + ([out_of_vocabulary(input_ids, vocab_size).sum()] if input_ids is not None else [])
    rows = [image_tokens_per_row, align_per_row] + ([levels] if levels is not None else [])
    rows += [total.to(image_tokens_per_row.dtype).expand_as(image_tokens_per_row) for total in totals]
    tokens_per_row, align_per_row, *level_list = torch.stack(rows).tolist()
    if input_ids is not None and any(level_list.pop()):
        raise_out_of_vocabulary(input_ids, vocab_size)
    if any(level_list.pop()):
        raise ValueError(
            f"Image(s) {nonfinite.nonzero().flatten().tolist()} of the batch (index among its images, in order) give "
            "NaN or inf features: their `pixel_values` hold NaN or inf values (build them with the model's processor "
            "from valid image files, and check any normalisation applied to them), or the vision tower overflows in "
            "this dtype (run it in float32 or bfloat16 rather than float16).")
    total, partial_rows = sum(tokens_per_row), [i for i, count in enumerate(tokens_per_row) if count % tokens_per_image]
    if total != num_images * tokens_per_image or partial_rows:
        raise ValueError(
            f"Image features and image tokens do not match: the batch has {total} `<image>` tokens (per sample: "
            f"{tokens_per_row}) but {num_images} images x {tokens_per_image} tokens = "
            f"{num_images * tokens_per_image} features."
            + (f" Samples {partial_rows} hold a partial image." if partial_rows else "")
            + f" Each image needs exactly {tokens_per_image} `<image>` tokens: build inputs with AlignGPTProcessor "
            f"(image_seq_length={tokens_per_image}) and make `max_length` long enough not to cut them.")
    if not expects_align and any(align_per_row):
        raise ValueError("`alignment_mode='none'` takes no `<align>` token, but the input has one; build the processor "
                         "with `add_alignment_token=False`.")
    for index, (count, has_image) in enumerate(zip(align_per_row, tokens_per_row) if expects_align else ()):
        if count != int(has_image > 0):  # exactly one `<align>` per sample with an image, none elsewhere
            reason = ("has an image but no `<align>` token; AlignGPTProcessor inserts it right after BOS" if not count
                      else "has an `<align>` token but no image; text-only samples take no alignment token"
                      if not has_image else f"has {count} `<align>` tokens; exactly one is expected")
            raise ValueError(f"Sample {index} {reason}.")
    for index, level in enumerate(level_list[0] if level_list else []):
        if tokens_per_row[index] and not 0 <= level < num_levels:
            raise ValueError(f"Sample {index} has alignment level {level}, outside 0..{num_levels - 1} (N-1 = "
                             f"strongest). Compute levels with `aligngpt-hf levels --num-levels {num_levels}`.")


def check_input_shapes(input_ids, inputs_embeds, attention_mask, pixel_values, alignment_levels, config,
                       position_ids=None, gate_text_mask=None) -> None:
    """Shapes, dtypes and arguments the alignment mode cannot use, without a host sync (the token-id range rides on
    the placeholder check's one copy)."""
    tokens = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and (input_ids.is_floating_point() or input_ids.dtype == torch.bool):
        raise TypeError(f"`input_ids` must hold integer token ids, got {input_ids.dtype}; tokenize with the processor.")
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[1] == 0):
        raise ValueError(f"`input_ids` has shape {tuple(input_ids.shape)}; expected (batch, sequence) with at least one "
                         "token: add the batch dimension (`input_ids.unsqueeze(0)`) or build inputs with the processor.")
    hidden_size = config.text_config.hidden_size
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size):
        raise ValueError(f"`inputs_embeds` has shape {tuple(inputs_embeds.shape)}; expected (batch, sequence, hidden "
                         f"size {hidden_size}), e.g. `model.get_input_embeddings()(input_ids)`.")
    if tokens is not None and tokens.shape[0] == 0:
        raise ValueError(f"The input holds no samples (shape {tuple(tokens.shape)}); give at least one.")
    if attention_mask is not None and tokens is not None and attention_mask.dim() == 2 and (
            attention_mask.shape[0] != tokens.shape[0] or attention_mask.shape[1] < tokens.shape[1]):
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but the input ids have "
            f"{tuple(tokens.shape[:2])} (batch, sequence): the batch sizes must match and the mask must cover "
            "every token (plus the cached ones). Build both with the same processor call.")
    if pixel_values is not None and pixel_values.dim() != 4:
        raise ValueError(
            f"`pixel_values` has shape {tuple(pixel_values.shape)}; expected (num_images, channels, height, width). "
            + ("Add the batch dimension (`pixel_values.unsqueeze(0)`)" if pixel_values.dim() < 4 else
               "Give all images as one flat batch (`pixel_values.flatten(0, 1)`)") + " or build inputs with the processor.")
    if pixel_values is not None and not pixel_values.is_floating_point():
        raise TypeError(f"`pixel_values` are {pixel_values.dtype}; the vision tower takes normalised float pixels, as "
                        "the processor returns them (raw 0..255 integers would give meaningless features).")
    for name, mask in (("position_ids", position_ids), ("gate_text_mask", gate_text_mask)):
        if mask is not None and tokens is not None and mask.dim() == 2 and (
                mask.shape[1] != tokens.shape[1] or mask.shape[0] not in (1, tokens.shape[0])):
            raise ValueError(f"`{name}` has shape {tuple(mask.shape)} but the input has {tuple(tokens.shape[:2])} "
                             "(batch, sequence); give one entry per input token.")
    channels, size = (getattr(config.vision_config, name, None) for name in ("num_channels", "image_size"))
    if pixel_values is not None and pixel_values.dim() == 4 and pixel_values.shape[0] and (
            (channels and pixel_values.shape[1] != channels) or (size and pixel_values.shape[2:] != (size, size))):
        raise ValueError(
            f"`pixel_values` has shape {tuple(pixel_values.shape)}; the vision tower takes {channels} channels at "
            f"{size}x{size} pixels. Build inputs with the model's own processor (its image processor resizes).")
    if alignment_levels is not None and not config.uses_alignment_token:
        raise ValueError(
            "`alignment_levels` was given, but this model has `alignment_mode='none'`: it has no level table and no "
            "`<align>` token, so levels cannot be applied. Drop `alignment_levels` (for stage 1, a data collator "
            "without `level_column`), or use a model with an alignment mode.")
    try:
        levels = None if alignment_levels is None else torch.as_tensor(alignment_levels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"`alignment_levels` must be integer levels, one per sample (a LongTensor or a list), got "
                        f"{type(alignment_levels).__name__} {alignment_levels!r}.") from None
    if levels is not None and (levels.is_floating_point() or levels.dtype == torch.bool):
        raise TypeError(f"`alignment_levels` must be integers (level 0..N-1), got {levels.dtype} values "
                        f"{levels.flatten()[:8].tolist()}; levels are never rounded or truncated.")


def placeholder_ids_from_embeddings(inputs_embeds: torch.Tensor, table: torch.Tensor, placeholders) -> torch.Tensor:
    """Ids for `inputs_embeds`: the placeholder id where a vector equals its embedding row, a plain token elsewhere."""
    plain = min({0, 1, 2} - set(placeholders))
    ids = torch.full(inputs_embeds.shape[:2], plain, dtype=torch.long, device=inputs_embeds.device)
    for token_id in placeholders:
        vector = table[token_id].to(inputs_embeds.device, inputs_embeds.dtype)
        ids = ids.masked_fill((inputs_embeds == vector).all(-1), token_id)
    return ids


def out_of_vocabulary(input_ids, vocab_size) -> torch.Tensor:
    """Mask of token ids outside the embedding table (all False when not checked); no host sync."""
    if input_ids is None or vocab_size is None:
        return torch.zeros((), dtype=torch.bool)
    return (input_ids < 0) | (input_ids >= vocab_size)


def table_size(model) -> int:
    """Rows of the word-embedding table; the config's vocabulary size for a wrapper without `num_embeddings` (PEFT's
    `trainable_token_indices`)."""
    return getattr(model.get_input_embeddings(), "num_embeddings", None) or model.config.text_config.vocab_size


def safe_token_ids(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Ids clamped into the table for the embedding lookup only, so an out-of-range id reaches the placeholder check
    (which names it) instead of a CUDA device-side assert. Decoding steps (one token, from the model) pass as is."""
    return input_ids.clamp(0, vocab_size - 1) if input_ids.shape[-1] > 1 else input_ids


def raise_out_of_vocabulary(input_ids, vocab_size) -> None:
    bad = out_of_vocabulary(input_ids, vocab_size)
    raise ValueError(
        f"Samples {bad.any(-1).nonzero().flatten().tolist()} hold token id(s) {sorted(set(input_ids[bad].tolist()))[:5]}"
        f", outside the embedding table (0..{vocab_size - 1}). Tokenize with the model's own processor; after adding "
        "tokens, call `model.resize_token_embeddings(len(tokenizer))`.")


def check_labels(labels: torch.Tensor, input_shape, vocab_size: int, all_ignored_ok: bool = False) -> None:
    """Labels: integer ids shaped like the input. All labels -100 after the causal shift (mean loss 0/0 = NaN) and ids
    outside the vocabulary are clear errors, found with one host sync, only when the loss is a mean over this batch:
    with `num_items_in_batch` (gradient accumulation) the loss is a sum over the accumulated count, 0 for such a
    micro-batch, so `all_ignored_ok` skips both (the collators build labels from the input ids)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a tensor of token ids, got {type(labels).__name__}; use "
                        "`torch.tensor(labels)` (or the processor's `return_tensors='pt'`).")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must hold integer token ids (-100 where nothing is predicted), got {labels.dtype}.")
    if input_shape is not None and tuple(labels.shape) != tuple(input_shape):
        raise ValueError(f"`labels` has shape {tuple(labels.shape)} but the input has {tuple(input_shape)} (batch, "
                         "sequence); give one label per input token (-100 where nothing is predicted).")
    if all_ignored_ok or not labels.numel() or torch.compiler.is_compiling():  # traced: no host copy
        return
    outside = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    supervised, has_outside = torch.stack([(labels[..., 1:] != -100).any(), outside.any()]).tolist()
    if has_outside:
        raise ValueError(
            f"`labels` hold {sorted(set(labels[outside].tolist()))[:5]}, neither -100 (ignored) nor a vocabulary id "
            f"(0..{vocab_size - 1}); build labels from the processor's input ids.")
    if not supervised:
        raise ValueError(
            "Every label of this batch is -100 (after the one-token shift): nothing would be learned and the loss "
            "would be NaN. Each sample needs supervised tokens (an assistant answer, or a caption in stage 1).")

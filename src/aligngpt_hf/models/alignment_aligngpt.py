# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""What AlignGPT adds to LLaVA: the level table, the gate, and the text/image statistics the gate reads (batched:
no per-sample Python loops)."""

import torch
from torch import nn

from .configuration_aligngpt import AlignGPTConfig
from .packing_aligngpt import packed_image_text_dots


class AlignGPTAlignment(nn.Module):
    """The level table E [N, H] (row N-1 = global) and, in the gated modes, the gate MLP fc1 -> GELU -> fc2."""

    def __init__(self, config: AlignGPTConfig):
        super().__init__()
        self.mode = config.alignment_mode
        self.num_levels = config.num_alignment_levels
        self.level_embeddings = nn.Parameter(torch.empty(self.num_levels, config.text_config.hidden_size))
        if config.uses_gate:
            self.fc1 = nn.Linear(config.image_seq_length, config.gate_hidden_size)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(config.gate_hidden_size, self.num_levels - 1)

    def gate(self, image_text_dots: torch.Tensor) -> torch.Tensor:
        """[B, K] dot products of image tokens with the mean text embedding -> softmax weights [B, N-1]."""
        dots = image_text_dots.to(self.fc1.weight.dtype)
        return torch.softmax(self.fc2(self.act(self.fc1(dots))), dim=-1)

    def forward(self, word_embeds, image_features, images_per_row, masks, levels=None, segments=None):
        """(vectors, weights): one `<align>` vector per row, or per sample of packed rows (`segments`), image rows
        first in batch order; the gate weights [B, N-1] (NaN rows without an image), None when no gate ran (level
        mode, the gate-free modes). `masks`: (image, align, attention, gate) masks for `gate_text_mask`."""
        rows_with_image, weights = images_per_row > 0, None
        if levels is not None:
            vectors = self.level_embeddings[levels.clamp(0, self.num_levels - 1)]
        else:
            if hasattr(self, "fc1"):
                text_mask = gate_text_mask(*masks)
                dots = (image_text_dots(word_embeds, text_mask, image_features, images_per_row) if segments is None
                        else packed_image_text_dots(word_embeds, text_mask, image_features, images_per_row, *segments))
                weights = self.gate(dots)
            vectors = self.vectors_for_weights(weights, images_per_row.shape[0])
            if weights is not None:
                weights = weights.masked_fill(~rows_with_image.unsqueeze(-1), float("nan"))
        # Image rows first, in batch order: masked_scatter fills the `<align>` slots from the front of its source,
        # and the leftover text-only rows are never read. A stable sort needs no host sync (boolean indexing would).
        return vectors[torch.argsort((~rows_with_image).to(torch.uint8), stable=True)], weights

    def vectors_for_weights(self, weights: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Combine the table rows for the configured mode; `weights` is None for the gate-free modes."""
        table = self.level_embeddings
        global_row, local_rows = table[-1], table[:-1]
        if self.mode == "global":
            return global_row.expand(batch_size, -1)
        if self.mode == "mean":
            return (global_row + local_rows.mean(0)).expand(batch_size, -1)
        mixed = weights.to(table.dtype) @ local_rows
        return mixed if self.mode == "local" else global_row + mixed


def gate_text_mask(image_mask, align_mask, attention_mask, gate_mask) -> torch.Tensor:
    """Text tokens the gate averages: the row's text (not image, not `<align>`, not the BOS right before `<align>`,
    not padding) within `gate_mask`; a row that `gate_mask` leaves without text falls back to all its text.

    The fallback keeps the gate seeing text under fully supervised labels (`gate_mask = labels == -100` then holds
    no text): all the text is what the original training averaged and what inference sees on the same tokens.
    """
    text_mask = ~(image_mask | align_mask)
    text_mask[:, :-1] &= ~align_mask[:, 1:]
    if attention_mask is not None and attention_mask.dim() == 2:  # compiled generation passes a 4-D mask
        text_mask &= attention_mask.bool()
    if gate_mask is None:
        return text_mask
    gated = text_mask & gate_mask.bool()
    return torch.where(gated.any(-1, keepdim=True), gated, text_mask)


def image_text_dots(word_embeds, text_mask, image_features, images_per_row) -> torch.Tensor:
    """d[b, j] = <V_j, mean text embedding of b>, averaged over the images of row b -> [B, K]."""
    weights = text_mask.unsqueeze(-1).to(word_embeds.dtype)
    mean_text = (word_embeds * weights).sum(1) / (weights.sum(1) + 1e-8)
    batch_size = word_embeds.shape[0]
    image_rows = torch.repeat_interleave(torch.arange(batch_size, device=word_embeds.device), images_per_row,
                                         output_size=image_features.shape[0])  # output_size: no host sync
    dots = torch.einsum("ikh,ih->ik", image_features, mean_text[image_rows])
    summed = dots.new_zeros(batch_size, dots.shape[1]).index_add_(0, image_rows, dots)
    return summed / images_per_row.clamp(min=1).unsqueeze(-1).to(summed.dtype)


__all__ = ["AlignGPTAlignment", "gate_text_mask", "image_text_dots"]

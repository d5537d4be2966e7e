# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""AlignGPT's output classes: the installed transformers' LLaVA outputs (so the KV-cache field carries its name), plus
the image features (a field: LLaVA's `image_hidden_states` is a deprecated property from 5.24) and the gate weights.
"""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast


@dataclass
class AlignGPTModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        The vision tower's output as [`AlignGPTModel.get_image_features`] returns it (`pooler_output`: one
        `(image_seq_length, hidden_size)` tensor per image).
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, image_seq_length, hidden_size)`, *optional*):
        Projected image features spliced into the sequence, as one tensor.
    alignment_weights (`torch.FloatTensor` of shape `(batch_size, num_alignment_levels - 1)`, *optional*):
        Gate weights over the local alignment levels (NaN rows for samples without an image). `None` when no gate
        ran: decoding steps, level mode (`alignment_levels` given) and the `global`/`mean`/`none` modes.
    """

    image_outputs: BaseModelOutputWithPooling | None = None
    image_hidden_states: torch.FloatTensor | None = None
    alignment_weights: torch.FloatTensor | None = None


@dataclass
class AlignGPTCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*): next-token cross-entropy over labels != -100.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): LM head scores.
    image_outputs, image_hidden_states, alignment_weights: see [`AlignGPTModelOutputWithPast`].
    """

    image_outputs: BaseModelOutputWithPooling | None = None
    image_hidden_states: torch.FloatTensor | None = None
    alignment_weights: torch.FloatTensor | None = None


__all__ = ["AlignGPTCausalLMOutputWithPast", "AlignGPTModelOutputWithPast"]

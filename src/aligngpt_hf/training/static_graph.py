"""Every trainable (or ZeRO-3-partitioned) parameter in every training step's graph, with or without images.

DDP (without `find_unused_parameters`), DeepSpeed ZeRO-3 and FSDP expect each rank to reach the same parameters in the
same module order at every step. A text-only batch never runs the vision tower, projector or gate, so a rank holding
one would skip their gradients (DDP errors) or their all-gathers (ZeRO-3/FSDP ranks wait on each other forever).
`attach_static_graph` adds a zero-valued term through those modules to the language model's input of image-free
training batches, right where image batches run them (words, then tower, projector, gate, then the language model), so
both kinds of batch walk one order forward and backward. It is the trainers' concern, so it lives here and not in the
model: the model's forward stays LLaVA's.
"""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle


def _runs(module) -> bool:
    """Whether a rank must run `module` on every step: it trains, or ZeRO-3 partitioned it (`ds_id`)."""
    return any(p.requires_grad or hasattr(p, "ds_id") for p in module.parameters())


def image_free_anchor(base, word_embeds: torch.Tensor) -> torch.Tensor | None:
    """0 x (blank image through the vision path + zero input through the gate + the level table), or None."""
    config, terms = base.config, []
    if _runs(base.vision_tower):
        vision = config.vision_config
        blank = word_embeds.new_zeros(1, vision.num_channels, vision.image_size, vision.image_size)
        terms.append(torch.stack(list(base.get_image_features(blank).pooler_output)).sum())
    elif _runs(base.multi_modal_projector):
        tokens = config.num_vision_feature_tokens or config.image_seq_length
        terms.append(base.multi_modal_projector(word_embeds.new_zeros(1, tokens, config.vision_config.hidden_size)).sum())
    alignment = getattr(base, "alignment", None)
    if alignment is not None and hasattr(alignment, "fc1") and alignment.fc1.weight.requires_grad:
        terms.append(alignment.gate(word_embeds.new_zeros(1, config.image_seq_length)).sum())
    if alignment is not None and alignment.level_embeddings.requires_grad:
        terms.append(alignment.level_embeddings.sum())
    return 0.0 * sum(terms) if terms else None


def attach_static_graph(model) -> list[RemovableHandle]:
    """Hook `model` (an AlignGPTForConditionalGeneration, or its base model) so image-free training batches carry the
    zero-valued anchor into the language model; inference and image batches are untouched. Returns the hook handles
    (`.remove()` undoes it).

    The anchor joins the language model's `inputs_embeds`, after the word-embedding module has returned: added inside
    that module's output, its backward (and ZeRO-3's re-gather of its shards) would come first instead of last.
    """
    base = getattr(model, "model", model)
    pending = {"image_free": False}

    def see_inputs(module, args, kwargs):
        has_images = kwargs.get("pixel_values") is not None or bool(kwargs.get("mm_encoder_outputs"))
        pending["image_free"] = module.training and torch.is_grad_enabled() and not has_images

    def add_anchor(module, args, kwargs):
        image_free, pending["image_free"] = pending["image_free"], False  # only the call inside this forward
        inputs_embeds = kwargs.get("inputs_embeds")
        anchor = image_free_anchor(base, inputs_embeds) if image_free and inputs_embeds is not None else None
        if anchor is None:
            return None
        return args, {**kwargs, "inputs_embeds": inputs_embeds + anchor.to(inputs_embeds.dtype)}

    return [base.register_forward_pre_hook(see_inputs, with_kwargs=True),
            base.language_model.register_forward_pre_hook(add_anchor, with_kwargs=True)]


__all__ = ["attach_static_graph", "image_free_anchor"]

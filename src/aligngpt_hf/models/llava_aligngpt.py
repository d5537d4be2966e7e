# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""An AlignGPT model from a transformers LLaVA one: its config, its weights under our keys, the model.

Remote-code file: `AlignGPTForConditionalGeneration.from_llava` calls `aligngpt_from_llava` (the class comes in as an
argument), so it works next to the weights too; `aligngpt-hf from-llava` (`aligngpt_hf.conversion.from_llava`) adds
the processor and writes the folder.
"""

from __future__ import annotations

import copy

VOCAB_MULTIPLE = 64  # new vocabulary sizes are padded like llava-hf's (32064) and `aligngpt-hf convert`'s
# Fields that follow the LLaVA checkpoint (its weights and processor depend on them); the rest may be chosen freely.
FROM_LLAVA = ("vision_config", "text_config", "projector_type", "projector_hidden_act", "multimodal_projector_bias",
              "vision_feature_layer", "vision_feature_select_strategy", "image_token_id", "tie_word_embeddings")
VOCABULARY_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def llava_model(model_or_path, **load_kwargs):
    """A `LlavaForConditionalGeneration`, or a folder/Hub id of one (refused, by its `model_type`, when it is not)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    if isinstance(model_or_path, LlavaForConditionalGeneration):
        model_type, name = model_or_path.config.model_type, type(model_or_path).__name__
    elif isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        model_type, name = AutoConfig.from_pretrained(model_or_path).model_type, str(model_or_path)
    else:
        raise TypeError(f"from_llava takes a LlavaForConditionalGeneration or its folder/Hub id, got "
                        f"{type(model_or_path).__name__}.")
    if model_type != "llava":  # an AlignGPT, itself built on LLaVA's classes, is refused here too
        raise ValueError(f"{name} holds a {model_type!r} model; from_llava takes a transformers LLaVA checkpoint "
                         "(model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf).")
    if isinstance(model_or_path, LlavaForConditionalGeneration):
        return model_or_path
    llava, info = LlavaForConditionalGeneration.from_pretrained(
        model_or_path, output_loading_info=True, **{"dtype": "auto", **load_kwargs})
    problems = {kind: sorted(info[f"{kind}_keys"])[:3] for kind in ("missing", "unexpected", "mismatched")}
    if any(problems.values()):  # transformers would fill a missing tensor randomly: the LLaVA would not be itself
        raise ValueError(f"{model_or_path} does not hold a whole LLaVA: " + ", ".join(
            f"{kind} {keys}" for kind, keys in problems.items() if keys) + ". Re-download or re-save the checkpoint.")
    return llava


def config_from_llava(llava_config, alignment_token_id: int | None = None, **config_kwargs):
    """AlignGPTConfig with the LLaVA checkpoint's backbones, projector, feature layer/strategy, `<image>` id and tying.

    `alignment_token_id` defaults to a new row after LLaVA's vocabulary. When it lies beyond the vocabulary, the
    vocabulary grows to the next multiple of 64; an id inside it (a padded row of llava-hf's 32064) keeps the size.
    """
    from .configuration_aligngpt import AlignGPTConfig

    fixed = sorted(set(config_kwargs) & set(FROM_LLAVA))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} follow the LLaVA checkpoint and cannot be set here; choose "
                         "alignment fields (num_alignment_levels, alignment_mode, gate_hidden_size, ...).")
    layer = llava_config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"This LLaVA concatenates the vision layers {layer} (`vision_feature_layer` is a list); "
                         "AlignGPT's projector and gate take one layer. Use a checkpoint with one feature layer.")
    text = copy.deepcopy(llava_config.text_config)
    vocab = text.vocab_size
    alignment_token_id = vocab if alignment_token_id is None else alignment_token_id
    if alignment_token_id >= vocab:
        text.vocab_size = -(-(alignment_token_id + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if getattr(text, "pad_token_id", None) is None and getattr(llava_config, "pad_token_id", None) is not None:
        text.pad_token_id = llava_config.pad_token_id  # older LLaVA configs keep the pad id at the top level
    return AlignGPTConfig(
        vision_config=copy.deepcopy(llava_config.vision_config), text_config=text, projector_type="mlp2x_gelu",
        projector_hidden_act=llava_config.projector_hidden_act,
        multimodal_projector_bias=llava_config.multimodal_projector_bias, vision_feature_layer=layer,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        image_token_id=llava_config.image_token_id, alignment_token_id=alignment_token_id,
        tie_word_embeddings=llava_config.tie_word_embeddings, **config_kwargs,
    )


def llava_state_dict(llava, vocab_size: int) -> dict:
    """LLaVA's tensors under AlignGPT's keys (the same: `model.vision_tower.*`, `model.multi_modal_projector.*`,
    `model.language_model.*`, `lm_head.*`); the vocabulary matrices keep LLaVA's rows bit for bit and get new rows
    equal to the mean of LLaVA's (transformers' `mean_resizing` rule without its sampling: a new row's logit starts
    at the average logit, so the softmax over LLaVA's tokens barely moves)."""
    import torch

    state = dict(llava.state_dict())
    for key in VOCABULARY_KEYS:
        rows = state.get(key)
        if rows is not None and rows.shape[0] < vocab_size:
            extra = rows.float().mean(0, keepdim=True).to(rows.dtype).expand(vocab_size - rows.shape[0], -1)
            state[key] = torch.cat([rows.detach(), extra])
    return state


def aligngpt_from_llava(model_class, model_or_path, alignment_token_id: int | None = None, **config_kwargs):
    """`model_class` (AlignGPTForConditionalGeneration) from a LLaVA model or checkpoint: LLaVA's weights bit for
    bit, a fresh level table and gate (the class's init), a vocabulary row for `<align>`; see `from_llava`."""
    from transformers.utils import logging

    llava = llava_model(model_or_path)
    config = config_from_llava(llava.config, alignment_token_id, **config_kwargs)
    state = llava_state_dict(llava, config.text_config.vocab_size)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its load report lists the level table and gate as missing: checked right below
    try:
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=llava.dtype,
                                                  output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    fresh = [key for key in info["missing_keys"]  # LLaVA's head has no bias: a Phi head's stays zero, the same logits
             if not key.startswith("model.alignment.") and key != "lm_head.bias"]
    if fresh or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"The LLaVA weights do not fit AlignGPT: missing {sorted(fresh)[:3]}, unexpected "
                         f"{sorted(info['unexpected_keys'])[:3]}, mismatched {sorted(info['mismatched_keys'])[:3]}.")
    generation = copy.deepcopy(llava.generation_config)
    generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | {config.image_token_id,
                                                                                 config.alignment_token_id})
    model.generation_config = generation
    return model.eval()

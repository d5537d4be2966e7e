"""The mPLUG-Owl v1 recipe on AlignGPT's trainers (mPLUG-Owl paper §3.2): model presets and LoRA settings.

Stage 1 (`mplug-owl-stage1`): vision tower + abstractor (+ level table) train, LLM frozen
(`AlignGPTPretrainConfig(train_vision_tower=True, vision_lr_multiplier=...)`). Stage 2 (`mplug-owl-stage2`): LoRA
r 8 / alpha 32 / dropout 0.05 on the LLM's q/v projections only, vision tower frozen, abstractor trained or frozen by
`train_projector`, 1:1 text-only / image micro-batches (`modality_batching="separate"`).
"""

from __future__ import annotations

# Anchored on the language model: the abstractor has q_proj/k_proj/v_proj too, and must never receive adapters.
MPLUG_OWL_LORA_TARGETS = r"(.*\.)?language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"

# mPLUG-Owl's vision side: last ViT layer, CLS kept, post-LN on all tokens, visual abstractor (v1 shape = the
# AlignGPTConfig abstractor defaults: 64 queries, 6 layers, 16 heads, SwiGLU 2816 -> 65 tokens per image).
MPLUG_OWL_CONFIG = dict(projector_type="abstractor", vision_feature_layer=-1, vision_feature_select_strategy="full",
                        vision_feature_post_layernorm=True)
# The same layout at the tiny test sizes (hidden 32): 6 queries, 2 layers -> 7 tokens per image.
MPLUG_OWL_TINY_CONFIG = dict(MPLUG_OWL_CONFIG, abstractor_num_queries=6, abstractor_num_layers=2,
                             abstractor_num_heads=4, abstractor_intermediate_size=48)
MODEL_PRESETS = {"mplug-owl": MPLUG_OWL_CONFIG}
TINY_MODEL_PRESETS = {"mplug-owl": MPLUG_OWL_TINY_CONFIG}


def model_preset(name: str | None, tiny: bool = False) -> dict:
    """Config overrides of a named model layout (`mplug-owl`); None = AlignGPT's own (MLP projector)."""
    if name is None:
        return {}
    presets = TINY_MODEL_PRESETS if tiny else MODEL_PRESETS
    if name not in presets:
        raise ValueError(f"Unknown model preset {name!r}; known: {', '.join(sorted(presets))}.")
    return dict(presets[name])


def mplug_owl_lora_config(r: int = 8, lora_alpha: int = 32, lora_dropout: float = 0.05, **kwargs):
    """mPLUG-Owl's released LoRA: the LLM's q_proj/v_proj only. `modules_to_save` is left empty: the trainer adds
    the gate (if the model has one) and the projector when `train_projector=True`.

    Example:

    ```python
    >>> from aligngpt_hf.training.mplug_owl import mplug_owl_lora_config
    >>> config = mplug_owl_lora_config()
    >>> config.r, config.lora_alpha, config.lora_dropout, config.modules_to_save
    (8, 32, 0.05, [])
    ```
    """
    from peft import LoraConfig

    kwargs.setdefault("target_modules", MPLUG_OWL_LORA_TARGETS)
    kwargs.setdefault("modules_to_save", [])
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM", **kwargs)


__all__ = ["MPLUG_OWL_CONFIG", "MPLUG_OWL_LORA_TARGETS", "model_preset", "mplug_owl_lora_config"]

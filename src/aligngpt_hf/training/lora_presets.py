"""LoRA target presets per language-model family: the attention and MLP projections of the decoder layers.

The projections have different names per family (Phi's `dense`/`fc1`/`fc2`, Phi-3's fused `qkv_proj`/`gate_up_proj`),
and `fc1`/`fc2` are also the names of the gate and of every CLIP/SigLIP MLP. So the presets are regexes anchored on
`language_model.layers.<i>.(self_attn|mlp).`: they can never reach the vision tower, the projector or the gate.
"""

from __future__ import annotations

LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# text_config.model_type -> the linear layers of one decoder layer (attention + MLP) that LoRA adapts.
LORA_TARGETS_BY_FAMILY = {
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
    "gemma": LLAMA_STYLE,
    "gemma2": LLAMA_STYLE,
    "gemma3_text": LLAMA_STYLE,
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


def lora_target_regex(names) -> str:
    """PEFT `target_modules` regex (matched with `re.fullmatch` against module names) for these layer names."""
    return rf"(.*\.)?language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"


def lora_target_modules(text_config) -> str:
    """The preset of the language model's family, from `text_config.model_type`."""
    family = getattr(text_config, "model_type", None)
    if family not in LORA_TARGETS_BY_FAMILY:
        raise ValueError(
            f"No LoRA target preset for the language model family {family!r} (config.text_config.model_type); known: "
            f"{', '.join(sorted(LORA_TARGETS_BY_FAMILY))}. Pass the targets yourself: `lora_target_modules` in the "
            "recipe, or `aligngpt_lora_config(target_modules=...)` with a regex over `language_model.layers.*` names."
        )
    return lora_target_regex(LORA_TARGETS_BY_FAMILY[family])


__all__ = ["LORA_TARGETS_BY_FAMILY", "lora_target_modules", "lora_target_regex"]

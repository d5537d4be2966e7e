"""Tiny language-model and vision-tower configs of each backbone family, from transformers' own config classes.

Shared by the LoRA-preset and the family-conversion tests: hidden 32, 2 layers, 4 heads (2 key/value heads), head
dim 8, random weights, no downloads.
"""

from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

from aligngpt_hf import AlignGPTConfig

HIDDEN, LAYERS = 32, 2
TEXT_CLASSES = {
    "llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma": GemmaConfig,
    "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "phi": PhiConfig, "phi3": Phi3Config,
}
NO_HEAD_DIM = ("phi", "phi3")  # their head dim is hidden / heads


def tiny_text_config(family: str, vocab_size: int = 300, **overrides):
    """A 2-layer language model of `family` (a `text_config.model_type`), BOS 1 / EOS 2 / pad 0."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family not in NO_HEAD_DIM:
        kwargs["head_dim"] = 8
    return TEXT_CLASSES[family](**{**kwargs, **overrides})


def tiny_vision_config(kind: str = "clip", image_size: int = 28, patch_size: int = 14):
    """CLIP (a CLS token + patches) or SigLIP (patches only) at 28 px with 14 px patches: 4 patches."""
    vision_class = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return vision_class(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=2, image_size=image_size, patch_size=patch_size)


# Vision geometries (image size, patch size): SigLIP-so400m-384/14's 27 x 27 grid scaled down to 3 x 3; a
# fixed-resolution SigLIP2 (patch 16, model_type "siglip") at 32 px: 2 x 2.
VISION_GEOMETRY = {"clip": ("clip", 28, 14), "siglip": ("siglip", 28, 14), "siglip-so400m": ("siglip", 42, 14),
                   "siglip2": ("siglip", 32, 16)}
# The backbone matrix: language model (family + what its released checkpoints set) and vision tower per cell.
BACKBONES = {
    "qwen2+siglip": ("qwen2", {}, "siglip"),
    "qwen2.5+siglip": ("qwen2", {"tie_word_embeddings": True}, "siglip"),  # the small Qwen2.5 tie their head
    "qwen3+siglip": ("qwen3", {}, "siglip"),
    "llama3+siglip-so400m": ("llama", {"rope_theta": 5e5, "vocab_size": 520}, "siglip-so400m"),
    "llama3+siglip2": ("llama", {"rope_theta": 5e5, "vocab_size": 520}, "siglip2"),
    "mistral+clip": ("mistral", {"sliding_window": 3}, "clip"),
    "gemma+siglip": ("gemma", {}, "siglip"),  # tied, scaled embeddings
    "gemma2+siglip": ("gemma2", {"sliding_window": 3}, "siglip"),  # + attention and final-logit soft-capping
    "gemma3+siglip": ("gemma3_text", {"sliding_window": 3}, "siglip"),
    "phi2+siglip": ("phi", {}, "siglip"),  # partial rotary, LM head with a bias
    "phi3+clip": ("phi3", {}, "clip"),
}


def backbone_config(name: str, **overrides) -> AlignGPTConfig:
    """The tiny AlignGPT of one `BACKBONES` cell; `<image>`/`<align>` are the last two ids of the vocabulary."""
    family, text_overrides, vision = BACKBONES[name]
    kind, image_size, patch_size = VISION_GEOMETRY[vision]
    text = tiny_text_config(family, **text_overrides)
    overrides.setdefault("gate_hidden_size", 16)
    overrides.setdefault("vision_feature_select_strategy", "default" if kind == "clip" else "full")
    return AlignGPTConfig(vision_config=tiny_vision_config(kind, image_size, patch_size), text_config=text,
                          image_token_id=text.vocab_size - 2, alignment_token_id=text.vocab_size - 1, **overrides)


def tiny_family_config(family: str, vision: str = "clip", vocab_size: int = 300, **overrides) -> AlignGPTConfig:
    """A tiny AlignGPT on `family` + `vision`; `<image>`/`<align>` are the last two ids of the vocabulary."""
    overrides.setdefault("gate_hidden_size", 16)
    overrides.setdefault("vision_feature_select_strategy", "default" if vision == "clip" else "full")
    return AlignGPTConfig(vision_config=tiny_vision_config(vision), text_config=tiny_text_config(family, vocab_size),
                          image_token_id=vocab_size - 2, alignment_token_id=vocab_size - 1, **overrides)

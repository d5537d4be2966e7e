"""Generate the Hub-ready configs of the published variants into `hub_configs/` (never edit those by hand).

    python -m aligngpt_hf.hub.hub_configs hub_configs/

The 7B/13B configs describe the released AlignGPT models after conversion: CLIP ViT-L/14-336 (layer -2, CLS dropped,
576 tokens), a Vicuna-1.5 LLM whose 32000-token vocabulary gains `<image>` (32000) and `<align>` (32001) and is padded
to a multiple of 64, N=8 levels, a 576 -> 256 -> 7 gate and the mlp2x_gelu projector.

The family variants pair other language models with the towers AlignGPT's follow-up trained them with: LLaMA-3-8B-Instruct
with SigLIP-so400m-384 (all 27 x 27 = 729 patch tokens, no CLS to drop, so a 729 -> 256 gate), and Gemma-7B,
Mistral-7B-Instruct-v0.2 and Phi-2 with CLIP ViT-L/14-336. Each language model keeps its published dimensions; its
vocabulary V gains `<image>` (V) and `<align>` (V + 1) and is padded to a multiple of 64, as conversion does. N=8 here;
the level count is a recipe field (`num_alignment_levels`, 4 to 10 were trained).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import CLIPVisionConfig, GemmaConfig, LlamaConfig, MistralConfig, PhiConfig, SiglipVisionConfig

from aligngpt_hf.models.configuration_aligngpt import PROCESSOR_AUTO_MAP, REMOTE_AUTO_MAP, AlignGPTConfig
from aligngpt_hf.paths import atomic_write_text

CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
VICUNA_COMMON = dict(
    vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
VICUNA_DIMS = {
    "aligngpt-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32),
    "aligngpt-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                         num_key_value_heads=40),
}
SIGLIP_SO400M_384 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
    patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)
VOCAB_MULTIPLE = 64
# name -> (text config class, published dimensions of the language model, vision tower, its select strategy)
FAMILY_VARIANTS = {
    "aligngpt-llama3-8b-instruct-siglip": (LlamaConfig, dict(  # meta-llama/Meta-Llama-3-8B-Instruct
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        hidden_act="silu", bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False,
    ), SiglipVisionConfig(**SIGLIP_SO400M_384), "full"),
    "aligngpt-gemma-7b": (GemmaConfig, dict(  # google/gemma-7b
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
        hidden_act="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
    ), CLIPVisionConfig(**CLIP_L_336), "default"),
    "aligngpt-mistral-7b-instruct": (MistralConfig, dict(  # mistralai/Mistral-7B-Instruct-v0.2
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
        sliding_window=None, hidden_act="silu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    ), CLIPVisionConfig(**CLIP_L_336), "default"),
    "aligngpt-phi-2": (PhiConfig, dict(  # microsoft/phi-2
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=2048, layer_norm_eps=1e-5, rope_theta=10000.0,
        partial_rotary_factor=0.4, hidden_act="gelu_new", bos_token_id=50256, eos_token_id=50256,
        tie_word_embeddings=False,
    ), CLIPVisionConfig(**CLIP_L_336), "default"),
}


def family_config(name: str, num_alignment_levels: int = 8) -> AlignGPTConfig:
    """A family variant: the language model's published config with `<image>`/`<align>` appended to its vocabulary."""
    text_class, dims, vision, strategy = FAMILY_VARIANTS[name]
    vocab = dims["vocab_size"]
    padded = -(-(vocab + 2) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return AlignGPTConfig(
        vision_config=vision,
        text_config=text_class(**{**dims, "vocab_size": padded}),
        num_alignment_levels=num_alignment_levels,
        gate_hidden_size=256,
        projector_type="mlp2x_gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_token_id=vocab,
        alignment_token_id=vocab + 1,
    )


def released_config(name: str) -> AlignGPTConfig:
    """The converted layout of `nlpzhaof/<name>`."""
    return AlignGPTConfig(
        vision_config=CLIPVisionConfig(**CLIP_L_336),
        text_config=LlamaConfig(**VICUNA_COMMON, **VICUNA_DIMS[name]),
        num_alignment_levels=8,
        gate_hidden_size=256,
        projector_type="mlp2x_gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_id=32000,
        alignment_token_id=32001,
    )


def mplug_owl_config() -> AlignGPTConfig:
    """mPLUG-Owl-style variant: CLIP ViT-L/14 at 224 px (last layer, CLS kept, post-LN on all tokens) + the visual
    abstractor (64 queries, 6 layers -> 65 tokens per image) + LLaMA-7B dims, with AlignGPT's levels and gate."""
    return AlignGPTConfig(
        vision_config=CLIPVisionConfig(**{**CLIP_L_336, "image_size": 224, "layer_norm_eps": 1e-6}),
        text_config=LlamaConfig(**VICUNA_COMMON, **VICUNA_DIMS["aligngpt-7b"]),
        projector_type="abstractor",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_feature_post_layernorm=True,
        image_token_id=32000,
        alignment_token_id=32001,
    )


def tiny_config() -> AlignGPTConfig:
    """The tiny test model (`aligngpt_hf.tiny`), with its locally trained tokenizer's vocabulary."""
    from aligngpt_hf.tiny import build_config, build_tokenizer

    return build_config(build_tokenizer())


def hub_config_variants() -> dict[str, AlignGPTConfig]:
    variants = {name: released_config(name) for name in VICUNA_DIMS}
    variants.update({name: family_config(name) for name in FAMILY_VARIANTS})
    return {**variants, "aligngpt-mplug-owl-7b": mplug_owl_config(), "tiny": tiny_config()}


def config_json(config: AlignGPTConfig) -> str:
    """Deterministic JSON (no library version stamp) with the architecture and remote-code auto_map."""
    data = config.to_diff_dict()
    data.pop("transformers_version", None)
    for sub in ("vision_config", "text_config"):
        data.get(sub, {}).pop("transformers_version", None)
    if config.projector_type != "abstractor":
        data = {key: value for key, value in data.items() if not key.startswith("abstractor_")}
    data["architectures"] = ["AlignGPTForConditionalGeneration"]
    data["auto_map"] = {**REMOTE_AUTO_MAP, **PROCESSOR_AUTO_MAP}
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_hub_configs(directory: str | Path) -> list[Path]:
    """Write `<directory>/<variant>/config.json` for every variant (each one whole or not at all, so a failed run
    leaves the previous file); returns the written paths."""
    written = []
    for name, config in hub_config_variants().items():
        path = Path(directory) / name / "config.json"
        atomic_write_text(path, config_json(config))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="hub_configs", help="folder to write (default: hub_configs)")
    directory = Path(parser.parse_args(argv).directory)
    if directory.exists() and not directory.is_dir():
        parser.error(f"{directory} is a file; give the folder to write the variants' config.json files into.")
    for path in write_hub_configs(directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

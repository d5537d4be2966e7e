"""Generate the Hub-ready configs of the published variants into `hub_configs/` (never edit those by hand).

    python -m aligngpt_hf.hub.hub_configs hub_configs/

The 7B/13B configs describe the released AlignGPT models after conversion: CLIP ViT-L/14-336 (layer -2, CLS dropped,
576 tokens), a Vicuna-1.5 LLM whose 32000-token vocabulary gains `<image>` (32000) and `<align>` (32001) and is padded
to a multiple of 64, N=8 levels, a 576 -> 256 -> 7 gate and the mlp2x_gelu projector.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import CLIPVisionConfig, LlamaConfig

from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
from aligngpt_hf.models.modeling_aligngpt import PROCESSOR_AUTO_MAP, REMOTE_AUTO_MAP

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
    """Write `<directory>/<variant>/config.json` for every variant; returns the written paths."""
    written = []
    for name, config in hub_config_variants().items():
        path = Path(directory) / name / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_json(config))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="hub_configs")
    for path in write_hub_configs(parser.parse_args(argv).directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

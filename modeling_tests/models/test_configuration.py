"""AlignGPTConfig: derived `image_seq_length`, validated choices, and the error text a user sees for each mistake."""

from __future__ import annotations

import re

import pytest
from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, Dinov2Config, LlamaConfig, SiglipVisionConfig

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration

TEXT = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1)
CLIP_336 = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=336, patch_size=14)
SIGLIP_224 = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=224, patch_size=16)


def config(**kwargs) -> AlignGPTConfig:
    return AlignGPTConfig(**{"vision_config": CLIP_336, "text_config": TEXT, "image_token_id": 62,
                             "alignment_token_id": 63, **kwargs})


@pytest.mark.parametrize(("vision", "strategy", "expected"), [
    (CLIP_336, "default", 576),   # (336 / 14)^2 patches, CLS dropped: LLaVA-1.5 / AlignGPT
    (CLIP_336, "full", 577),      # CLS kept
    (SIGLIP_224, "full", 196),    # SigLIP has no CLS token
])
def test_image_seq_length_is_derived_from_the_vision_config(vision, strategy, expected):
    derived = config(vision_config=vision, vision_feature_select_strategy=strategy)
    assert derived.image_seq_length == expected
    assert config(vision_config=vision, vision_feature_select_strategy=strategy,
                  image_seq_length=expected).image_seq_length == expected


def test_gate_input_width_is_the_image_seq_length():
    tiny_vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=8)
    model = AlignGPTForConditionalGeneration(config(vision_config=tiny_vision, gate_hidden_size=8))
    assert model.model.alignment.fc1.in_features == model.config.image_seq_length == 16
    assert model.model.alignment.fc2.out_features == model.config.num_alignment_levels - 1 == 7


def test_full_clip_config_is_reduced_to_its_vision_part():
    full = CLIPConfig(vision_config=CLIP_336.to_dict())
    assert config(vision_config=full).vision_config.model_type == "clip_vision_model"
    assert config(vision_config=full.to_dict()).image_seq_length == 576


def test_wrong_image_seq_length_names_the_derivation():
    message = ("`image_seq_length=100` disagrees with the model: clip_vision_model at 336px with patch 14 and "
               "strategy 'default' gives 576 tokens per image (the gate's input width).")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        config(image_seq_length=100)


def test_default_strategy_needs_a_cls_token():
    message = ("`vision_feature_select_strategy='default'` drops a CLS token, but 'siglip_vision_model' has none; "
               "use `vision_feature_select_strategy='full'`.")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        config(vision_config=SIGLIP_224)


def test_underivable_vision_tower_needs_an_explicit_image_seq_length():
    dinov2 = Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    message = ("Cannot derive `image_seq_length` for vision model type 'dinov2'; pass `image_seq_length` "
               "(feature tokens per image after the select strategy).")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        config(vision_config=dinov2)
    assert config(vision_config=dinov2, image_seq_length=1369).image_seq_length == 1369


@pytest.mark.parametrize(("field", "allowed"), [
    ("alignment_mode", "'adaptive', 'global', 'local', 'mean', 'none'"),
    ("gate_text_scope", "'prompt', 'all'"),
    ("projector_type", "'linear', 'mlp2x_gelu', 'abstractor'"),
    ("vision_feature_select_strategy", "'default', 'full'"),
])
def test_enumerations_are_validated(field, allowed):
    with pytest.raises(ValueError, match=f"^{re.escape(f'`{field}` must be one of {allowed}, got ' + repr('bogus'))}"):
        config(**{field: "bogus"})


def test_level_count_and_token_ids_are_validated():
    with pytest.raises(ValueError, match=r"^`num_alignment_levels` must be an integer >= 2 \(one global row plus at "
                                         r"least one local row\), got 1\.$"):
        config(num_alignment_levels=1)
    with pytest.raises(ValueError, match=r"^`image_token_id` and `alignment_token_id` must differ, both are 62\.$"):
        config(alignment_token_id=62)


def test_dict_round_trip_and_auto_config():
    original = config(alignment_mode="mean", num_alignment_levels=4, gate_text_scope="all")
    for reloaded in (AlignGPTConfig.from_dict(original.to_dict()), AutoConfig.for_model(**original.to_dict())):
        assert isinstance(reloaded, AlignGPTConfig)
        assert (reloaded.alignment_mode, reloaded.num_alignment_levels, reloaded.gate_text_scope) == ("mean", 4, "all")
        assert reloaded.image_seq_length == 576
        assert reloaded.vision_config.to_dict() == original.vision_config.to_dict()
        assert reloaded.text_config.hidden_size == TEXT.hidden_size

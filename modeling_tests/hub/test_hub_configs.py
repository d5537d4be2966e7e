"""hub_configs/ is generated: regenerating gives identical files, and each loads through AutoConfig."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration
from aligngpt_hf.hub.hub_configs import family_config, main, write_hub_configs
from conftest import REPO_ROOT

FAMILY = {  # variant -> (text model type, hidden, vocab after <image>/<align> + padding, <image> id, tokens per image)
    "aligngpt-llama3-8b-instruct-siglip": ("llama", 4096, 128320, 128256, 729),
    "aligngpt-gemma-7b": ("gemma", 3072, 256064, 256000, 576),
    "aligngpt-mistral-7b-instruct": ("mistral", 4096, 32064, 32000, 576),
    "aligngpt-phi-2": ("phi", 2560, 51264, 51200, 576),
}


def test_hub_configs_are_up_to_date_and_load(tmp_path):
    written = write_hub_configs(tmp_path)
    assert sorted(path.parent.name for path in written) == sorted(
        ["aligngpt-13b", "aligngpt-7b", "aligngpt-mplug-owl-7b", "tiny", *FAMILY])
    for path in written:
        committed = REPO_ROOT / "hub_configs" / path.parent.name / "config.json"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run python -m aligngpt_hf.hub.hub_configs"
        config = AutoConfig.from_pretrained(path.parent)
        assert isinstance(config, AlignGPTConfig)
    seven_b = AutoConfig.from_pretrained(tmp_path / "aligngpt-7b")
    assert seven_b.image_seq_length == 576 and seven_b.gate_hidden_size == 256
    assert (seven_b.text_config.hidden_size, seven_b.text_config.vocab_size) == (4096, 32064)
    assert AutoConfig.from_pretrained(tmp_path / "aligngpt-13b").text_config.hidden_size == 5120
    owl = AutoConfig.from_pretrained(tmp_path / "aligngpt-mplug-owl-7b")
    assert (owl.projector_type, owl.image_seq_length, owl.vision_config.image_size) == ("abstractor", 65, 224)


def test_generator_refuses_a_file_as_its_folder(tmp_path, capsys):
    target = tmp_path / "configs.yaml"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as raised:
        main([str(target)])
    assert raised.value.code == 2
    assert f"{target} is a file; give the folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_family_configs_carry_the_published_dimensions(tmp_path):
    write_hub_configs(tmp_path)
    for name, (model_type, hidden, vocab, image_id, tokens) in FAMILY.items():
        config = AutoConfig.from_pretrained(tmp_path / name)
        text = config.text_config
        assert (text.model_type, text.hidden_size, text.vocab_size) == (model_type, hidden, vocab), name
        assert (config.image_token_id, config.alignment_token_id) == (image_id, image_id + 1)
        assert config.image_seq_length == tokens and config.num_alignment_levels == 8
    llama3 = AutoConfig.from_pretrained(tmp_path / "aligngpt-llama3-8b-instruct-siglip")
    assert (llama3.vision_config.model_type, llama3.vision_feature_select_strategy) == ("siglip_vision_model", "full")
    assert (llama3.text_config.num_key_value_heads, llama3.text_config.rope_parameters["rope_theta"]) == (8, 500000.0)
    gemma = AutoConfig.from_pretrained(tmp_path / "aligngpt-gemma-7b")
    assert gemma.tie_word_embeddings and gemma.text_config.head_dim == 256
    assert AutoConfig.from_pretrained(tmp_path / "aligngpt-mistral-7b-instruct").text_config.rope_parameters[
        "rope_theta"] == 1e6
    assert AutoConfig.from_pretrained(tmp_path / "aligngpt-phi-2").text_config.rope_parameters[
        "partial_rotary_factor"] == 0.4


@pytest.mark.parametrize("levels", [4, 5, 6, 8, 10])
def test_level_counts_build_at_full_size_with_the_tower_gate_width(levels):
    """The 729-wide gate of the SigLIP variant, and an N x H table with N - 1 gate outputs, for every trained N."""
    with torch.device("meta"):
        model = AlignGPTForConditionalGeneration(family_config("aligngpt-llama3-8b-instruct-siglip", levels))
    alignment = model.model.alignment
    assert tuple(alignment.level_embeddings.shape) == (levels, 4096)
    assert (alignment.fc1.in_features, alignment.fc1.out_features, alignment.fc2.out_features) == (729, 256, levels - 1)

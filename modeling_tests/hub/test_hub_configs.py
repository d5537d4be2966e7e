"""hub_configs/ is generated: regenerating gives identical files, and each loads through AutoConfig."""

from __future__ import annotations

from transformers import AutoConfig

from aligngpt_hf import AlignGPTConfig
from aligngpt_hf.hub.hub_configs import write_hub_configs
from conftest import REPO_ROOT


def test_hub_configs_are_up_to_date_and_load(tmp_path):
    written = write_hub_configs(tmp_path)
    assert sorted(path.parent.name for path in written) == ["aligngpt-13b", "aligngpt-7b", "aligngpt-mplug-owl-7b", "tiny"]
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

"""Keyword overrides given to `from_pretrained` are set by transformers after `__init__`: they are checked as the
constructor's arguments are."""

from __future__ import annotations

import pytest

from aligngpt_hf import AlignGPTConfig


@pytest.fixture
def saved_config(tmp_path):
    AlignGPTConfig().save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("override, message", [
    ({"alignment_mode": "bogus"}, r"`alignment_mode` must be one of"),
    ({"num_alignment_levels": 1}, r"`num_alignment_levels` must be an integer >= 2"),
])
def test_from_pretrained_overrides_are_validated_like_the_constructor(saved_config, override, message):
    with pytest.raises(ValueError, match=message):
        AlignGPTConfig.from_pretrained(saved_config, **override)

"""Faults found by probing whose fix belongs in the remote-code unit (`src/aligngpt_hf/models/`), kept as strict
xfails until it lands. The command line already refuses these inputs (`aligngpt-hf from-llava` loads the LLaVA itself
and checks the loading report); the Python API does not."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from aligngpt_hf import AlignGPTForConditionalGeneration
from aligngpt_hf.tiny import build_llava


@pytest.mark.xfail(strict=True, reason="llava_aligngpt.llava_model loads the LLaVA without output_loading_info: a "
                                       "missing tensor is initialised randomly and from_llava returns a model")
def test_from_llava_api_refuses_a_checkpoint_with_a_missing_tensor(tmp_path):
    torch.manual_seed(0)
    model, processor = build_llava()
    model.save_pretrained(tmp_path / "llava")
    state = load_file(tmp_path / "llava" / "model.safetensors")
    state.pop(next(key for key in state if key.endswith("multi_modal_projector.linear_1.bias")))
    save_file(state, tmp_path / "llava" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.bias"):
        AlignGPTForConditionalGeneration.from_llava(tmp_path / "llava")

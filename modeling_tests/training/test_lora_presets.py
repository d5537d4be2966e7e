"""LoRA target presets per language-model family: PEFT wraps the decoder's attention and MLP projections only."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from aligngpt_hf import AlignGPTForConditionalGeneration
from aligngpt_hf.training.lora_presets import (
    LORA_TARGETS_BY_FAMILY,
    aligngpt_lora_config,
    check_peft_model,
    lora_target_modules,
    prepare_peft_config,
)
from family_builders import TEXT_CLASSES, tiny_family_config

LLAMA_STYLE = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}
EXPECTED = {  # the projections of one decoder layer, as transformers names them
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), LLAMA_STYLE),
    "phi": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
}


def test_every_family_has_a_preset():
    assert set(LORA_TARGETS_BY_FAMILY) == set(EXPECTED) == set(TEXT_CLASSES)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_preset_wraps_the_decoder_projections_and_never_the_vision_side(family):
    torch.manual_seed(0)
    # SigLIP's MLP and the gate also have fc1/fc2 layers: Phi's preset must not reach them
    model = AlignGPTForConditionalGeneration(tiny_family_config(family, "siglip" if family == "phi" else "clip"))
    decoder_linears = {name for name, module in model.named_modules()
                       if isinstance(module, nn.Linear) and ".language_model.layers." in name}
    config = prepare_peft_config(aligngpt_lora_config(r=2, lora_alpha=4, lora_dropout=0.0), model)
    peft_model = get_peft_model(model, config)
    wrapped = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
               if isinstance(module, LoraLayer)}
    assert wrapped == {f"model.language_model.layers.{i}.{name}" for i in range(2) for name in EXPECTED[family]}
    assert wrapped == decoder_linears  # attention + MLP are every linear layer of a decoder layer
    check_peft_model(peft_model)
    adapters = [name for name, _ in peft_model.named_parameters() if "lora_" in name]
    assert adapters and all(".language_model.layers." in name for name in adapters)


def test_explicit_targets_win_and_unknown_families_are_refused():
    model = AlignGPTForConditionalGeneration(tiny_family_config("phi"))
    config = prepare_peft_config(aligngpt_lora_config(target_modules=r".*language_model.*\.q_proj"), model)
    assert config.target_modules == r".*language_model.*\.q_proj"
    assert aligngpt_lora_config(text_config=model.config.text_config).target_modules == (
        r"(.*\.)?language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|dense|fc1|fc2)")
    assert re.fullmatch(lora_target_modules(model.config.text_config), "model.language_model.layers.11.mlp.fc2")
    assert not re.fullmatch(lora_target_modules(model.config.text_config), "model.vision_tower.encoder.layers.0.mlp.fc2")
    with pytest.raises(ValueError, match=r"^No LoRA target preset for the language model family 'gpt2' "
                                         r"\(config\.text_config\.model_type\); known: gemma, gemma2, gemma3_text, "
                                         r"llama, mistral, phi, phi3, qwen2, qwen3\. Pass the targets yourself: "
                                         r"`lora_target_modules` in the recipe"):
        lora_target_modules(SimpleNamespace(model_type="gpt2"))

"""Every language-model family and vision tower keeps its own semantics inside AlignGPT.

The matrix (one cell per `family_builders.BACKBONES` entry) checks, per cell: the logits equal an independent
computation (vision tower -> select -> projector, the `<align>` vector from the level table and the gate written out
here, and the family's own `XForCausalLM` run on those embeddings), batched generation with padding equals each row
alone, and a reload through remote code in a Python without `aligngpt_hf` gives the same logits bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Siglip2VisionConfig, SiglipVisionConfig

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration
from conftest import package_free_env
from family_builders import BACKBONES, HIDDEN, backbone_config, tiny_text_config, tiny_vision_config

CELLS = list(BACKBONES)
BOS, PAD = 1, 0


def family(name: str) -> str:
    return BACKBONES[name][0]


def randomize(model, seed: int = 0):
    """Weights of std 0.2 (not the 0.02 init): logits of a few units, where soft-capping and the gate show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """One tiny model per cell, built once for the module."""
    return {name: randomize(AlignGPTForConditionalGeneration(backbone_config(name))) for name in CELLS}


def rows(model, name: str):
    """Two rows of different lengths, left-padded: [BOS] <align> <image>*K text (Qwen has no BOS: <align> first)."""
    config = model.config
    start = [] if family(name).startswith("qwen") else [BOS]
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids = [start + [config.alignment_token_id] + [config.image_token_id] * config.image_seq_length + p for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in ids])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    vision = config.vision_config
    pixels = torch.randn(2, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}


def expected_logits(model, name: str, batch) -> torch.Tensor:
    """The forward written out: features, gate, `<align>` vector, then the family's own causal LM."""
    config, parts = model.config, model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = parts.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
    hidden = hidden[:, 1:] if config.vision_config.model_type == "clip_vision_model" else hidden  # CLIP: drop CLS
    projector = parts.multi_modal_projector
    features = F.linear(F.gelu(F.linear(hidden, projector.linear_1.weight, projector.linear_1.bias)),
                        projector.linear_2.weight, projector.linear_2.bias)
    # Word vectors as the family's embedding module gives them: every Gemma generation scales them by sqrt(hidden).
    scale = HIDDEN ** 0.5 if family(name).startswith("gemma") else 1.0
    words = parts.language_model.embed_tokens.weight[ids] * torch.tensor(scale)
    assert torch.equal(model.get_input_embeddings()(ids), words)
    image, align = ids == config.image_token_id, ids == config.alignment_token_id
    before_align = torch.zeros_like(align)
    before_align[:, :-1] = align[:, 1:] & (ids[:, :-1] == BOS)
    text = mask.bool() & ~image & ~align & ~before_align
    alignment, embeds = parts.alignment, words.clone()
    table = alignment.level_embeddings
    for row in range(len(ids)):
        mean_text = words[row][text[row]].mean(0)
        dots = features[row] @ mean_text
        weights = torch.softmax(alignment.fc2(F.gelu(alignment.fc1(dots))), -1)
        embeds[row, image[row]] = features[row]
        embeds[row, align[row]] = table[-1] + weights @ table[:-1]
    reference = AutoModelForCausalLM.from_config(config.text_config).eval()
    state = {f"model.{key}": value for key, value in parts.language_model.state_dict().items()}
    state.update({f"lm_head.{key}": value for key, value in model.lm_head.state_dict().items()})
    reference.load_state_dict(state, strict=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return reference(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("name", CELLS)
def test_forward_equals_the_family_causal_lm_on_independent_embeddings(models, name):
    model = models[name]
    batch = rows(model, name)
    with torch.no_grad():
        logits = model(**batch).logits
        expected = expected_logits(model, name, batch)
    real = batch["attention_mask"].bool()
    assert (logits[real] - expected[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", CELLS)
def test_batched_generation_equals_each_row_alone(models, name):
    model = models[name]
    batch = rows(model, name)
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    width = batch["input_ids"].shape[1]
    for row in range(2):
        keep = batch["attention_mask"][row].bool()
        single = {"input_ids": batch["input_ids"][row, keep][None], "pixel_values": batch["pixel_values"][row:row + 1]}
        alone = model.generate(**single, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        assert torch.equal(generated[row, width:], alone[0, single["input_ids"].shape[1]:])


RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["aligngpt_hf"] = None  # only the files next to the weights can define the model
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    root, names = sys.argv[1], sys.argv[2:]
    outputs = {}
    for name in names:
        model = AutoModelForImageTextToText.from_pretrained(f"{root}/{name}", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        batch = load_file(f"{root}/{name}/batch.safetensors")
        with torch.no_grad():
            outputs[name] = model(**batch).logits
        tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        outputs[name + ":tied"] = torch.tensor(tied)
    save_file(outputs, f"{root}/outputs.safetensors")
    print("RELOAD_OK")
    """
)


def test_every_cell_reloads_through_remote_code_bit_for_bit(models, tmp_path):
    """One subprocess reloads all cells (a process per cell would cost seconds each)."""
    expected = {}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        batch = rows(model, name)
        save_file(batch, tmp_path / name / "batch.safetensors")
        with torch.no_grad():
            expected[name] = model(**batch).logits
    result = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path), *CELLS], capture_output=True,
                            text=True, env=package_free_env(tmp_path / "hf_home"), cwd=tmp_path, timeout=300)
    assert "RELOAD_OK" in result.stdout, result.stderr[-3000:]
    remote = load_file(tmp_path / "outputs.safetensors")
    for name, model in models.items():
        assert torch.equal(remote[name], expected[name]), name
        assert bool(remote[name + ":tied"]) == model.config.tie_word_embeddings, name


def test_final_logit_softcapping_is_applied_after_the_head_and_before_the_loss(models):
    """Gemma2/Gemma3 `final_logit_softcapping`: logits = cap * tanh(head / cap), as their ForCausalLM computes."""
    model = models["gemma2+siglip"]
    batch = rows(model, "gemma2+siglip")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    cap = model.config.text_config.final_logit_softcapping
    assert cap == 30.0  # Gemma2's released value
    with torch.no_grad():
        out = model(**batch, labels=labels)
        raw = model.lm_head(model.model(**batch).last_hidden_state)
    assert torch.equal(out.logits, torch.tanh(raw / cap) * cap)
    assert (out.logits - raw).abs().max() > 1e-3  # the cap matters at these logits
    shifted = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    assert torch.allclose(out.loss, F.cross_entropy(shifted, labels[:, 1:].reshape(-1)), atol=1e-6)


def test_trl_fused_head_applies_the_same_softcapping(models):
    """TRL's trainers skip our `forward` (fused head over `model.model`); they read the cap from `text_config`."""
    from trl.trainer.utils import add_fused_lm_head

    model = AlignGPTForConditionalGeneration(backbone_config("gemma2+siglip"))
    model.load_state_dict(models["gemma2+siglip"].state_dict())
    batch = rows(model.eval(), "gemma2+siglip")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
        add_fused_lm_head(model)
        fused = model(**batch, labels=labels, fused_lm_head=True).loss
    assert torch.allclose(fused, expected, atol=1e-5)


def test_gemma2_attention_softcapping_is_refused_by_transformers_with_sdpa():
    """sdpa cannot soft-cap attention logits; transformers refuses Gemma2 with it (eager is its default here)."""
    assert AlignGPTForConditionalGeneration(backbone_config("gemma2+siglip")).config.text_config._attn_implementation \
        == "eager"
    for implementation in ("sdpa", {"text_config": "sdpa"}):
        with pytest.raises(ValueError, match="Gemma2Model does not support an attention implementation through torch"):
            AlignGPTForConditionalGeneration._from_config(backbone_config("gemma2+siglip"),
                                                          attn_implementation=implementation)
    model = AlignGPTForConditionalGeneration(backbone_config("gemma2+siglip"))
    with pytest.raises(ValueError, match="Gemma2Model does not support an attention implementation through torch"):
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("name,implementation", [
    ("mistral+clip", "eager"), ("mistral+clip", "sdpa"), ("gemma2+siglip", "eager"), ("gemma3+siglip", "eager"),
    ("gemma3+siglip", "sdpa"),
])
def test_packed_row_with_a_sliding_window_equals_each_sample_alone(models, name, implementation):
    """`sliding_window=3`, shorter than each sample: the packed mask keeps both the window and the sample bounds."""
    model = AlignGPTForConditionalGeneration._from_config(backbone_config(name), attn_implementation=implementation)
    model.load_state_dict(models[name].state_dict())
    model.eval()
    batch = rows(model, name)
    samples = [batch["input_ids"][row, batch["attention_mask"][row].bool()] for row in range(2)]
    positions = torch.cat([torch.arange(len(sample)) for sample in samples])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(samples)[None], pixel_values=batch["pixel_values"], position_ids=positions,
                       use_cache=False).logits[0]
        alone = [model(input_ids=sample[None], pixel_values=batch["pixel_values"][row:row + 1]).logits[0]
                 for row, sample in enumerate(samples)]
        wide = backbone_config(name)
        wide.text_config.sliding_window = 4096
        unwindowed = AlignGPTForConditionalGeneration._from_config(wide, attn_implementation=implementation).eval()
        unwindowed.load_state_dict(model.state_dict())
        full = unwindowed(input_ids=samples[0][None], pixel_values=batch["pixel_values"][:1]).logits[0]
    assert (packed - torch.cat(alone)).abs().max() <= 1e-5
    assert (full - alone[0]).abs().max() > 1e-3  # the window is in effect


@pytest.mark.parametrize("name", ["gemma+siglip", "qwen2.5+siglip", "gemma2+siglip"])
def test_tied_head_stays_tied_after_resize_and_save_load(models, name, tmp_path):
    model = AlignGPTForConditionalGeneration(backbone_config(name))
    model.load_state_dict(models[name].state_dict())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.resize_token_embeddings(model.config.text_config.vocab_size + 1)  # e.g. a new special token row
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = AlignGPTForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_phi_keeps_its_lm_head_bias(models):
    """Phi-1/1.5/2's ForCausalLM head has a bias (the matrix cell compares the logits with it)."""
    assert models["phi2+siglip"].lm_head.bias is not None
    assert models["phi3+clip"].lm_head.bias is None


@pytest.mark.parametrize("image_size,patch_size,tokens", [
    (384, 14, 729),  # SigLIP-so400m-384/14, SigLIP2 patch14-384
    (256, 16, 256),  # SigLIP2 patch16-256
    (512, 16, 1024),  # SigLIP2 patch16-512
    (224, 14, 256),  # SigLIP2 patch14-224
])
def test_tokens_per_image_and_gate_width_come_from_the_siglip_tower(image_size, patch_size, tokens):
    """Fixed-resolution SigLIP2 checkpoints load with SigLIP's classes (model_type "siglip"), hence SigLIP's rule."""
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                                num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    config = AlignGPTConfig(vision_config=vision, text_config=tiny_text_config("llama"), image_token_id=298,
                            alignment_token_id=299, gate_hidden_size=16, vision_feature_select_strategy="full",
                            vision_feature_layer=-1)
    assert config.image_seq_length == tokens
    with torch.device("meta"):
        model = AlignGPTForConditionalGeneration(config)
    assert model.model.alignment.fc1.in_features == tokens


def test_siglip2_naflex_tower_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"SigLIP2 NaFlex tower .* Use a fixed-resolution SigLIP2 checkpoint"):
        AlignGPTConfig(vision_config=Siglip2VisionConfig(), text_config=tiny_text_config("llama"),
                       image_token_id=298, alignment_token_id=299, vision_feature_select_strategy="full")


def test_vision_feature_select_strategy_per_tower():
    """CLIP drops its CLS token by default; SigLIP has none, so `default` (drop CLS) is refused there."""
    assert backbone_config("mistral+clip").image_seq_length == 4
    assert backbone_config("phi3+clip", vision_feature_select_strategy="full").image_seq_length == 5
    with pytest.raises(ValueError, match="'siglip_vision_model' has none; use `vision_feature_select_strategy='full'`"):
        AlignGPTConfig(vision_config=tiny_vision_config("siglip"), text_config=tiny_text_config("llama"),
                       image_token_id=298, alignment_token_id=299, vision_feature_select_strategy="default")


def test_phi_head_bias_is_zero_from_a_llava_whose_head_has_none():
    """transformers' LLaVA drops Phi's head bias; `from_llava` keeps LLaVA's logits with a zero bias."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = backbone_config("phi2+siglip")
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=config.vision_config, text_config=config.text_config, image_token_id=config.image_token_id,
        vision_feature_select_strategy="full")).eval()
    model = AlignGPTForConditionalGeneration.from_llava(llava, alignment_token_id=config.alignment_token_id,
                                                        alignment_mode="none")
    assert torch.equal(model.lm_head.bias, torch.zeros_like(model.lm_head.bias))
    ids = torch.tensor([[BOS] + [config.image_token_id] * config.image_seq_length + [5, 6, 7]])
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           llava(input_ids=ids, pixel_values=pixels).logits)

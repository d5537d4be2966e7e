"""`aligngpt-hf convert` on AlignGPT_family checkpoints: tiny stand-ins of each family layout, converted, and our
forward compared with an independent computation of the family's forward on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from aligngpt_hf import AlignGPTForConditionalGeneration, convert_checkpoint
from aligngpt_hf.conversion.convert import is_stage1_artefact, load_stage1_artefact
from aligngpt_hf.conversion.mapping import ConversionError
from family_builders import tiny_text_config, tiny_vision_config

VOCAB, PADDED, K, GATE = 300, 320, 4, 16
IMAGE_ID, ALIGN_ID = VOCAB, VOCAB + 1
TOWER_PREFIX = "vision_tower.vision_tower.vision_model."
# family model_type -> (language model family, vision tower, n_indicators)
FAMILIES = {
    "aligngpt": ("llama", "siglip", 6),  # LLaMA-3 + SigLIP
    "aligngpt_mistral": ("mistral", "clip", 4),
    "aligngpt_phi": ("phi", "siglip", 5),
    "aligngpt_gemma": ("gemma", "clip", 10),  # tied LM head, the whole input scaled by sqrt(H) (transformers 4.40)
    "aligngpt_qwen2": ("qwen2", "siglip", 8),
}
STAGE2_IDS = [1, 57, 88, 21, 9, -200, 13, 140, 77, 5]  # the family's batch: -200 marks the image
STAGE1_IDS = [1, -200, 64, 99, 12]
ATOL = 1e-5


def legacy_config_fields(text_config) -> dict:
    """The language model's config as transformers 4.40 (the family's pin) wrote it: rope fields at the top level."""
    fields = text_config.to_dict()
    rope = fields.pop("rope_parameters", None) or {}
    fields["rope_theta"] = rope.get("rope_theta", 10000.0)
    if "partial_rotary_factor" in rope:
        fields["partial_rotary_factor"] = rope["partial_rotary_factor"]
    for key in ("transformers_version", "dtype", "architectures"):
        fields.pop(key, None)
    return fields


def family_checkpoint(folder, layout, seed=0, edit=None, **config_fields):
    """A tiny stage-2 checkpoint in the `layout` family's layout (`pytorch_model.bin`, config.json, the tower's
    config); `config_fields` overwrite config.json fields."""
    family, vision_kind, levels = FAMILIES[layout]
    torch.manual_seed(seed)
    text_config, vision_config = tiny_text_config(family, VOCAB), tiny_vision_config(vision_kind)
    language_model = AutoModelForCausalLM.from_config(text_config)
    state = {key: value for key, value in language_model.state_dict().items() if key != "lm_head.bias"}  # no bias there
    tower = AutoModel.from_config(vision_config)
    state.update({TOWER_PREFIX + key: value for key, value in tower.state_dict().items()})
    hidden = text_config.hidden_size
    state.update({
        "mm_projector.0.weight": torch.randn(hidden, vision_config.hidden_size) * 0.2,
        "mm_projector.0.bias": torch.randn(hidden) * 0.1,
        "mm_projector.2.weight": torch.randn(hidden, hidden) * 0.2, "mm_projector.2.bias": torch.randn(hidden) * 0.1,
        "align_indicators.indicator_embs": torch.randn(levels, hidden),
        "gated_weight_layer.mlp.0.weight": torch.randn(GATE, K) * 0.3,
        "gated_weight_layer.mlp.0.bias": torch.randn(GATE) * 0.1,
        "gated_weight_layer.mlp.2.weight": torch.randn(levels - 1, GATE) * 0.3,
        "gated_weight_layer.mlp.2.bias": torch.randn(levels - 1) * 0.1,
    })
    if edit is not None:
        edit(state)
    folder.mkdir(parents=True)
    torch.save({key: value.contiguous().clone() for key, value in state.items()}, folder / "pytorch_model.bin")
    tower.save_pretrained(folder / f"{vision_kind}-tower")
    config = {**legacy_config_fields(text_config), "model_type": layout, "vocab_size": VOCAB,
              "architectures": ["AlignGPTForCausalLM"], "mm_vision_tower": f"{vision_kind}-tower",
              "mm_hidden_size": vision_config.hidden_size, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "n_indicators": levels, "use_s2": False,
              "s2_scales": "336", **config_fields}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def family_reference(folder, model_type, ids, pixel_values, level=None):
    """The family's forward, computed from the checkpoint with transformers' plain classes: image features spliced at
    the -200 sentinel, the alignment vector inserted after the first token, the gate on the mean embedding of every
    other non-image token. Returns (logits [L, VOCAB], gate weights or None)."""
    family, vision_kind, _ = FAMILIES[model_type]
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    decoder = AutoModel.from_config(tiny_text_config(family, VOCAB))
    decoder.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    tower = AutoModel.from_config(tiny_vision_config(vision_kind))
    tower.load_state_dict({k[len(TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(TOWER_PREFIX)})
    with torch.no_grad():
        features = tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        features = features[0, 1:] if vision_kind == "clip" else features[0]  # CLIP drops CLS; SigLIP has none
        image = F.linear(F.gelu(F.linear(features, state["mm_projector.0.weight"], state["mm_projector.0.bias"])),
                         state["mm_projector.2.weight"], state["mm_projector.2.bias"])
        cut = ids.index(-200)
        rows = decoder.get_input_embeddings().weight  # transformers 4.40: unscaled rows, for Gemma too
        before, after = rows[torch.tensor(ids[:cut])], rows[torch.tensor(ids[cut + 1:])]
        table, weights = state["align_indicators.indicator_embs"], None
        if level is None:
            text = torch.cat([before, after])[1:]
            dots = image @ (text.sum(0) / (text.shape[0] + 1e-8))
            hidden = F.gelu(F.linear(dots, state["gated_weight_layer.mlp.0.weight"], state["gated_weight_layer.mlp.0.bias"]))
            weights = torch.softmax(F.linear(hidden, state["gated_weight_layer.mlp.2.weight"],
                                             state["gated_weight_layer.mlp.2.bias"]), -1)
            vector = table[-1] + weights @ table[:-1]
        else:
            vector = table[level]
        sequence = torch.cat([before[:1], vector[None], before[1:], image, after])
        if family == "gemma":  # transformers 4.40's GemmaModel scaled its whole input, not only the word rows
            sequence = sequence * torch.tensor(decoder.config.hidden_size ** 0.5)
        hidden_states = decoder(inputs_embeds=sequence[None]).last_hidden_state[0]
        head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
        return F.linear(hidden_states, head), weights


def our_ids(ids):
    """The same sample in this package's layout: `<align>` after the first token, K `<image>` for the sentinel."""
    cut = ids.index(-200)
    return torch.tensor([[ids[0], ALIGN_ID, *ids[1:cut], *[IMAGE_ID] * K, *ids[cut + 1:]]])


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(1, 3, 28, 28)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_checkpoint_converts_and_matches_the_family_forward(model_type, tmp_path, pixels):
    source = family_checkpoint(tmp_path / "source", model_type)
    result = convert_checkpoint(source, tmp_path / "out", progress=False)
    family, vision_kind, levels = FAMILIES[model_type]
    assert result.kind == "full" and not result.has_processor and any("no processor" in n for n in result.notes)
    model = AlignGPTForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    config = model.config
    assert (config.text_config.model_type, config.num_alignment_levels, config.image_seq_length) == (family, levels, K)
    assert config.vision_feature_select_strategy == ("full" if vision_kind == "siglip" else "default")
    assert (config.image_token_id, config.alignment_token_id, config.text_config.vocab_size) == (IMAGE_ID, ALIGN_ID,
                                                                                                  PADDED)
    model.config.gate_text_scope = "all"  # the family's gate averaged every text token, as at its inference
    for ids, level in ((STAGE2_IDS, None), (STAGE1_IDS, levels - 2)):
        expected_logits, expected_weights = family_reference(source, model_type, ids, pixels, level)
        levels_in = None if level is None else torch.tensor([level])
        with torch.no_grad():
            out = model(input_ids=our_ids(ids), pixel_values=pixels, alignment_levels=levels_in)
        assert (out.logits[0, :, :VOCAB] - expected_logits).abs().max().item() < ATOL, (model_type, level)
        if level is None:
            torch.testing.assert_close(out.alignment_weights[0], expected_weights, atol=ATOL, rtol=0)


def test_weights_are_bit_identical_and_the_tied_head_is_dropped(tmp_path):
    source = family_checkpoint(tmp_path / "source", "aligngpt_gemma")
    result = convert_checkpoint(source, tmp_path / "out", progress=False)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in ours and result.dropped["lm_head.weight"].startswith("LM head tied")
    assert torch.equal(ours["model.language_model.embed_tokens.weight"][:VOCAB], state["model.embed_tokens.weight"])
    assert torch.equal(ours["model.alignment.fc2.weight"], state["gated_weight_layer.mlp.2.weight"])
    assert torch.equal(ours["model.alignment.fc1.bias"], state["gated_weight_layer.mlp.0.bias"])
    hidden = ours["model.alignment.level_embeddings"].shape[1]  # Gemma: rescaled for today's scaled embeddings
    assert torch.equal(ours["model.alignment.level_embeddings"], state["align_indicators.indicator_embs"] * hidden ** 0.5)
    assert torch.equal(ours["model.alignment.fc1.weight"], state["gated_weight_layer.mlp.0.weight"] / hidden)
    assert torch.equal(ours["model.multi_modal_projector.linear_2.bias"], state["mm_projector.2.bias"] * hidden ** 0.5)
    assert torch.equal(ours["model.vision_tower.encoder.layers.0.mlp.fc1.weight"],
                       state[TOWER_PREFIX + "encoder.layers.0.mlp.fc1.weight"])
    model = AlignGPTForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    headless = family_checkpoint(tmp_path / "headless", "aligngpt_gemma", edit=lambda s: s.pop("lm_head.weight"))
    convert_checkpoint(headless, tmp_path / "headless-out", progress=False)  # transformers' own save leaves it out
    assert load_file(tmp_path / "headless-out" / "model.safetensors").keys() == ours.keys()
    phi = convert_checkpoint(family_checkpoint(tmp_path / "phi", "aligngpt_phi"), tmp_path / "phi-out", progress=False)
    phi_state = load_file(tmp_path / "phi-out" / "model.safetensors")
    assert {"model.language_model.final_layernorm.weight", "model.language_model.final_layernorm.bias",
            "lm_head.weight"} <= set(phi_state) and not phi.dropped


def test_family_stage1_projector_file_converts_to_a_stage1_artefact(tmp_path):
    source = family_checkpoint(tmp_path / "full", "aligngpt_phi")
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    torch.save({k: v for k, v in state.items() if k.startswith(("mm_projector.", "align_indicators."))},
               stage1 / "mm_projector_align.bin")
    (stage1 / "config.json").write_text((source / "config.json").read_text())
    (source / "siglip-tower").rename(stage1 / "siglip-tower")
    convert_checkpoint(stage1, tmp_path / "out", progress=False)
    assert is_stage1_artefact(tmp_path / "out")
    config, tensors = load_stage1_artefact(tmp_path / "out")
    assert (config.text_config.model_type, config.num_alignment_levels, config.image_seq_length) == ("phi", 5, K)
    assert torch.equal(tensors["model.alignment.level_embeddings"], state["align_indicators.indicator_embs"])


def test_siglip_so400m_named_by_a_training_machine_path_is_recognised(tmp_path):
    """The family's configs name the tower by a path on their machine; with the tower inside the checkpoint, the
    so400m-384 dimensions are known: 729 tokens, a 729-wide gate."""
    from aligngpt_hf.conversion.family import resolve_family_vision

    orig = {"mm_vision_tower": "/workspace/visual_tower/siglip-so400m-patch14-384"}
    vision, folder, settings = resolve_family_vision(orig, tmp_path, None, need_weights=False)
    assert (vision.model_type, vision.hidden_size, vision.image_size, vision.patch_size) == (
        "siglip_vision_model", 1152, 384, 14)
    assert folder is None and settings["size"] == {"height": 384, "width": 384} and settings["image_mean"] == [0.5] * 3


def test_which_configs_take_the_family_path():
    from aligngpt_hf.conversion.family import is_family_config

    vicuna = {"model_type": "aligngpt", "vocab_size": 32000, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    assert not is_family_config(vicuna) and not is_family_config({**vicuna, "n_indicators": 4, "use_s2": False})
    assert is_family_config({**vicuna, "vocab_size": 128256})  # LLaMA-3
    assert not is_family_config({**vicuna, "vocab_size": 300})  # the tiny original fixture
    assert is_family_config({**vicuna, "mm_vision_tower": "/data/siglip-so400m-patch14-384"})
    assert is_family_config({**vicuna, "use_s2": True}) and is_family_config({**vicuna, "model_type": "aligngpt_phi"})


# ---------------------------------------------------------------------------------------------------------------------
# Refusals


def test_s2_checkpoints_are_refused_before_anything_is_written(tmp_path):
    source = family_checkpoint(tmp_path / "s2", "aligngpt", use_s2=True, s2_scales="28,56", mm_hidden_size=64)
    with pytest.raises(ConversionError, match=r"uses S2 multi-scale vision features \(`use_s2: true`, `s2_scales: "
                                              r"'28,56'`: 2 scales concatenated into `mm_hidden_size: 64` channels\)\. "
                                              r"This package has no S2 vision path yet"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # OUTPUT is built in a staging folder and renamed only when complete
    wide = family_checkpoint(tmp_path / "wide", "aligngpt_mistral", mm_hidden_size=64)
    with pytest.raises(ConversionError, match=r"`mm_hidden_size` is 64, but the vision tower gives 32 channels"):
        convert_checkpoint(wide, tmp_path / "out2", progress=False)


def test_inconsistent_family_checkpoints_are_refused(tmp_path):
    levels = family_checkpoint(tmp_path / "a", "aligngpt_qwen2", n_indicators=6)
    with pytest.raises(ConversionError, match=r"config.json says `n_indicators: 6`, but `align_indicators\."
                                              r"indicator_embs` has 8 rows"):
        convert_checkpoint(levels, tmp_path / "a-out", progress=False)
    untied = family_checkpoint(tmp_path / "b", "aligngpt_gemma",
                               edit=lambda s: s.update({"lm_head.weight": torch.randn(VOCAB, 32)}))
    with pytest.raises(ConversionError, match=r"`lm_head.weight` differs from `model.embed_tokens.weight`"):
        convert_checkpoint(untied, tmp_path / "b-out", progress=False)
    biased = family_checkpoint(tmp_path / "c", "aligngpt_phi", edit=lambda s: s.update({"lm_head.bias": torch.zeros(VOCAB)}))
    with pytest.raises(ConversionError, match=r"Unknown key.*\n  lm_head\.bias"):
        convert_checkpoint(biased, tmp_path / "c-out", progress=False)
    unknown = family_checkpoint(tmp_path / "d", "aligngpt_mistral", model_type="aligngpt_falcon")
    with pytest.raises(ConversionError, match=r"Unknown AlignGPT model_type 'aligngpt_falcon'.*aligngpt_gemma"):
        convert_checkpoint(unknown, tmp_path / "d-out", progress=False)
    with pytest.raises(ConversionError, match=r"AlignGPT_family checkpoint \(aligngpt_mistral\): it was trained in "
                                             r"that code base's own conversation formats .* so no processor is written"):
        convert_checkpoint(family_checkpoint(tmp_path / "e", "aligngpt_mistral"), tmp_path / "e-out",
                           tokenizer=tmp_path, progress=False)


@pytest.mark.parametrize("variant, model_type, tower", [
    ("aligngpt-llama3-8b-instruct-siglip", "aligngpt", "/workspace/visual_tower/siglip-so400m-patch14-384"),
    ("aligngpt-gemma-7b", "aligngpt_gemma", "/workspace/visual_tower/clip-vit-large-patch14-336"),
    ("aligngpt-mistral-7b-instruct", "aligngpt_mistral", "/workspace/visual_tower/clip-vit-large-patch14-336"),
    ("aligngpt-phi-2", "aligngpt_phi", "/workspace/visual_tower/clip-vit-large-patch14-336"),
])
def test_a_full_size_family_config_converts_to_the_shipped_hub_config(variant, model_type, tower, tmp_path):
    """config.json as the follow-up wrote it (transformers 4.40 fields, its towers named by training-machine paths)
    -> the same config as hub_configs/<variant>: the converted checkpoints and the recipes' models agree."""
    from aligngpt_hf.conversion.family import build_family_config, resolve_family_vision
    from aligngpt_hf.conversion.weight_files import KeyIndex
    from aligngpt_hf.hub.hub_configs import family_config

    hub = family_config(variant)
    vocab = hub.image_token_id
    orig = {**legacy_config_fields(hub.text_config), "model_type": model_type, "vocab_size": vocab,
            "mm_vision_tower": tower, "mm_hidden_size": hub.vision_config.hidden_size, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "n_indicators": 8, "use_s2": False}
    if model_type == "aligngpt_gemma":
        orig.update(hidden_act="gelu", hidden_activation=None)  # google/gemma-7b's config.json
    shapes = KeyIndex()
    for key, shape in (("model.embed_tokens.weight", (vocab, hub.text_config.hidden_size)),
                       ("align_indicators.indicator_embs", (8, hub.text_config.hidden_size)),
                       ("gated_weight_layer.mlp.0.weight", (256, hub.image_seq_length))):
        shapes[key], shapes.dtypes[key] = shape, torch.bfloat16
    vision = resolve_family_vision(orig, tmp_path, None, need_weights=False)[0]
    converted = build_family_config(orig, vision, shapes, None, "full")
    assert converted.text_config.to_diff_dict() == hub.text_config.to_diff_dict()
    assert converted.vision_config.to_diff_dict() == hub.vision_config.to_diff_dict()
    for name in ("image_seq_length", "vision_feature_select_strategy", "image_token_id", "alignment_token_id",
                 "num_alignment_levels", "gate_hidden_size", "tie_word_embeddings"):
        assert getattr(converted, name) == getattr(hub, name), name

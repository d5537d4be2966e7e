"""Parity with the ORIGINAL AlignGPT implementation on its golden tiny fixtures (modeling_tests/fixtures).

The weights are loaded with a small key mapping written here (the converter issue has the full, strict one). Our
model keeps row order and never truncates, so outputs are compared row by row through `output_row_to_input_row`.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, LlamaConfig

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration
from conftest import ORIGINAL_FIXTURES

ORIGINAL_VOCAB, IMAGE_ID, ALIGN_ID, TOKENS_PER_IMAGE, SENTINEL = 300, 300, 301, 4, -200
KEY_MAP = [  # (original prefix, our prefix)
    ("model.", "model.language_model."),
    ("mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("align_indicators.indicator_embs", "model.alignment.level_embeddings"),
    ("gated_weight_layer.mlp.0.", "model.alignment.fc1."),
    ("gated_weight_layer.mlp.2.", "model.alignment.fc2."),
    ("lm_head.", "lm_head."),
]


def load_original_model() -> AlignGPTForConditionalGeneration:
    source = ORIGINAL_FIXTURES / "original_checkpoint"
    original = json.loads((source / "config.json").read_text())
    text = LlamaConfig(
        vocab_size=ORIGINAL_VOCAB + 2, **{key: original[key] for key in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")},
    )
    vision = CLIPVisionConfig.from_pretrained(source / "vision_tower")
    config = AlignGPTConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, alignment_token_id=ALIGN_ID)
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(config).eval()
    state = model.state_dict()
    weights = torch.load(source / "pytorch_model.bin", weights_only=True)
    vision_weights = torch.load(source / "vision_tower" / "pytorch_model.bin", weights_only=True)
    loaded = {}
    for key, tensor in weights.items():
        if "rotary_emb.inv_freq" in key or key.startswith("vision_tower."):
            continue  # derived buffers; vision comes from mm_vision_tower, as the original loads it
        prefix, target = next((p, t) for p, t in KEY_MAP if key.startswith(p))
        loaded[target + key[len(prefix):]] = tensor
    for key, tensor in vision_weights.items():
        if not key.endswith("position_ids"):
            loaded["model.vision_tower." + key.removeprefix("vision_model.")] = tensor
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):  # keep the 2 new rows
        loaded[key] = torch.cat([loaded[key], state[key][ORIGINAL_VOCAB:]])
    assert set(loaded) == set(state), set(loaded) ^ set(state)
    model.load_state_dict(loaded)
    return model


def expand_inputs(input_ids, attention_mask, labels=None):
    """Original inputs (-200 sentinel) -> ours: K `<image>` tokens, `<align>` right after BOS, right padding."""
    rows, label_rows = [], []
    for b in range(input_ids.shape[0]):
        valid = attention_mask[b].bool()
        ids = input_ids[b][valid].tolist()
        labs = labels[b][valid].tolist() if labels is not None else [-100] * len(ids)
        out, out_labels = [], []
        for j, (token, label) in enumerate(zip(ids, labs)):
            if token == SENTINEL:
                out += [IMAGE_ID] * TOKENS_PER_IMAGE
                out_labels += [-100] * TOKENS_PER_IMAGE
            else:
                out.append(token)
                out_labels.append(label)
            if j == 0 and SENTINEL in ids:
                out.append(ALIGN_ID)
                out_labels.append(-100)
        rows.append(out)
        label_rows.append(out_labels)
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labs = torch.tensor([r + [-100] * (length - len(r)) for r in label_rows])
    image_rows = [SENTINEL in input_ids[b][attention_mask[b].bool()].tolist() for b in range(input_ids.shape[0])]
    return ids, mask, labs, torch.tensor(image_rows)


@pytest.fixture(scope="module")
def cases():
    meta = json.loads((ORIGINAL_FIXTURES / "cases.json").read_text())["cases"]
    return meta, load_file(ORIGINAL_FIXTURES / "cases.safetensors")


@pytest.fixture(scope="module")
def original_model():
    return load_original_model()


def run_case(model, meta, tensors, name, with_labels=False, levels=None):
    inputs = meta[name]["inputs"]
    ids, mask, labels, image_rows = expand_inputs(
        tensors[inputs["input_ids"]], tensors[inputs["attention_mask"]],
        tensors[inputs["labels"]] if with_labels else None,
    )
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=tensors[inputs["images"]][image_rows],
                        labels=labels if with_labels else None, alignment_levels=levels)
    finally:
        hook.remove()
    out.loss = original_vocab_loss(out, labels) if with_labels else None
    return out, captured["embeds"], image_rows


def original_vocab_loss(out, labels):
    """HF causal-LM loss over the original vocabulary (the 2 added rows are not part of the original softmax)."""
    logits = out.logits[:, :-1, :ORIGINAL_VOCAB].reshape(-1, ORIGINAL_VOCAB)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100).item()


def compare_logits(out, meta, tensors, name):
    expected = meta[name]["expected"]
    logits, valid_mask = tensors[expected["logits"]], tensors[expected["llm_attention_mask"]]
    worst = 0.0
    for out_row, in_row in enumerate(meta[name]["output_row_to_input_row"]):
        valid = int(valid_mask[out_row].sum())
        diff = (out.logits[in_row, :valid, :ORIGINAL_VOCAB] - logits[out_row, :valid]).abs().max().item()
        worst = max(worst, diff)
    assert worst < 1e-5, f"{name}: max |logit diff| {worst:.2e}"
    return worst


def image_rows_in_output_order(meta, name, image_rows):
    return [row for row in meta[name]["output_row_to_input_row"] if image_rows[row]]


@pytest.mark.parametrize("name", ["inference_batch2", "finetune_mixed", "finetune_text_only"])
def test_gated_cases_match_original(original_model, cases, name):
    meta, tensors = cases
    model = original_model
    model.config.gate_text_scope = "all"  # the original training gate averaged answers too
    with_labels = "labels" in meta[name]["inputs"]
    out, embeds, image_rows = run_case(model, meta, tensors, name, with_labels=with_labels)
    compare_logits(out, meta, tensors, name)
    expected = meta[name]["expected"]
    if with_labels:
        assert abs(out.loss - expected["loss"]) < 1e-5
    rows = image_rows_in_output_order(meta, name, image_rows)
    if rows:
        torch.testing.assert_close(out.alignment_weights[rows], tensors[expected["gate_scores"]], atol=1e-5, rtol=0)
        torch.testing.assert_close(embeds[rows, 1], tensors[expected["indicator_vectors"]], atol=1e-5, rtol=0)
    model.config.gate_text_scope = "prompt"


def test_pretrain_level_case_matches_original(original_model, cases):
    meta, tensors = cases
    levels = tensors[meta["pretrain_batch2"]["inputs"]["align_ids"]]
    out, embeds, _ = run_case(original_model, meta, tensors, "pretrain_batch2", with_labels=True, levels=levels)
    compare_logits(out, meta, tensors, "pretrain_batch2")
    assert abs(out.loss - meta["pretrain_batch2"]["expected"]["loss"]) < 1e-5
    expected_vectors = tensors[meta["pretrain_batch2"]["expected"]["indicator_vectors"]]
    torch.testing.assert_close(embeds[:, 1], expected_vectors, atol=1e-6, rtol=0)


def test_greedy_generation_matches_original(original_model, cases):
    meta, tensors = cases
    inputs = meta["generate_greedy"]["inputs"]
    raw_ids = tensors[inputs["input_ids"]]
    ids, mask, _, _ = expand_inputs(raw_ids, torch.ones_like(raw_ids))
    generated = original_model.generate(input_ids=ids, attention_mask=mask, pixel_values=tensors[inputs["images"]],
                                        max_new_tokens=5, do_sample=False, output_scores=True,
                                        return_dict_in_generate=True)
    assert generated.sequences[0, ids.shape[1]:].tolist() == meta["generate_greedy"]["expected"]["new_token_ids"]
    scores = torch.cat(generated.scores)[:, :ORIGINAL_VOCAB]
    torch.testing.assert_close(scores, tensors[meta["generate_greedy"]["expected"]["step_scores"]], atol=1e-4,
                               rtol=1e-4)

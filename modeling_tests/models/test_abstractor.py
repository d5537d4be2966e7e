"""The mPLUG-Owl visual abstractor projector: exact output, token counts, init, remote-code reload."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.functional import layer_norm, silu

from aligngpt_hf.tiny import build_processor
from conftest import package_free_env, user_message

ABSTRACTOR = dict(projector_type="abstractor", abstractor_num_queries=6, abstractor_num_layers=2,
                  abstractor_num_heads=4, abstractor_intermediate_size=48, vision_feature_layer=-1,
                  vision_feature_select_strategy="full", vision_feature_post_layernorm=True)


def reference_abstractor(abstractor, visual):
    """The mPLUG-Owl v1 abstractor (paper §3.1) written out with plain matrix products and an explicit softmax."""
    queries = abstractor.query_tokens.expand(visual.shape[0], -1, -1)
    for layer in abstractor.layers:
        normed = layer_norm(queries, queries.shape[-1:], layer.norm_queries.weight, layer.norm_queries.bias, 1e-5)
        visual_normed = layer_norm(visual, visual.shape[-1:], layer.norm_visual.weight, layer.norm_visual.bias, 1e-5)
        keys_values = torch.cat([normed, visual_normed], dim=1)
        heads, width = layer.num_heads, normed.shape[-1]

        def split(x, heads=heads, width=width):
            return x.view(x.shape[0], x.shape[1], heads, width // heads).transpose(1, 2)

        q = split(normed @ layer.q_proj.weight.T + layer.q_proj.bias)
        k = split(keys_values @ layer.k_proj.weight.T + layer.k_proj.bias)
        v = split(keys_values @ layer.v_proj.weight.T + layer.v_proj.bias)
        probabilities = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        attended = (probabilities @ v).transpose(1, 2).reshape(normed.shape)
        hidden = normed + attended @ layer.o_proj.weight.T + layer.o_proj.bias
        ffn = layer_norm(hidden, hidden.shape[-1:], layer.norm_ffn.weight, layer.norm_ffn.bias, 1e-5)
        inner = silu(ffn @ layer.gate_proj.weight.T + layer.gate_proj.bias) * (ffn @ layer.up_proj.weight.T
                                                                              + layer.up_proj.bias)
        inner = layer_norm(inner, inner.shape[-1:], layer.norm_inner.weight, layer.norm_inner.bias, 1e-6)
        queries = hidden + inner @ layer.down_proj.weight.T + layer.down_proj.bias
    projected = queries @ abstractor.linear_out.weight.T + abstractor.linear_out.bias
    return torch.cat([projected, abstractor.end_of_image.expand(visual.shape[0], 1, -1)], dim=1)


def test_abstractor_matches_independent_computation(make_model):
    model = make_model(**ABSTRACTOR)
    with torch.no_grad():  # non-trivial norms, so a swapped LayerNorm would show
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        visual = model.model.vision_tower.post_layernorm(hidden)  # CLS kept, post-LN on all 17 tokens
        expected = reference_abstractor(model.model.multi_modal_projector, visual)
        features = torch.stack(model.model.get_image_features(pixels).pooler_output)
    assert features.shape == (3, 7, 32)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_token_counts_through_processor_and_model(make_model, tokenizer, images):
    model = make_model(**ABSTRACTOR)
    assert model.config.image_seq_length == 7 and model.model.alignment.fc1.in_features == 7
    assert model.config.num_vision_feature_tokens == 17  # 16 patches + CLS
    processor = build_processor(tokenizer, image_seq_length=model.config.image_seq_length)
    prompts = [processor.apply_chat_template(user_message("Q?", num_images=n), add_generation_prompt=True)
               for n in (1, 2)]
    batch = processor(text=prompts, images=[[images[0]], images[1:]], padding=True, return_tensors="pt")
    assert (batch["input_ids"] == processor.image_token_id).sum(-1).tolist() == [7, 14]
    with torch.no_grad():
        out = model(**batch)
    assert out.image_hidden_states.shape == (3, 7, 32) and out.alignment_weights.shape == (2, 7)
    with pytest.raises(ValueError, match=r"`image_seq_length=16` disagrees with the model: 6 abstractor queries \+ 1"):
        make_model(image_seq_length=16, **ABSTRACTOR)


def test_queries_are_distinct_and_random_after_init(make_model):
    abstractor = make_model(**ABSTRACTOR).model.multi_modal_projector
    queries = abstractor.query_tokens
    assert torch.cdist(queries, queries).add(torch.eye(len(queries)) * 1e9).min() > 0
    assert 0.005 < queries.std().item() < 0.05 and abstractor.end_of_image.abs().sum() > 0


CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["aligngpt_hf"] = None
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText
    folder, inputs, outputs = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model.model.multi_modal_projector).__name__ == "AlignGPTVisualAbstractor"
    with torch.no_grad():
        save_file({"logits": model(**load_file(inputs)).logits}, outputs)
    """
)


def test_save_and_remote_code_reload_give_identical_outputs(make_model, tokenizer, images, tmp_path):
    model = make_model(**ABSTRACTOR)
    processor = build_processor(tokenizer, image_seq_length=7)
    model.save_pretrained(tmp_path / "owl")
    assert (tmp_path / "owl" / "abstractor_aligngpt.py").is_file()
    prompt = processor.apply_chat_template(user_message("Q?"), add_generation_prompt=True)
    batch = processor(text=[prompt], images=[images[0]], return_tensors="pt")
    save_file(dict(batch), tmp_path / "inputs.safetensors")
    env = package_free_env(tmp_path / "home")
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "owl"), str(tmp_path / "inputs.safetensors"),
                             str(tmp_path / "outputs.safetensors")], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():  # another process may run another thread count: same weights, last-bit reduction order
        torch.testing.assert_close(load_file(tmp_path / "outputs.safetensors")["logits"], model(**batch).logits,
                                   rtol=0, atol=1e-6)

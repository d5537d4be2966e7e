"""AlignGPT forward semantics against an independent per-sample computation written from the paper's equations."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from aligngpt_hf import AlignGPTForConditionalGeneration
from conftest import user_message


def reference_forward(model, input_ids, attention_mask, pixel_values, levels=None, gate_text_mask=None):
    """Per-sample, loop-based reimplementation of the paper's equations (deliberately unlike the vectorised model code)."""
    config, base = model.config, model.model
    embed = base.get_input_embeddings()
    image_id, align_id, tokens_per_image = config.image_token_id, config.alignment_token_id, config.image_seq_length
    features = []
    for pixels in pixel_values if pixel_values is not None else []:
        hidden = base.vision_tower(pixels[None], output_hidden_states=True).hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        features.append(base.multi_modal_projector(hidden)[0])
    feature_iter = iter(features)
    rows, all_weights = [], []
    for b in range(input_ids.shape[0]):
        ids, mask = input_ids[b].tolist(), attention_mask[b].tolist()
        row_images = [next(feature_iter) for _ in range(ids.count(image_id) // tokens_per_image)]
        vector, weights = None, torch.full((config.num_alignment_levels - 1,), float("nan"))
        if row_images and config.alignment_mode != "none":
            vector, weights = reference_alignment_vector(model, b, ids, mask, row_images, levels, gate_text_mask)
        all_weights.append(weights)
        image_rows = [token for image in row_images for token in image]
        row = []
        for token in ids:
            if token == image_id:
                row.append(image_rows.pop(0))
            elif token == align_id:
                row.append(vector)
            else:
                row.append(embed.weight[token])
        rows.append(torch.stack(row))
    positions = torch.tensor([[max(sum(m[: j + 1]) - 1, 0) if m[j] else 0 for j in range(len(m))]
                              for m in attention_mask.tolist()])
    hidden = base.language_model(inputs_embeds=torch.stack(rows), attention_mask=attention_mask,
                                 position_ids=positions).last_hidden_state
    return model.lm_head(hidden), torch.stack(all_weights)


def reference_alignment_vector(model, b, ids, mask, row_images, levels, gate_text_mask):
    config, table = model.config, model.model.alignment.level_embeddings
    embed = model.model.get_input_embeddings()
    if levels is not None:
        return table[int(levels[b])], torch.full((config.num_alignment_levels - 1,), float("nan"))
    mode = config.alignment_mode
    if mode == "global":
        return table[-1], torch.full((config.num_alignment_levels - 1,), float("nan"))
    if mode == "mean":
        return table[-1] + table[:-1].sum(0) / (config.num_alignment_levels - 1), torch.full((7,), float("nan"))
    text = []
    for j, token in enumerate(ids):
        is_bos_before_align = j + 1 < len(ids) and ids[j + 1] == config.alignment_token_id
        allowed = gate_text_mask is None or bool(gate_text_mask[b, j])
        if mask[j] and token not in (config.image_token_id, config.alignment_token_id) and not is_bos_before_align \
                and allowed:
            text.append(embed.weight[token])
    mean_text = torch.stack(text).sum(0) / (len(text) + 1e-8)
    dots = torch.stack([image @ mean_text for image in row_images]).mean(0)
    gate = model.model.alignment
    weights = torch.softmax(gate.fc2(torch.nn.functional.gelu(gate.fc1(dots))), dim=-1)
    local = sum(weights[k] * table[k] for k in range(config.num_alignment_levels - 1))
    return (local if mode == "local" else table[-1] + local), weights


def mixed_batch(processor, images, padding_side="right"):
    """Row 0: one image; row 1: two images, multi-turn; row 2: text only."""
    conversations = [
        user_message("What colour is the shape?"),
        user_message("Compare the two pictures.", num_images=2)
        + [{"role": "assistant", "content": "They differ."}, {"role": "user", "content": "How?"}],
        user_message("Tell me a joke.", num_images=0),
    ]
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    return processor(text=prompts, images=[[images[0]], images[1:3], []], padding=True, padding_side=padding_side,
                     return_tensors="pt")


def assert_matches_reference(model, batch, levels=None, gate_text_mask=None):
    with torch.no_grad():
        out = model(**batch, alignment_levels=levels, gate_text_mask=gate_text_mask)
        expected_logits, expected_weights = reference_forward(
            model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], levels, gate_text_mask
        )
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], expected_logits[valid], atol=1e-6, rtol=1e-6)
    return out, expected_weights


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_adaptive_forward_matches_reference(make_model, processor, images, padding_side):
    model = make_model()
    batch = mixed_batch(processor, images, padding_side)
    out, expected_weights = assert_matches_reference(model, batch)
    assert out.alignment_weights.shape == (3, 7)
    torch.testing.assert_close(out.alignment_weights[:2], expected_weights[:2], atol=1e-6, rtol=1e-6)
    assert torch.isnan(out.alignment_weights[2]).all()  # text-only row: no gate
    torch.testing.assert_close(out.alignment_weights[:2].sum(-1), torch.ones(2))
    align_id = model.config.alignment_token_id
    assert (batch["input_ids"] == align_id).sum(-1).tolist() == [1, 1, 0]


def test_padding_side_does_not_change_valid_logits(make_model, processor, images):
    model = make_model()
    right, left = mixed_batch(processor, images, "right"), mixed_batch(processor, images, "left")
    with torch.no_grad():
        right_out, left_out = model(**right), model(**left)
    for row in range(3):
        torch.testing.assert_close(right_out.logits[row][right["attention_mask"][row].bool()],
                                   left_out.logits[row][left["attention_mask"][row].bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right_out.alignment_weights, left_out.alignment_weights, equal_nan=True)


@pytest.mark.parametrize("mode", ["global", "local", "mean"])
def test_ablation_modes_match_reference(make_model, processor, images, mode):
    model = make_model(alignment_mode=mode)
    assert hasattr(model.model.alignment, "fc1") == (mode == "local")
    out, expected_weights = assert_matches_reference(model, mixed_batch(processor, images))
    if mode == "local":
        torch.testing.assert_close(out.alignment_weights[:2], expected_weights[:2], atol=1e-6, rtol=1e-6)
    else:
        assert out.alignment_weights is None


def test_level_mode_uses_table_rows(make_model, processor, images):
    model = make_model()
    levels = torch.tensor([3, 7, -1])  # the text-only row's level is ignored
    out, _ = assert_matches_reference(model, mixed_batch(processor, images), levels=levels)
    assert out.alignment_weights is None


def test_gate_text_mask_from_labels_excludes_answers(make_model, processor, images):
    conversation = user_message("What colour is the shape?") + [{"role": "assistant", "content": "Red."}]
    batch = processor.apply_chat_template(
        [conversation], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        processor_kwargs={"images": [[images[0]]]}, return_tensors="pt",
    )
    assistant = batch.pop("assistant_masks").bool()
    labels = batch["input_ids"].masked_fill(~assistant, -100)
    model = make_model()
    with torch.no_grad():
        prompt_scope = model(**batch, labels=labels).alignment_weights
        all_scope = model(**batch).alignment_weights
        _, expected_prompt = reference_forward(model, batch["input_ids"], batch["attention_mask"],
                                               batch["pixel_values"], gate_text_mask=labels == -100)
    torch.testing.assert_close(prompt_scope, expected_prompt, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(prompt_scope, all_scope)
    model.config.gate_text_scope = "all"
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, labels=labels).alignment_weights, all_scope)


def test_mode_none_reproduces_llava(make_model, tokenizer, images):
    from aligngpt_hf.tiny import build_processor

    model = make_model(alignment_mode="none")
    assert not hasattr(model.model, "alignment")
    processor = build_processor(tokenizer, add_alignment_token=False)
    prompts = [processor.apply_chat_template(user_message(q), add_generation_prompt=True) for q in ("Hi?", "What?")]
    batch = processor(text=prompts, images=images[:2], padding=True, return_tensors="pt")
    config = model.config
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id, image_seq_length=config.image_seq_length,
        vision_feature_layer=config.vision_feature_layer, vision_feature_select_strategy="default",
    )).eval()
    missing, unexpected = llava.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    with torch.no_grad():
        ours, theirs = model(**batch).logits, llava(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-6, rtol=1e-6)


def test_placeholder_feature_mismatch_is_loud(make_model, processor, images):
    model = make_model()
    batch = mixed_batch(processor, images)
    with pytest.raises(ValueError, match=r"the batch has 48 `<image>` tokens \(per sample: \[16, 32, 0\]\) but 2 "
                                         r"images x 16 tokens = 32 features"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:2]})
    truncated = {**batch, "input_ids": batch["input_ids"].clone()}
    truncated["input_ids"][0, (truncated["input_ids"][0] == model.config.image_token_id).nonzero()[0]] = 7
    with pytest.raises(ValueError, match=r"Samples \[0\] hold a partial image"):
        model(**truncated)


def test_alignment_token_errors_name_the_sample(make_model, processor, images):
    model = make_model()
    batch = mixed_batch(processor, images)
    align_id, pad_id = model.config.alignment_token_id, processor.tokenizer.pad_token_id
    no_align = batch["input_ids"].clone()
    no_align[1][no_align[1] == align_id] = 7
    with pytest.raises(ValueError, match=r"^Sample 1 has an image but no `<align>` token"):
        model(**{**batch, "input_ids": no_align})
    stray = batch["input_ids"].clone()
    stray[2, 3] = align_id
    with pytest.raises(ValueError, match=r"^Sample 2 has an `<align>` token but no image"):
        model(**{**batch, "input_ids": stray})
    with pytest.raises(ValueError, match=r"Samples \[0, 1\] contain `<image>` tokens but no `pixel_values`"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match=r"^Sample 1 has alignment level 8, outside 0\.\.7"):
        model(**batch, alignment_levels=torch.tensor([0, 8, 0]))
    assert pad_id is not None


def test_remaining_placeholder_errors(make_model, processor, images):
    model = make_model()
    batch = mixed_batch(processor, images)
    twice = batch["input_ids"].clone()
    twice[0, 3] = model.config.alignment_token_id
    with pytest.raises(ValueError, match=r"^Sample 0 has 2 `<align>` tokens; exactly one is expected\.$"):
        model(**{**batch, "input_ids": twice})
    with pytest.raises(ValueError, match=r"^`alignment_levels` has 2 entries for a batch of 3 samples\.$"):
        model(**batch, alignment_levels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^`alignment_mode='none'` takes no `<align>` token, but the input has one"):
        make_model(alignment_mode="none")(**batch)


@pytest.mark.parametrize("levels", [None, torch.tensor([5, 0, 3])])
def test_text_only_row_first_keeps_alignment_vectors_on_their_rows(make_model, processor, images, levels):
    """ALIGN vectors are gathered for image rows only; a leading text-only row must not shift them."""
    model = make_model()
    batch = mixed_batch(processor, images)
    order = torch.tensor([2, 0, 1])
    reordered = {"input_ids": batch["input_ids"][order], "attention_mask": batch["attention_mask"][order],
                 "pixel_values": batch["pixel_values"]}
    out, expected_weights = assert_matches_reference(model, reordered, levels=levels)
    if levels is None:
        torch.testing.assert_close(out.alignment_weights, expected_weights, atol=1e-6, rtol=1e-6, equal_nan=True)


HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_assert_async"}


def count_host_syncs(monkeypatch, function) -> int:
    """Ops that make a GPU step wait for the device: scalar reads, data-dependent shapes, `tolist`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"syncs": 0}
    tolist = torch.Tensor.tolist

    def counting_tolist(tensor):
        counts["syncs"] += 1
        return tolist(tensor)

    class CountSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            unsized_repeat = name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
            counts["syncs"] += name in HOST_SYNC_OPS or unsized_repeat
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    with CountSyncs():
        function()
    monkeypatch.undo()
    return counts["syncs"]


def llava_twin(model, processor, images):
    """transformers' LLaVA with `model`'s weights (mode `none`), and a two-image batch for it."""
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=model.config.vision_config.to_dict(), text_config=model.config.text_config.to_dict(),
        image_token_id=model.config.image_token_id, image_seq_length=model.config.image_seq_length,
        vision_feature_layer=model.config.vision_feature_layer)).eval()
    llava.load_state_dict(model.state_dict(), strict=False)
    llava_processor = processor.__class__(processor.image_processor, processor.tokenizer, add_alignment_token=False,
                                          image_seq_length=model.config.image_seq_length)
    conversation = processor.apply_chat_template(user_message("Describe it."), add_generation_prompt=True)
    return llava, llava_processor(text=[conversation] * 2, images=[[images[0]], [images[1]]], return_tensors="pt")


def test_forward_waits_on_the_host_no_more_often_than_llava(make_model, processor, images, monkeypatch):
    """All placeholder/level checks share one device-to-host copy, so a GPU step stalls no more than LLaVA's."""
    llava, llava_inputs = llava_twin(make_model(alignment_mode="none"), processor, images)
    batch, aligngpt = mixed_batch(processor, images), make_model()
    with torch.no_grad():
        llava_syncs = count_host_syncs(monkeypatch, lambda: llava(**llava_inputs))
        gate_syncs = count_host_syncs(monkeypatch, lambda: aligngpt(**batch))
        level_syncs = count_host_syncs(monkeypatch, lambda: aligngpt(**batch, alignment_levels=[1, 2, 3]))
    assert gate_syncs <= llava_syncs and level_syncs <= llava_syncs, (gate_syncs, level_syncs, llava_syncs)


def decoding_step(model, inputs):
    """Prefill with a cache, then the one-token step `generate` makes next (cache under this transformers' name)."""
    prefill = model(**inputs, use_cache=True)
    cache_name = "cache" if "cache" in prefill else "past_key_values"
    next_token = prefill.logits[:, -1:].argmax(-1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=-1)
    return lambda: model(input_ids=next_token, attention_mask=mask, use_cache=True, **{cache_name: prefill[cache_name]})


def test_decoding_step_waits_on_the_host_no_more_often_than_llava(make_model, processor, images, monkeypatch):
    """Decoding steps skip the placeholder checks (generate suppresses both ids), so they never sync more than LLaVA."""
    llava, llava_inputs = llava_twin(make_model(alignment_mode="none"), processor, images)
    aligngpt, batch = make_model(), processor(
        text=[processor.apply_chat_template(user_message("Describe it."), add_generation_prompt=True)] * 2,
        images=[[images[0]], [images[1]]], return_tensors="pt")
    with torch.no_grad():
        llava_syncs = count_host_syncs(monkeypatch, decoding_step(llava, llava_inputs))
        aligngpt_syncs = count_host_syncs(monkeypatch, decoding_step(aligngpt, batch))
    assert aligngpt_syncs <= llava_syncs, (aligngpt_syncs, llava_syncs)


def test_any_dtype_casts_vision_output_to_llm_dtype(make_model, processor, images):
    model = make_model()
    model.model.vision_tower.to(torch.float64)
    batch = mixed_batch(processor, images)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    bf16 = make_model().to(torch.bfloat16)
    with torch.no_grad():
        out = bf16(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_sdpa_is_default_and_eager_agrees(make_model, tokenizer, processor, images):
    from aligngpt_hf import AlignGPTForConditionalGeneration
    from aligngpt_hf.tiny import build_config

    model = make_model()
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    eager = AlignGPTForConditionalGeneration._from_config(build_config(tokenizer), attn_implementation="eager").eval()
    assert eager.config.text_config._attn_implementation == "eager"
    eager.load_state_dict(model.state_dict())
    batch = mixed_batch(processor, images)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, eager(**batch).logits, atol=1e-5, rtol=1e-5)


def test_loading_without_weights_initialises_the_vision_tower_as_clip_does(make_model):
    """`from_pretrained(..., state_dict={})` (every weight missing) must give CLIP's own init, not the generic std 0.02
    transformers' custom-code guard used to leave on the tower's attention and MLP layers."""
    config = make_model().config
    loaded = AlignGPTForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    attention = loaded.model.vision_tower.encoder.layers[0].self_attn
    vision = config.vision_config
    expected = vision.hidden_size**-0.5 * (2 * vision.num_hidden_layers) ** -0.5 * vision.initializer_factor
    assert attention.q_proj.weight.std().item() == pytest.approx(expected, rel=0.25)
    assert abs(attention.q_proj.weight.std().item() - 0.02) > 0.01

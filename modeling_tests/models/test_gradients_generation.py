"""Which parameters learn in each stage, and generation (image-free static graphs: training/test_static_graph.py)."""

from __future__ import annotations

import torch

from conftest import user_message

STAGE1_TRAINABLE = ("model.multi_modal_projector.", "model.alignment.level_embeddings")


def freeze_for_stage(model, stage: int) -> None:
    for name, param in model.named_parameters():
        if stage == 1:
            param.requires_grad = name.startswith(STAGE1_TRAINABLE)
        else:
            param.requires_grad = not name.startswith(("model.vision_tower.", "model.alignment.level_embeddings"))


def caption_batch(processor, images):
    prompts = [processor.tokenizer.bos_token + "<image>a red square\n", processor.tokenizer.bos_token + "<image>green"]
    batch = processor(text=prompts, images=images[:2], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[(labels == processor.image_token_id) | (labels == processor.alignment_token_id)] = -100
    return batch, labels


def chat_batch(processor, images):
    conversations = [user_message(q) + [{"role": "assistant", "content": a}]
                     for q, a in (("What colour is it?", "Red."), ("And the shape?", "A square."))]
    batch = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt",
        processor_kwargs={"images": [[images[0]], [images[1]]], "padding": True},
    )
    labels = batch["input_ids"].masked_fill(batch.pop("assistant_masks") == 0, -100)
    return batch, labels


def test_stage1_only_projector_and_level_table_get_gradients(make_model, processor, images):
    model = make_model().train()
    freeze_for_stage(model, 1)
    batch, labels = caption_batch(processor, images)
    model(**batch, labels=labels, alignment_levels=torch.tensor([2, 6])).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, _ in model.named_parameters() if name.startswith(STAGE1_TRAINABLE)}
    table_grad = model.model.alignment.level_embeddings.grad
    assert table_grad[[2, 6]].abs().sum(-1).gt(0).all()  # the rows of the given levels learn
    assert table_grad[[0, 1, 3, 4, 5, 7]].abs().sum() == 0  # the others do not


def test_stage2_leaves_table_and_vision_untouched(make_model, processor, images):
    model = make_model().train()
    freeze_for_stage(model, 2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch, labels = chat_batch(processor, images)
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    frozen = {name for name in before if name.startswith(("model.vision_tower.", "model.alignment.level_embeddings"))}
    assert not changed & frozen
    assert {"model.alignment.fc1.weight", "model.alignment.fc2.weight", "model.multi_modal_projector.linear_1.weight",
            "model.language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight"} <= changed


def generation_prompts(processor, images):
    questions = ["What colour is the shape?", "Describe the picture in a few words please.", "Count them."]
    prompts = [processor.apply_chat_template(user_message(q, num_images=int(i < 2)), add_generation_prompt=True)
               for i, q in enumerate(questions)]
    return prompts, [[images[0]], [images[1]], []]


def test_batched_left_padded_generation_equals_one_by_one(make_model, processor, images):
    model = make_model(seed=3)
    prompts, image_lists = generation_prompts(processor, images)
    batch = processor(text=prompts, images=image_lists, padding=True, padding_side="left", return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    prompt_length = batch["input_ids"].shape[1]
    assert torch.equal(generated[:, :prompt_length], batch["input_ids"])  # prompt + new tokens, like HF
    for row, (prompt, row_images) in enumerate(zip(prompts, image_lists)):
        single = processor(text=[prompt], images=row_images or None, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert alone[0, single["input_ids"].shape[1]:].tolist() == generated[row, prompt_length:].tolist()


def test_cache_on_and_off_agree_and_special_tokens_are_suppressed(make_model, processor, images):
    model = make_model(seed=4)
    # make <image>/<align> the most likely next tokens: generation must still never emit them
    with torch.no_grad():
        model.lm_head.weight[model.config.image_token_id] = model.lm_head.weight.abs().max() * 50
    prompts, image_lists = generation_prompts(processor, images)
    batch = processor(text=prompts[:2], images=image_lists[:2], padding=True, padding_side="left",
                      return_tensors="pt")
    cached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    new_tokens = cached[:, batch["input_ids"].shape[1]:]
    assert not torch.isin(new_tokens, torch.tensor([processor.image_token_id, processor.alignment_token_id])).any()
    assert model.generation_config.suppress_tokens == sorted([processor.image_token_id, processor.alignment_token_id])


def test_alignment_computed_once_at_prefill(make_model, processor, images):
    model = make_model(seed=5)
    calls = []
    model.model.alignment.register_forward_pre_hook(lambda *args: calls.append("alignment"))
    original_gate = model.model.alignment.gate

    def counting_gate(dots):
        calls.append(dots.shape)
        return original_gate(dots)

    model.model.alignment.gate = counting_gate
    prompts, image_lists = generation_prompts(processor, images)
    batch = processor(text=prompts[:1], images=image_lists[:1], return_tensors="pt")
    model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert calls == ["alignment", torch.Size([1, 16])]  # the module runs once, at prefill; no decoding step calls it


def test_gradient_checkpointing_matches_plain_backward(make_model, processor, images):
    batch, labels = caption_batch(processor, images)
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch, labels=labels).loss.backward()
        grads.append(model.model.multi_modal_projector.linear_1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])

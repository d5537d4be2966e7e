"""Image-free training batches reach every trainable (or ZeRO-3-partitioned) module, in the image batches' order.

The trainers attach `aligngpt_hf.training.static_graph.attach_static_graph`; the model itself stays LLaVA's forward.
"""

from __future__ import annotations

import torch

from aligngpt_hf.training.static_graph import attach_static_graph
from conftest import user_message

ABSTRACTOR = dict(projector_type="abstractor", abstractor_num_queries=6, abstractor_num_layers=2,
                  abstractor_num_heads=4, abstractor_intermediate_size=48, vision_feature_layer=-1,
                  vision_feature_select_strategy="full", vision_feature_post_layernorm=True)


def freeze_for_stage2(model) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = not name.startswith(("model.vision_tower.", "model.alignment.level_embeddings"))


def test_text_only_batch_without_the_hooks_leaves_the_gate_out_of_the_graph(make_model, processor):
    """Why the hooks exist: a plain model's image-free step gives the gate no gradient (DDP would stop there)."""
    model = make_model().train()
    batch = processor(text=["<s>just text"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert model.model.alignment.fc1.weight.grad is None


def test_text_only_training_batch_keeps_graph_static(make_model, processor):
    model = make_model().train()
    freeze_for_stage2(model)
    attach_static_graph(model)
    batch = processor(text=["<s>just text", "<s>more text here"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        eval_loss = model.eval()(**batch, labels=labels).loss
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), eval_loss)  # zero contribution
    for module in (model.model.multi_modal_projector, model.model.alignment.fc1, model.model.alignment.fc2):
        for param in module.parameters():
            assert param.grad is not None and param.grad.abs().sum() == 0
    assert all(p.grad is None for p in model.model.vision_tower.parameters())  # frozen: not run at all


def test_stage1_anchor_covers_a_trainable_vision_tower(make_model, processor):
    model = make_model(**ABSTRACTOR).train()
    attach_static_graph(model)
    batch = processor(text=["<s>text only"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.model.vision_tower.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in model.model.multi_modal_projector.parameters())


def test_zero3_partitioned_frozen_vision_tower_runs_on_image_free_batches(make_model, processor):
    """ZeRO-3 gathers the tower's shards on every rank that runs it: a text-only rank must run it too, or it hangs."""
    model = make_model().train()
    model.model.vision_tower.requires_grad_(False)
    attach_static_graph(model)
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    text_only = processor.tokenizer(["USER: hi ASSISTANT: hello"], return_tensors="pt")
    model(**text_only)
    assert calls == []  # frozen and not partitioned: no blank-image pass
    for parameter in model.model.vision_tower.parameters():
        parameter.ds_id = 0  # what DeepSpeed ZeRO-3 puts on the parameters it partitions
    model(**text_only)
    assert calls == [1]
    with torch.no_grad():
        model(**text_only)
    model.eval()(**text_only)
    assert calls == [1]  # inference never pays for it


def module_order(model, batch) -> tuple[list[str], list[str]]:
    """Names of the watched modules in the order one training step's forward and backward reach them."""
    inner = model.model
    watched = {"tower": inner.vision_tower, "projector": inner.multi_modal_projector,
               "embeddings": inner.language_model.embed_tokens, "gate": inner.alignment.fc1,
               "llm": inner.language_model.layers[0]}
    forward, backward = [], []
    handles = [module.register_forward_pre_hook(lambda *args, name=name: forward.append(name))
               for name, module in watched.items()]
    handles += [module.register_full_backward_pre_hook(lambda *args, name=name: backward.append(name))
                for name, module in watched.items() if any(p.requires_grad for p in module.parameters())]
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for handle in handles:
        handle.remove()
    return forward, backward


def test_zero3_text_only_rank_walks_the_modules_in_the_image_rank_order(make_model, processor, images):
    """ZeRO-3 gathers each module's shards collectively: ranks must reach the modules in one order, forward and
    backward, or the text-only rank and an image rank wait on different collectives (the run hangs)."""
    model = make_model().train()
    freeze_for_stage2(model)
    attach_static_graph(model)
    for parameter in model.model.vision_tower.parameters():
        parameter.ds_id = 0  # what DeepSpeed ZeRO-3 puts on the parameters it partitions
    image_batch = processor(text=[processor.apply_chat_template(user_message("Hi?"), add_generation_prompt=True)],
                            images=[[images[0]]], return_tensors="pt")
    text_only = processor.tokenizer(["USER: hi ASSISTANT: hello"], return_tensors="pt")
    image_order, text_order = module_order(model, image_batch), module_order(model, dict(text_only))
    assert image_order[0] == ["embeddings", "tower", "projector", "gate", "llm"]
    assert text_order == image_order


def test_trainers_attach_the_hooks(make_model, processor, tmp_path):
    from datasets import Dataset

    from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer

    rows = [{"images": [], "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                                         {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]}]
    model = make_model()
    args = AlignGPTInstructConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1,
                                  allow_untrained_alignment=True)
    AlignGPTInstructTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    assert len(model.model._forward_pre_hooks_with_kwargs) == 1
    assert len(model.model.language_model._forward_pre_hooks_with_kwargs) == 1

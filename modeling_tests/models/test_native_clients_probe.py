"""Client calls that work with transformers' LLaVA and must work the same way with AlignGPT.

Each test runs one call that outside code (transformers' `generate`, PEFT) makes with exactly these names, on a tiny
model, and checks the result against an independent computation.
"""

from __future__ import annotations

import pytest
import torch

from conftest import user_message


@pytest.fixture
def batch(processor, images):
    prompt = processor.apply_chat_template(user_message("What colour is it?"), add_generation_prompt=True)
    return processor(text=[prompt], images=images[:1], return_tensors="pt")


def test_generate_takes_llavas_vision_feature_arguments(make_model, batch):
    """`generate(vision_feature_layer=..., vision_feature_select_strategy=...)` reaches the vision tower, as LLaVA's
    does (generate used to refuse them as unused model kwargs): the first token is the forward's argmax on that layer."""
    model = make_model(seed=1)
    with torch.no_grad():
        logits = model(**batch, vision_feature_layer=-1, vision_feature_select_strategy="default").logits[0, -1]
        default = model(**batch).logits[0, -1]
        out = model.generate(**batch, vision_feature_layer=-1, vision_feature_select_strategy="default",
                             max_new_tokens=1, do_sample=False)
    logits[model.generation_config.suppress_tokens] = -float("inf")
    assert not torch.allclose(logits, default)  # the layer choice changes the answer, so the check below is real
    assert out[0, -1].item() == logits.argmax().item()


def test_lora_trainable_token_indices_wraps_the_embedding_table(make_model, batch, tokenizer):
    """PEFT's `trainable_token_indices` wraps the word-embedding table in a module without `num_embeddings`; the
    forward used to read that attribute (AttributeError). Now: the base model's logits at start, and a backward pass
    reaches the chosen row of a prompt word, not the `<align>` row (its slot holds the alignment vector)."""
    from peft import LoraConfig, get_peft_model

    model = make_model(seed=2)
    with torch.no_grad():
        reference = model(**batch).logits
    word_id, align_id = batch["input_ids"][0, -1].item(), tokenizer.convert_tokens_to_ids("<align>")
    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[word_id, align_id])
    peft_model = get_peft_model(model, config)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    out = peft_model(**batch, labels=labels)
    torch.testing.assert_close(out.logits, reference)
    out.loss.backward()
    (delta,) = [p for name, p in peft_model.named_parameters() if "trainable_tokens_delta" in name]
    assert delta.shape == (2, model.config.text_config.hidden_size)
    assert delta.grad[0].abs().sum() > 0 and delta.grad[1].abs().sum() == 0
    assert peft_model.generate(**batch, max_new_tokens=2).shape[1] == batch["input_ids"].shape[1] + 2


def test_trainer_predict_returns_the_logits_for_mixed_batches(make_model, processor, images, tmp_path):
    """`Trainer.predict`/`evaluate(compute_metrics=...)` gather what the model returns besides the loss; the image
    outputs (None fields), image features and gate weights (absent in text-only batches) used to break that gathering
    (a TypeError, then an AssertionError across batches). Predictions are the logits, as for LLaVA's language model."""
    from transformers import Trainer, TrainingArguments

    model = make_model(seed=4)
    image_text = processor.apply_chat_template(user_message("What colour is it?"), add_generation_prompt=True) + " Red."
    encoded = processor(text=[image_text] * 2, images=images[:2], return_tensors="pt")
    rows = [{"input_ids": encoded["input_ids"][i], "pixel_values": encoded["pixel_values"][i:i + 1]} for i in range(2)]
    rows += [{"input_ids": processor(text=["USER: How many? ASSISTANT: Two."], return_tensors="pt")["input_ids"][0]} for _ in range(2)]
    for row in rows:
        row["labels"] = row["input_ids"].masked_fill(row["input_ids"] == model.config.image_token_id, -100)

    def collate(batch):
        out = {key: torch.nn.utils.rnn.pad_sequence([row[key] for row in batch], batch_first=True,
                                                    padding_value=-100 if key == "labels" else 0)
               for key in ("input_ids", "labels")}
        out["attention_mask"] = torch.nn.utils.rnn.pad_sequence([torch.ones_like(row["input_ids"]) for row in batch],
                                                                batch_first=True)
        if any("pixel_values" in row for row in batch):
            out["pixel_values"] = torch.cat([row["pixel_values"] for row in batch if "pixel_values" in row])
        return out

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, data_collator=collate, compute_metrics=lambda _: {"seen": 1.0})
    predictions = trainer.predict(rows)
    assert predictions.metrics["test_seen"] == 1.0
    assert predictions.predictions.shape == (4, len(rows[0]["input_ids"]), model.config.text_config.vocab_size)
    with torch.no_grad():
        expected = model(**collate(rows[2:3])).logits[0].numpy()
    text_length = len(rows[2]["input_ids"])
    assert abs(predictions.predictions[2, :text_length] - expected).max() < 1e-4


def test_forward_with_images_compiles_as_one_graph(make_model, batch):
    """`torch.compile(model, fullgraph=True)` traces LLaVA's forward with images and labels; ours broke the graph at
    the placeholder checks' host copy. Traced, the count and token-id checks stay in the graph (as LLaVA's count
    check); the logits, loss and gate weights equal the eager forward's."""
    model = make_model(seed=5)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    text_only = {"input_ids": batch["input_ids"][:, :1], "attention_mask": batch["attention_mask"][:, :1]}
    text_only["input_ids"] = torch.cat([text_only["input_ids"], batch["input_ids"][:, -4:]], 1)
    text_only["attention_mask"] = torch.ones_like(text_only["input_ids"])
    with torch.no_grad():
        eager = model(**batch, labels=labels)  # also installs transformers' output hooks before tracing
        eager_text = model(**text_only).logits
        compiled_model = torch.compile(model, fullgraph=True, backend="eager")
        compiled = compiled_model(**batch, labels=labels)
        compiled_text = compiled_model(**text_only).logits
    torch.testing.assert_close(compiled.logits, eager.logits)
    torch.testing.assert_close(compiled.loss, eager.loss)
    torch.testing.assert_close(compiled.alignment_weights, eager.alignment_weights)
    torch.testing.assert_close(compiled_text, eager_text)
    out_of_table = batch["input_ids"].clone()
    out_of_table[0, -1] = model.config.text_config.vocab_size  # eager: a named error; traced: never a clamped id
    with torch.no_grad(), pytest.raises(RuntimeError, match="assertion"):
        compiled_model(**{**batch, "input_ids": out_of_table})


def test_loading_a_llava_folder_into_aligngpt_names_from_llava(tmp_path):
    """`AlignGPTForConditionalGeneration.from_pretrained(<LLaVA folder>)`: transformers only warns about the other model
    type and builds a default config, which failed on an unrelated default token id. Now the cause and the fix."""
    from aligngpt_hf import AlignGPTForConditionalGeneration
    from aligngpt_hf.tiny import build_llava

    llava, _ = build_llava()
    llava.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model type 'llava', not 'aligngpt': `AlignGPTForConditionalGeneration\."
                                         r"from_llava\(SOURCE\)` or `aligngpt-hf from-llava SOURCE OUTPUT`"):
        AlignGPTForConditionalGeneration.from_pretrained(tmp_path)


def test_base64_images_and_data_uris_load_as_transformers_load_image_does(processor, images):
    """Chat messages from OpenAI-style clients carry images as `data:image/png;base64,...` URIs or bare base64;
    transformers' `load_image` (LLaVA's processor) decodes both, ours looked for a file of that name."""
    import base64
    import io

    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    expected = processor(text="<image> hi", images=images[0], return_tensors="pt")["pixel_values"]
    for source in (encoded, "data:image/png;base64," + encoded):
        torch.testing.assert_close(processor(text="<image> hi", images=source, return_tensors="pt")["pixel_values"],
                                   expected)
        conversation = [{"role": "user", "content": [{"type": "image", "url": source}, {"type": "text", "text": "Hi"}]}]
        batch = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
        torch.testing.assert_close(batch["pixel_values"], expected)
    with pytest.raises(FileNotFoundError, match="image file missing.png not found"):
        processor(text="<image> hi", images="missing.png")


def test_a_larger_table_set_without_the_config_keeps_its_rows(make_model, batch):
    """`set_input_embeddings` with a larger table (the config's vocabulary size unchanged): LLaVA embeds the new ids;
    the token-id check reads the table's own size, so a new row is used, not refused as outside the table."""
    model = make_model(seed=6)
    old = model.get_input_embeddings()
    table = torch.nn.Embedding(old.num_embeddings + 8, old.embedding_dim)
    with torch.no_grad():
        table.weight[: old.num_embeddings] = old.weight
    model.set_input_embeddings(table)
    ids = batch["input_ids"].clone()
    ids[0, -1] = old.num_embeddings + 3
    with torch.no_grad():
        logits = model(**{**batch, "input_ids": ids}).logits
        embeds = model.get_input_embeddings()(ids)
        expected = model(inputs_embeds=embeds, pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, expected)

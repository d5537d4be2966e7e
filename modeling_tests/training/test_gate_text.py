"""The text the gate reads under every labelling a trainer can produce.

Rule: the gate averages a row's text tokens inside its gate mask (the prompt: `labels == -100`); a row (or a packed
sample) whose mask leaves no text falls back to all its text. BOS, `<align>`, `<image>` and padding never count.
Each case below is checked against that rule computed independently from the token ids, and rows with different
text must get different weights (under full labels the old mask held no text at all, so every row got the same).
"""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from aligngpt_hf.training.data import AlignGPTDataCollator
from aligngpt_hf.training.packing import AlignGPTPackingCollator

TURNS = [("What colour is the shape?", "The shape is red."),
         ("Describe the picture in a few words, please.", "A small green circle on white."),
         ("How many squares?", "Three.")]


def rows(images) -> list[dict]:
    return [{"images": [images[index]], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
        for index, (question, answer) in enumerate(TURNS)]


def sharp_model(make_model):
    """A tiny model whose gate moves far above the tolerance when its text input changes."""
    model = make_model(seed=1)
    with torch.no_grad():
        model.model.alignment.fc1.weight.mul_(30)
        model.model.alignment.fc2.weight.mul_(30)
    return model


def expected_weights(model, processor, batch: dict, prompt_only: bool) -> torch.Tensor:
    """The documented rule, from the ids alone: text = not BOS/`<image>`/`<align>`/padding; the prompt = text with
    label -100; a row without prompt text takes all its text. Then the gate on <image tokens, mean text>."""
    ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    special = {processor.image_token_id, processor.alignment_token_id, processor.tokenizer.bos_token_id}
    text = attention & ~torch.isin(ids, torch.tensor(sorted(special)))
    seen = text & (batch["labels"] == -100) if prompt_only else text.clone()
    for row in range(ids.shape[0]):
        if not seen[row].any():
            seen[row] = text[row]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.model(input_ids=ids, attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"]).image_hidden_states
        mean_text = torch.stack([embeds[row, seen[row]].mean(0) for row in range(ids.shape[0])])
        dots = torch.einsum("bkh,bh->bk", features, mean_text)  # one image per row
        return model.model.alignment.gate(dots)


def gate_weights(model, batch: dict, through_labels: bool) -> torch.Tensor:
    """Weights as a trainer gets them: with `labels` through the top-level forward (stock TRL), else the batch as is."""
    inputs = dict(batch) if through_labels else {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        return model(**inputs).alignment_weights


def assert_rows_differ(weights: torch.Tensor):
    for first in range(weights.shape[0]):
        for second in range(first + 1, weights.shape[0]):
            assert (weights[first] - weights[second]).abs().max() > 1e-2, (first, second)


@pytest.mark.parametrize("assistant_only", [False, True], ids=["full-labels", "assistant-only"])
def test_stock_trl_collator_gate_reads_each_rows_text(make_model, processor, images, assistant_only):
    collate = DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=assistant_only)
    batch = collate(rows(images))
    if not assistant_only:  # every real token is a target: the prompt mask holds no text
        assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()
    model = sharp_model(make_model)
    weights = gate_weights(model, batch, through_labels=True)
    torch.testing.assert_close(weights, expected_weights(model, processor, batch, prompt_only=True), rtol=0,
                               atol=1e-5)
    assert_rows_differ(weights)


@pytest.mark.parametrize("assistant_only", [False, True], ids=["full-labels", "assistant-only"])
def test_our_collator_gate_reads_each_rows_text(make_model, processor, images, assistant_only):
    collate = AlignGPTDataCollator(processor=processor, max_length=2048, assistant_only_loss=assistant_only,
                                   gate_text_mask=True)
    batch = collate(rows(images))
    model = sharp_model(make_model)
    weights = gate_weights(model, batch, through_labels=False)
    expected = expected_weights(model, processor, batch, prompt_only=True)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-5)
    assert_rows_differ(weights)
    if not assistant_only:  # the fallback is all the text: what inference sees on the same tokens
        inference = gate_weights(model, {k: v for k, v in batch.items() if k != "gate_text_mask"}, False)
        torch.testing.assert_close(weights, inference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("assistant_only", [False, True], ids=["full-labels", "assistant-only"])
def test_packed_samples_fall_back_to_their_own_text(make_model, processor, images, assistant_only):
    inner = AlignGPTDataCollator(processor=processor, max_length=2048, assistant_only_loss=assistant_only,
                                 gate_text_mask=True)
    samples = rows(images)
    padded = inner(samples)
    packed = AlignGPTPackingCollator(inner)([samples[:2], samples[2:]])  # two rows; the second one is padded
    model = sharp_model(make_model)
    weights = gate_weights(model, packed, through_labels=False)
    torch.testing.assert_close(weights, expected_weights(model, processor, padded, prompt_only=True), rtol=0,
                               atol=1e-5)
    torch.testing.assert_close(weights, gate_weights(model, padded, through_labels=False), rtol=0, atol=1e-6)
    assert_rows_differ(weights)

"""LLaVA JSON adapter, collator labels (decoded), length safety, levels, modality sampler."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from aligngpt_hf import load_llava_json
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_SYSTEM
from aligngpt_hf.training.data import (
    PLAIN_CHAT_TEMPLATE,
    AlignGPTDataCollator,
    sample_token_lengths,
    synthetic_dataset,
)
from aligngpt_hf.training.sampler import ModalityLengthGroupedSampler, modality_grouped_indices, modality_lengths


@pytest.fixture
def llava_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 24), (200, 30, 30)).save(images / "a.png")
    Image.new("RGB", (24, 24), (30, 30, 200)).save(images / "b.png")
    records = [
        {"id": "cap-0", "image": "a.png", "similarity": 6,
         "conversations": [{"from": "human", "value": "<image>\nRender a clear summary."},
                           {"from": "gpt", "value": "A red square."}]},
        {"id": "chat-1", "image": "b.png",
         "conversations": [{"from": "human", "value": "What colour is the shape?\n<image>"},
                           {"from": "gpt", "value": "The shape is blue."},
                           {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "There are two."}]},
        {"id": "text-2", "conversations": [{"from": "human", "value": "What shape is it?"},
                                           {"from": "gpt", "value": "It is a square."}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def labels_text(tokenizer, batch, row):
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != -100])


def test_load_llava_json_rows_follow_trl_vision_format_with_lazy_images(llava_folder):
    ds = load_llava_json(llava_folder / "data.json", image_folder=llava_folder / "images")
    assert ds.column_names == ["id", "images", "messages", "alignment_level"]
    assert ds["alignment_level"] == [6, None, None]
    raw = ds.cast_column("images", type(ds.features["images"])(type(ds.features["images"].feature)(decode=False)))
    assert raw[0]["images"][0]["path"] == str(llava_folder / "images" / "a.png") and raw[0]["images"][0]["bytes"] is None
    row = ds[1]
    assert row["images"][0].size == (24, 24)  # decoded on access
    assert row["messages"][0] == {"role": "user", "content": [{"type": "image", "text": None},
                                                              {"type": "text", "text": "What colour is the shape?"}]}
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
    assert ds[2]["images"] == []


def test_load_llava_json_errors_name_the_record(llava_folder):
    with pytest.raises(FileNotFoundError, match=r"data\.json: 2 image file\(s\) not found \(first: 'cap-0': .*a\.png"):
        load_llava_json(llava_folder / "data.json", image_folder=llava_folder)
    bad = [{"id": "x", "image": ["a.png", "b.png"],
            "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "yo"}]}]
    (llava_folder / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json: record 'x' \(#0\) has 1 `<image>` placeholder\(s\) for 2 image\(s\)\.$"):
        load_llava_json(llava_folder / "bad.json", llava_folder / "images")
    bad = [{"id": "y", "similarity": 0.21, "conversations": [{"from": "gpt", "value": "yo"}]}]
    (llava_folder / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json: record 'y' \(#0\) has `similarity`=0\.21; AlignGPT's pre-training JSON"):
        load_llava_json(llava_folder / "bad.json")


def test_stage1_labels_are_caption_and_newline_with_levels(llava_folder, processor, tokenizer):
    ds = load_llava_json(llava_folder / "data.json", image_folder=llava_folder / "images")
    collator = AlignGPTDataCollator(processor=processor, max_length=64, assistant_only_loss=True,
                                    chat_template=PLAIN_CHAT_TEMPLATE, level_column="alignment_level")
    batch = collator([ds[0]])
    ids = batch["input_ids"][0]
    assert tokenizer.decode(ids) == "<s><align>" + "<image>" * 16 + "A red square.\n"
    assert labels_text(tokenizer, batch, 0) == "A red square.\n"
    assert batch["alignment_levels"].tolist() == [6]
    with pytest.raises(ValueError, match=r"^Sample 'chat-1' has an image but no `alignment_level`: stage 1 feeds"):
        collator([ds[0], ds[1]])


def test_stage2_labels_cover_only_assistant_turns_and_eos_in_mixed_batches(llava_folder, processor, tokenizer):
    ds = load_llava_json(llava_folder / "data.json", image_folder=llava_folder / "images")
    collator = AlignGPTDataCollator(processor=processor, max_length=256, assistant_only_loss=True,
                                    gate_text_mask=True)
    batch = collator([ds[2], ds[1]])  # text-only first: order must be kept, nothing truncated
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]) == (
        "<s>" + VICUNA_V1_SYSTEM + " USER: What shape is it? ASSISTANT: It is a square.</s>")
    assert labels_text(tokenizer, batch, 0) == "It is a square.</s>"
    # byte-level BPE glues the space after "ASSISTANT:" to " The"/" There" (like LLaMA's "▁The"): the answer tokens
    assert labels_text(tokenizer, batch, 1) == " The shape is blue.</s> There are two.</s>"
    assert (batch["input_ids"] == processor.image_token_id).sum(-1).tolist() == [0, 16]
    assert (batch["input_ids"] == processor.alignment_token_id).sum(-1).tolist() == [0, 1]
    expected_gate = (batch["labels"] == -100) & batch["attention_mask"].bool()
    assert torch.equal(batch["gate_text_mask"], expected_gate)
    assert "alignment_levels" not in batch


def test_overlong_sample_raises_and_exact_lengths_match_the_collator(llava_folder, processor):
    ds = load_llava_json(llava_folder / "data.json", image_folder=llava_folder / "images")
    collator = AlignGPTDataCollator(processor=processor, max_length=40, assistant_only_loss=True)
    with pytest.raises(ValueError, match=r"^Sample 'chat-1' is \d+ tokens long \(its 1 image\(s\) and `<align>` "
                                         r"included\) but `max_length` is 40\. Image tokens are never cut: .*"
                                         r"`skip_overlong_samples=True`"):
        collator([ds[1]])
    lengths = sample_token_lengths(ds, processor)
    full = AlignGPTDataCollator(processor=processor, max_length=None, assistant_only_loss=True)
    assert lengths == [int(full([ds[i]])["attention_mask"].sum()) for i in range(3)]
    plain = sample_token_lengths(ds.select([0]), processor, chat_template=PLAIN_CHAT_TEMPLATE)
    assert plain == [2 + 16 + len(processor.tokenizer("A red square.\n", add_special_tokens=False)["input_ids"])]


def test_all_masked_batch_raises(processor):
    collator = AlignGPTDataCollator(processor=processor, max_length=None, assistant_only_loss=True)
    rows = [{"id": "q-only", "images": [], "messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(ValueError, match=r"^Every label of this batch is -100 \(samples 'q-only'\): nothing would be "
                                         r"learned and the loss would be a silent 0\."):
        collator(rows)


def test_trainer_skips_and_counts_overlong_samples(make_model, processor, tmp_path):
    from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer

    dataset = synthetic_dataset(6, "instruct", text_only_every=3)
    long_rows = [1]  # make one image row too long
    dataset = dataset.map(lambda row, i: {"messages": [row["messages"][0], {
        "role": "assistant", "content": row["messages"][1]["content"] * (12 if i in long_rows else 1)}]},
        with_indices=True)
    args = AlignGPTInstructConfig(output_dir=str(tmp_path), max_length=160, skip_overlong_samples=True, use_cpu=True,
                                  report_to="none", allow_untrained_alignment=True, max_steps=1,
                                  per_device_train_batch_size=2, activation_checkpointing=False)
    trainer = AlignGPTInstructTrainer(model=make_model(), args=args, train_dataset=dataset,
                                      processing_class=processor)
    assert trainer.num_skipped_samples == 1 and len(trainer.train_dataset) == 5
    assert "instruct-1" not in trainer.train_dataset["id"]
    args.max_length = 100
    with pytest.raises(ValueError, match=r"^All 6 samples are longer than max_length=100 \(image tokens and `<align>` "
                                         r"included\); raise `max_length`\.$"):
        AlignGPTInstructTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=processor)


def test_modality_grouped_indices_follow_llava():
    lengths = [5, -3, 7, -2, 4, 6, -8, 9, -1, 2]  # 6 image rows, 4 text-only rows
    generator = torch.Generator().manual_seed(0)
    order = modality_grouped_indices(lengths, batch_size=2, world_size=1, generator=generator)
    assert sorted(order) == list(range(10))
    batches = [order[i:i + 2] for i in range(0, 10, 2)]
    single = [len({lengths[i] > 0 for i in batch}) == 1 for batch in batches]
    assert all(single[:3])  # mm: 2 full megabatches + leftover; text: 1 full + leftover; leftovers merged last
    for batch in batches[:3]:
        assert abs(lengths[batch[0]]) >= abs(lengths[batch[1]])  # sorted longest first within a megabatch
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=1, seed=3)
    first = list(sampler)
    assert list(sampler) == first  # deterministic per epoch: every rank and a resumed run draw the same order
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(10))


def test_modality_lengths_count_words_and_sign_by_image():
    ds = synthetic_dataset(4, "instruct", text_only_every=2)
    assert modality_lengths(ds) == [5 + 4, -(2 + 4), 5 + 4, -(2 + 4)]

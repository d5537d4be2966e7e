"""Padding-free multimodal packing: bins, the packed layout, loss/gradient/weight equality with padded batches
(both stages; image, text-only and multi-image rows), per-sample gates, and the refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainerCallback

from aligngpt_hf import (
    AlignGPTInstructConfig,
    AlignGPTInstructTrainer,
    AlignGPTPretrainConfig,
    AlignGPTPretrainTrainer,
)
from aligngpt_hf.training.data import PLAIN_CHAT_TEMPLATE, AlignGPTDataCollator, synthetic_dataset
from aligngpt_hf.training.packing import (
    AlignGPTPackingCollator,
    PackedDataset,
    PackLengthGroupedSampler,
    best_fit_decreasing,
    check_packed_attention,
)

FAST = dict(report_to="none", save_strategy="no", activation_checkpointing=False, use_cpu=True,
            dataloader_num_workers=0, logging_steps=1, warmup_steps=0, lr_scheduler_type="constant",
            disable_tqdm=True, learning_rate=1e-3, seed=0)
QA = [("What colour is the shape?", "The shape is red."), ("How many?", "There are two circles."),
      ("Is the caption correct? Answer the question using a single word or phrase.", "Yes."),
      ("What shape is it?", "It is a blue square.")]


def mixed_rows(images) -> list[dict]:
    """One-image rows, a text-only row and a two-image row, with levels (stage 1) and QA turns (stage 2)."""
    counts = [1, 0, 2, 1]
    rows = []
    for index, ((question, answer), count) in enumerate(zip(QA, counts)):
        rows.append({"id": f"row-{index}", "images": images[index % 2: index % 2 + count], "alignment_level": 2 * index + 1,
                     "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def stage_collator(processor, stage: str, assistant_only: bool = True) -> AlignGPTDataCollator:
    if stage == "pretrain":
        return AlignGPTDataCollator(processor=processor, max_length=2048, assistant_only_loss=assistant_only,
                                    chat_template=PLAIN_CHAT_TEMPLATE, level_column="alignment_level")
    return AlignGPTDataCollator(processor=processor, max_length=2048, assistant_only_loss=assistant_only,
                                gate_text_mask=True)


def model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def token_losses(logits, labels) -> list[torch.Tensor]:
    """Per-row losses of the supervised next tokens (the model's causal shift), in row order."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return [row_losses[row_labels != -100] for row_losses, row_labels in zip(losses, labels[:, 1:])]


def test_best_fit_decreasing_puts_each_sample_in_the_fullest_pack_that_fits():
    packs = best_fit_decreasing([5, 4, 3, 3, 2, 1], capacity=8)
    # 5 -> A (room 3); 4 -> B (4); 3 -> A (0, full); 3 -> B (1); 2 -> C (6); 1 -> B (0)
    assert packs == [[0, 2], [1, 3, 5], [4]]
    assert sorted(i for pack in packs for i in pack) == list(range(6))
    with pytest.raises(ValueError, match=r"Sample 'b' is 9 tokens long .* max_length=8; 1 sample\(s\) are too long\. "
                                         r"Image tokens are never cut"):
        best_fit_decreasing([3, 9], capacity=8, names=["'a'", "'b'"])


def test_packed_rows_restart_positions_mask_first_labels_and_keep_images_in_order(processor, images):
    rows = mixed_rows(images)
    inner = stage_collator(processor, "instruct")
    padded = inner(rows)
    packed = AlignGPTPackingCollator(inner)([rows[:2], rows[2:]])  # two packs -> two rows
    lengths = padded["attention_mask"].sum(-1).tolist()
    width = max(lengths[0] + lengths[1], lengths[2] + lengths[3])
    assert packed["input_ids"].shape == (2, width) and "attention_mask" not in packed
    expected_positions = torch.cat([torch.arange(lengths[0]), torch.arange(lengths[1])])
    assert torch.equal(packed["position_ids"][0, : lengths[0] + lengths[1]], expected_positions)
    starts = [0, lengths[0], width, width + lengths[2], 2 * width]
    assert packed["cu_seq_lens_q"].tolist() == starts
    for sample, (row, offset) in enumerate([(0, 0), (0, lengths[0]), (1, 0), (1, lengths[2])]):
        tokens = slice(offset, offset + lengths[sample])
        assert torch.equal(packed["input_ids"][row, tokens], padded["input_ids"][sample, : lengths[sample]])
        assert torch.equal(packed["gate_text_mask"][row, tokens], padded["gate_text_mask"][sample, : lengths[sample]])
        assert packed["labels"][row, offset] == -100
        assert torch.equal(packed["labels"][row, offset + 1: offset + lengths[sample]],
                           padded["labels"][sample, 1: lengths[sample]])
    tail = slice(lengths[0] + lengths[1], width)  # padding continues the last sample, never a target or gate text
    assert (packed["labels"][0, tail] == -100).all() and not packed["gate_text_mask"][0, tail].any()
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])  # 1 + 0 + 2 + 1 images, pack order


@pytest.mark.parametrize("assistant_only", [True, False], ids=["assistant-only", "full-labels"])
@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_packed_losses_and_gradients_equal_padded(make_model, processor, images, stage, assistant_only):
    """Full labels supervise each sample's first token, which in a packed row would be predicted from the previous
    sample's last one: the packing collator must mask it (assistant-only labels mask it anyway and hide the bug)."""
    rows = mixed_rows(images)
    inner = stage_collator(processor, stage, assistant_only)
    padded, packed = inner(rows), AlignGPTPackingCollator(inner)(rows)  # padding-free: the batch in one row
    assert packed["input_ids"].shape[0] == 1 and padded["attention_mask"].eq(0).any()
    results = []
    for batch in (padded, packed):
        model = make_model(seed=3)
        out = model(**batch)  # the model's own loss: the mean over the batch's targets
        losses = token_losses(out.logits, batch["labels"])
        out.loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        results.append((losses, grads, out.alignment_weights, out.loss.detach()))
    padded_losses, padded_grads, padded_weights, padded_loss = results[0]
    packed_losses, packed_grads, packed_weights, packed_loss = results[1]
    assert [len(losses) for losses in packed_losses] == [sum(len(losses) for losses in padded_losses)]
    torch.testing.assert_close(torch.cat(packed_losses), torch.cat(padded_losses), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=0, atol=1e-6)
    assert len(padded_losses) == 4 and all(len(losses) > 0 for losses in padded_losses)
    assert padded_grads.keys() == packed_grads.keys()
    assert "model.multi_modal_projector.linear_1.weight" in packed_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    if stage == "instruct":  # one gate row per sample (NaN for the text-only one), identical to the padded run
        torch.testing.assert_close(packed_weights, padded_weights, rtol=0, atol=1e-6, equal_nan=True)
        assert packed_weights.shape[0] == 4 and packed_weights[1].isnan().all()


def test_a_samples_gate_never_sees_its_neighbours_text(make_model, processor, images):
    inner = stage_collator(processor, "instruct")
    model = make_model(seed=1)
    with torch.no_grad():  # a sharp gate, so text changes move its weights far above the tolerance
        model.model.alignment.fc1.weight.mul_(30)
        model.model.alignment.fc2.weight.mul_(30)
    first, second = mixed_rows(images)[0], mixed_rows(images)[3]
    other_first = {**first, "messages": [{"role": "user", "content": "Describe the scene in one long sentence."},
                                         {"role": "assistant", "content": "A red square."}]}
    collate = AlignGPTPackingCollator(inner)
    with torch.no_grad():
        together = model(**model_inputs(collate([first, second]))).alignment_weights
        changed = model(**model_inputs(collate([other_first, second]))).alignment_weights
        alone = model(**model_inputs(inner([second]))).alignment_weights
    assert (together[0] - changed[0]).abs().max() > 1e-2  # the first sample's own text moves its gate
    torch.testing.assert_close(together[1], changed[1], rtol=0, atol=1e-6)  # ... never its neighbour's
    torch.testing.assert_close(together[1], alone[0], rtol=0, atol=1e-6)


def _weights_after_training(trainer) -> dict:
    trainer.train()
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


def _assert_same_weights(packed: dict, padded: dict):
    """Within 1e-5 relative, per tensor (the norm of the difference over the norm of the weights)."""
    for name, value in padded.items():
        relative = ((packed[name] - value).norm() / value.norm().clamp(min=1e-12)).item()
        assert relative <= 1e-5, f"{name}: packed and padded weights differ by {relative:.2e} (relative)"


def test_padding_free_stage2_steps_with_modality_sampler_and_accumulation_equal_padded(make_model, processor, images,
                                                                                      tmp_path):
    rows = synthetic_dataset(8, "instruct", text_only_every=3).to_list() + mixed_rows(images)
    dataset = Dataset.from_list([{**row, "images": row["images"]} for row in rows])
    weights = []
    for padding_free in (False, True):
        model = make_model(seed=2).train()
        model.config.aligngpt_stage = "pretrain"
        args = AlignGPTInstructConfig(output_dir=str(tmp_path / str(padding_free)), max_steps=3,
                                      per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                      group_by_modality_length=True, padding_free=padding_free,
                                      **{**FAST, "learning_rate": 2e-5})  # the paper's stage-2 rate
        trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
        weights.append(_weights_after_training(trainer))
    before = make_model(seed=2).state_dict()
    assert not torch.equal(weights[0]["model.alignment.fc1.weight"], before["model.alignment.fc1.weight"])
    _assert_same_weights(weights[1], weights[0])


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_accumulated_micro_batches_take_the_full_batch_sgd_step(make_model, processor, images, tmp_path, padding_free):
    """Two micro-batches of 2 with unequal token counts must give the gradient of one batch of 4: the loss is summed
    over the accumulated targets and divided once by their count, not averaged per micro-batch. Plain SGD makes the
    step proportional to that gradient (AdamW's first step is about lr x sign(gradient) and would hide a wrong scale)."""
    rows = mixed_rows(images) + synthetic_dataset(4, "instruct").to_list()
    dataset = Dataset.from_list(rows)
    weights = []
    for batch_size, accumulation, packed in ((4, 1, False), (2, 2, padding_free)):
        model = make_model(seed=5).train()
        model.config.aligngpt_stage = "pretrain"
        args = AlignGPTInstructConfig(output_dir=str(tmp_path / f"{batch_size}-{packed}"), max_steps=2, optim="sgd",
                                      per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                      group_by_modality_length=False, padding_free=packed, assistant_only_loss=False,
                                      **{**FAST, "learning_rate": 0.5})
        trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
        assert type(trainer.create_optimizer()) is torch.optim.SGD
        weights.append(_weights_after_training(trainer))
    before = make_model(seed=5).state_dict()
    assert not torch.equal(weights[0]["model.multi_modal_projector.linear_1.weight"],
                           before["model.multi_modal_projector.linear_1.weight"])
    _assert_same_weights(weights[1], weights[0])


def test_packing_stage1_steps_equal_padded(make_model, processor, images, tmp_path):
    dataset = Dataset.from_list(mixed_rows(images) + synthetic_dataset(3, "pretrain").to_list())
    weights = []
    for packing in (False, True):
        model = make_model(seed=4).train()
        args = AlignGPTPretrainConfig(output_dir=str(tmp_path / str(packing)), max_steps=3, packing=packing,
                                      per_device_train_batch_size=1 if packing else len(dataset), **FAST)
        trainer = AlignGPTPretrainTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
        if packing:  # every sample fits one 2048-token pack: the padded run's one batch of all samples
            assert isinstance(trainer.train_dataset, PackedDataset) and len(trainer.train_dataset) == 1
        weights.append(_weights_after_training(trainer))
    _assert_same_weights(weights[1], weights[0])


def test_packs_follow_max_length_and_modality(make_model, processor, tmp_path):
    model = make_model()
    model.config.aligngpt_stage = "pretrain"
    dataset = synthetic_dataset(9, "instruct", text_only_every=3)
    args = AlignGPTInstructConfig(output_dir=str(tmp_path), max_steps=1, packing=True, max_length=300,
                                  per_device_train_batch_size=2, **FAST)
    trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    packs = trainer.train_dataset
    assert max(packs.lengths) <= 300 and len(packs) < 9 and packs.num_samples == 9
    has_image = [bool(row["images"]) for row in dataset]
    assert all(len({has_image[i] for i in pack}) == 1 for pack in packs.packs)  # grouped by modality
    batch = trainer.data_collator([packs[0], packs[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["position_ids"].shape == batch["input_ids"].shape


def test_refuses_a_cache_an_unknown_attention_and_a_model_that_leaks_across_samples(make_model, processor, images):
    model = make_model()
    batch = model_inputs(AlignGPTPackingCollator(stage_collator(processor, "instruct"))(mixed_rows(images)))
    with pytest.raises(ValueError, match=r"Packed rows cannot use a KV cache: .* Pass `use_cache=False`"):
        model(**batch, use_cache=True)
    model.config.text_config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match=r"the language model uses 'paged\|sdpa'\. Load it with `attn_implementation="):
        model(**batch)
    from transformers import MambaConfig, MambaModel

    leaky = MambaModel(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2))
    with pytest.raises(ValueError, match=r"\(MambaModel, attention 'eager'\) lets packed samples see each other"):
        check_packed_attention(SimpleNamespace(model=SimpleNamespace(language_model=leaky)))
    check_packed_attention(make_model())  # sdpa Llama: samples stay apart


def test_packing_settings_are_checked_and_reach_the_cli(tmp_path):
    with pytest.raises(ValueError, match=r"packs whole samples \(`packing_strategy='bfd'`\); 'wrapped' would cut"):
        AlignGPTInstructConfig(output_dir=str(tmp_path), packing=True, packing_strategy="wrapped")
    with pytest.raises(ValueError, match=r"`modality_batching='separate'` .* does not combine with `packing`"):
        AlignGPTInstructConfig(output_dir=str(tmp_path), padding_free=True, modality_batching="separate")
    from aligngpt_hf.training.packing import prepare_packing

    streaming = Dataset.from_list([{"images": [], "messages": []}]).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"needs a map-style dataset .* use `padding_free=True`"):
        prepare_packing(SimpleNamespace(packing=True, padding_free=False), None, streaming, None)
    from aligngpt_hf.training.cli import parse_recipe

    _, args = parse_recipe("instruct", "instruct_tiny", ["--packing", "true", "--output_dir", str(tmp_path)])
    assert args.packing is True and args.padding_free is False


def test_lora_with_padding_free_equals_padded_lora(make_model, processor, images, tmp_path):
    from aligngpt_hf.training.trainers import aligngpt_lora_config

    dataset = Dataset.from_list(mixed_rows(images))
    weights = []
    for padding_free in (False, True):
        model = make_model(seed=5).train()
        model.config.aligngpt_stage = "pretrain"
        args = AlignGPTInstructConfig(output_dir=str(tmp_path / str(padding_free)), max_steps=2,
                                      per_device_train_batch_size=2, padding_free=padding_free, **FAST)
        trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                          peft_config=aligngpt_lora_config(r=4, lora_alpha=8, lora_dropout=0.0))
        weights.append({name: value for name, value in _weights_after_training(trainer).items() if "lora_" in name})
    assert weights[0] and weights[0].keys() == weights[1].keys()
    _assert_same_weights(weights[1], weights[0])


class _Killed(Exception):
    pass


class _KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Killed(f"killed after step {self.step}")


def test_packed_run_resumes_to_the_same_weights(make_model, processor, tmp_path):
    def trainer(output_dir, callbacks=()):
        model = make_model(seed=0).train()
        model.config.aligngpt_stage = "pretrain"
        args = AlignGPTInstructConfig(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=1,
                                      packing=True, max_length=300, save_steps=3,
                                      **{**FAST, "save_strategy": "steps"})
        return AlignGPTInstructTrainer(model=model, args=args, processing_class=processor, callbacks=list(callbacks),
                                       train_dataset=synthetic_dataset(8, "instruct", text_only_every=2))

    reference = trainer(tmp_path / "reference")
    assert 3 < len(reference.train_dataset) < 6  # the resumed part crosses an epoch of packs
    expected = _weights_after_training(reference)
    with pytest.raises(_Killed):
        trainer(tmp_path / "run", [_KillAfterStep(4)]).train()
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_flash_layout_puts_all_packs_in_one_row_and_pack_lengths_are_checked(processor, images):
    rows = mixed_rows(images)
    inner = stage_collator(processor, "instruct")
    lengths = inner(rows)["attention_mask"].sum(-1).tolist()
    packed = AlignGPTPackingCollator(inner, max_length=2048, one_row=True)([rows[:2], rows[2:]])
    assert packed["input_ids"].shape == (1, sum(lengths))  # no padding at all
    assert packed["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert packed["max_length_q"] == max(lengths)
    with pytest.raises(ValueError, match=rf"A pack of samples \[1, 2\] of this batch is {lengths[2] + lengths[3]} "
                                         r"tokens long, over max_length=\d+: the lengths measured when packing"):
        AlignGPTPackingCollator(inner, max_length=lengths[2] + lengths[3] - 1)([rows[:1], rows[2:]])


def test_pack_sampler_gives_single_modality_batches_of_similar_length_then_the_leftovers():
    lengths = [200, -150, 190, 100, -90, 220, 120, 210, -180, 95]  # negative: text-only packs
    sampler = PackLengthGroupedSampler(lengths, batch_size=2, seed=0, group=2)
    order = list(sampler)
    assert sorted(order) == list(range(10)) and list(sampler) == order
    batches = [order[i: i + 2] for i in range(0, 10, 2)]
    for batch in batches[:4]:  # 3 image + 1 text-only full batches, each sorted from a megabatch of 4
        assert len({lengths[i] > 0 for i in batch}) == 1 and abs(lengths[batch[0]]) >= abs(lengths[batch[1]])
    assert {lengths[i] > 0 for i in batches[4]} == {True, False}  # one leftover of each modality, last
    sampler.set_epoch(1)
    assert list(sampler) != order

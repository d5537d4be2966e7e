"""Both training stages on each language-model family with its own tokenizer and chat format: labels are exactly the
answers and their turn end, packed equals padded (loss and one optimizer step), stage 2 with the family's LoRA preset."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft.tuners.lora import LoraLayer
from PIL import Image
from transformers import TrainerCallback

from aligngpt_hf import (
    AlignGPTForConditionalGeneration,
    AlignGPTInstructConfig,
    AlignGPTInstructTrainer,
    AlignGPTPretrainConfig,
    AlignGPTPretrainTrainer,
)
from aligngpt_hf.models.chat_templates_aligngpt import turn_end
from aligngpt_hf.training.data import PLAIN_CHAT_TEMPLATE, AlignGPTDataCollator
from aligngpt_hf.training.lora_presets import LORA_TARGETS_BY_FAMILY
from aligngpt_hf.training.packing import AlignGPTPackingCollator
from aligngpt_hf.training.trainers import aligngpt_lora_config
from family_builders import tiny_family_parts

FAMILIES = ["qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "phi"]
FAST = dict(report_to="none", save_strategy="no", activation_checkpointing=False, use_cpu=True,
            dataloader_num_workers=0, logging_steps=1, warmup_steps=0, lr_scheduler_type="constant",
            disable_tqdm=True, seed=0, max_steps=1, per_device_train_batch_size=4, optim="sgd", learning_rate=0.1)
TURNS = [("What colour is the shape?", "The shape is red."), ("How many?", "There are two circles."),
         ("Is the caption correct?", "Yes."), ("What shape is it?", "It is a blue square.")]
PROJECTOR = {f"model.multi_modal_projector.linear_{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")}


def rows() -> list[dict]:
    """A one-image row, a text-only row, a two-image row and a one-image row (levels for stage 1)."""
    images = [Image.new("RGB", (36, 28), (200, 30, 30)), Image.new("RGB", (28, 40), (30, 60, 200))]
    return [{"id": f"row-{i}", "images": images[: count], "alignment_level": 2 * i + 1,
             "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            for i, ((question, answer), count) in enumerate(zip(TURNS, [1, 0, 2, 1]))]


def collator(processor, stage: str) -> AlignGPTDataCollator:
    if stage == "pretrain":
        return AlignGPTDataCollator(processor=processor, max_length=2048, assistant_only_loss=True,
                                    chat_template=PLAIN_CHAT_TEMPLATE, level_column="alignment_level")
    return AlignGPTDataCollator(processor=processor, max_length=2048, assistant_only_loss=True, gate_text_mask=True)


def fresh_model(config, stage: str = "pretrain"):
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(config)
    if stage == "instruct":
        model.config.aligngpt_stage = "pretrain"  # as if stage 1 had run
    return model


def expected_labels(processor, stage: str) -> list[str]:
    """Stage 1: each caption + "\\n" (the plain template); stage 2: each answer + the format's turn end."""
    if stage == "pretrain":
        return [f"{answer}\n" for _, answer in TURNS]
    tokenizer = processor.tokenizer
    end = turn_end(processor.chat_template)
    end = tokenizer.eos_token if end == "eos" else end
    return [f"{answer}{end}" for _, answer in TURNS]


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_answers_and_packed_loss_equals_padded(family, stage):
    processor, config = tiny_family_parts(family)
    inner = collator(processor, stage)
    padded, packed = inner(rows()), AlignGPTPackingCollator(inner)(rows())
    # vicuna_v1 (phi): the space of "ASSISTANT: " is supervised where BPE merges it into the answer's first token
    decoded = [processor.tokenizer.decode(row[row != -100]).removeprefix(" ") for row in padded["labels"]]
    assert decoded == expected_labels(processor, stage)
    assert packed["input_ids"].shape[0] == 1 and padded["attention_mask"].eq(0).any()
    model = fresh_model(config, stage).eval()
    with torch.no_grad():
        padded_loss, packed_loss = model(**padded).loss, model(**packed).loss
    torch.testing.assert_close(packed_loss, padded_loss, rtol=0, atol=1e-5)


def train_one_step(config, processor, stage: str, padding_free: bool, output_dir, peft_config=None):
    """(trainer, parameters before, after) of one SGD step on the four rows as one batch."""
    model = fresh_model(config, stage).train()
    dataset = Dataset.from_list(rows())
    if stage == "pretrain":
        args = AlignGPTPretrainConfig(output_dir=str(output_dir), padding_free=padding_free, **FAST)
        trainer = AlignGPTPretrainTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    else:
        args = AlignGPTInstructConfig(output_dir=str(output_dir), padding_free=padding_free, **FAST)
        trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                          peft_config=peft_config)
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before, {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


def relative_difference(packed: dict, padded: dict) -> float:
    return max(((packed[name] - value).norm() / value.norm().clamp(min=1e-12)).item() for name, value in padded.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_of_each_stage_packed_equals_padded_and_stage2_lora_reaches_only_the_language_model(family, tmp_path):
    processor, config = tiny_family_parts(family)
    runs = {}
    for padding_free in (False, True):
        _, before, after = train_one_step(config, processor, "pretrain", padding_free, tmp_path / f"s1-{padding_free}")
        assert {name for name in after if not torch.equal(after[name], before[name])} == (
            PROJECTOR | {"model.alignment.level_embeddings"})
        runs[padding_free] = after
    assert relative_difference(runs[True], runs[False]) <= 1e-5
    for padding_free in (False, True):
        lora = aligngpt_lora_config(r=2, lora_alpha=4, lora_dropout=0.0)
        trainer, before, after = train_one_step(config, processor, "instruct", padding_free,
                                                tmp_path / f"s2-{padding_free}", lora)
        wrapped = {name for name, module in trainer.model.named_modules() if isinstance(module, LoraLayer)}
        assert wrapped and all(".language_model.layers." in name for name in wrapped)
        preset = set(LORA_TARGETS_BY_FAMILY[config.text_config.model_type])  # every projection of the family's preset
        assert {name.rsplit(".", 1)[1] for name in wrapped} == preset
        assert len(wrapped) == len(preset) * config.text_config.num_hidden_layers
        moved = {name for name in after if not torch.equal(after[name], before[name])}
        assert any("lora_B" in name for name in moved)
        assert all("lora_" in name or "modules_to_save" in name for name in moved)
        runs[padding_free] = after
    assert relative_difference(runs[True], runs[False]) <= 1e-5


class _Killed(Exception):
    pass


class _KillAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:  # before checkpoint-2 is written
            raise _Killed("killed after step 2")


def instruct_run(config, processor, output_dir, batch_size: int, accumulation: int, padding_free: bool, callbacks=()):
    """Stage 2 (full fine-tuning, plain SGD) on eight rows: two optimizer steps, a checkpoint after each."""
    model = fresh_model(config, "instruct").train()
    args = AlignGPTInstructConfig(output_dir=str(output_dir), padding_free=padding_free,
                                  gradient_accumulation_steps=accumulation, group_by_modality_length=False,
                                  **{**FAST, "max_steps": 2, "per_device_train_batch_size": batch_size,
                                     "save_strategy": "steps", "save_steps": 1})
    return AlignGPTInstructTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows() + rows()),
                                   processing_class=processor, callbacks=list(callbacks))


def weights_after(trainer, **train_kwargs) -> dict:
    trainer.train(**train_kwargs)
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])  # no BOS; soft-capping; fused qkv projections
def test_accumulated_packed_micro_batches_and_a_resumed_run_equal_one_full_batch_run(family, tmp_path):
    """Two packed micro-batches of 2 take the step of one padded batch of 4 (the loss is normalised once over the
    accumulated targets), and a run killed at its last step resumes from checkpoint-1 to the same weights."""
    processor, config = tiny_family_parts(family)
    full = weights_after(instruct_run(config, processor, tmp_path / "full", 4, 1, False))
    accumulated = weights_after(instruct_run(config, processor, tmp_path / "accumulated", 2, 2, True))
    assert relative_difference(accumulated, full) <= 1e-5
    with pytest.raises(_Killed):
        instruct_run(config, processor, tmp_path / "killed", 2, 2, True, [_KillAfterStep()]).train()
    resumed = weights_after(instruct_run(config, processor, tmp_path / "killed", 2, 2, True),
                            resume_from_checkpoint=str(tmp_path / "killed" / "checkpoint-1"))
    assert all(torch.equal(resumed[name], value) for name, value in accumulated.items())
    start = fresh_model(config, "instruct").state_dict()
    assert not torch.equal(full["model.multi_modal_projector.linear_1.weight"],
                           start["model.multi_modal_projector.linear_1.weight"])

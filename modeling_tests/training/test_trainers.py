"""Stage-1 and stage-2 trainers on tiny models: what trains, what the model sees, LoRA, hand-over, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aligngpt_hf import (
    AlignGPTInstructConfig,
    AlignGPTInstructTrainer,
    AlignGPTPretrainConfig,
    AlignGPTPretrainTrainer,
)
from aligngpt_hf.training.data import synthetic_dataset
from aligngpt_hf.training.stage_handoff import load_for_instruct, merge_lora
from aligngpt_hf.training.trainers import aligngpt_lora_config

FAST = dict(
    per_device_train_batch_size=2,
    report_to="none",
    save_strategy="no",
    activation_checkpointing=False,
    use_cpu=True,
    dataloader_num_workers=0,
    logging_steps=1,
    warmup_steps=0,
    lr_scheduler_type="constant",
    disable_tqdm=True,
)
GATE = ["model.alignment.fc1.weight", "model.alignment.fc1.bias", "model.alignment.fc2.weight", "model.alignment.fc2.bias"]
PROJECTOR = [f"model.multi_modal_projector.linear_{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")]


def pretrain_args(tmp_path, **overrides):
    return AlignGPTPretrainConfig(output_dir=str(tmp_path / "stage1"), **{**FAST, "max_steps": 6, **overrides})


def instruct_args(tmp_path, **overrides):
    return AlignGPTInstructConfig(output_dir=str(tmp_path / "stage2"), **{**FAST, "max_steps": 4, **overrides})


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed(model, before):
    return sorted(name for name, param in model.named_parameters() if not torch.equal(param, before[name]))


def llm_names(model):
    return sorted(n for n, _ in model.named_parameters() if n.startswith(("model.language_model.", "lm_head.")))


def run_stage1(make_model, processor, tmp_path, **overrides):
    model = make_model().train()
    trainer = AlignGPTPretrainTrainer(model=model, args=pretrain_args(tmp_path, **overrides),
                                      train_dataset=synthetic_dataset(8, "pretrain"), processing_class=processor)
    return model, trainer


def test_stage1_trains_exactly_projector_and_level_table_and_loss_decreases(make_model, processor, tmp_path):
    model, trainer = run_stage1(make_model, processor, tmp_path, max_steps=8)
    before = snapshot(model)
    trainer.train()
    assert changed(model, before) == sorted(PROJECTOR + ["model.alignment.level_embeddings"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert model.config.aligngpt_stage == "pretrain"


def test_stage1_levels_reach_the_model(make_model, processor, tmp_path):
    """Only the rows of the levels in the data move: dropped levels would run the gate and move every row."""
    model = make_model().train()
    dataset = synthetic_dataset(8, "pretrain").map(lambda row, i: {"alignment_level": 2 + (i % 2) * 3},
                                                   with_indices=True)
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("alignment_levels")), with_kwargs=True)
    trainer = AlignGPTPretrainTrainer(model=model, args=pretrain_args(tmp_path, max_steps=3),
                                      train_dataset=dataset, processing_class=processor)
    table = model.model.alignment.level_embeddings.detach().clone()
    trainer.train()
    moved = [i for i in range(8) if not torch.equal(model.model.alignment.level_embeddings[i], table[i])]
    assert moved == [2, 5]
    assert all(levels is not None and sorted(levels.tolist()) == [2, 5] for levels in seen)


def test_stage1_vision_tower_option(make_model, processor, tmp_path):
    model, trainer = run_stage1(make_model, processor, tmp_path, max_steps=2, train_vision_tower=True)
    before = snapshot(model)
    trainer.train()
    moved = changed(model, before)
    assert any(name.startswith("model.vision_tower.") for name in moved)
    assert not any(name.startswith(("model.language_model.", "lm_head.", "model.alignment.fc")) for name in moved)


def test_stage2_trains_exactly_llm_projector_and_gate_with_mixed_batches(make_model, processor, tmp_path):
    model = make_model().train()
    model.config.aligngpt_stage = "pretrain"
    dataset = synthetic_dataset(8, "instruct", text_only_every=2)
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    trainer = AlignGPTInstructTrainer(model=model, args=instruct_args(tmp_path, group_by_modality_length=False),
                                      train_dataset=dataset, processing_class=processor)
    before = snapshot(model)
    trainer.train()
    assert changed(model, before) == sorted(llm_names(model) + PROJECTOR + GATE)
    assert model.config.aligngpt_stage == "instruct"
    batch = seen[0]
    has_image = (batch["input_ids"] == processor.image_token_id).any(-1).tolist()
    assert has_image == [True, False]  # order kept: image row, then text-only row
    mask = batch["gate_text_mask"]
    assert mask.dtype == torch.bool and not mask[batch["attention_mask"] == 0].any()


def test_stage2_modality_grouped_batches_are_single_modality(make_model, processor, tmp_path):
    model = make_model().train()
    model.config.aligngpt_stage = "pretrain"
    kinds = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: kinds.append(tuple((kw["input_ids"] == processor.image_token_id).any(-1).tolist())),
        with_kwargs=True,
    )
    trainer = AlignGPTInstructTrainer(model=model, args=instruct_args(tmp_path, max_steps=6),
                                      train_dataset=synthetic_dataset(12, "instruct", text_only_every=2),
                                      processing_class=processor)
    trainer.train()
    # LLaVA's order: 2 full megabatches per modality shuffled together, then the two leftovers mixed at the end
    assert sorted(kinds[:4]) == [(False, False), (False, False), (True, True), (True, True)]
    assert sorted(sum(kinds[4:], ())) == [False, False, True, True]


def test_stage2_refuses_an_untrained_level_table(make_model, processor, tmp_path):
    with pytest.raises(ValueError, match=r"^This model's projector and level table were never trained by stage 1 "
                                         r"\(its config has no `aligngpt_stage` marker\)\. .*"
                                         r"pass `allow_untrained_alignment=True`"):
        AlignGPTInstructTrainer(model=make_model(), args=instruct_args(tmp_path),
                                train_dataset=synthetic_dataset(4, "instruct"), processing_class=processor)
    AlignGPTInstructTrainer(model=make_model(), args=instruct_args(tmp_path, allow_untrained_alignment=True),
                            train_dataset=synthetic_dataset(4, "instruct"), processing_class=processor)


def test_wrong_config_class_and_lora_in_stage1_are_refused(make_model, processor, tmp_path):
    with pytest.raises(TypeError, match=r"^AlignGPTPretrainTrainer takes `args=AlignGPTPretrainConfig\(\.\.\.\)`, "
                                        r"got AlignGPTInstructConfig\.$"):
        AlignGPTPretrainTrainer(model=make_model(), args=instruct_args(tmp_path),
                                train_dataset=synthetic_dataset(4), processing_class=processor)
    with pytest.raises(ValueError, match=r"^Stage 1 trains the projector and level table in full; LoRA"):
        AlignGPTPretrainTrainer(model=make_model(), args=pretrain_args(tmp_path), peft_config=aligngpt_lora_config(),
                                train_dataset=synthetic_dataset(4), processing_class=processor)


def test_projector_learning_rate_gets_its_own_groups(make_model, processor, tmp_path):
    model = make_model().train()
    model.config.aligngpt_stage = "pretrain"
    trainer = AlignGPTInstructTrainer(model=model, args=instruct_args(tmp_path, projector_lr=1e-2, learning_rate=1e-4),
                                      train_dataset=synthetic_dataset(4, "instruct"), processing_class=processor)
    optimizer = trainer.create_optimizer()
    projector_ids = {id(p) for p in model.model.multi_modal_projector.parameters()}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= projector_ids if group["lr"] == 1e-2 else not ids & projector_ids
    assert sum(len(g["params"]) for g in optimizer.param_groups if g["lr"] == 1e-2) == 4


def test_lora_trains_only_adapters_and_saved_modules_then_merges_to_identical_outputs(
    make_model, processor, tmp_path
):
    model = make_model().train()
    model.config.aligngpt_stage = "pretrain"
    trainer = AlignGPTInstructTrainer(model=model, args=instruct_args(tmp_path, learning_rate=1e-2),
                                      train_dataset=synthetic_dataset(8, "instruct", text_only_every=4),
                                      processing_class=processor, peft_config=aligngpt_lora_config(r=4, lora_alpha=8))
    peft_model = trainer.model
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and not any("vision_tower" in n or "level_embeddings" in n for n in trainable)
    before = snapshot(peft_model)
    trainer.train()
    moved = changed(peft_model, before)
    assert moved and all("lora_" in n or "modules_to_save" in n for n in moved)
    assert {n.split(".modules_to_save")[0] for n in moved if "modules_to_save" in n} == {
        "base_model.model.model.multi_modal_projector", "base_model.model.model.alignment.fc1",
        "base_model.model.model.alignment.fc2"}
    trainer.save_model(str(tmp_path / "adapter"))
    batch = trainer.data_collator([synthetic_dataset(2, "instruct")[i] for i in range(2)])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "gate_text_mask")}
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        merged = merge_lora(peft_model, output_dir=str(tmp_path / "merged"), processor=processor)
        actual = merged(**inputs).logits
    assert type(merged).__name__ == "AlignGPTForConditionalGeneration"
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_stage1_output_to_stage2_to_save_to_remote_code_reload(make_model, processor, tmp_path):
    model, trainer = run_stage1(make_model, processor, tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "stage1"))
    start = load_for_instruct(str(tmp_path / "stage1"))
    assert start.config.aligngpt_stage == "pretrain"
    torch.testing.assert_close(start.model.alignment.level_embeddings, model.model.alignment.level_embeddings)
    stage2 = AlignGPTInstructTrainer(model=start, args=instruct_args(tmp_path, max_steps=2),
                                     train_dataset=synthetic_dataset(4, "instruct"), processing_class=processor)
    stage2.train()
    stage2.save_model(str(tmp_path / "final"))
    batch = stage2.data_collator([synthetic_dataset(1, "instruct")[0]])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = start.eval()(**inputs).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "folder = sys.argv[1]\n"
        "model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()\n"
        "AutoProcessor.from_pretrained(folder, trust_remote_code=True)\n"
        "inputs = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    logits = model(**inputs).logits\n"
        "expected = torch.load(sys.argv[3], weights_only=True)\n"
        "print(json.dumps({'module': type(model).__module__, 'stage': model.config.aligngpt_stage,\n"
        "                  'max_diff': (logits - expected).abs().max().item()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "final"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "expected.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["stage"] == "instruct"
    assert report["max_diff"] < 1e-5


def test_load_for_instruct_takes_the_language_model_from_a_base_llm(make_model, tokenizer, processor, tmp_path):
    from transformers import LlamaForCausalLM

    model, trainer = run_stage1(make_model, processor, tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "stage1"))
    torch.manual_seed(7)
    text_config = model.config.text_config
    base = LlamaForCausalLM(type(text_config)(**{**text_config.to_dict(), "vocab_size": len(tokenizer) - 2}))
    start = load_for_instruct(str(tmp_path / "stage1"), base_language_model=base)
    torch.testing.assert_close(start.model.language_model.layers[0].mlp.up_proj.weight,
                               base.model.layers[0].mlp.up_proj.weight)
    vocab = len(tokenizer) - 2
    torch.testing.assert_close(start.lm_head.weight[:vocab], base.lm_head.weight)
    torch.testing.assert_close(start.lm_head.weight[vocab:], model.lm_head.weight[vocab:])
    torch.testing.assert_close(start.model.multi_modal_projector.linear_1.weight,
                               model.model.multi_modal_projector.linear_1.weight)


def test_gradient_checkpointing_keeps_the_trainable_sets(make_model, processor, tmp_path):
    model, trainer = run_stage1(make_model, processor, tmp_path, max_steps=1, activation_checkpointing=True)
    before = snapshot(model)
    trainer.train()
    assert changed(model, before) == sorted(PROJECTOR + ["model.alignment.level_embeddings"])
    model = make_model().train()
    model.config.aligngpt_stage = "pretrain"
    trainer = AlignGPTInstructTrainer(model=model, args=instruct_args(tmp_path, max_steps=1, activation_checkpointing=True),
                                      train_dataset=synthetic_dataset(2, "instruct"), processing_class=processor)
    before = snapshot(model)
    trainer.train()
    assert model.model.language_model.gradient_checkpointing
    assert changed(model, before) == sorted(llm_names(model) + PROJECTOR + GATE)


@pytest.mark.parametrize("config_class", [AlignGPTPretrainConfig, AlignGPTInstructConfig])
def test_checkpointing_defaults_on_and_the_deprecated_name_still_counts(config_class, tmp_path):
    """TRL's default (on) applies only when neither name is given: `gradient_checkpointing=False`, the name most
    scripts still pass, must turn it off (with transformers' deprecation warning), not be overridden by our default."""
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert config_class(**common).activation_checkpointing is True
    assert config_class(**common, activation_checkpointing=False).gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):
        args = config_class(**common, gradient_checkpointing=False)
    assert (args.activation_checkpointing, args.gradient_checkpointing) == (False, False)


def test_image_token_mismatch_is_not_blamed_on_max_length(make_model, processor, tmp_path):
    model = make_model().train()
    model.config.aligngpt_stage = "pretrain"
    trainer = AlignGPTInstructTrainer(model=model, args=instruct_args(tmp_path, max_steps=1),
                                      train_dataset=synthetic_dataset(2, "instruct"), processing_class=processor)
    collate = trainer.data_collator

    def broken(examples):  # a hand-built batch with one `<image>` token too few
        batch = collate(examples)
        first = (batch["input_ids"][0] == processor.image_token_id).nonzero()[0, 0]
        batch["input_ids"][0, first] = processor.tokenizer.convert_tokens_to_ids("<unk>")
        return batch

    trainer.data_collator = broken
    with pytest.raises(ValueError, match=r"^Image features and image tokens do not match: the batch has 31 `<image>` "
                                         r"tokens \(per sample: \[15, 16\]\)"):
        trainer.train()


def test_load_for_instruct_from_a_converted_stage1_artefact(stage1_artefact, tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    source, artefact, tensors = stage1_artefact
    with pytest.raises(ValueError, match=r"is a converted stage-1 artefact \(projector \+ level table only\): pass "
                                         r"`base_language_model`"):
        load_for_instruct(str(artefact))
    torch.manual_seed(9)
    base = LlamaForCausalLM(source.config.text_config)
    model = load_for_instruct(str(artefact), base_language_model=base)
    assert model.config.aligngpt_stage == "pretrain"
    for name, tensor in tensors.items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    torch.testing.assert_close(model.lm_head.weight, base.lm_head.weight)
    torch.testing.assert_close(model.model.language_model.norm.weight, base.model.norm.weight)

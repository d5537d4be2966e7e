"""mPLUG-Owl recipe (its paper's §3.2 and released code) on tiny models: what each stage trains, where LoRA lands,
1:1 text-only / image batching, stage-1 vision weights handed to stage 2, the shipped recipes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from aligngpt_hf import (
    AlignGPTInstructConfig,
    AlignGPTInstructTrainer,
    AlignGPTPretrainConfig,
    AlignGPTPretrainTrainer,
)
from aligngpt_hf.cli import main
from aligngpt_hf.tiny import build_processor
from aligngpt_hf.training.cli import RECIPES_DIR, parse_recipe, resolve_recipe
from aligngpt_hf.training.data import synthetic_dataset
from aligngpt_hf.training.mplug_owl import MPLUG_OWL_TINY_CONFIG, mplug_owl_lora_config
from aligngpt_hf.training.sampler import SeparateModalitySampler, separate_modality_indices
from aligngpt_hf.training.stage_handoff import load_for_instruct

FAST = dict(per_device_train_batch_size=2, report_to="none", save_strategy="no", activation_checkpointing=False,
            use_cpu=True, dataloader_num_workers=0, logging_steps=1, warmup_steps=0, disable_tqdm=True)
GPU_ONLY = ["--bf16", "false", "--tf32", "false", "--use_cpu", "true"]


@pytest.fixture(scope="module")
def owl_processors(tokenizer):
    """alignment_mode -> processor: 7 image tokens, `<align>` only where the model takes one."""
    tokens = MPLUG_OWL_TINY_CONFIG["abstractor_num_queries"] + 1
    return {mode: build_processor(tokenizer, image_seq_length=tokens, add_alignment_token=mode != "none")
            for mode in ("adaptive", "none")}


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed(model, before):
    return {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}


def names_under(model, *prefixes):
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


@pytest.mark.parametrize("alignment_mode", ["adaptive", "none"])
def test_stage1_trains_exactly_vision_tower_and_abstractor_and_saves_the_vision_tower(
        make_model, owl_processors, tmp_path, alignment_mode):
    owl_processor = owl_processors[alignment_mode]
    model = make_model(alignment_mode=alignment_mode, **MPLUG_OWL_TINY_CONFIG).train()
    with_table = alignment_mode != "none"
    args = AlignGPTPretrainConfig(output_dir=str(tmp_path / "stage1"), max_steps=2, learning_rate=1e-3,
                                  train_vision_tower=True, vision_lr_multiplier=0.1, train_level_table=with_table,
                                  adam_beta2=0.98, adam_epsilon=1e-6, weight_decay=0.1, **FAST)
    trainer = AlignGPTPretrainTrainer(model=model, args=args, train_dataset=synthetic_dataset(4, "pretrain"),
                                      processing_class=owl_processor)
    before = snapshot(model)
    trainer.train()
    expected = names_under(model, "model.vision_tower.", "model.multi_modal_projector.")
    assert changed(model, before) == expected | ({"model.alignment.level_embeddings"} if with_table else set())
    vision = set(map(id, model.model.vision_tower.parameters()))
    rates = {(all(id(p) in vision for p in group["params"]), round(group["initial_lr"], 12))
             for group in trainer.optimizer.param_groups}
    assert rates == {(True, 1e-4), (False, 1e-3)}  # vision lr = lr x vision_lr_multiplier
    # stage-1 artefacts hold the trained vision tower, and stage 2 starts from it
    trainer.save_model(str(tmp_path / "stage1"))
    stage2 = load_for_instruct(str(tmp_path / "stage1"))
    trained = dict(model.model.vision_tower.named_parameters())
    loaded = dict(stage2.model.vision_tower.named_parameters())
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert not any(torch.equal(loaded[k], before[f"model.vision_tower.{k}"]) for k in trained)


@pytest.mark.parametrize(("alignment_mode", "train_projector"), [("none", False), ("adaptive", True)])
def test_stage2_lora_trains_only_llm_q_v_adapters_with_one_text_and_one_image_batch_per_step(
        make_model, owl_processors, tmp_path, alignment_mode, train_projector):
    owl_processor = owl_processors[alignment_mode]
    model = make_model(alignment_mode=alignment_mode, **MPLUG_OWL_TINY_CONFIG).train()
    model.config.aligngpt_stage = "pretrain"
    kinds = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: kinds.append(set((kw["input_ids"] == owl_processor.image_token_id).any(-1).tolist())),
        with_kwargs=True,
    )
    args = AlignGPTInstructConfig(output_dir=str(tmp_path / "stage2"), max_steps=2, gradient_accumulation_steps=2,
                                  learning_rate=1e-2, modality_batching="separate", train_projector=train_projector,
                                  max_grad_norm=1.0, weight_decay=1e-4, **FAST)
    dataset = synthetic_dataset(10, "instruct", text_only_every=5)  # 2 text-only rows, 8 image rows
    trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=owl_processor,
                                      peft_config=mplug_owl_lora_config())
    names = {name for name, _ in trainer.model.named_parameters()}
    lora = {name for name in names if "lora_" in name}
    assert lora and all(".language_model.layers." in n and (".q_proj." in n or ".v_proj." in n) for n in lora)
    assert not any(".vision_tower." in n or ".multi_modal_projector." in n for n in lora)
    saved = {name for name in names if "modules_to_save" in name}
    expected_saved = {"multi_modal_projector"} if train_projector else set()
    if alignment_mode != "none":
        expected_saved |= {"alignment.fc1", "alignment.fc2"}  # AlignGPT's gate trains in stage 2 either way
    assert {n.split(".modules_to_save")[0].removeprefix("base_model.model.model.") for n in saved} == expected_saved
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(trainer.model, before)
    assert moved == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert moved <= lora | saved and {n for n in lora if "lora_B" in n} <= moved
    assert kinds == [{False}, {True}] * 2  # text, image | text, image: one of each per optimizer step
    assert trainer.modality_batching_counts == {"text_repeated": 6, "text_unused": 0, "image_repeated": 0,
                                                "image_unused": 0}


def test_lora_that_reaches_the_abstractor_is_refused(make_model, owl_processors, tmp_path):
    owl_processor = owl_processors["none"]
    model = make_model(alignment_mode="none", **MPLUG_OWL_TINY_CONFIG)
    loose = LoraConfig(r=2, target_modules=r".*\.(q_proj|v_proj)", exclude_modules=r".*vision_tower.*",
                       modules_to_save=[], task_type="CAUSAL_LM")
    args = AlignGPTInstructConfig(output_dir=str(tmp_path / "s2"), max_steps=1, train_projector=False, **FAST)
    with pytest.raises(ValueError, match=r"^LoRA reached the multi modal projector \(.*layers\.0\.q_proj"):
        AlignGPTInstructTrainer(model=model, args=args, train_dataset=synthetic_dataset(2, "instruct"),
                                processing_class=owl_processor, peft_config=loose)
    with pytest.raises(ValueError, match=r"^`train_projector=False`, but the LoRA config's `modules_to_save`"):
        AlignGPTInstructTrainer(model=model, args=AlignGPTInstructConfig(
            output_dir=str(tmp_path / "s2"), train_projector=False, **FAST), processing_class=owl_processor,
            peft_config=mplug_owl_lora_config(modules_to_save=["multi_modal_projector"]))


def test_full_fine_tuning_can_freeze_the_projector(make_model, owl_processors, tmp_path):
    owl_processor = owl_processors["none"]
    model = make_model(alignment_mode="none", **MPLUG_OWL_TINY_CONFIG)
    args = AlignGPTInstructConfig(output_dir=str(tmp_path / "s2"), max_steps=1, train_projector=False, **FAST)
    AlignGPTInstructTrainer(model=model, args=args, train_dataset=synthetic_dataset(2, "instruct"),
                            processing_class=owl_processor)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names_under(model, "model.language_model.", "lm_head.")


def test_separate_batching_cycles_or_stops_and_counts():
    lengths = [3, 4, -2, 5, 6, -1, 7]  # 5 image rows, 2 text-only rows
    order, counts = separate_modality_indices(lengths, 2, torch.Generator().manual_seed(0), "cycle")
    batches = [order[i : i + 2] for i in range(0, len(order), 2)]
    assert len(batches) == 6 and all((lengths[b[0]] > 0) == (lengths[b[1]] > 0) for b in batches)
    assert [lengths[b[0]] > 0 for b in batches] == [False, True] * 3
    image_draws = [i for b in batches[1::2] for i in b]
    assert set(image_draws) == {0, 1, 3, 4, 6} and len(image_draws) == 6  # every image row, one drawn twice
    assert counts == {"text_repeated": 4, "text_unused": 0, "image_repeated": 1, "image_unused": 0}
    order, counts = separate_modality_indices(lengths, 2, torch.Generator().manual_seed(0), "stop")
    assert len(order) == 4 and counts == {"text_repeated": 0, "text_unused": 0, "image_repeated": 0,
                                          "image_unused": 3}
    with pytest.raises(ValueError, match=r"no text rows; use modality_batching='mixed'"):
        SeparateModalitySampler([1, 2], batch_size=1)
    with pytest.raises(ValueError, match=r"fewer rows \(2\) than one batch \(4\)"):
        SeparateModalitySampler(lengths, batch_size=4, on_exhausted="stop")
    with pytest.raises(ValueError, match=r"`modality_batching` must be one of \('mixed', 'separate'\)"):
        AlignGPTInstructConfig(output_dir="x", modality_batching="1:1", use_cpu=True)
    with pytest.raises(ValueError, match=r"^`vision_lr_multiplier` sets the vision tower's learning rate, but the "
                                         r"vision tower is frozen"):
        AlignGPTPretrainConfig(output_dir="x", vision_lr_multiplier=0.1, use_cpu=True)


def test_shipped_mplug_owl_recipes_follow_the_paper():
    assert resolve_recipe("mplug_owl_stage1") == resolve_recipe("mplug-owl-stage1") == RECIPES_DIR / \
        "mplug-owl-stage1.yaml"
    script, args = parse_recipe("pretrain", "mplug-owl-stage1", GPU_ONLY)
    assert script.model_preset == "mplug-owl" and script.vision_tower == "openai/clip-vit-large-patch14"
    assert args.train_vision_tower and args.train_level_table and args.vision_lr_multiplier is None
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (1e-4, 0.9, 0.98, 1e-6)
    assert args.weight_decay == 0.1 and args.lr_scheduler_type == "cosine" and args.max_length == 512
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 4096
    script, args = parse_recipe("instruct", "mplug-owl-stage2", GPU_ONLY)
    assert script.use_lora and (script.lora_r, script.lora_alpha, script.lora_dropout) == (8, 32, 0.05)
    assert script.lora_target_modules == "mplug-owl"
    assert args.learning_rate == 2e-5 and args.warmup_steps == 50 and args.max_grad_norm == 1.0
    assert args.weight_decay == 1e-4 and args.adam_epsilon == 1e-6 and args.modality_batching == "separate"
    assert not args.train_projector and args.max_steps == 2000
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 256


def test_tiny_mplug_owl_recipes_run_both_stages_from_the_cli(tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert main(["pretrain", "mplug-owl-stage1-tiny", "--output_dir", str(stage1), "--disable_tqdm", "true"]) == 0
    config = json.loads((stage1 / "config.json").read_text())
    assert config["projector_type"] == "abstractor" and config["image_seq_length"] == 7
    assert main(["instruct", "mplug_owl_stage2_tiny", "--model_name_or_path", str(stage1), "--output_dir",
                 str(stage2), "--merge_lora", "false", "--disable_tqdm", "true"]) == 0
    adapter = json.loads((stage2 / "adapter_config.json").read_text())
    assert adapter["target_modules"] == r"(.*\.)?language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
    assert sorted(adapter["modules_to_save"]) == ["alignment.fc1", "alignment.fc2"]  # abstractor frozen
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 32, 0.05)

"""`aligngpt-hf pretrain|instruct RECIPE [--field value ...]`: shipped recipes, tiny end-to-end run, from-parts start."""

from __future__ import annotations

import pytest
import torch
import yaml

from aligngpt_hf import AlignGPTConfig
from aligngpt_hf.cli import main
from aligngpt_hf.hub.hub_configs import hub_config_variants
from aligngpt_hf.training.cli import RECIPES_DIR, accelerate_config_path, parse_recipe
from aligngpt_hf.training.model_setup import build_from_components, config_overrides

GPU_ONLY = ["--bf16", "false", "--tf32", "false", "--use_cpu", "true"]


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_paper_recipes(size):
    for stage, lr, global_batch in (("pretrain", 1e-3, 256), ("instruct", 2e-5, 128)):
        raw = yaml.safe_load((RECIPES_DIR / f"{stage}_{size}.yaml").read_text())
        assert raw["bf16"] is True and raw["tf32"] is True and raw["activation_checkpointing"] is True
        script, args = parse_recipe(stage, f"{stage}_{size}", GPU_ONLY)
        assert args.learning_rate == lr and args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.03
        assert args.num_train_epochs == 1 and args.max_length == 2048 and args.weight_decay == 0
        assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == global_batch
    assert script.model_name_or_path == f"checkpoints/aligngpt-{size}-pretrain" and args.group_by_modality_length


# recipe suffix -> (language model, vision tower, hub config of the result, stage-2 batch per device, accumulation)
FAMILY_RECIPES = {
    "llama3_8b_siglip": ("meta-llama/Meta-Llama-3-8B-Instruct", "google/siglip-so400m-patch14-384",
                         "aligngpt-llama3-8b-instruct-siglip", 8, 2),
    "gemma_7b": ("google/gemma-7b", "openai/clip-vit-large-patch14-336", "aligngpt-gemma-7b", 16, 1),
    "mistral_7b": ("mistralai/Mistral-7B-Instruct-v0.2", "openai/clip-vit-large-patch14-336",
                   "aligngpt-mistral-7b-instruct", 16, 1),
    "phi2": ("microsoft/phi-2", "openai/clip-vit-large-patch14-336", "aligngpt-phi-2", 16, 1),
}


def recipe_stage(stem: str) -> str:
    return "pretrain" if stem.startswith("pretrain") or stem.endswith(("stage1", "stage1-tiny")) else "instruct"


def test_every_shipped_recipe_parses_for_its_stage():
    stems = sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))
    assert {f"{stage}_{name}" for name in FAMILY_RECIPES for stage in ("pretrain", "instruct")} <= set(stems)
    for stem in stems:
        script, args = parse_recipe(recipe_stage(stem), stem, GPU_ONLY)
        assert args.output_dir and (script.model_name_or_path or (script.language_model and script.vision_tower)), stem


@pytest.mark.parametrize("name", FAMILY_RECIPES)
def test_family_recipes_build_the_hub_config_and_keep_the_paper_schedule(name):
    language_model, vision_tower, variant, per_device, accumulation = FAMILY_RECIPES[name]
    script, pretrain = parse_recipe("pretrain", f"pretrain_{name}", GPU_ONLY)
    assert (script.language_model, script.vision_tower, script.num_alignment_levels) == (language_model, vision_tower, 8)
    assert pretrain.learning_rate == 1e-3 and pretrain.per_device_train_batch_size * 8 * pretrain.gradient_accumulation_steps == 256
    stage2_script, instruct = parse_recipe("instruct", f"instruct_{name}", GPU_ONLY)
    assert stage2_script.model_name_or_path == pretrain.output_dir and instruct.learning_rate == 2e-5
    assert (instruct.per_device_train_batch_size, instruct.gradient_accumulation_steps) == (per_device, accumulation)
    assert instruct.group_by_modality_length and instruct.max_length == 2048
    hub = hub_config_variants()[variant]
    for levels in (4, 5, 6, 8, 10):  # the level count is a recipe override
        script = parse_recipe("pretrain", f"pretrain_{name}", [*GPU_ONLY, "--num_alignment_levels", str(levels)])[0]
        built = AlignGPTConfig(  # what build_from_components makes of the recipe, on the hub config's parts
            vision_config=hub.vision_config, text_config=hub.text_config, image_token_id=hub.image_token_id,
            alignment_token_id=hub.alignment_token_id, num_alignment_levels=script.num_alignment_levels,
            **config_overrides(script))
        assert built.num_alignment_levels == levels
        assert (built.image_seq_length, built.vision_feature_select_strategy) == (
            hub.image_seq_length, hub.vision_feature_select_strategy)


def test_overrides_beat_the_recipe_and_unknown_recipes_are_named():
    _, args = parse_recipe("pretrain", "pretrain_tiny", ["--learning_rate", "0.5", "--max_steps", "2"])
    assert args.learning_rate == 0.5 and args.max_steps == 2
    with pytest.raises(FileNotFoundError, match=r"^No recipe 'nope': not a file, nor a shipped recipe \(instruct_13b, "):
        parse_recipe("pretrain", "nope")
    assert accelerate_config_path("zero3").read_text().count("zero_stage: 3") == 1


def test_tiny_recipes_run_both_stages_and_lora_merge(tmp_path, capsys):
    stage1, stage2, lora = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "lora"
    assert main(["pretrain", "pretrain_tiny", "--output_dir", str(stage1), "--disable_tqdm", "true"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"aligngpt-hf pretrain: model saved to {stage1}"
    assert (stage1 / "model.safetensors").is_file() and (stage1 / "processor_config.json").is_file()
    common = ["--model_name_or_path", str(stage1), "--disable_tqdm", "true", "--max_steps", "2"]
    assert main(["instruct", "instruct_tiny", "--output_dir", str(stage2), *common]) == 0
    assert main(["instruct", "instruct_tiny", "--output_dir", str(lora), *common, "--use_lora", "true",
                 "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"]) == 0
    assert (lora / "adapter_model.safetensors").is_file() and (lora / "merged" / "model.safetensors").is_file()
    from aligngpt_hf import AlignGPTForConditionalGeneration

    merged = AlignGPTForConditionalGeneration.from_pretrained(lora / "merged")
    start = AlignGPTForConditionalGeneration.from_pretrained(stage1)
    assert merged.config.aligngpt_stage == "instruct"
    assert not torch.equal(merged.model.language_model.layers[0].self_attn.q_proj.weight,
                           start.model.language_model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(merged.model.vision_tower.embeddings.patch_embedding.weight,
                               start.model.vision_tower.embeddings.patch_embedding.weight)


def test_build_from_components_copies_pretrained_weights(tokenizer, tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPVisionModel, LlamaForCausalLM

    from aligngpt_hf.tiny import build_config

    config = build_config(tokenizer)
    torch.manual_seed(3)
    llm, vision = LlamaForCausalLM(config.text_config), CLIPVisionModel(config.vision_config)
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    vision.save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    model, processor = build_from_components(str(tmp_path / "llm"), str(tmp_path / "clip"), num_alignment_levels=4)
    assert model.config.num_alignment_levels == 4 and processor.image_seq_length == 16
    assert model.config.text_config.vocab_size % 64 == 0
    vocab = len(tokenizer)
    torch.testing.assert_close(model.lm_head.weight[:vocab], llm.lm_head.weight)
    ours = model.model.vision_tower.state_dict()
    assert ours.keys() == vision.state_dict().keys()
    for name, tensor in vision.state_dict().items():
        torch.testing.assert_close(ours[name], tensor)
    assert processor.image_processor.do_pad is True


def test_instruct_cli_starts_from_a_converted_stage1_artefact(stage1_artefact, tokenizer, tmp_path):
    from transformers import CLIPImageProcessorPil, LlamaForCausalLM

    source, artefact, tensors = stage1_artefact
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(artefact)
    LlamaForCausalLM(source.config.text_config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    out = tmp_path / "stage2"
    assert main(["instruct", "instruct_tiny", "--model_name_or_path", str(artefact), "--language_model",
                 str(tmp_path / "llm"), "--output_dir", str(out), "--max_steps", "1", "--disable_tqdm", "true"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()

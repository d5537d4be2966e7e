"""`aligngpt-hf pretrain|instruct RECIPE --dry-run`: full-size plans on a CPU, offline, checked against known counts."""

from __future__ import annotations

import json

import pytest
import torch

from aligngpt_hf.cli import main
from aligngpt_hf.training.cli import RECIPES_DIR, parse_recipe
from aligngpt_hf.training.memory import GIB, TrainingShape, estimate_memory

CLIP_L_336 = 303_507_456
VICUNA_7B = 6_738_415_616  # 32,000-token vocabulary
PROJECTOR_7B = 20_979_712  # 1024 -> 4096 -> 4096 with biases
LEVEL_TABLE_7B = 32_768  # 8 x 4096
ADDED_ROWS_7B = 2 * 64 * 4096  # `<image>`, `<align>` + padding to 32,064 rows, in embeddings and LM head


def dry_run(tmp_path, stage: str, recipe: str, *overrides: str) -> dict:
    """The plan written by the CLI; `--debug` lets a refusal raise its exception for `pytest.raises` to read."""
    out = tmp_path / recipe
    assert main([stage, recipe, "--dry-run", "--output_dir", str(out), *overrides, "--debug"]) == 0
    return json.loads((out / "dry_run.json").read_text())


def test_pretrain_7b_plans_the_paper_stage_1_on_a_cpu(tmp_path, capsys):
    report = dry_run(tmp_path, "pretrain", "pretrain_7b")
    modules = report["modules"]
    assert modules["model.vision_tower"] == {"params": CLIP_L_336, "trainable": 0}
    assert modules["model.language_model"]["params"] + modules["lm_head"]["params"] == VICUNA_7B + ADDED_ROWS_7B
    assert modules["model.multi_modal_projector"] == {"params": PROJECTOR_7B, "trainable": PROJECTOR_7B}
    assert modules["model.alignment.level_embeddings"] == {"params": LEVEL_TABLE_7B, "trainable": LEVEL_TABLE_7B}
    assert report["trainable_params"] == 21_012_480
    assert report["total_params"] == sum(entry["params"] for entry in modules.values())
    assert (report["dtype"], report["num_gpus"], report["global_batch_size"], report["seq_length"]) == (
        "bfloat16", 8, 256, 2048)
    assert report["data"]["status"] == "missing" and "does not exist" in report["data"]["message"]
    assert set(report["memory_gib"]) == {"ddp", "zero2", "zero3", "fsdp"}
    printed = capsys.readouterr().out
    assert "21,012,480 trainable" in printed and "zero3" in printed


def test_without_dry_run_the_bf16_recipe_still_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="Your setup doesn't support bf16/gpu"):
        parse_recipe("pretrain", "pretrain_7b", ["--output_dir", str(tmp_path)])


def test_dry_run_flag_is_accepted_before_the_recipe_too(tmp_path):
    out = tmp_path / "out"
    assert main(["pretrain", "--dry-run", "pretrain_tiny", "--output_dir", str(out)]) == 0
    assert json.loads((out / "dry_run.json").read_text())["dtype"] == "float32"


def recipe_stage(stem: str) -> str:
    return "instruct" if stem.startswith("instruct") or "stage2" in stem else "pretrain"


# recipes that start from `aligngpt-hf from-llava`'s output: planned from a folder holding its config
FROM_LLAVA = [p.stem for p in RECIPES_DIR.glob("*from_llava*.yaml")]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem not in FROM_LLAVA))
def test_every_shipped_recipe_dry_runs(tmp_path, recipe):
    stage = recipe_stage(recipe)
    report = dry_run(tmp_path, stage, recipe)
    assert 0 < report["trainable_params"] < report["total_params"]
    for strategy in ("ddp", "zero2", "zero3", "fsdp"):
        terms = report["memory_gib"][strategy]
        assert terms["total"] == pytest.approx(sum(v for k, v in terms.items() if k != "total"), abs=0.01)
    if stage == "instruct" and not report["use_lora"]:  # stage 2: everything but the tower and the level table
        modules = report["modules"]
        frozen = modules["model.vision_tower"]["params"] + modules.get("model.alignment.level_embeddings",
                                                                        {"params": 0})["params"]
        train_projector = "mplug" not in recipe
        frozen += 0 if train_projector else modules["model.multi_modal_projector"]["params"]
        assert report["trainable_params"] == report["total_params"] - frozen


def test_instruct_7b_plans_from_the_stage_1_folder_pretrain_7b_writes(tmp_path):
    report = dry_run(tmp_path, "instruct", "instruct_7b")
    assert report["model_source"].startswith("checkpoints/aligngpt-7b-pretrain does not exist yet: planned as "
                                             "recipe pretrain_7b writes it")
    modules = report["modules"]
    assert report["trainable_params"] == report["total_params"] - CLIP_L_336 - LEVEL_TABLE_7B
    assert modules["model.alignment"]["trainable"] == modules["model.alignment"]["params"] > 0  # the gate trains


def test_memory_formula_against_a_hand_computation():
    p, t, n, layer = 7_000_000_000, 21_000_000, 8, 200_000_000
    shape = TrainingShape(total_params=p, trainable_params=t, decoder_layer_params=layer, root_params=p - 32 * layer,
                          num_layers=32, hidden_size=4096, intermediate_size=11008, batch_size=8, seq_length=2048,
                          mixed_precision=True, activation_checkpointing=True, num_gpus=n)
    tokens = 8 * 2048
    activations = 2 * (32 * tokens * 4096 + tokens * (11 * 4096 + 4 * 11008))
    memory = estimate_memory(shape)
    assert memory["ddp"]["total"] == pytest.approx((4 * p + 16 * t + activations) / GIB, abs=1e-3)
    assert memory["zero2"]["total"] == pytest.approx((2 * p + 2 * t / n + 12 * t / n + activations) / GIB, abs=1e-3)
    assert memory["zero3"]["total"] == pytest.approx((2 * p / n + 14 * t / n + 4 * layer + activations) / GIB,
                                                     abs=1e-3)
    assert memory["fsdp"]["total"] == pytest.approx(
        (4 * p / n + 12 * t / n + 4 * layer + 2 * (p - 32 * layer) + activations) / GIB, abs=1e-3)
    no_checkpointing = estimate_memory(TrainingShape(**{**shape.__dict__, "activation_checkpointing": False}))
    assert no_checkpointing["ddp"]["activations"] == pytest.approx(
        2 * 32 * tokens * (11 * 4096 + 4 * 11008) / GIB, abs=1e-3)


def _save_parts(tokenizer, tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPVisionModel, LlamaForCausalLM

    from aligngpt_hf.tiny import build_config

    config = build_config(tokenizer)
    LlamaForCausalLM(config.text_config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    CLIPVisionModel(config.vision_config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    return str(tmp_path / "llm"), str(tmp_path / "clip")


def test_local_parts_plan_the_same_model_a_real_run_builds(tokenizer, tmp_path):
    from aligngpt_hf.training.dry_run import parameter_counts
    from aligngpt_hf.training.model_setup import build_stage_model
    from aligngpt_hf.training.trainers import freeze_for_pretrain

    llm, clip = _save_parts(tokenizer, tmp_path)
    parts = ["--language_model", llm, "--vision_tower", clip, "--num_alignment_levels", "4"]
    report = dry_run(tmp_path, "pretrain", "pretrain_7b", *parts)
    script_args, training_args = parse_recipe("pretrain", "pretrain_7b", [*parts, "--output_dir", str(tmp_path / "x"),
                                                                         "--bf16", "false", "--tf32", "false"])
    model, _ = build_stage_model("pretrain", script_args, training_args)
    freeze_for_pretrain(model)
    real = parameter_counts(model)
    assert {k: report[k] for k in real} == real
    assert "local config" in report["model_source"]


def test_instruct_from_an_existing_folder_reads_its_config_and_checks_the_stage_marker(make_model, tmp_path):
    folder = tmp_path / "stage1"
    make_model().save_pretrained(folder)
    with pytest.raises(ValueError, match="never trained by stage 1"):
        dry_run(tmp_path, "instruct", "instruct_tiny", "--model_name_or_path", str(folder))
    report = dry_run(tmp_path, "instruct", "instruct_tiny", "--model_name_or_path", str(folder),
                     "--allow_untrained_alignment", "true", "--use_lora", "true", "--lora_r", "4")
    assert report["model_source"] == f"{folder}/config.json"
    assert report["lora_params"] > 0 and report["modules"]["model.vision_tower"]["trainable"] == 0
    assert report["modules"]["model.alignment.level_embeddings"]["trainable"] == 0


def test_unknown_components_are_refused_without_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^dry run: no config for language_model 'nobody/no-such-llm': not a "
                       r"local folder, not in the Hugging Face cache"):
        dry_run(tmp_path, "pretrain", "pretrain_7b", "--language_model", "nobody/no-such-llm")


def _write_llava(path, folder, count: int, missing_image_at: int | None = None):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    records = []
    for index in range(count):
        if index != missing_image_at:
            Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(folder / f"{index}.png")
        records.append({"id": f"r{index}", "image": f"{index}.png", "similarity": index % 8, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"caption {index}"}]})
    path.write_text(json.dumps(records, indent=1))


def test_data_path_is_checked_on_its_first_records(tmp_path):
    data, images = tmp_path / "pairs.json", tmp_path / "images"
    _write_llava(data, images, 20, missing_image_at=15)  # beyond the records a dry run reads
    common = ["--data_path", str(data), "--image_folder", str(images)]
    report = dry_run(tmp_path, "pretrain", "pretrain_7b", *common)
    assert report["data"]["status"] == "first 8 records valid, their images present"
    _write_llava(data, images, 20, missing_image_at=3)
    (images / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match="r3"):
        dry_run(tmp_path, "pretrain", "pretrain_7b", *common)


def test_instruct_from_a_converted_stage1_artefact_needs_the_base_llm_and_plans_its_config(stage1_artefact, tmp_path):
    source, artefact, _ = stage1_artefact
    with pytest.raises(ValueError, match=r"is a converted stage-1 artefact \(projector \+ level table only\): pass "
                                         r"`language_model`"):
        dry_run(tmp_path, "instruct", "instruct_tiny", "--model_name_or_path", str(artefact))
    report = dry_run(tmp_path, "instruct", "instruct_tiny", "--model_name_or_path", str(artefact),
                     "--language_model", str(tmp_path / "base-llm"))
    assert report["model_source"] == f"{artefact} (converted stage-1 artefact)"
    assert report["total_params"] == sum(p.numel() for p in source.parameters())


def test_a_start_nobody_writes_is_refused_with_the_way_out(tmp_path):
    from aligngpt_hf.hub.hub_configs import config_json, released_config

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"not the output_dir of a shipped recipe; the dry run never downloads\. "
                                                r"Plan from a folder holding its config instead"):
        dry_run(tmp_path, "instruct", "instruct_7b", "--model_name_or_path", missing)
    published = tmp_path / "aligngpt-7b"
    published.mkdir()
    (published / "config.json").write_text(config_json(released_config("aligngpt-7b")))
    report = dry_run(tmp_path, "instruct", "instruct_7b", "--model_name_or_path", str(published),
                     "--allow_untrained_alignment", "true")
    assert report["trainable_params"] == report["total_params"] - CLIP_L_336 - LEVEL_TABLE_7B


@pytest.mark.parametrize("recipe", sorted(FROM_LLAVA))
def test_from_llava_recipes_plan_from_the_config_of_their_start(tmp_path, recipe):
    """Their start is `aligngpt-hf from-llava`'s output, which no recipe writes: refused until a config is named."""
    from aligngpt_hf.hub.hub_configs import config_json, released_config

    with pytest.raises(FileNotFoundError, match=r"Plan from a folder holding its config instead"):
        dry_run(tmp_path, recipe_stage(recipe), recipe)
    start = tmp_path / "start"
    start.mkdir()
    (start / "config.json").write_text(config_json(released_config("aligngpt-7b")))
    stage = recipe_stage(recipe)
    extra = ["--allow_untrained_alignment", "true"] if stage == "instruct" else []
    report = dry_run(tmp_path, stage, recipe, "--model_name_or_path", str(start), *extra)
    if recipe.startswith("pretrain"):  # the alignment warm-up: the level table only (train_projector: false)
        assert report["trainable_params"] == LEVEL_TABLE_7B

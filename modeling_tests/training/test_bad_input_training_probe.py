"""Bad input, training data and command line: LLaVA records the loader let through or answered with a bare Python
error, stage-1 levels found missing only mid-run, recipe values that trained on garbage or crashed inside the
Trainer, and stage-2 starts from folders that are not a stage-1 output.

Each test names the case and asserts the exception type and the key words of its message (file, record, field, fix).
"""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import pytest
from PIL import Image

from aligngpt_hf import AlignGPTInstructConfig, AlignGPTPretrainConfig, AlignGPTPretrainTrainer, cli, load_llava_json
from aligngpt_hf.training.checkpoints import resolve_resume
from aligngpt_hf.training.configs import AlignGPTScriptArguments
from aligngpt_hf.training.data import synthetic_dataset
from aligngpt_hf.training.stage_handoff import check_alignment_trained, load_for_instruct

TURNS = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."}]
TINY_RECIPE = "pretrain_tiny"


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    return tmp_path


def write(folder, records, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def record(**fields):
    return {"id": "r1", "image": "a.png", "conversations": TURNS, **fields}


def answer(value):
    return [TURNS[0], {"from": "gpt", "value": value}]


# ------------------------------------------------------------------------------------------------ LLaVA records


def test_speaker_that_is_not_a_string_names_the_field(folder):
    path = write(folder, [record(conversations=[{"from": ["human"], "value": "<image>\nx"}, TURNS[1]])])
    with pytest.raises(ValueError, match=r"data\.json: record 'r1' \(#0\): `conversations\[0\]\.from` is \['human'\]; "
                                         r"expected one of \['assistant', 'gpt', 'human', 'system', 'user'\]\.$"):
        load_llava_json(path, folder / "images")


@pytest.mark.parametrize("level", [1e300, 2**70])
def test_level_beyond_int64_is_out_of_range_not_an_overflow(folder, level):
    path = write(folder, [record(similarity=level)])
    with pytest.raises(ValueError, match=r"record 'r1' \(#0\) has `similarity`=.*, outside the levels 0\.\.N-1\. "
                                         r"Recompute levels with `aligngpt-hf levels --num-levels N`"):
        load_llava_json(path, folder / "images")


def test_id_that_is_an_object_is_refused_and_a_null_id_is_the_position(folder):
    with pytest.raises(ValueError, match=r"data\.json: record #0 has `id`=\{'a': 1\}; expected a string or an "
                                         r"integer\.$"):
        load_llava_json(write(folder, [record(id={"a": 1})]), folder / "images")
    assert load_llava_json(write(folder, [record(id=None)]), folder / "images")["id"] == ["0"]


def test_duplicate_ids_are_kept_and_reported(folder, caplog):
    path = write(folder, [record(), record(id="r2"), record(), record(id="r2")])
    with caplog.at_level(logging.WARNING, logger="aligngpt_hf.training.llava_json"):
        dataset = load_llava_json(path, folder / "images")
    assert dataset["id"] == ["r1", "r2", "r1", "r2"]
    assert "data.json: 2 record(s) repeat the `id` of an earlier record (first: 'r1' (#2), 'r2' (#3)); all are " \
           "kept." in caplog.text


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_image_folder_that_is_not_a_folder_is_named(folder, kind):
    image_folder = folder / "nowhere"
    if kind == "file":
        image_folder.write_text("not a folder")
    state = "does not exist" if kind == "missing" else "is not a folder"
    with pytest.raises(NotADirectoryError, match=rf"data\.json: the image folder .*nowhere {state}, but the records "
                                                 r"name images\. Pass the folder the `image` paths are relative to"):
        load_llava_json(write(folder, [record()]), image_folder)


def test_empty_path_in_an_image_list(folder):
    turns = [{"from": "human", "value": "<image>\n<image>\nx"}, TURNS[1]]
    path = write(folder, [record(image=["a.png", " "], conversations=turns)])
    with pytest.raises(ValueError, match=r"record 'r1' \(#0\) has an empty path in `image`=\['a\.png', ' '\]; name the "
                                         r"image file, or drop the field"):
        load_llava_json(path, folder / "images")


def test_image_path_that_names_a_folder(folder):
    (folder / "images" / "sub").mkdir()
    with pytest.raises(IsADirectoryError, match=r"data\.json: 1 `image` path\(s\) name a folder, not an image file "
                                                r"\(first: 'r1': .*images/sub\)\. Name the image file inside it\.$"):
        load_llava_json(write(folder, [record(image="sub")]), folder / "images")


def test_data_path_that_is_a_folder(folder):
    with pytest.raises(IsADirectoryError, match=r"images is a folder; `data_path` names the LLaVA JSON/JSONL file "
                                                r"itself\.$"):
        load_llava_json(folder / "images", folder / "images")


def test_system_turn_after_the_start_is_refused_at_load(folder):
    turns = [*TURNS, {"from": "system", "value": "Be brief."}, {"from": "human", "value": "And?"},
             {"from": "gpt", "value": "Red."}]
    with pytest.raises(ValueError, match=r"record 'r1' \(#0\): `conversations\[2\]\.value` is a `system` turn after "
                                         r"the start; only the first turn may be one\."):
        load_llava_json(write(folder, [record(conversations=turns)]), folder / "images")
    first = [{"from": "system", "value": "Be brief."}, *TURNS]
    assert load_llava_json(write(folder, [record(conversations=first)]), folder / "images")[0]["messages"][0][
        "role"] == "system"


def test_empty_answers_are_refused_and_listed(folder):
    path = write(folder, [record(), record(id="e1", conversations=answer("")),
                          record(id="e2", conversations=[*TURNS, {"from": "human", "value": "More?"},
                                                         {"from": "gpt", "value": "  \n"}])])
    with pytest.raises(ValueError, match=r"data\.json: 2 `gpt` answer\(s\) are empty and would teach the model to "
                                         r"answer with the end token alone \(first: 'e1' \(#1\) `conversations\[1\]"
                                         r"\.value`, 'e2' \(#2\) `conversations\[3\]\.value`\)\. Fill in the answer"):
        load_llava_json(path, folder / "images")


def test_align_tag_in_the_data_is_refused(folder):
    turns = [{"from": "human", "value": "<image>\n<align> Describe."}, TURNS[1]]
    with pytest.raises(ValueError, match=r"record 'r1' \(#0\): `conversations\[0\]\.value` holds `<align>`, the token "
                                         r"the processor places after BOS"):
        load_llava_json(write(folder, [record(conversations=turns)]), folder / "images")


# ------------------------------------------------------------------------------------------------ stage-1 levels


def pretrain_trainer(make_model, processor, tmp_path, dataset):
    args = AlignGPTPretrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                  report_to="none", save_strategy="no", activation_checkpointing=False, use_cpu=True,
                                  dataloader_num_workers=0, disable_tqdm=True)
    return AlignGPTPretrainTrainer(model=make_model(seed=0), args=args, train_dataset=dataset,
                                   processing_class=processor)


def test_stage1_rows_without_a_level_are_refused_before_training(make_model, processor, folder):
    records = [record(similarity=2), record(id="r2", similarity=5), record(id="gap")]
    dataset = load_llava_json(write(folder, records), folder / "images")
    with pytest.raises(ValueError, match=r"^Stage 1: 1 row\(s\) with an image have no `alignment_level` \(first: "
                                         r"'gap' \(#2\)\)\. Stage 1 feeds each pair's alignment level"):
        pretrain_trainer(make_model, processor, folder, dataset)


def test_stage1_data_without_a_level_column_is_refused_before_training(make_model, processor, folder):
    dataset = load_llava_json(write(folder, [record(), record(id="r2")]), folder / "images")
    with pytest.raises(ValueError, match=r"^Stage 1: 2 row\(s\) with an image \(the data has no `alignment_level` "
                                         r"column\) have no `alignment_level` \(first: 'r1' \(#0\), 'r2' \(#1\)\)"):
        pretrain_trainer(make_model, processor, folder, dataset)


def test_stage1_level_the_model_does_not_have_is_refused_before_training(make_model, processor, tmp_path):
    dataset = synthetic_dataset(4, "pretrain")
    levels = [0, 3, 11, 7]
    dataset = dataset.remove_columns("alignment_level").add_column("alignment_level", levels)
    with pytest.raises(ValueError, match=r"^Stage 1: 1 row\(s\) have a `alignment_level` that is not a level of this "
                                         r"model \(integers in 0\.\.7; first: 'pretrain-2' \(#2\)=11\)"):
        pretrain_trainer(make_model, processor, tmp_path, dataset)


def test_cli_data_is_checked_against_the_models_levels_at_load(folder):
    from aligngpt_hf.training.model_setup import load_training_data

    path = write(folder, [record(similarity=3), record(id="r2", similarity=9)])
    script_args = AlignGPTScriptArguments(data_path=str(path), image_folder=str(folder / "images"))
    with pytest.raises(ValueError, match=r"record 'r2' \(#1\) has `similarity`=9, outside the levels 0\.\.7"):
        load_training_data("pretrain", script_args, num_alignment_levels=8)


# ------------------------------------------------------------------------------------------------ trainer settings


@pytest.mark.parametrize("options, message", [
    ({"learning_rate": float("inf")}, r"`learning_rate` is inf; it must be a finite number\."),
    ({"learning_rate": -1.0}, r"`learning_rate` is -1\.0; it must be > 0\."),
    ({"projector_lr": float("nan")}, r"`projector_lr` is nan; it must be a finite number\."),
    ({"num_train_epochs": -1.0}, r"`num_train_epochs` is -1\.0; it must be > 0\."),
    ({"num_train_epochs": float("nan")}, r"`num_train_epochs` is nan; it must be a finite number\."),
    ({"weight_decay": -0.1}, r"`weight_decay` is -0\.1; it must be >= 0\."),
    ({"max_grad_norm": float("nan")}, r"`max_grad_norm` is nan; it must be a finite number\."),
    ({"gradient_accumulation_steps": 0}, r"`gradient_accumulation_steps` is 0; it must be an integer >= 1\."),
    ({"max_length": 0}, r"`max_length` is 0; it must be >= 1"),
    ({"save_strategy": "steps", "save_steps": -2}, r"`save_steps` is -2 with save_strategy='steps'; it must be > 0\."),
], ids=["lr-inf", "lr-negative", "projector-lr-nan", "epochs-negative", "epochs-nan", "weight-decay-negative",
        "grad-norm-nan", "accumulation-0", "max-length-0", "save-steps-negative"])
def test_trainer_numbers_that_train_nothing_or_garbage_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        AlignGPTInstructConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)


def test_epochs_are_not_checked_when_max_steps_decides(tmp_path):
    args = AlignGPTPretrainConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=3, num_train_epochs=0)
    assert args.max_steps == 3


def test_negative_vision_lr_multiplier(tmp_path):
    with pytest.raises(ValueError, match=r"^`vision_lr_multiplier` is -2\.0; it must be > 0\."):
        AlignGPTPretrainConfig(output_dir=str(tmp_path), use_cpu=True, train_vision_tower=True,
                               vision_lr_multiplier=-2.0)


@pytest.mark.parametrize("options, message", [
    ({"image_aspect_ratio": "stretch"}, r"`image_aspect_ratio` is 'stretch'; use `pad` or `square`"),
    ({"num_gpus": 0}, r"`num_gpus` is 0; it must be an integer >= 1, or unset\."),
    ({"synthetic_samples": 0}, r"`synthetic_samples` is 0; it must be >= 1\."),
    ({"lora_alpha": 0}, r"`lora_alpha` is 0; it must be > 0"),
])
def test_script_arguments_out_of_range(options, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        AlignGPTScriptArguments(**options)


def test_lora_target_that_is_not_a_regular_expression():
    from aligngpt_hf.training.model_setup import lora_config

    script_args = AlignGPTScriptArguments(use_lora=True, lora_target_modules="(q_proj")
    with pytest.raises(ValueError, match=r"^`lora_target_modules` '\(q_proj' is not a valid regular expression "
                                         r"\(missing \), unterminated subpattern"):
        lora_config("instruct", script_args)


# ------------------------------------------------------------------------------------------------ command line


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


def recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_that_is_not_yaml_is_one_line_with_the_place(tmp_path, capsys):
    path = recipe(tmp_path, "model_name_or_path: tiny\noutput_dir: {{{\n")
    code, err = run_cli(["pretrain", path], capsys)
    assert code == 1
    assert err.startswith(f"aligngpt-hf pretrain: error: {path}:3:1: the recipe is not valid YAML (")
    assert "Traceback" not in err and "\n" not in err


@pytest.mark.parametrize("argv, message", [
    (["--max_steps", "abc"], "argument --max_steps/--max-steps: invalid int value: 'abc' (recipe "),
    (["--max_steps"], "argument --max_steps/--max-steps: expected one argument (recipe "),
])
def test_bad_override_is_one_line_without_the_usage_text(tmp_path, capsys, argv, message):
    code, err = run_cli(["pretrain", TINY_RECIPE, "--output_dir", str(tmp_path), *argv], capsys)
    assert code == 1
    assert err.startswith(f"aligngpt-hf pretrain: error: {message}") and "\n" not in err and "usage" not in err


@pytest.mark.parametrize("line, message", [
    ("save_strategy: no", "`save_strategy: False`: YAML reads a bare yes/no/on/off as true/false; quote the choice, "
                          "e.g. `save_strategy: \"no\"`"),
    ("max_steps: [1]", "`max_steps` is [1]; it must be an integer."),
    ("max_steps: 1.5", "`max_steps` is 1.5; it must be an integer."),
    ("learning_rate: {a: 1}", "`learning_rate` is {'a': 1}; it must be a number."),
])
def test_recipe_value_of_the_wrong_yaml_type(tmp_path, capsys, line, message):
    path = recipe(tmp_path, f"model_name_or_path: tiny\ndataset_name: synthetic\n{line}\n")
    code, err = run_cli(["pretrain", path, "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1 and err == f"aligngpt-hf pretrain: error: {path}: {message}" + (
        " (one of no, steps, epoch, best)." if "save_strategy" in line else "")


def test_recipe_that_is_a_folder(tmp_path, capsys):
    code, err = run_cli(["pretrain", str(tmp_path)], capsys)
    assert (code, err) == (1, f"aligngpt-hf pretrain: error: The recipe {tmp_path} is a folder; pass the recipe's YAML "
                              "file (or a shipped recipe's name).")


def test_output_dir_that_is_the_starting_model_folder_is_refused(tmp_path, capsys):
    start = tmp_path / "stage1"
    start.mkdir()
    code, err = run_cli(["instruct", "instruct_tiny", "--model_name_or_path", str(start), "--output_dir",
                         str(tmp_path / "stage1" / ".." / "stage1")], capsys)
    assert code == 1
    assert err.startswith("aligngpt-hf instruct: error: `output_dir` ") and err.endswith(
        "is the `model_name_or_path` folder this run starts from; saving there would overwrite it. Choose another "
        "`output_dir`.")


def test_dry_run_into_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    code, err = run_cli(["pretrain", "pretrain_7b", "--dry-run", "--output_dir", str(tmp_path / "taken")], capsys)
    assert code == 1 and err.startswith(f"aligngpt-hf pretrain: error: the output_dir {tmp_path}/taken is inside ")
    assert (tmp_path / "taken").read_text() == "a file"


# ------------------------------------------------------------------------------------------------ stage hand-off


def test_stage2_from_folders_that_are_not_a_stage1_output(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config\.json: it is not a stage-1 output folder\. Start "
                                                r"stage 2 from the folder `aligngpt-hf pretrain` saved"):
        load_for_instruct(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file is a file, not a stage-1 output folder\."):
        load_for_instruct(str(tmp_path / "file"))
    for name, config, message in [
        ("broken", "{\"model_type\": ", r"broken/config\.json is cut short or not a JSON object\."),
        ("untyped", "{}", r"untyped/config\.json names no `model_type`: it is not an AlignGPT stage-1 output\."),
        ("llm", '{"model_type": "llama"}', r"llm holds a 'llama' model, not an AlignGPT stage-1 output\."),
        ("llava", '{"model_type": "llava"}', r"For a LLaVA checkpoint, run `aligngpt-hf from-llava` first\."),
        ("noweights", '{"model_type": "aligngpt"}', r"noweights holds no model weights \(model\.safetensors\): the "
                                                    r"stage-1 save did not finish\."),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_for_instruct(str(tmp_path / name))


def test_stage2_from_a_stage1_folder_with_cut_weights(make_model, tmp_path):
    make_model(seed=0).save_pretrained(tmp_path / "stage1")
    weights = tmp_path / "stage1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"stage1: model\.safetensors is truncated or corrupt \(.*\); the stage-1 save "
                                         r"did not finish\. Rerun stage 1"):
        load_for_instruct(str(tmp_path / "stage1"))


def test_stage1_artefact_with_a_broken_marker(tmp_path):
    (tmp_path / "aligngpt_stage.json").write_text('{"stage": ')
    with pytest.raises(ValueError, match=r"aligngpt_stage\.json is cut short or not JSON; convert the stage-1 artefact "
                                         r"again"):
        load_for_instruct(str(tmp_path), base_language_model="unused")


def test_unknown_stage_marker_is_named():
    config = SimpleNamespace(aligngpt_stage="stage-one", uses_alignment_token=True)
    with pytest.raises(ValueError, match=r"its config has an unknown \('stage-one', not 'pretrain' or 'instruct'\) "
                                         r"`aligngpt_stage` marker"):
        check_alignment_trained(config)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_resume_from_a_path_that_is_not_a_folder(tmp_path, kind):
    target = tmp_path / "checkpoint-7"
    if kind == "file":
        target.write_text("x")
    state = "does not exist" if kind == "missing" else "is a file"
    with pytest.raises(FileNotFoundError, match=rf"^Cannot resume from .*checkpoint-7: it {state}\. Pass a "
                                                r"checkpoint-N folder the run saved"):
        resolve_resume(str(target), tmp_path)


def test_stage1_data_without_any_image_is_refused(make_model, processor, tmp_path):
    from datasets import Dataset

    rows = [{"id": f"t{i}", "images": [], "alignment_level": 1,
             "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A caption."}]}
            for i in range(3)]
    with pytest.raises(ValueError, match=r"^Stage 1 trains the projector and level table on image-caption pairs, but "
                                         r"none of the 3 rows has an image\."):
        pretrain_trainer(make_model, processor, tmp_path, Dataset.from_list(rows))


def test_message_that_is_not_an_object_names_the_row_when_grouping_by_modality():
    from datasets import Dataset

    from aligngpt_hf.training.sampler import modality_lengths

    rows = Dataset.from_list([{"id": "ok", "images": [], "messages": ["Hi", "Hello."]}])
    with pytest.raises(ValueError, match=r"^Row 'ok' \(#0\) of the training data has a message 'Hi'; expected "
                                         r"\{'role': \.\.\., 'content'"):
        modality_lengths(rows)


def test_data_path_beside_dataset_name_says_which_is_used(folder, caplog):
    from aligngpt_hf.training.model_setup import load_training_data

    path = write(folder, [record()])
    script_args = AlignGPTScriptArguments(data_path=str(path), image_folder=str(folder / "images"),
                                          dataset_name="synthetic")
    with caplog.at_level(logging.WARNING, logger="aligngpt_hf.training.model_setup"):
        assert load_training_data("instruct", script_args)["id"] == ["r1"]
    assert f"Training on data_path {path}; dataset_name 'synthetic' is not used." in caplog.text


@pytest.mark.parametrize("text, message", [
    ("", r"must hold a JSON list of LLaVA records, got an empty file\."),
    ('{"data": [1]}', r"must hold a JSON list of LLaVA records, got an object\."),
    ("[]", r"holds no records: there is nothing to train on\."),
    ('[{"id": 1,', r"data\.json:1:11: not valid JSON \(Expecting property name"),
])
def test_dry_run_names_a_data_file_that_is_not_a_llava_list(tmp_path, capsys, text, message):
    (tmp_path / "data.json").write_text(text)
    code, err = run_cli(["pretrain", "pretrain_7b", "--dry-run", "--output_dir", str(tmp_path / "plan"),
                         "--data_path", str(tmp_path / "data.json")], capsys)
    assert code == 1 and err.startswith(f"aligngpt-hf pretrain: error: {tmp_path}/data.json")
    assert re.search(message, err), err
    assert not (tmp_path / "plan" / "dry_run.json").exists()


def test_resuming_with_other_model_settings_names_the_checkpoint(make_model, processor, tmp_path):
    options = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, report_to="none",
                   activation_checkpointing=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                   save_strategy="steps", save_steps=1, max_steps=1)
    AlignGPTPretrainTrainer(model=make_model(seed=0), args=AlignGPTPretrainConfig(**options),
                            train_dataset=synthetic_dataset(4), processing_class=processor).train()
    other = make_model(seed=0, gate_hidden_size=8)
    trainer = AlignGPTPretrainTrainer(model=other, args=AlignGPTPretrainConfig(**{**options, "max_steps": 2}),
                                      train_dataset=synthetic_dataset(4), processing_class=processor)
    with pytest.raises(ValueError, match=r"checkpoint-1 does not fit this model \(size mismatch for .*\): it was saved "
                                         r"by a run with other model settings \(its config\.json\)\. Resume with the "
                                         r"settings that run used"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    other_modules = AlignGPTPretrainTrainer(
        model=make_model(seed=0), args=AlignGPTPretrainConfig(**{**options, "max_steps": 2, "train_vision_tower": True}),
        train_dataset=synthetic_dataset(4), processing_class=processor)
    with pytest.raises(ValueError, match=r"checkpoint-1's optimizer state does not fit this run \(loaded state dict "
                                         r"contains a parameter group .*\): the run that saved it trained other modules"):
        other_modules.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))


@pytest.mark.parametrize("fields, message", [
    ({"image": None, "images": ["a.png"]}, r"record 'r1' \(#0\) has `images`; LLaVA JSON names the field `image` \(a "
                                           r"path or a list of paths\)\. Rename it\.$"),
    ({"image": "a\x00.png"}, r"record 'r1' \(#0\) has `image`='a\\x00\.png', a path holding a NUL character\.$"),
    ({"conversations": [{"role": "user", "content": "<image>\nx"}, {"role": "assistant", "content": "y"}]},
     r"`conversations\[0\]\.from` is None; expected one of .* LLaVA JSON turns are \{\"from\": \.\.\., \"value\": "
     r"\.\.\.\}, not \{\"role\": \.\.\., \"content\": \.\.\.\}\.$"),
    ({"conversations": None, "messages": []}, r"record 'r1' \(#0\) has no `conversations`\. It has `messages`: rows in "
                                              r"TRL's `messages` format load with `datasets`"),
], ids=["images-field", "nul-in-path", "role-content-turns", "messages-field"])
def test_records_in_a_neighbouring_format_are_named(folder, fields, message):
    item = record(**fields)
    if item["image"] is None:
        del item["image"]
    with pytest.raises(ValueError, match=message):
        load_llava_json(write(folder, [item]), folder / "images")


def stage2_collator(processor):
    from aligngpt_hf.training.data import AlignGPTDataCollator

    return AlignGPTDataCollator(processor=processor, max_length=256, assistant_only_loss=True)


def test_image_text_in_a_trl_row_that_also_has_images_is_named(processor):
    row = {"id": "x", "images": [Image.new("RGB", (24, 24))],
           "messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red."}]}
    with pytest.raises(ValueError, match=r"^Sample 'x': message 0 holds the text `<image>` while the row's images come "
                                         r"in `images`"):
        stage2_collator(processor)([row])


def test_one_bare_image_path_is_one_image_not_its_characters(processor, folder):
    messages = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}]
    batch = stage2_collator(processor)([{"id": "x", "images": str(folder / "images" / "a.png"), "messages": messages}])
    assert batch["pixel_values"].shape[0] == 1


def test_messages_that_are_not_a_list_name_the_sample(processor):
    with pytest.raises(ValueError, match=r"^Sample 'x' has `messages`=None; expected a list of"):
        stage2_collator(processor)([{"id": "x", "images": [], "messages": None}])


def test_missing_image_folder_is_deferred_with_check_images_false(folder):
    dataset = load_llava_json(write(folder, [record()]), folder / "nowhere", check_images=False)
    assert dataset.features["images"].feature.decode and len(dataset) == 1


def test_missing_base_language_model_folder_is_named(tmp_path, capsys):
    start = tmp_path / "stage1"
    start.mkdir()
    code, err = run_cli(["instruct", "instruct_tiny", "--model_name_or_path", str(start), "--language_model",
                         str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")], capsys)
    assert (code, err) == (1, f"aligngpt-hf instruct: error: the language_model folder {tmp_path}/nowhere does not "
                              "exist (and it is not a Hub repo id like 'owner/name'); check the path")


def test_a_file_where_the_merged_lora_model_goes_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "merged").write_text("x")
    code, err = run_cli(["instruct", "instruct_tiny", "--model_name_or_path", str(tmp_path / "nowhere"), "--use_lora",
                         "true", "--output_dir", str(tmp_path / "out")], capsys)
    assert (code, err) == (1, f"aligngpt-hf instruct: error: {tmp_path}/out/merged is a file, but the merged LoRA model "
                              "is saved in a folder of that name after training; move the file, or set `merge_lora` to "
                              "false.")


def test_recipe_that_sets_a_field_twice_is_refused(tmp_path, capsys):
    path = recipe(tmp_path, "model_name_or_path: tiny\nmax_steps: 4\ndataset_name: synthetic\nmax_steps: 2\n")
    code, err = run_cli(["pretrain", path, "--output_dir", str(tmp_path / "out")], capsys)
    assert (code, err) == (1, f"aligngpt-hf pretrain: error: {path}:4:1: the recipe is not valid YAML (`max_steps` is "
                              "set twice (first on line 2)).")

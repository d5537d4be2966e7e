"""Bad input, training data and command line, second pass: LLaVA turns that break the human/gpt alternation or
write the image tag wrongly, TRL rows whose images and image parts disagree, saved `DatasetDict` folders, recipe keys
and overrides that are not fields, and output folders among the training data.

Each test names the case and asserts the exception type and the key words of its message (file, record, field, fix).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image

from aligngpt_hf import cli, load_llava_json
from aligngpt_hf.training.configs import AlignGPTScriptArguments
from aligngpt_hf.training.data import PLAIN_CHAT_TEMPLATE, AlignGPTDataCollator
from aligngpt_hf.training.model_setup import load_training_data

TURNS = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."}]
RED = (200, 30, 30)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (24, 24), RED).save(tmp_path / "images" / "a.png")
    return tmp_path


def write(folder, records, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def record(**fields):
    return {"id": "r1", "image": "a.png", "conversations": TURNS, **fields}


def turns(*pairs):
    return [{"from": speaker, "value": value} for speaker, value in pairs]


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


# ------------------------------------------------------------------------------------------------ LLaVA JSON turns


@pytest.mark.parametrize("tag", ["<Image>", "< image >", "<IMAGE>", "<image/>", "<image >"])
def test_misspelled_image_tag_is_refused_not_trained_as_text(folder, tag):
    # Before: the tag stayed in the prompt as words and the image was put in front of the turn.
    path = write(folder, [record(conversations=turns(("human", f"{tag}\nDescribe."), ("gpt", "Red.")))])
    with pytest.raises(ValueError, match=re.escape(
            f"data.json: record 'r1' (#0): `conversations[0].value` holds {tag!r}; the image placeholder is exactly "
            "`<image>` (lower case, no spaces). Write it so, or remove it.")):
        load_llava_json(path, folder / "images")


@pytest.mark.parametrize("conversation, index, what", [
    (turns(("gpt", "Hello."), ("human", "<image>\nDescribe."), ("gpt", "Red.")), 0,
     "a `gpt` turn before any human turn"),
    (turns(("system", "Be brief."), ("gpt", "Hello."), ("human", "<image>\nDescribe."), ("gpt", "Red.")), 1,
     "a `gpt` turn before any human turn"),
    (turns(("human", "<image>\nDescribe."), ("gpt", "Red."), ("gpt", "Square.")), 2, "a second `gpt` turn in a row"),
])
def test_gpt_turn_that_answers_no_human_turn_is_refused(folder, conversation, index, what):
    # Before: loaded, and the chat template rendered `ASSISTANT: a</s> ASSISTANT: b</s>` (or an answer to nothing).
    path = write(folder, [record(conversations=conversation)])
    with pytest.raises(ValueError, match=re.escape(
            f"record 'r1' (#0): `conversations[{index}]` is {what}; turns alternate human, gpt, human, gpt.")):
        load_llava_json(path, folder / "images")


def test_last_human_turn_without_an_answer_is_refused(folder):
    path = write(folder, [record(conversations=[*TURNS, {"from": "human", "value": "And the colour?"}])])
    with pytest.raises(ValueError, match=re.escape(
            "record 'r1' (#0): `conversations[2]` is a human turn with no `gpt` answer after it, so it would train "
            "on nothing. Add the answer, or drop the turn.")):
        load_llava_json(path, folder / "images")


@pytest.mark.parametrize("name, text, message", [
    ("data.json", '[{"id": "r1", "image": "a.png", "image": "b.png", "conversations": []}]',
     "data.json: a JSON object gives the key `image` twice (the record with `id` 'r1'); JSON would keep only the "
     "last value and drop the other silently. Keep one."),
    ("data.json", '[{"id": "r1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>"}, '
                  '{"from": "gpt", "value": "Red.", "value": "Blue."}]}]',
     'data.json: a JSON object gives the key `value` twice ({"from": "gpt", "value": "Blue."})'),
    ("data.jsonl", '{"id": "r0", "image": "a.png", "conversations": []}\r\n{"id": "r1", "id": "r2"}\r\n',
     "data.jsonl:2: a JSON object gives the key `id` twice"),
])
def test_key_given_twice_in_a_record_is_refused_not_dropped(folder, name, text, message):
    # Before: JSON kept the last value; the first image path or answer vanished silently.
    (folder / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_llava_json(folder / name, folder / "images")


def test_roles_of_other_datasets_and_a_leading_system_turn_still_load(folder):
    conversation = turns(("system", "Be brief."), ("user", "<image>\nDescribe."), ("assistant", "Red."))
    row = load_llava_json(write(folder, [record(conversations=conversation)]), folder / "images")[0]
    assert [message["role"] for message in row["messages"]] == ["system", "user", "assistant"]


def test_missing_relative_data_path_names_the_working_directory(folder, monkeypatch):
    monkeypatch.chdir(folder)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"nested/data.json: no such LLaVA JSON/JSONL file (a relative path is read from the working directory "
            f"{os.getcwd()}).")):
        load_llava_json("nested/data.json", "images")


# ------------------------------------------------------------------------------------------------ TRL rows


def user(text, images=1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(content):
    return {"role": "assistant", "content": content}


def stage2(processor):
    return AlignGPTDataCollator(processor=processor, max_length=2048, assistant_only_loss=True)


@pytest.mark.parametrize("parts, images", [(1, 0), (0, 1), (2, 1), (1, 2)])
def test_image_parts_and_images_that_disagree_name_the_sample(processor, parts, images):
    # Before: TRL's bare "Number of images provided ... does not match ..." without the sample.
    row = {"id": "s7", "messages": [user("What is it?", parts), assistant("Red.")],
           "images": [Image.new("RGB", (24, 24), RED)] * images}
    with pytest.raises(ValueError, match=re.escape(
            f"Sample 's7': Number of images provided ({images}) does not match number of image placeholders "
            f"({parts}). Give one {{'type': 'image'}} part per entry of `images`")):
        stage2(processor)([row])


def test_last_user_message_without_an_answer_is_refused(processor):
    row = {"id": "s1", "messages": [user("What is it?"), assistant("Red."), user("Sure?", 0)],
           "images": [Image.new("RGB", (24, 24), RED)]}
    with pytest.raises(ValueError, match=re.escape(
            "Sample 's1': message 2 is a `user` message with no assistant answer after it, so it would train on "
            "nothing.")):
        stage2(processor)([row])


@pytest.mark.parametrize("content", ["", "  ", [], [{"type": "text", "text": " \n"}]])
def test_empty_assistant_message_is_refused(processor, content):
    # Before: trained the end token alone (labels ` </s>`).
    row = {"id": "s2", "messages": [user("What is it?", 0), assistant(content)], "images": []}
    with pytest.raises(ValueError, match=re.escape(
            "Sample 's2': message 1 is an empty assistant answer and would teach the model to answer with the end "
            "token alone.")):
        stage2(processor)([row])


def test_numpy_integer_level_is_a_level(processor):
    # Rows built from pandas/NumPy hold np.int64; before, `np.int64(3)` was refused as "not an integer".
    collator = AlignGPTDataCollator(processor=processor, max_length=2048, chat_template=PLAIN_CHAT_TEMPLATE,
                                    level_column="alignment_level", num_alignment_levels=8)
    rows = [{"messages": [user(""), assistant("A red square.")], "images": [Image.new("RGB", (24, 24), RED)],
             "alignment_level": level} for level in (np.int64(3), np.int32(5))]
    assert collator(rows)["alignment_levels"].tolist() == [3, 5]


def test_array_images_are_read_as_the_processor_reads_them(processor):
    # Before: "is a ndarray, not an image: pass ... a numpy/torch array" refused the array its message asked for.
    pixels = np.random.default_rng(0).integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
    rows = [{"messages": [user("What is it?"), assistant("Red.")], "images": [image]}
            for image in (pixels, Image.fromarray(pixels))]
    batch = stage2(processor)(rows)
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    with pytest.raises(ValueError, match=r"^sample image 0: holds NaN or infinite pixel values"):
        stage2(processor)([{"messages": [user("q"), assistant("a")], "images": [np.full((8, 8, 3), np.nan)]}])


# ------------------------------------------------------------------------------------------------ saved datasets


@pytest.fixture
def saved(tmp_path):
    rows = Dataset.from_dict({"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
                              * 3, "images": [[]] * 3})
    DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "dict"))
    DatasetDict({"validation": rows}).save_to_disk(str(tmp_path / "validation_only"))
    rows.save_to_disk(str(tmp_path / "single"))
    rows.select([]).save_to_disk(str(tmp_path / "empty"))
    return tmp_path


def data(stage="instruct", **options):
    return load_training_data(stage, AlignGPTScriptArguments(**options))


def test_saved_dataset_dict_folder_gives_the_named_split(saved):
    assert len(data(dataset_name=str(saved / "dict"))) == 3
    assert len(data(dataset_name=str(saved / "dict"), dataset_split="test")) == 1


@pytest.mark.parametrize("name, split, message", [
    ("dict", "nope", "{folder} holds the splits ['train', 'test'], not 'nope'; set `dataset_split` (CLI: "
                     "--dataset_split) to one of them."),
    ("validation_only", "train", "{folder} holds the splits ['validation'], not 'train'; set `dataset_split`"),
    ("single", "test", "`dataset_split` is 'test', but {folder} holds one dataset without splits; drop "
                       "`dataset_split` (it defaults to train)."),
    ("empty", "train", "{folder} is a saved dataset without rows: there is nothing to train on."),
])
def test_saved_dataset_folder_problems_are_named(saved, name, split, message):
    # Before: datasets' "Unknown split" without the folder, a silently ignored split, an IndexError traceback.
    folder = str(saved / name)
    with pytest.raises(ValueError, match=re.escape(message.format(folder=folder))):
        data(dataset_name=folder, dataset_split=split)


def test_dataset_config_on_a_saved_folder_is_refused(saved):
    with pytest.raises(ValueError, match=re.escape(
            f"`dataset_config` 'en' names a config of a Hub dataset, but {saved / 'single'} is a folder saved with "
            "`save_to_disk`, which has none; drop `dataset_config`.")):
        data(dataset_name=str(saved / "single"), dataset_config="en")


# ------------------------------------------------------------------------------------------------ recipes and CLI


@pytest.mark.parametrize("options, message", [
    ({"lora_r": 0}, "`lora_r` is 0; the LoRA rank must be an integer >= 1."),
    ({"lora_r": -4}, "`lora_r` is -4; the LoRA rank must be an integer >= 1."),
    ({"lora_dropout": float("nan")}, "`lora_dropout` is nan; it must be a probability in [0, 1)"),
    ({"lora_dropout": 1.0}, "`lora_dropout` is 1.0; it must be a probability in [0, 1)"),
])
def test_lora_rank_and_dropout_out_of_range_name_the_field(options, message):
    # Before: PEFT's "`r` should be a positive integer" (not the field's name); a NaN dropout was accepted.
    with pytest.raises(ValueError, match=re.escape(message)):
        AlignGPTScriptArguments(use_lora=True, **options)


@pytest.mark.parametrize("line, key, hint", [
    ("Max_Steps: 7", "Max_Steps", " Did you mean `max_steps`?"),
    ("unknown_field: 3", "unknown_field", " See `aligngpt-hf pretrain --help` for the fields."),
])
def test_recipe_key_that_is_not_a_field_names_the_file_and_the_field_meant(tmp_path, capsys, line, key, hint):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model_name_or_path: tiny\ndataset_name: synthetic\n{line}\n")
    code, err = run_cli(["pretrain", str(path), "--dry-run", "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err == f"aligngpt-hf pretrain: error: {path}: `{key}` is not a field of `aligngpt-hf pretrain`.{hint}"


def test_override_that_is_not_a_field_names_the_field_meant(tmp_path, capsys):
    code, err = run_cli(["pretrain", "pretrain_tiny", "--dry-run", "--output_dir", str(tmp_path), "--lora.r", "3"],
                        capsys)
    assert code == 1
    assert err == ("aligngpt-hf pretrain: error: command line: `lora.r` is not a field of `aligngpt-hf pretrain`. "
                   "Did you mean `lora_r`?")


@pytest.mark.parametrize("twice", [["--max_steps", "3", "--max_steps", "5"], ["--max_steps", "3", "--max-steps=5"]])
def test_override_given_twice_is_refused(tmp_path, capsys, twice):
    # Before: the last one won silently.
    code, err = run_cli(["pretrain", "pretrain_tiny", "--dry-run", "--output_dir", str(tmp_path), *twice], capsys)
    assert code == 1
    assert err.startswith("aligngpt-hf pretrain: error: command line: `--max_steps` is given twice; give each field "
                          "once")
    assert not (tmp_path / "dry_run.json").exists()


@pytest.mark.parametrize("output, what", [
    ("images", "is the `image_folder`"), ("images/run", "is inside the `image_folder`"),
    (".", "is the folder of `data_path`"),
])
def test_output_dir_among_the_training_data_is_refused_before_training(folder, capsys, monkeypatch, output, what):
    # Before: the model, tokenizer and checkpoints were saved among the images (or over the data's README.md).
    records = [record(id=f"r{i}", similarity=i % 2) for i in range(2)]
    write(folder, records)
    monkeypatch.chdir(folder)
    code, err = run_cli(["pretrain", "pretrain_tiny", "--data_path", "data.json", "--image_folder", "images",
                         "--output_dir", output, "--max_steps", "1"], capsys)
    assert code == 1
    assert f"error: `output_dir` {output} {what}" in err and err.endswith("Choose an `output_dir` outside it.")
    assert sorted(os.listdir(folder / "images")) == ["a.png"] and not (folder / "config.json").exists()


def test_dry_run_sees_a_saved_dataset_dict_folder(saved, tmp_path, capsys):
    code, _ = run_cli(["instruct", "instruct_tiny", "--dry-run", "--dataset_name", str(saved / "dict"),
                       "--output_dir", str(tmp_path / "plan")], capsys)
    assert code == 0
    plan = json.loads((tmp_path / "plan" / "dry_run.json").read_text())
    assert plan["data"]["status"] == "saved datasets folder present (rows not checked)"


# ------------------------------------------------------------------------------------------------ trainers


@pytest.mark.parametrize("streaming", [False, True])
def test_text_only_dataset_without_an_images_column_trains_on_its_messages(make_model, processor, tmp_path,
                                                                           streaming):
    # Before: TRL took it for a language-model dataset (tokenised and truncated to max_length by TRL, `messages`
    # dropped), and the collator failed at step 1 with "got keys ['input_ids', 'labels']".
    from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": f"Question {i}?"},
                                            {"role": "assistant", "content": "An answer."}]} for i in range(4)])
    rows = rows.to_iterable_dataset() if streaming else rows
    model = make_model(seed=0).train()
    model.config.aligngpt_stage = "pretrain"
    args = AlignGPTInstructConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=1,
                                  use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                                  activation_checkpointing=False, dataloader_num_workers=0)
    trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
    first = next(iter(trainer.train_dataset))
    assert first["images"] == [] and first["messages"][0]["content"] == "Question 0?"
    batch = trainer.data_collator([first])
    assert processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100]) == " An answer.</s>"
    assert trainer.train().global_step == 1


def instruct_trainer(make_model, processor, tmp_path, dataset, **options):
    from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer

    model = make_model(seed=0).train()
    model.config.aligngpt_stage = "pretrain"
    args = AlignGPTInstructConfig(output_dir=str(tmp_path / "run"), **{
        "per_device_train_batch_size": 2, "max_steps": 1, "use_cpu": True, "bf16": False, "report_to": "none",
        "save_strategy": "no", "activation_checkpointing": False, "dataloader_num_workers": 0, **options})
    return AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)


def text_rows(count):
    return Dataset.from_list([{"messages": [{"role": "user", "content": "What is it?"},
                                            {"role": "assistant", "content": "Red."}], "images": []}
                              for _ in range(count)])


def test_separate_modality_batching_of_a_stream_is_refused_not_ignored(make_model, processor, tmp_path):
    # Before: a stream has no sampler, so the 1:1 text/image alternation was silently not applied.
    with pytest.raises(ValueError, match=re.escape(
            "modality_batching='separate' needs a dataset with a length (not an iterable dataset): a stream is read "
            "in its own order.")):
        instruct_trainer(make_model, processor, tmp_path, text_rows(4).to_iterable_dataset(),
                         modality_batching="separate")


def test_modality_grouping_of_a_stream_is_reported(make_model, processor, tmp_path, caplog):
    instruct_trainer(make_model, processor, tmp_path, text_rows(4).to_iterable_dataset())
    assert "group_by_modality_length=True has no effect on an iterable (streaming) dataset" in caplog.text


def test_drop_last_with_fewer_rows_than_a_batch_is_refused(make_model, processor, tmp_path):
    # Before: zero steps were trained and the untrained model saved as the result.
    with pytest.raises(ValueError, match=re.escape(
            "`dataloader_drop_last` drops the last incomplete batch, and the 1 row(s) of `train_dataset` do not fill "
            "one batch of 2: the run would train zero steps.")):
        instruct_trainer(make_model, processor, tmp_path, text_rows(1), dataloader_drop_last=True)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_words_of_the_command_line_mean_what_they_say(tmp_path):
    # Before: `--resume_from_checkpoint true` looked for a folder named "true", and its error told the CLI user to
    # pass resume_from_checkpoint=True, which a command line cannot; `false` failed the same way.
    from aligngpt_hf.training.checkpoints import resolve_resume

    with pytest.raises(ValueError, match=re.escape(f"resume_from_checkpoint=True but {tmp_path} holds no "
                                                   "checkpoint-N folder")):
        resolve_resume("true", tmp_path)
    assert resolve_resume("false", tmp_path) is None


def test_empty_resume_from_checkpoint_is_refused_not_read_as_the_working_directory(tmp_path):
    from aligngpt_hf.training.checkpoints import resolve_resume

    with pytest.raises(ValueError, match=re.escape(
            f"`resume_from_checkpoint` is empty; pass a checkpoint-N folder the run saved (in {tmp_path}), or true "
            "for the newest complete one.")):
        resolve_resume("", tmp_path)


# ------------------------------------------------------------------------------------------------ model parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from aligngpt_hf.tiny import build_llava

    folder = tmp_path_factory.mktemp("parts")
    model, processor = build_llava()
    model.model.language_model.save_pretrained(folder / "lm")
    processor.tokenizer.save_pretrained(folder / "lm")
    model.model.vision_tower.save_pretrained(folder / "vt")
    processor.image_processor.save_pretrained(folder / "vt")
    return folder


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("language_model, vision_tower, message", [
    ("vt", "lm", "`language_model` {folder}/vt holds a 'clip_vision_model' model, not a causal language model. Are "
                 "`language_model` and `vision_tower` swapped?"),
    ("lm", "lm", "`vision_tower` {folder}/lm holds a 'llama' model, not a vision encoder (CLIP, SigLIP)."),
])
def test_model_parts_of_the_wrong_kind_are_named(parts, tmp_path, capsys, dry, language_model, vision_tower,
                                                 message):
    # Before: the dry run ended in an AttributeError traceback ('CLIPVisionConfig' has no 'vocab_size'), a real run in
    # a tokenizer error naming neither part, or "Cannot derive `image_seq_length` for vision model type 'llama'".
    code, err = run_cli(["pretrain", "pretrain_tiny", *(["--dry-run"] if dry else []), "--model_name_or_path", "",
                         "--language_model", str(parts / language_model), "--vision_tower", str(parts / vision_tower),
                         "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1 and err == f"aligngpt-hf pretrain: error: {message.format(folder=parts)}"


def test_model_parts_beside_a_starting_model_are_refused_not_ignored(parts, tmp_path, capsys):
    code, err = run_cli(["pretrain", "pretrain_tiny", "--language_model", str(parts / "lm"), "--vision_tower",
                         str(parts / "vt"), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1 and err == (
        "aligngpt-hf pretrain: error: `language_model` and `vision_tower` build a fresh stage-1 model, but "
        "`model_name_or_path` 'tiny' is used as it is, so they would be ignored. Set `model_name_or_path` or the "
        "parts, not both (an empty value unsets one: `--vision_tower \"\"`).")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows, message", [
    ([{"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]}],
     "the dataset has the columns ['id', 'image', 'conversations']. The rows are in LLaVA's format (`conversations`): "
     "load that file with `load_llava_json` (CLI: --data_path)."),
    ([{"text": "A red square."}], "the dataset has the columns ['text']."),
    ([{"messages": ["Hi.", "Hello."], "images": []}], "The first row's `messages` is \"['Hi.', 'Hello.']\"; AlignGPT "
                                                      "trainers take lists of {'role': ..., 'content': ...} messages"),
    ([{"prompt": "Hi.", "completion": "Hello.", "images": []}], "The first row's `prompt` is 'Hi.'"),
])
def test_rows_that_are_not_conversations_are_named_before_training(make_model, processor, tmp_path, rows, message):
    # Before: TRL's "the dataset is not conversational", naming neither the columns nor the fix.
    with pytest.raises(ValueError, match=re.escape(message)):
        instruct_trainer(make_model, processor, tmp_path, Dataset.from_list(rows * 2))


@pytest.mark.parametrize("target, why", [
    ("nomatch_xyz", "it matches no module name (whole names, as `re.fullmatch`)"),
    (".*vision_tower.*q_proj", "it reaches only model.vision_tower.encoder.layers.0.self_attn.q_proj and the like, "
                               "which are kept free of adapters"),
])
def test_lora_target_that_reaches_no_language_model_module_is_named(tmp_path, capsys, target, why):
    # Before: PEFT's "No modules were targeted for adaptation", naming neither the field nor a module.
    code, err = run_cli(["instruct", "instruct_7b", "--dry-run", "--output_dir", str(tmp_path), "--use_lora", "true",
                         "--lora_target_modules", target], capsys)
    assert code == 1
    assert err.startswith(f"aligngpt-hf instruct: error: `lora_target_modules` {target!r} targets no language-model "
                          f"module: {why}")
    assert "e.g. model.language_model.layers.0.self_attn.q_proj" in err


def test_deepspeed_config_that_does_not_exist_is_named(tmp_path, capsys):
    # Before: transformers' "No package metadata was found for The 'deepspeed>=0.9.3' distribution ..." (or a
    # missing-file error from inside DeepSpeed).
    code, err = run_cli(["pretrain", "pretrain_7b", "--dry-run", "--output_dir", str(tmp_path), "--deepspeed",
                         str(tmp_path / "zero9.json")], capsys)
    assert code == 1 and err == (f"aligngpt-hf pretrain: error: the `deepspeed` config {tmp_path / 'zero9.json'} does "
                                 "not exist; pass a DeepSpeed JSON file (or launch with a shipped accelerate config: "
                                 "`python -m aligngpt_hf.training.cli --accelerate-config zero2`).")


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_deepspeed_without_the_package_says_so_and_how_a_dry_run_goes_on(tmp_path, capsys):
    config = tmp_path / "zero2.json"
    config.write_text("{}")
    code, err = run_cli(["pretrain", "pretrain_7b", "--dry-run", "--output_dir", str(tmp_path / "out"), "--deepspeed",
                         str(config)], capsys)
    assert code == 1 and err == (f"aligngpt-hf pretrain: error: `deepspeed` {config} needs the DeepSpeed package, "
                                 "which is not installed (pip install -e '.[deepspeed]'). A dry run estimates "
                                 "zero2/zero3 memory without it: drop `deepspeed`.")


def test_home_in_recipe_paths_is_expanded_as_for_output_dir(monkeypatch, tmp_path):
    # Before: `output_dir: ~/runs` was expanded (by transformers) but `data_path: ~/d.json` was read as a folder "~".
    monkeypatch.setenv("HOME", str(tmp_path))
    script = AlignGPTScriptArguments(data_path="~/d.json", image_folder="~/images", dataset_name="~/saved")
    assert (script.data_path, script.image_folder, script.dataset_name) == (
        f"{tmp_path}/d.json", f"{tmp_path}/images", f"{tmp_path}/saved")


def test_environment_variable_in_a_data_path_is_named_as_not_expanded(folder, monkeypatch):
    monkeypatch.chdir(folder)
    with pytest.raises(FileNotFoundError, match=re.escape(
            "$DATA/d.json: no such LLaVA JSON/JSONL file (a relative path is read from the working directory "
            f"{folder}); environment variables (`$NAME`) in it are not expanded.")):
        load_llava_json("$DATA/d.json", "images")


def test_missing_image_paths_of_a_dataset_are_named_before_training(make_model, processor, folder, monkeypatch):
    # Before: the first batch that reached a missing file failed, possibly hours into the run.
    monkeypatch.chdir(folder)
    messages = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "Red."}]
    rows = Dataset.from_list([{"id": f"r{i}", "messages": messages, "images": [path]}
                              for i, path in enumerate(["images/a.png", "a.png", str(folder / "b.png")])])
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"2 image path(s) of the `images` column name no file (first: 'r1' (#1): a.png, 'r2' (#2): "
            f"{folder / 'b.png'}). Relative paths are read from the working directory {folder}.")):
        instruct_trainer(make_model, processor, folder, rows)

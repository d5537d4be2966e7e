"""Bad input, training layer: bad LLaVA JSON, bad rows at collate time, empty data, NaN, half-written checkpoints.

Each test is named after the case and asserts the exception type and the key words of its message (file, line or
record, field, value, fix).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer, load_llava_json
from aligngpt_hf.training.checkpoints import checkpoint_problem, newest_complete_checkpoint
from aligngpt_hf.training.data import PLAIN_CHAT_TEMPLATE, AlignGPTDataCollator, open_image, synthetic_dataset

TURNS = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."}]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (24, 24), (30, 30, 200)).save(tmp_path / "outside.png")
    return tmp_path


def write(folder, records, name="data.json"):
    path = folder / name
    path.write_text(records if isinstance(records, str) else json.dumps(records), encoding="utf-8")
    return path


def record(**fields):
    return {"id": "r1", "image": "a.png", "conversations": TURNS, **fields}


# ------------------------------------------------------------------------------------------------ image paths


@pytest.mark.parametrize("image", ["../outside.png", "../../x.png", "ABSOLUTE"])
def test_image_path_escaping_the_image_folder_is_refused(folder, image):
    image = str(folder / "outside.png") if image == "ABSOLUTE" else image
    path = write(folder, [record(image=image)])
    with pytest.raises(ValueError, match=r"data\.json: record 'r1' \(#0\) `image`: image path .* outside the image "
                                         r"folder .*allow_outside_image_folder=True"):
        load_llava_json(path, folder / "images")


def test_image_path_outside_the_folder_with_the_opt_in_flag(folder):
    path = write(folder, [record(image="../outside.png")])
    dataset = load_llava_json(path, folder / "images", allow_outside_image_folder=True)
    assert dataset[0]["images"][0].getpixel((0, 0)) == (30, 30, 200)


# ------------------------------------------------------------------------------------------------ parser errors


def test_non_utf8_file(folder):
    path = folder / "data.json"
    path.write_bytes(b'[\n{"id": "r1", "caption": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"data\.json:2: not UTF-8 \(byte \d+\); re-save the file as UTF-8\.$"):
        load_llava_json(path, folder / "images")


@pytest.mark.parametrize("name,text,message", [
    ("data.json", "", r"data\.json is empty: it holds no LLaVA records\.$"),
    ("data.jsonl", "\n\n", r"data\.jsonl is empty: it holds no LLaVA records\.$"),
    ("data.json", "[]", r"data\.json holds no records \(an empty list\): there is nothing to train on\.$"),
])
def test_empty_json_or_jsonl(folder, name, text, message):
    with pytest.raises(ValueError, match=message):
        load_llava_json(write(folder, text, name), folder / "images")


def test_corrupt_jsonl_line_names_the_right_line(folder):
    good = json.dumps(record())
    path = write(folder, f"{good}\n\n{good}\n{{broken\n", "data.jsonl")  # a blank line before: line 4, not 3
    with pytest.raises(ValueError, match=r"data\.jsonl:4: not valid JSON \(Expecting property name"):
        load_llava_json(path, folder / "images")


def test_json_syntax_error_names_line_and_column(folder):
    path = write(folder, '[\n  {"id": "r1",,}\n]')
    with pytest.raises(ValueError, match=r"data\.json:2:15: not valid JSON \(Expecting property name"):
        load_llava_json(path, folder / "images")


def test_conversations_that_is_a_string(folder):
    path = write(folder, [record(conversations="<image>\nDescribe.")])
    with pytest.raises(ValueError, match=r"data\.json: record 'r1' \(#0\) has `conversations` of type str; expected "
                                         r"a list of turns"):
        load_llava_json(path, folder / "images")


def test_record_that_is_not_an_object(folder):
    path = write(folder, [record(), "just a string"])
    with pytest.raises(ValueError, match=r"data\.json: record #1 is a str, not a JSON object\.$"):
        load_llava_json(path, folder / "images")


def test_turn_value_that_is_not_a_string(folder):
    path = write(folder, [record(conversations=[TURNS[0], {"from": "gpt", "value": 42}])])
    with pytest.raises(ValueError, match=r"record 'r1' \(#0\): `conversations\[1\]\.value` is 42; expected a string"):
        load_llava_json(path, folder / "images")


@pytest.mark.parametrize("value", ["high", 2.7, True])
def test_similarity_that_is_not_an_integer(folder, value):
    path = write(folder, [record(similarity=value)])
    with pytest.raises(ValueError, match=rf"record 'r1' \(#0\) has `similarity`={value!r}; AlignGPT's pre-training "
                                         r"JSON stores the integer alignment level there \(never rounded\)"):
        load_llava_json(path, folder / "images")


@pytest.mark.parametrize("value,levels", [(-1, None), (12, 8)])
def test_similarity_out_of_range_at_load_time(folder, value, levels):
    path = write(folder, [record(similarity=value)])
    top = "N-1" if levels is None else levels - 1
    with pytest.raises(ValueError, match=rf"record 'r1' \(#0\) has `similarity`={value}, outside the levels 0\.\.{top}"):
        load_llava_json(path, folder / "images", num_alignment_levels=levels)


def test_record_with_no_assistant_turn_is_refused_and_counted(folder):
    human_only = [{"from": "human", "value": "<image>\nDescribe."}]
    path = write(folder, [record(), record(id="q1", conversations=human_only), record(id="q2", conversations=human_only)])
    with pytest.raises(ValueError, match=r"data\.json: 2 record\(s\) have no assistant \(`gpt`\) turn and would train "
                                         r"on nothing \(first: 'q1', 'q2'\)"):
        load_llava_json(path, folder / "images")


# ------------------------------------------------------------------------------------------------ collator


def pretrain_rows(levels):
    rows = synthetic_dataset(len(levels), "pretrain")
    return [dict(rows[i], alignment_level=level) for i, level in enumerate(levels)]


def pretrain_collator(processor, num_levels=8):
    return AlignGPTDataCollator(processor=processor, max_length=256, assistant_only_loss=True,
                                chat_template=PLAIN_CHAT_TEMPLATE, level_column="alignment_level",
                                num_alignment_levels=num_levels)


@pytest.mark.parametrize("level", [12, -1])
def test_level_out_of_range_at_collate_time_names_the_record(processor, level):
    with pytest.raises(ValueError, match=rf"^Sample 'pretrain-1' has `alignment_level`={level}; levels must be "
                                         r"integers in 0\.\.7 \(never rounded\)"):
        pretrain_collator(processor)(pretrain_rows([3, level]))


def test_float_level_at_collate_time_is_refused(processor):
    with pytest.raises(ValueError, match=r"^Sample 'pretrain-0' has `alignment_level`=2\.7; levels must be integers"):
        pretrain_collator(processor)(pretrain_rows([2.7, 3]))


def test_sample_without_supervised_tokens_in_a_mixed_batch(processor):
    rows = synthetic_dataset(2, "instruct")
    rows = [rows[0], dict(rows[1], messages=rows[1]["messages"][:1])]
    collator = AlignGPTDataCollator(processor=processor, max_length=256, assistant_only_loss=True)
    with pytest.raises(ValueError, match=r"^Sample 'instruct-1' has no supervised token \(no assistant turn, or an "
                                         r"empty one\) and would train on nothing"):
        collator(rows)


def test_unknown_role_in_a_training_row(processor):
    rows = synthetic_dataset(1, "instruct")
    row = dict(rows[0], messages=[rows[0]["messages"][0], {"role": "bot", "content": "Red."}])
    collator = AlignGPTDataCollator(processor=processor, max_length=256, assistant_only_loss=True)
    with pytest.raises(ValueError, match=r"^Sample 'instruct-0': message 1 has role 'bot'; AlignGPT's chat template "
                                         r"knows only"):
        collator([row])


def test_training_images_use_the_processors_conversion(folder):
    rgba = folder / "rgba.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(rgba)
    deep = folder / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(deep)
    assert open_image(str(rgba)).getpixel((0, 0)) == (255, 255, 255)  # white, as the processor
    assert open_image({"path": str(deep), "bytes": None}).getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((4, 4), 4112, dtype=np.uint16)).save(deep)
    assert open_image(str(deep)).getpixel((0, 0)) == (16, 16, 16)  # 4112 / 257, not clipped to 255


# ------------------------------------------------------------------------------------------------ trainer


def make_trainer(make_model, processor, output_dir, dataset=None, data_collator=None, max_steps=4):
    model = make_model(seed=0).train()
    model.config.aligngpt_stage = "pretrain"
    args = AlignGPTInstructConfig(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3, seed=3,
        save_strategy="steps", save_steps=2, report_to="none", activation_checkpointing=False, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    dataset = synthetic_dataset(8, "instruct") if dataset is None else dataset
    return AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                   data_collator=data_collator)


def test_empty_dataset(make_model, processor, tmp_path):
    with pytest.raises(ValueError, match=r"^`train_dataset` is empty \(0 rows\): there is nothing to train on\."):
        make_trainer(make_model, processor, tmp_path, dataset=Dataset.from_list([]))


def test_resume_skips_a_half_written_checkpoint(make_model, processor, tmp_path, caplog):
    make_trainer(make_model, processor, tmp_path).train()
    weights = tmp_path / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed while writing
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    assert checkpoint_problem(tmp_path / "checkpoint-4").startswith("model.safetensors is truncated or corrupt")
    with caplog.at_level(logging.WARNING, logger="aligngpt_hf.training.checkpoints"):
        assert newest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "Resuming from checkpoint-2, not from checkpoint-4: model.safetensors is truncated" in caplog.text
    resumed = make_trainer(make_model, processor, tmp_path)
    assert resumed.train(resume_from_checkpoint=True).global_step == 4  # from step 2: two more steps


def test_resume_from_an_explicit_broken_checkpoint(make_model, processor, tmp_path):
    broken = tmp_path / "checkpoint-9"
    broken.mkdir(parents=True)
    (broken / "trainer_state.json").write_text('{"global_step": 9')
    trainer = make_trainer(make_model, processor, tmp_path / "run")
    with pytest.raises(ValueError, match=r"^Cannot resume from .*checkpoint-9: trainer_state\.json is cut short or not "
                                         r"JSON\. Resume from an earlier checkpoint"):
        trainer.train(resume_from_checkpoint=str(broken))
    with pytest.raises(ValueError, match=r"^No complete checkpoint in .* \(checkpoint-9: trainer_state\.json is cut "
                                         r"short or not JSON\)\. Delete the broken folders"):
        newest_complete_checkpoint(tmp_path)


def test_nan_pixels_stop_training_with_a_clear_error(make_model, processor, tmp_path):
    collator = AlignGPTDataCollator(processor=processor, max_length=256, assistant_only_loss=True, gate_text_mask=True)

    def poisoned(rows):
        batch = collator(rows)
        batch["pixel_values"][1] = float("nan")
        return batch

    trainer = make_trainer(make_model, processor, tmp_path, data_collator=poisoned)
    with pytest.raises(ValueError, match=r"^Image\(s\) \[1\] of the batch \(index among its images, in order\) give "
                                         r"NaN or inf features: their `pixel_values` hold NaN or inf values"):
        trainer.train()
    assert torch.isfinite(next(trainer.model.parameters())).all()  # stopped before the optimizer stepped on NaN


def test_turn_value_that_is_null(folder):
    path = write(folder, [record(conversations=[TURNS[0], {"from": "gpt", "value": None}])])
    with pytest.raises(ValueError, match=r"record 'r1' \(#0\): `conversations\[1\]\.value` is None; expected a string"):
        load_llava_json(path, folder / "images")


def test_training_cli_flag_allows_paths_outside_the_image_folder(folder):
    from transformers import HfArgumentParser

    from aligngpt_hf.training.configs import AlignGPTScriptArguments
    from aligngpt_hf.training.model_setup import load_training_data

    path = write(folder, [record(image="../outside.png")])
    argv = ["--data_path", str(path), "--image_folder", str(folder / "images")]
    parser = HfArgumentParser(AlignGPTScriptArguments)
    (refused,) = parser.parse_args_into_dataclasses(argv)
    with pytest.raises(ValueError, match=r"record 'r1' \(#0\) `image`: image path '\.\./outside\.png' resolves to "):
        load_training_data("pretrain", refused)
    (allowed,) = parser.parse_args_into_dataclasses([*argv, "--allow_outside_image_folder"])
    assert load_training_data("pretrain", allowed)[0]["images"][0].getpixel((0, 0)) == (30, 30, 200)


def test_symlink_inside_the_image_folder_pointing_outside_is_refused_unless_allowed(folder):
    """The check is on real paths: a link inside the folder that leads out of it is an outside path too."""
    (folder / "shared").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "shared" / "s.png")
    (folder / "images" / "coco").symlink_to(folder / "shared", target_is_directory=True)
    (folder / "images" / "inside").mkdir()
    Image.new("RGB", (8, 8), (4, 5, 6)).save(folder / "images" / "inside" / "i.png")
    (folder / "images" / "link.png").symlink_to(folder / "images" / "inside" / "i.png")  # stays inside: fine
    assert load_llava_json(write(folder, [record(image="link.png")]), folder / "images")[0]["images"][0].getpixel(
        (0, 0)) == (4, 5, 6)
    with pytest.raises(ValueError, match=r"record 'r1' \(#0\) `image`: image path 'coco/s\.png' resolves to .*images/"
                                         r"coco/s\.png \(through a symlink, to .*shared/s\.png\), outside the image "
                                         r"folder .*allow_outside_image_folder=True"):
        load_llava_json(write(folder, [record(image="coco/s.png")]), folder / "images")
    dataset = load_llava_json(write(folder, [record(image="coco/s.png")]), folder / "images",
                              allow_outside_image_folder=True)
    assert dataset[0]["images"][0].getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"outside the image folder"):
        load_llava_json(write(folder, [record(image="coco/../../shared/s.png")]), folder / "images")

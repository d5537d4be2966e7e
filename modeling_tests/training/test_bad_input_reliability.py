"""Training faults that used to be silent or unclear: rotated photos, damaged images in the data, records the chat
template would mangle, streaming data with skipping, unwritable or full output folders, resuming a finished run or
the other stage's checkpoint. Each error names the file, the record and the fix."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image

from aligngpt_hf import (
    AlignGPTInstructConfig,
    AlignGPTInstructTrainer,
    AlignGPTPretrainConfig,
    AlignGPTPretrainTrainer,
    load_llava_json,
)
from aligngpt_hf.training.checkpoints import TrainingCompleteError
from aligngpt_hf.training.data import synthetic_dataset

FAST = dict(per_device_train_batch_size=2, report_to="none", save_strategy="no", activation_checkpointing=False,
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, learning_rate=1e-3, seed=3)


def bomb_png() -> bytes:
    """A valid PNG header announcing 20000 x 20000 pixels (PIL refuses it as a decompression bomb on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def llava_folder(tmp_path, images: dict[str, bytes], turns=None):
    (tmp_path / "images").mkdir(exist_ok=True)
    records = []
    for name, data in images.items():
        (tmp_path / "images" / name).write_bytes(data)
        records.append({"id": f"rec-{name}", "image": name, "conversations": turns or [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A thing."}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json"


def instruct_trainer(make_model, processor, tmp_path, dataset, **overrides):
    model = make_model(seed=0).train()
    model.config.aligngpt_stage = "pretrain"
    args = AlignGPTInstructConfig(output_dir=str(tmp_path / "run"), **{**FAST, "max_steps": 2, **overrides})
    return AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)


# ------------------------------------------------------------------------------------------------ records


def test_image_tag_in_an_assistant_turn_is_refused_at_load(tmp_path):
    path = llava_folder(tmp_path, {"a.png": b""}, turns=[{"from": "human", "value": "Describe."},
                                                          {"from": "gpt", "value": "Here: <image> a cat."}])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/data\.json: record 'rec-a\.png' \(#0\): "
                                         r"`conversations\[1\]\.value` is a `gpt` turn holding `<image>`; images "
                                         r"belong to a human turn\. Move the `<image>` tag into the question"):
        load_llava_json(path, tmp_path / "images", check_images=False)


def test_two_human_turns_in_a_row_are_refused_at_load(tmp_path):
    path = llava_folder(tmp_path, {"a.png": b""}, turns=[{"from": "human", "value": "<image>\nFirst q."},
                                                          {"from": "human", "value": "Second q."},
                                                          {"from": "gpt", "value": "A."}])
    with pytest.raises(ValueError, match=r"record 'rec-a\.png' \(#0\): `conversations\[1\]\.value` is a second human "
                                         r"turn in a row; merge it into the turn before"):
        load_llava_json(path, tmp_path / "images", check_images=False)


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("name, data, why", [
    ("bomb.png", bomb_png(), r"DecompressionBombError: .* larger than PIL's limit for untrusted files; shrink it, "
                             r"or raise `PIL\.Image\.MAX_IMAGE_PIXELS` if you trust it"),
    ("cut.jpg", truncated_jpeg(), r"OSError: image file is truncated.*; the file is cut short"),
], ids=["decompression-bomb", "truncated-jpeg"])
def test_damaged_training_image_names_the_record_and_the_file(make_model, processor, tmp_path, name, data, why):
    dataset = load_llava_json(llava_folder(tmp_path, {name: data}), tmp_path / "images")
    trainer = instruct_trainer(make_model, processor, tmp_path, dataset)
    with pytest.raises(ValueError, match=rf"^sample 'rec-{name}' image 0: {tmp_path}/images/{name} is not a readable "
                                         rf"image \({why}\)\. Replace or re-download it\.$"):
        trainer.data_collator([trainer.train_dataset[0]])


def test_exif_rotated_training_photo_gets_the_pixels_the_processor_gives(make_model, processor, tmp_path):
    from modeling_tests.models.test_processor_inputs import rotated_jpeg

    dataset = load_llava_json(llava_folder(tmp_path, {"photo.jpg": rotated_jpeg()}), tmp_path / "images")
    trainer = instruct_trainer(make_model, processor, tmp_path, dataset)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    expected = processor(images=str(tmp_path / "images" / "photo.jpg"), text="<image>", return_tensors="pt")
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])


# ------------------------------------------------------------------------------------------------ set-up


def test_streaming_dataset_with_skip_overlong_samples_is_a_clear_error(make_model, processor, tmp_path):
    streaming = synthetic_dataset(4, "instruct").to_iterable_dataset()
    with pytest.raises(ValueError, match=r"^skip_overlong_samples=True measures every sample before training, which "
                                         r"a streaming IterableDataset cannot offer\. Load the data without streaming"):
        instruct_trainer(make_model, processor, tmp_path, streaming, skip_overlong_samples=True, max_length=64)


def test_output_dir_that_cannot_be_written_is_refused_before_training(make_model, processor, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(NotADirectoryError, match=rf"^the output_dir {tmp_path}/taken/run is inside {tmp_path}/taken, "
                                                 r"which is a file; choose another folder$"):
        instruct_trainer(make_model, processor, tmp_path / "taken", synthetic_dataset(4, "instruct"))


DISK_FULL = """
import resource, signal, sys, torch
sys.path.insert(0, {root!r})
from modeling_tests.conftest import build_tokenizer
from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer
from aligngpt_hf.tiny import build_config, build_processor
from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
from aligngpt_hf.training.data import synthetic_dataset
tokenizer = build_tokenizer()
model = AlignGPTForConditionalGeneration(build_config(tokenizer))
model.config.aligngpt_stage = "pretrain"
args = AlignGPTInstructConfig(output_dir={out!r}, report_to="none", use_cpu=True, max_steps=1)
trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=synthetic_dataset(2, "instruct"),
                                  processing_class=build_processor(tokenizer))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the disk is "full" after 20 kB per file
try:
    trainer.save_model({out!r})
except OSError as error:
    print("ERROR", error)
"""


def test_full_disk_while_saving_names_the_folder(tmp_path):
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    code = DISK_FULL.format(root=root, out=str(tmp_path / "run"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert f"ERROR cannot save the model to {tmp_path}/run: File too large; free space on that disk or write " \
           "elsewhere" in result.stdout, result.stdout + result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ resume


def test_resuming_a_finished_run_says_so_and_trains_nothing(make_model, processor, tmp_path):
    dataset = synthetic_dataset(8, "instruct")  # 4 steps per epoch: max_steps=3 ends mid-epoch
    options = dict(max_steps=3, save_strategy="steps", save_steps=3)
    instruct_trainer(make_model, processor, tmp_path, dataset, **options).train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    weights = (tmp_path / "run" / "checkpoint-3" / "model.safetensors").read_bytes()
    again = instruct_trainer(make_model, processor, tmp_path, dataset, **options)
    with pytest.raises(TrainingCompleteError, match=rf"^Training is already complete: {tmp_path}/run/checkpoint-3 is "
                                                    r"at step 3 \(epoch 0\.75\), the configured end \(max_steps=3\)\. "
                                                    r"Nothing was trained and no checkpoint was written\. Raise "
                                                    r"max_steps to train further"):
        again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").read_bytes() == weights


def test_resuming_stage_2_from_a_stage_1_checkpoint_names_the_stage(make_model, processor, tmp_path):
    args = AlignGPTPretrainConfig(output_dir=str(tmp_path / "run"), **{**FAST, "max_steps": 1,
                                                                       "save_strategy": "steps", "save_steps": 1})
    AlignGPTPretrainTrainer(model=make_model(seed=0).train(), args=args, train_dataset=synthetic_dataset(4),
                            processing_class=processor).train()
    stage2 = instruct_trainer(make_model, processor, tmp_path, synthetic_dataset(4, "instruct"))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/run/checkpoint-1 is a checkpoint of stage 1 \(`pretrain`, "
                                         r"its config\.json says aligngpt_stage='pretrain'\), but this is stage 2 "
                                         r"\(`instruct`\): a stage resumes only its own checkpoints\. To go on, start "
                                         r"stage 2 FROM the stage-1 output"):
        stage2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))


def test_resuming_with_another_optimizer_names_both_before_any_step(make_model, processor, tmp_path):
    """transformers would load the AdamW state into SGD and fail inside its first step (`KeyError: 'momentum'`)."""
    dataset = synthetic_dataset(8, "instruct")
    instruct_trainer(make_model, processor, tmp_path, dataset, max_steps=1, save_strategy="steps", save_steps=1).train()
    again = instruct_trainer(make_model, processor, tmp_path, dataset, max_steps=2, optim="sgd")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/run/checkpoint-1 was saved by a run with optim='adamw_torch\w*' "
                                         r"\(its training_args\.json\), but this run uses optim='sgd': the optimizer "
                                         r"state cannot be carried over\. Resume with `--optim adamw_torch\w*`"):
        again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 0

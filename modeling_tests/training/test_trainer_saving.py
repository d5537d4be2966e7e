"""The trainers' saves: staged inside the output folder and renamed into place, so a failed save leaves the previous
model whole, and without transformers' `training_args.bin` pickle (the arguments are written as JSON)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer
from aligngpt_hf.training.data import synthetic_dataset

FAST = dict(report_to="none", use_cpu=True, activation_checkpointing=False, per_device_train_batch_size=2)


@pytest.fixture
def trainer(make_model, processor, tmp_path):
    model = make_model(seed=0).train()
    model.config.aligngpt_stage = "pretrain"
    args = AlignGPTInstructConfig(output_dir=str(tmp_path / "run"), max_steps=1, save_strategy="no", **FAST)
    return AlignGPTInstructTrainer(model=model, args=args, train_dataset=synthetic_dataset(2, "instruct"),
                                   processing_class=processor)


def test_saved_folder_holds_the_arguments_as_json_and_no_pickle(trainer, tmp_path):
    trainer.save_model()
    out = tmp_path / "run"
    names = sorted(path.name for path in out.iterdir())
    assert "model.safetensors" in names and "config.json" in names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl")) or name.startswith(".")]
    assert json.loads((out / "training_args.json").read_text())["output_dir"] == str(out)


def test_a_save_that_fails_midway_leaves_the_previous_model_whole(trainer, tmp_path, monkeypatch):
    trainer.save_model()
    out = tmp_path / "run"
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def full_disk(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"cut")  # the disk fills up mid-file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(trainer.model), "save_pretrained", full_disk)
    with pytest.raises(OSError, match=rf"^cannot save the model to {out}: No space left on device"):
        trainer.save_model()
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # nothing cut, nothing left behind

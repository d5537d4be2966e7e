"""Kill-and-resume: a run interrupted after a checkpoint resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer
from aligngpt_hf.training.data import synthetic_dataset


class Killed(Exception):
    pass


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


def make_trainer(make_model, processor, output_dir, callbacks=()):
    model = make_model(seed=0).train()
    model.config.aligngpt_stage = "pretrain"
    args = AlignGPTInstructConfig(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, seed=11,
        save_strategy="steps", save_steps=3, report_to="none", activation_checkpointing=False, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, group_by_modality_length=True,
    )
    dataset = synthetic_dataset(8, "instruct", text_only_every=2)  # 4 steps per epoch: the resume crosses an epoch
    return AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                   callbacks=list(callbacks))


def test_interrupted_run_resumes_to_the_same_weights(make_model, processor, tmp_path):
    reference = make_trainer(make_model, processor, tmp_path / "reference")
    reference.train()
    expected = {name: param.detach().clone() for name, param in reference.model.named_parameters()}

    interrupted = make_trainer(make_model, processor, tmp_path / "run", callbacks=[KillAfterStep(4)])
    with pytest.raises(Killed):
        interrupted.train()
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").is_file()

    resumed = make_trainer(make_model, processor, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, expected[name]), name
    assert not torch.equal(expected["lm_head.weight"], make_model(seed=0).lm_head.weight)

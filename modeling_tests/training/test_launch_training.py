"""The shipped `accelerate launch --config_file <shipped config> -m aligngpt_hf.cli pretrain|instruct` commands, run
as written on 2 CPU processes (gloo) with the documented CPU override (docs/multi-gpu.md):
`--num_processes 2 --mixed_precision no --main_process_port <free>`, the tiny recipes' `use_cpu: true` doing the rest.

One stage-1 run under ddp.yaml (checkpoint every 2 steps) feeds three checks: same weights as one process with the
same global batch, resume from its checkpoint under the same launcher, and stage 2 under fsdp.yaml from its folder
(on CPU accelerate runs fsdp.yaml as DDP; the real FSDP2 sharding is test_launch_fsdp.py). Where DeepSpeed is
installed (optional extra, not a test dependency) zero2.yaml / zero3.yaml run the same way as real DeepSpeed engines.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligngpt_hf import AlignGPTForConditionalGeneration
from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.training.cli import accelerate_config_path
from conftest import run_launcher

# the console script next to this interpreter (a virtual environment), else the one on PATH
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate") or "accelerate"
CPU_OVERRIDE = ["--num_processes", "2", "--mixed_precision", "no"]


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch(config: str, args: list[str], cwd: Path, timeout: int = 300) -> str:
    """`accelerate launch --config_file <shipped config> <CPU override> -m aligngpt_hf.cli ARGS`; returns stdout."""
    command = [ACCELERATE, "launch", "--config_file", str(accelerate_config_path(config)), *CPU_OVERRIDE,
               "--main_process_port", free_port(), "-m", "aligngpt_hf.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = run_launcher(command, env=env, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def max_difference(left: Path, right: Path) -> float:
    a, b = load_file(left / "model.safetensors"), load_file(right / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def loss_lines(stdout: str) -> int:
    return sum(1 for line in stdout.splitlines() if line.startswith("{'loss'"))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Stage 1 of `pretrain_tiny` (4 steps) on 2 processes x batch 2 and on 1 process x batch 4."""
    root = tmp_path_factory.mktemp("launch")
    common = ["pretrain", "pretrain_tiny", "--disable_tqdm", "true"]
    stdout = launch("ddp", [*common, "--output_dir", "ddp", "--save_strategy", "steps", "--save_steps", "2"], root)
    assert cli_main([*common, "--output_dir", str(root / "single"), "--per_device_train_batch_size", "4"]) == 0
    return root, stdout


def test_ddp_launch_of_pretrain_matches_one_process_with_the_same_global_batch(stage1):
    root, stdout = stage1
    checkpoint = root / "ddp" / "checkpoint-2"
    assert (checkpoint / "rng_state_1.pth").is_file()  # rank 1 existed
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2 and state["epoch"] == 0.5  # 2 steps x 2 ranks x 2 rows = 8 of 16 rows
    assert loss_lines(stdout) == 4
    assert max_difference(root / "ddp", root / "single") < 1e-6


def test_ddp_launch_resumes_from_its_checkpoint_to_the_same_weights(stage1):
    root, _ = stage1
    stdout = launch("ddp", ["pretrain", "pretrain_tiny", "--disable_tqdm", "true", "--output_dir", "resumed",
                            "--resume_from_checkpoint", str(root / "ddp" / "checkpoint-2")], root)
    assert loss_lines(stdout) == 2  # steps 3 and 4 only: training continued from step 2
    assert max_difference(root / "resumed", root / "ddp") < 1e-6


def instruct_args(root: Path) -> list[str]:
    return ["instruct", "instruct_tiny", "--model_name_or_path", str(root / "ddp"), "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def stage2_reference(stage1):
    """Stage 2 of `instruct_tiny` from the multi-process stage-1 folder on 1 process x batch 4 (rows are mixed:
    every 4th is text-only)."""
    root, _ = stage1
    assert cli_main([*instruct_args(root), "--output_dir", str(root / "single-instruct"),
                     "--per_device_train_batch_size", "4"]) == 0
    return root / "single-instruct"


def test_instruct_under_fsdp_config_starts_from_a_multi_process_stage1_folder(stage1, stage2_reference):
    root, _ = stage1
    launch("fsdp", [*instruct_args(root), "--output_dir", "fsdp-instruct"], root)
    assert max_difference(root / "fsdp-instruct", stage2_reference) < 1e-6
    assert max_difference(root / "fsdp-instruct", root / "ddp") > 1e-6  # stage 2 did train
    config = json.loads((root / "fsdp-instruct" / "config.json").read_text())
    assert config["aligngpt_stage"] == "instruct"


def test_zero2_launch_of_pretrain_matches_one_process(stage1):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (`pip install -e '.[deepspeed]'`)")
    root, _ = stage1
    launch("zero2", ["pretrain", "pretrain_tiny", "--disable_tqdm", "true", "--output_dir", "zero2"], root)
    assert max_difference(root / "zero2", root / "single") < 1e-6


def test_zero3_launch_of_instruct_with_text_only_rows_matches_one_process(stage1, stage2_reference):
    """A text-only rank must gather the ZeRO-3-partitioned tower as its peers do, in their module order, or it hangs."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (`pip install -e '.[deepspeed]'`)")
    root, _ = stage1
    launch("zero3", [*instruct_args(root), "--output_dir", "zero3"], root, timeout=180)
    # the gathered ZeRO-3 save names the LLM the legacy way (`language_model.model.`); from_pretrained maps it back
    loaded = AlignGPTForConditionalGeneration.from_pretrained(root / "zero3", dtype=torch.float32).state_dict()
    expected = AlignGPTForConditionalGeneration.from_pretrained(stage2_reference, dtype=torch.float32).state_dict()
    assert max((loaded[name] - expected[name]).abs().max().item() for name in expected) < 1e-6

"""Shared tiny, offline fixtures: a locally trained tokenizer, the processor and tiny AlignGPT models."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process unless the caller chose: the tiny models gain nothing from a second thread, a busy
# machine (another process on the other core) slows two spinning threads several-fold, and child processes (remote-code
# reloads, DDP ranks) inherit the same count, so their float reductions match the parent's bit for bit.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from aligngpt_hf import AlignGPTForConditionalGeneration  # noqa: E402
from aligngpt_hf.tiny import build_config, build_processor, build_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# Recorded inputs and outputs of the original AlignGPT implementation on a tiny model (data: see its README.md).
ORIGINAL_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "aligngpt_original_tiny"


def package_free_env(hf_home: Path, **overrides: str) -> dict:
    """Environment for a child process that loads remote code: fresh HF_HOME, offline, no `aligngpt_hf` source on
    PYTHONPATH (other entries stay, e.g. the pinned transformers of CI's lower-bound run)."""
    kept = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if entry and not (Path(entry) / "aligngpt_hf").exists()]
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(kept),
            **overrides}


def run_launcher(command: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(capture_output=True, text=True)` for multi-process launchers: the launcher gets its own process
    group, killed whole on timeout, so the ranks it started never outlive a failed test (and slow down the rest)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return build_processor(tokenizer)


@pytest.fixture
def make_model(tokenizer):
    """Factory: a seeded tiny model in eval mode; keyword arguments go to the config."""

    def make(seed: int = 0, **config_kwargs) -> AlignGPTForConditionalGeneration:
        torch.manual_seed(seed)
        model = AlignGPTForConditionalGeneration(build_config(tokenizer, **config_kwargs))
        return model.eval()

    return make


@pytest.fixture
def stage1_artefact(make_model, tmp_path):
    """A converted stage-1 artefact as `aligngpt-hf convert` writes it (config, projector + level table, stage
    marker naming a saved CLIP tower), from a seeded tiny model; returns (that model, the artefact folder, its tensors)."""
    import json

    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    source = make_model(seed=5)
    artefact = tmp_path / "artefact"
    source.config.save_pretrained(artefact)
    tensors = {k: v.contiguous() for k, v in source.state_dict().items()
               if k.startswith("model.multi_modal_projector.") or k == "model.alignment.level_embeddings"}
    save_file(tensors, artefact / "stage1.safetensors")
    CLIPVisionModel(source.config.vision_config).save_pretrained(tmp_path / "clip")
    (artefact / "aligngpt_stage.json").write_text(json.dumps(
        {"stage": "pretrain", "format_version": 1, "weights": "stage1.safetensors", "tensors": sorted(tensors),
         "vision_tower": str(tmp_path / "clip")}))
    return source, artefact, tensors


@pytest.fixture
def images():
    """Three small images of different sizes and colours (non-square, to exercise pad-to-square)."""
    return [
        Image.new("RGB", (40, 24), (200, 30, 30)),
        Image.new("RGB", (20, 36), (30, 160, 40)),
        Image.new("RGB", (32, 32), (20, 40, 220)),
    ]


def user_message(text: str, num_images: int = 1) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]

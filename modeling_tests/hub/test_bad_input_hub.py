"""Bad input, hub layer: a truncated shard or a pickle in the folder to publish is named; the pickle never runs.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from aligngpt_hf.hub.loading import load_for_publishing


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def folder(tmp_path, processor):
    from aligngpt_hf.tiny import build_model

    torch.manual_seed(0)
    build_model(processor.tokenizer).save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    return tmp_path / "run"


def test_truncated_safetensors_at_push_names_the_file(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"run: weight file\(s\) model\.safetensors are truncated or corrupt \(.*\); "
                                         r"re-download or re-save them"):
        load_for_publishing(folder)


def test_pickle_weights_at_push_are_refused_without_torch_advice(folder, tmp_path):
    marker = tmp_path / "PWNED"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"lm_head.weight": Payload(marker)}))
    with pytest.raises(ValueError) as refused:
        load_for_publishing(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder}: the pickle weights (pytorch_model.bin) were refused: they hold more than "
                              "tensors, and unpickling them could run arbitrary code.")
    assert "weights_only=False" not in message and not marker.exists()


def test_interrupted_dry_run_leaves_no_half_folder_and_the_rerun_works(folder, tmp_path, monkeypatch):
    from aligngpt_hf.hub import push

    out = tmp_path / "me-model-publish"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(push, "complete_auto_maps", killed)  # weights and processor written, auto_map not yet
    with pytest.raises(KeyboardInterrupt):
        push.push_to_hub(folder, "me/model", dry_run=True, output_dir=out)
    assert not out.exists() and not list(tmp_path.glob(".me-model-publish*"))
    (tmp_path / ".me-model-publish.aligngpt-tmp-k1ll3d").mkdir()  # what a kill -9 would leave behind
    (tmp_path / ".me-model-publish.aligngpt-tmp-k1ll3d" / "model.safetensors").write_bytes(b"half")
    monkeypatch.undo()
    result = push.push_to_hub(folder, "me/model", dry_run=True, output_dir=out)
    assert "config.json" in result.files and not list(tmp_path.glob(".me-model-publish*"))

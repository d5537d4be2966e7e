"""Bad input, conversion layer: truncated or hostile weight files are named, and a pickle payload never runs.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from aligngpt_hf import convert_checkpoint
from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.conversion.mapping import ConversionError
from conftest import ORIGINAL_FIXTURES

ORIGINAL = ORIGINAL_FIXTURES / "original_checkpoint"


class Payload:
    """Unpickling this would create `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "original"
    shutil.copytree(ORIGINAL, folder)
    return folder


def test_truncated_bin_checkpoint_names_the_file(source, tmp_path):
    weights = source / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin is truncated or corrupt \(PytorchStreamReader failed "
                                              r".*\); re-download or re-copy it\.$"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_truncated_safetensors_shard_names_the_file(source, tmp_path):
    state = torch.load(source / "pytorch_model.bin", map_location="cpu", weights_only=True)
    (source / "pytorch_model.bin").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, source / "model.safetensors")
    shard = source / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ConversionError, match=r"model\.safetensors is truncated or corrupt \(Error while deserializing "
                                              r"header: .*\); re-download or re-copy it\.$"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_pickle_payload_is_refused_names_the_file_and_never_runs(source, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    (source / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload(marker)}))
    with pytest.raises(ConversionError) as refused:
        convert_checkpoint(source, tmp_path / "out", progress=False)
    message = str(refused.value)
    assert message.startswith(f"{source / 'pytorch_model.bin'} was refused: it is a pickle holding more than tensors")
    assert "weights_only=False" not in message and "will likely succeed" not in message
    assert not marker.exists()
    assert cli_main(["convert", str(source), str(tmp_path / "out2"), "--no-progress"]) != 0
    assert "weights_only=False" not in capsys.readouterr().err and not marker.exists()


def test_random_bytes_bin_is_not_a_torch_checkpoint(source, tmp_path, capsys):
    import random

    noise = random.Random(0).randbytes(4096)
    assert noise[:1] not in (b"\x80", b"P")
    (source / "pytorch_model.bin").write_bytes(noise)
    with pytest.raises(ConversionError, match=rf"^{source / 'pytorch_model.bin'} is not a torch checkpoint: it is "
                                              r"neither a zip archive nor a pickle \(it starts with bytes [0-9a-f]{4}\)\."
                                              r" Re-download or re-copy it, or remove it from the folder\.$"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert cli_main(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith(f"aligngpt-hf convert: error: {source / 'pytorch_model.bin'} is not a "
                                              "torch checkpoint")


def test_interrupted_conversion_leaves_no_half_output_and_the_rerun_needs_no_overwrite(source, tmp_path,
                                                                                        monkeypatch):
    from aligngpt_hf.conversion import convert

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "write_side_files", killed)  # weights written, config not yet
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.undo()
    result = convert_checkpoint(source, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").is_file() and "model.safetensors" in result.files

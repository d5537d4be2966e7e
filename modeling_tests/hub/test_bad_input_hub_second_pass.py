"""Bad input, hub layer, second pass: git references and commit ids given as the branch to push to; a training
folder whose own README.md, trainer state, optimizer files and logs are not published (now said, not silent);
upload-only options given to a dry run.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import pytest
import torch

from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.hub.push import push_to_hub


@pytest.fixture(scope="module")
def folder(tmp_path_factory, processor):
    from aligngpt_hf.tiny import build_model

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("hub") / "run"
    build_model(processor.tokenizer).save_pretrained(run)
    processor.save_pretrained(run)
    return run


@pytest.mark.parametrize("revision", ["refs/pr/1", "refs/heads/main", "HEAD", "@", "0123456789abcdef" * 2 + "01234567"])
def test_revision_that_is_a_reference_or_commit_is_refused_before_loading(folder, tmp_path, revision):
    with pytest.raises(ValueError, match=rf"^--revision {revision!r} is a git reference or commit, not a branch name: "
                                         r".*Give the branch's own name, e.g\. 'main' or 'v1'\."):
        push_to_hub(folder, "me/model", dry_run=True, revision=revision, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_folder_extras_and_its_readme_are_named_not_published(folder, tmp_path, capsys):
    import shutil

    run = tmp_path / "trained"
    shutil.copytree(folder, run)
    (run / "README.md").write_text("# my own notes\n")
    (run / "optimizer.pt").write_bytes(b"optimizer state")
    (run / "training_args.bin").write_bytes(b"pickle")
    (run / "runs").mkdir()
    (run / "runs" / "events.out.tfevents").write_text("log")
    (run / "checkpoint-5").mkdir()
    out = tmp_path / "publish"
    assert cli_main(["push", str(run), "me/model", "--dry-run", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    published = sorted(p.name for p in out.iterdir())
    assert not {"optimizer.pt", "training_args.bin", "runs", "checkpoint-5"} & set(published)
    assert f"{len(published)} files: {', '.join(published)}" in stdout  # every uploaded file is listed
    assert (out / "README.md").read_text().startswith("---\n")  # the generated card, not the folder's notes
    assert (f"{run / 'README.md'} was not published: the repository's README.md is the generated model card"
            in stdout)
    assert (f"Not published from {run} (4 entries; the model and processor are re-saved from it): checkpoint-5/, "
            "optimizer.pt, runs/, training_args.bin." in stdout)


def test_upload_options_given_to_a_dry_run_are_named_as_unused(folder, tmp_path, capsys):
    argv = ["push", str(folder), "me/model", "--dry-run", "--out", str(tmp_path / "out"), "--revision", "v1",
            "--commit-message", "first", "--token", "hf_x"]
    assert cli_main(argv) == 0
    assert "--revision, --commit-message, --token not used: a dry run uploads nothing." in capsys.readouterr().out


def copy_of(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "nope", "KeyError: unknown name 'nope'"),
    ("eos_token_id", "2", "StrictDataclassFieldValidationError: Validation error for field 'eos_token_id'"),
])
def test_config_value_the_model_cannot_be_built_from_is_named(folder, tmp_path, field, value, message):
    import json
    import re

    run = copy_of(folder, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["text_config"][field] = value  # a KeyError or a validation traceback before
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^{run / 'config.json'}: a value the model cannot be built from "
                                         rf"\({re.escape(message)}"):
        push_to_hub(run, "me/model", dry_run=True, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["{x", "[1]"])
def test_broken_generation_config_is_named_not_replaced_by_defaults(folder, tmp_path, text):
    run = copy_of(folder, tmp_path)
    (run / "generation_config.json").write_text(text)  # transformers dropped it with a warning: defaults published
    with pytest.raises(ValueError, match=rf"^{run / 'generation_config.json'} (is not valid JSON|holds a JSON list)"):
        push_to_hub(run, "me/model", dry_run=True, output_dir=tmp_path / "out")


def test_folder_whose_only_bin_is_trainer_state_has_no_weights(folder, tmp_path):
    run = copy_of(folder, tmp_path)
    (run / "model.safetensors").unlink()
    (run / "training_args.bin").write_bytes(b"pickle")  # counted as weights before: transformers' message followed
    with pytest.raises(FileNotFoundError, match=rf"^{run} has no weights \(model\.safetensors or its shards; it holds "):
        push_to_hub(run, "me/model", dry_run=True, output_dir=tmp_path / "out")


def test_shard_size_in_mebibytes_names_the_units_save_pretrained_reads(folder, tmp_path):
    with pytest.raises(ValueError, match=r"^--max-shard-size '500MiB' is not a positive size; write it like 5GB or "
                                         r"500MB \(a number of bytes, or with KB, MB, GB or TB: save_pretrained reads "
                                         r"no MiB/GiB\)\.$"):
        push_to_hub(folder, "me/model", dry_run=True, max_shard_size="500MiB", output_dir=tmp_path / "out")

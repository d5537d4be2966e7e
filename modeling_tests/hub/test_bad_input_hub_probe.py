"""Bad input, hub layer (found by probing): repo ids, branches, shard sizes and card fields the Hub would refuse only
at upload; a publish folder inside the model folder (or holding it); `--private` that is ignored (a dry run, or an
existing public repository on the stand-in Hub); folders that are files, LLaVA or original-layout checkpoints, or
hold no weights.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from modeling_tests.hub.test_hub import _hub_env, fake_hub  # noqa: F401 (fixture)

from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.hub.loading import load_for_publishing
from aligngpt_hf.hub.push import push_to_hub

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, processor):
    from aligngpt_hf.tiny import build_model

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("hub") / "run"
    build_model(processor.tokenizer).save_pretrained(run)
    processor.save_pretrained(run)
    return run


@pytest.mark.parametrize("repo_id", ["a b/c", "me/model..", "../x", "me/" + "x" * 100, "me/model\n"])
def test_repo_id_the_hub_would_refuse_is_named_before_loading(folder, tmp_path, repo_id):
    with pytest.raises(ValueError, match=r"^REPO_ID .* is not a Hub repo id \(.*\); write it as 'owner/name'"):
        push_to_hub(folder, repo_id, dry_run=True, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("revision", ["bad branch", "v1..v2", "-rm", "a~1", ""])
def test_revision_that_is_not_a_branch_name(folder, tmp_path, revision):
    with pytest.raises(ValueError, match=rf"^--revision {revision!r} is not a valid branch name"):
        push_to_hub(folder, "me/model", dry_run=True, revision=revision, output_dir=tmp_path / "out")


@pytest.mark.parametrize("size", ["lots", "0", "0GB", "5", 0, -1])
def test_shard_size_is_checked_before_loading(folder, tmp_path, capsys, size):
    with pytest.raises(ValueError, match=rf"^--max-shard-size {size!r} is not a positive size; write it like 5GB"):
        push_to_hub(folder, "me/model", dry_run=True, max_shard_size=size, output_dir=tmp_path / "out")


@pytest.mark.parametrize("options, message", [
    (dict(license="mit\nextra: 1"), r"^--license 'mit\\nextra: 1' is not a licence id"),
    (dict(base_models=["a b"]), r"^--base-model 'a b' is not a Hub repo id"),
    (dict(datasets=["a/b/c"]), r"^--dataset 'a/b/c' is not a Hub repo id"),
])
def test_card_fields_the_hub_would_refuse(folder, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        push_to_hub(folder, "me/model", dry_run=True, output_dir=tmp_path / "out", **options)


def test_private_with_dry_run_is_refused_not_ignored(folder, tmp_path, capsys):
    assert cli_main(["push", str(folder), "me/model", "--dry-run", "--private", "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith("aligngpt-hf push: error: --private applies to the repository an "
                                              "upload creates, but --dry-run uploads nothing")


@pytest.mark.parametrize("where", ["inside", "holds"])
def test_publish_folder_overlapping_the_model_folder_is_refused(folder, tmp_path, where):
    source = tmp_path / "run"
    shutil.copytree(folder, source)
    out = source / "publish" if where == "inside" else tmp_path
    expected = "is inside the source folder" if where == "inside" else "holds the source folder"
    with pytest.raises(ValueError, match=rf"^The publish folder {out} {expected}"):
        push_to_hub(source, "me/model", dry_run=True, output_dir=out)
    assert sorted(os.listdir(source)) == sorted(os.listdir(folder))


def test_folders_that_are_not_aligngpt_models_are_named(folder, tmp_path):
    from aligngpt_hf.tiny import build_llava

    with pytest.raises(NotADirectoryError, match=r"the model folder .*config\.json is a file"):
        load_for_publishing(folder / "config.json")
    model, processor = build_llava()
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"llava is a transformers LLaVA \(model_type 'llava'\), not AlignGPT; turn it "
                                         r"into one first: `aligngpt-hf from-llava FOLDER OUTPUT`"):
        load_for_publishing(tmp_path / "llava")
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"model_type": "aligngpt", "mm_vision_tower": "clip"}))
    (original / "processor_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"original is an original-layout checkpoint .*`aligngpt-hf convert FOLDER "
                                         r"OUTPUT`"):
        load_for_publishing(original)
    empty = tmp_path / "noweights"
    shutil.copytree(folder, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"noweights has no weights \(model\.safetensors or its shards; it "
                                                r"holds .*config\.json.*\); save the model into it first"):
        load_for_publishing(empty)


def test_private_push_to_an_existing_public_repo_is_refused(fake_hub, folder, tmp_path):  # noqa: F811
    endpoint, root = fake_hub
    env = {**_hub_env(endpoint, tmp_path / "home"), "PYTHONPATH": str(SRC)}

    def push(*extra):
        return subprocess.run([sys.executable, "-m", "aligngpt_hf.cli", "push", str(folder), "me/public-one", *extra],
                              capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)

    first = push()  # the stand-in Hub creates it public
    assert first.returncode == 0, first.stderr[-2000:]
    stored = root / "store" / "me__public-one"
    before = {p.name: p.stat().st_mtime_ns for p in stored.iterdir()}
    second = push("--private")
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        "aligngpt-hf push: error: --private was given, but me/public-one already exists and is public: --private "
        "does not change an existing repository. Make it private on the Hub first (Settings), or push to a new "
        "repository.")
    assert {p.name: p.stat().st_mtime_ns for p in stored.iterdir()} == before  # nothing uploaded
    fresh = subprocess.run([sys.executable, "-m", "aligngpt_hf.cli", "push", str(folder), "me/private-one",
                            "--private"], capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]  # a new repository is created private as asked


def test_adapter_and_stage1_folders_name_the_step_that_makes_a_model(folder, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"adapter holds a PEFT adapter \(adapter_config\.json\), not a full model; "
                                         r"merge it first"):
        load_for_publishing(adapter)
    stage1 = tmp_path / "stage1"
    shutil.copytree(folder, stage1)
    (stage1 / "model.safetensors").rename(stage1 / "stage1.safetensors")
    (stage1 / "aligngpt_stage.json").write_text(json.dumps({"stage": "pretrain", "weights": "stage1.safetensors"}))
    with pytest.raises(ValueError, match=r"stage1 is a stage-1 artefact \(projector and level table only, no language "
                                         r"model\); run stage 2"):
        load_for_publishing(stage1)


def _edit_weights(folder, tmp_path, name, edit):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / name
    shutil.copytree(folder, copy)
    state = load_file(copy / "model.safetensors")
    edit(state)
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


LEVELS = "model.alignment.level_embeddings"


@pytest.mark.parametrize("name, edit, message", [
    ("missing", lambda s: s.pop(LEVELS), rf"1 weight\(s\) missing \(would be random\): {LEVELS}\."),
    ("extra", lambda s: s.__setitem__("junk.weight", torch.zeros(2)), r"1 weight\(s\) not in the model \(would be "
                                                                       r"dropped\): junk\.weight\."),
    ("shape", lambda s: s.__setitem__(LEVELS, torch.zeros(3, 5)), rf"1 weight\(s\) of the wrong shape: {LEVELS} "
                                                                   r"\[3, 5\] vs \[8, \d+\]\."),
])
def test_weights_that_do_not_fill_the_model_are_refused(folder, tmp_path, capsys, name, edit, message):
    broken = _edit_weights(folder, tmp_path, name, edit)
    assert cli_main(["push", str(broken), "me/model", "--dry-run", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"aligngpt-hf push: error: {broken}: the weights do not match its config\.json: {message} "
                        r"Publish the folder the model was saved to whole .*", err), err
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused(folder, tmp_path):
    def poison(state):
        state[LEVELS] = state[LEVELS].clone()
        state[LEVELS][0, 0] = float("nan")

    broken = _edit_weights(folder, tmp_path, "nan", poison)
    with pytest.raises(ValueError, match=rf"nan: 1 weight\(s\) hold NaN or infinite values \({LEVELS}\); the run "
                                         r"diverged"):
        load_for_publishing(broken)


def test_damaged_tokenizer_file_is_named(folder, tmp_path):
    broken = tmp_path / "tok"
    shutil.copytree(folder, broken)
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tok: its processor cannot be loaded \(KeyError: 'added_tokens'\); re-save "
                                         r"it"):
        load_for_publishing(broken)

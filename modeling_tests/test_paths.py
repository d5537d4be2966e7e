"""`aligngpt_hf.paths`: atomic writes, leftovers of killed runs, writability, disk errors named, local vs Hub id."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import re
import stat
import types
from dataclasses import replace

import pytest

from aligngpt_hf.paths import atomic_path, atomic_write_text, check_local_or_hub, check_writable, saving_to


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_text("new, half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open(..., "w") makes it, not mkstemp's 0600


def test_atomic_folder_replaces_the_old_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    with atomic_path(tmp_path / "out", directory=True) as staging:
        (staging / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new.txt"]


@pytest.mark.parametrize("message, expected", [
    ("Error while serializing: I/O error: No space left on device (os error 28)", "No space left on device; free space"),
    ("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", "the write stopped short"),
])
def test_writers_own_disk_errors_are_named(tmp_path, message, expected):
    class WriterError(Exception):
        pass

    with pytest.raises(OSError, match=rf"^cannot save to {tmp_path}/model: {expected}"), saving_to(tmp_path / "model"):
        raise WriterError(message)
    with pytest.raises(OSError, match=rf"^cannot save to {tmp_path}: Read-only file system; make it writable"), \
            saving_to(tmp_path):
        raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(KeyError), saving_to(tmp_path):  # not a write failure: unchanged
        raise KeyError("x")


def test_check_writable_creates_nothing(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, local", [
    ("./runs/model", True), ("/abs/missing", True), ("~/missing", True), ("a/b/c", True), ("runs\\model", True),
    ("owner/name", False), ("gpt2", False),
])
def test_missing_local_folder_is_not_called_a_hub_id(name, local):
    if local:
        with pytest.raises(FileNotFoundError, match="^the model folder " + re.escape(name) + " does not exist"):
            check_local_or_hub(name)
    else:
        assert check_local_or_hub(name) == name


def test_missing_folder_under_an_existing_local_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="the model folder runs/stage2 does not exist"):
        check_local_or_hub("runs/stage2")


# ------------------------------------------------------------------------- the package's writers, disk full mid-write


class _DiskFullFile:
    """A file opened for writing whose first write stores half of its data, then fails as a full disk does."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


@pytest.fixture
def disk_fills_up(monkeypatch):
    """Call it to make every file opened for writing from then on (`open`, `Path.write_text`, `os.fdopen`, PIL's and
    transformers' savers) take half of its first write and fail: what a full disk or a killed run leaves behind."""
    real_open = io.open

    def torn_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _DiskFullFile(handle) if any(flag in mode for flag in "wax+") else handle

    def start():
        monkeypatch.setattr(io, "open", torn_open)
        monkeypatch.setattr(builtins, "open", torn_open)

    return start


def _snapshot(folder):
    """Every file and folder under `folder` (hidden temporary ones included) with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


def test_hub_configs_keep_the_old_files_when_a_rewrite_fails(tmp_path, disk_fills_up):
    from aligngpt_hf.hub.hub_configs import write_hub_configs

    first = write_hub_configs(tmp_path)[0]
    before = _snapshot(tmp_path)
    disk_fills_up()
    with pytest.raises(OSError, match=rf"^cannot write {re.escape(str(first))}: No space left on device; free space"):
        write_hub_configs(tmp_path)
    assert _snapshot(tmp_path) == before  # every config.json as it was, no temporary file left


def test_publish_configs_keep_the_old_files_when_a_rewrite_fails(tmp_path, disk_fills_up):
    from aligngpt_hf.hub.push import complete_auto_maps

    (tmp_path / "config.json").write_text('{"model_type": "aligngpt"}\n')
    (tmp_path / "tokenizer_config.json").write_text("{}\n")
    before = _snapshot(tmp_path)
    disk_fills_up()
    with pytest.raises(OSError, match=rf"^cannot write {re.escape(str(tmp_path / 'config.json'))}: No space left"):
        complete_auto_maps(tmp_path)
    assert _snapshot(tmp_path) == before


def test_merged_stage_two_folder_is_kept_whole_when_saving_fails(tmp_path, make_model, processor, disk_fills_up):
    from aligngpt_hf.training.stage_handoff import merge_lora

    out = tmp_path / "merged"
    merge_lora(types.SimpleNamespace(merge_and_unload=lambda: make_model(seed=0)), out, processor)
    before = _snapshot(tmp_path)
    newer = make_model(seed=1)
    disk_fills_up()
    with pytest.raises(OSError, match=rf"^cannot write {re.escape(str(out))}: No space left on device"):
        merge_lora(types.SimpleNamespace(merge_and_unload=lambda: newer), out, processor)
    assert _snapshot(tmp_path) == before  # the earlier merged model, config and processor; no staging folder


def test_dry_run_report_keeps_the_old_file_when_a_rewrite_fails(tmp_path, disk_fills_up):
    from aligngpt_hf.training.dry_run import write_json

    write_json(tmp_path / "dry_run.json", {"old": 1})
    disk_fills_up()
    with pytest.raises(OSError, match="No space left on device"):
        write_json(tmp_path / "dry_run.json", {"new": 2})
    assert _snapshot(tmp_path) == {"dry_run.json": b'{\n  "old": 1\n}\n'}


def test_demo_results_keep_the_old_files_when_a_rewrite_fails(tmp_path, disk_fills_up):
    from aligngpt_hf.demo.runs import write_results

    write_results(tmp_path, {"accuracy": {"colour": 1.0}}, "accuracy.md", "old table\n")
    disk_fills_up()
    with pytest.raises(OSError, match=rf"^cannot write {re.escape(str(tmp_path / 'results.json'))}: No space left"):
        write_results(tmp_path, {"accuracy": {"colour": 0.5}}, "accuracy.md", "new table\n")
    assert _snapshot(tmp_path) == {"accuracy.md": b"old table\n",
                                   "results.json": b'{\n  "accuracy": {\n    "colour": 1.0\n  }\n}'}


def test_demo_data_keeps_the_old_files_when_a_rewrite_fails(tmp_path, disk_fills_up):
    from aligngpt_hf.demo.runs import write_heldout
    from aligngpt_hf.demo.stages import QUICK, shuffled_levels

    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps([{"id": i, "similarity": i, "alignment_level": i} for i in range(6)]))
    shuffled_levels(levels, seed=0)
    write_heldout(tmp_path, replace(QUICK, heldout_per_kind=1), random.Random(0))
    before = _snapshot(tmp_path)
    assert "levels.shuffled.json" in before and "data/heldout/questions.json" in before
    disk_fills_up()
    with pytest.raises(OSError, match="No space left on device"):
        shuffled_levels(levels, seed=1)
    with pytest.raises(OSError, match="No space left on device"):
        write_heldout(tmp_path, replace(QUICK, heldout_per_kind=1), random.Random(1))
    assert _snapshot(tmp_path) == before  # the old shuffle and held-out folder, images included; nothing half-written


def test_demo_answers_written_without_the_package_keep_the_old_file(tmp_path, disk_fills_up):
    from aligngpt_hf.demo.evaluate import write_json

    write_json(str(tmp_path / "answers.json"), {"answers": ["old"]})
    disk_fills_up()
    with pytest.raises(OSError, match="No space left on device"):
        write_json(str(tmp_path / "answers.json"), {"answers": ["new"]})
    assert _snapshot(tmp_path) == {"answers.json": b'{\n "answers": [\n  "old"\n ]\n}'}


def test_sweep_false_leaves_other_leftovers_for_the_folders_own_cleanup(tmp_path):
    leftover = tmp_path / ".a.png.aligngpt-tmp-k1ll3d"
    leftover.write_bytes(b"half")
    with atomic_path(tmp_path / "a.png", sweep=False) as temp:
        temp.write_bytes(b"png")
    assert leftover.exists() and (tmp_path / "a.png").read_bytes() == b"png"
    with atomic_path(tmp_path / "a.png") as temp:
        temp.write_bytes(b"png2")
    assert sorted(os.listdir(tmp_path)) == ["a.png"]

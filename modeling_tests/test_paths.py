"""`aligngpt_hf.paths`: atomic writes, leftovers of killed runs, writability, disk errors named, local vs Hub id."""

from __future__ import annotations

import errno
import os
import re
import stat

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

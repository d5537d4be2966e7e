"""Paths the package reads and writes: atomic writes, writability checks, local folder versus Hub repo id, image
paths from data files (kept inside their image folder), and JSON data files read without silently dropped keys.

Why one place: every output (levels JSON and report, answer JSONL, converted and publish folders) must be either the
old file or the complete new one, never half of it, whatever kills the process; and a read-only or full disk must be
named with its path before work starts, not as a bare "File too large" after an hour. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

# Every temporary file or folder the package makes next to an output carries this marker, so a rerun can remove the
# leftovers of a killed run (and only those).
TEMP_MARKER = ".aligngpt-tmp-"
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# How writers that are not Python file objects report a failed write: safetensors ("... (os error 28)") and torch's
# zip writer ("unexpected pos ...", "PytorchStreamWriter failed writing file ...").
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_TORCH_WRITER_FAILURE = ("unexpected pos", "PytorchStreamWriter failed")


def temp_name(target: str | os.PathLike) -> str:
    """The prefix of the package's temporary files for `target`: hidden, in the same folder, marked."""
    return f".{Path(target).name}{TEMP_MARKER}"


def remove_leftovers(target: str | os.PathLike) -> list[Path]:
    """Delete temporary files/folders a killed earlier write of `target` left next to it; returns what went."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in target.parent.glob(temp_name(target) + "*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def disk_error(error: OSError, path: str | os.PathLike, action: str = "write") -> OSError:
    """`error` (disk full, read-only, no permission) as the same OSError type, naming `path` and the fix."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    fix = ("free space on that disk or write elsewhere" if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
           else "make it writable or choose another folder")
    return type(error)(f"cannot {action} {path}: {reason}; {fix}")


@contextlib.contextmanager
def saving_to(path: str | os.PathLike, action: str = "save to"):
    """Re-raise a failed write inside the block (disk full, file too large, read-only, also as safetensors' or torch's
    own error types) as an OSError naming `path`; other errors pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in _DISK_ERRNOS:
            raise
        raise disk_error(error, path, action) from None
    except Exception as error:  # noqa: BLE001 (safetensors' and torch's writers raise their own types)
        found = _OS_ERROR_CODE.search(str(error))
        if found:
            raise disk_error(OSError(int(found.group(1)), str(error)), path, action) from None
        if any(text in str(error) for text in _TORCH_WRITER_FAILURE):
            raise OSError(f"cannot {action} {path}: the write stopped short ({str(error).splitlines()[0][:80]}); "
                          "check the free space of that disk") from None
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False, *, sweep: bool = True):
    """Yield a temporary path next to `target`; on success it replaces `target` in one rename, on error it is removed.

    `directory=True` yields an empty folder (a whole output folder is built there, then renamed). Disk-full and
    permission errors are re-raised naming `target`. `sweep=False` skips removing a killed run's leftovers (a scan of
    the whole folder): for many small files in a folder that is itself rebuilt from scratch by every run.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_leftovers(target)
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=temp_name(target), dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=temp_name(target), dir=target.parent)
        os.close(handle)
        temp = Path(name)
    try:
        with saving_to(target, "write"):
            yield temp
            if directory and target.is_dir():  # move the old folder aside, put the new one in place, then drop it
                old = Path(tempfile.mkdtemp(prefix=temp_name(target), dir=target.parent))
                os.replace(target, old / target.name)
                os.replace(temp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(temp, target)
    except BaseException:
        _discard(temp)
        raise
    _keep_default_permissions(target, directory)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, drop: tuple[str, ...] = ()):
    """Yield an empty staging folder inside `folder`; on success every entry written there is renamed into `folder`
    (one rename each: a crash or a full disk while writing leaves the previous files whole), except the names in
    `drop`; the staging folder is removed in any case. For writers that fill a folder holding other outputs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder / "staged")
    staging = Path(tempfile.mkdtemp(prefix=temp_name(folder / "staged"), dir=folder))
    try:
        yield staging
        for entry in sorted(staging.iterdir()):
            destination = folder / entry.name
            if entry.name in drop:
                continue
            if entry.is_dir() and destination.is_dir():
                shutil.rmtree(destination)
            os.replace(entry, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _discard(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _keep_default_permissions(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp make private 0600/0700 entries; give `path` the mode a plain `open(..., "w")` or `mkdir`
    would (0666/0777 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `target` atomically (temp file in the same folder, flushed, then renamed over it)."""
    with atomic_path(target) as temp, open(temp, "w", encoding=encoding) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(target)


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse a folder the package could not write into, before any work: its nearest existing parent must accept a
    new file. The check writes and removes one marked temporary file."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise NotADirectoryError(f"the {what} {folder} is inside {existing}, which is a file; choose another folder")
    try:
        handle, name = tempfile.mkstemp(prefix=f".write-check{TEMP_MARKER}", dir=existing)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise disk_error(error, folder if folder == existing else existing, f"write the {what} into") from None
    return folder


def check_local_or_hub(name: str | os.PathLike, what: str = "model") -> str:
    """A local folder that exists, or something that can be a Hub repo id; a path that does not exist is named as a
    missing folder (transformers would call it an invalid repo id)."""
    text = str(name)
    if Path(text).expanduser().exists():
        return text
    owner = text.split("/")[0]
    looks_local = (text.startswith((".", "/", "~")) or text.count("/") > 1 or not _HUB_ID.match(text)
                   or ("/" in text and Path(owner).is_dir()))
    if looks_local:
        raise FileNotFoundError(f"the {what} folder {text} does not exist (and it is not a Hub repo id like "
                                "'owner/name'); check the path")
    return text


def resolve_image_path(value, image_folder=None, allow_outside: bool = False, where: str = "image") -> str:
    """`value` joined to `image_folder`; a path that resolves outside the folder is refused unless `allow_outside`.

    Why: LLaVA JSON files come from strangers; `../../etc/x`, `/home/me/private.png` or a symlink inside the folder
    that points out of it must not be read silently. The check is on the real path (symlinks resolved, in the folder
    as well), so link a data folder in from elsewhere with `allow_outside_image_folder=True`.
    """
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise TypeError(f"{where}: expected an image path (string), got {type(value).__name__} {value!r}.")
    if image_folder is None:
        return str(value)
    folder = Path(os.path.abspath(image_folder))
    path = Path(os.path.normpath(folder / value))
    real, real_folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if not allow_outside and real != real_folder and real_folder not in real.parents:
        via = "" if real == path else f" (through a symlink, to {real})"
        raise ValueError(
            f"{where}: image path {str(value)!r} resolves to {path}{via}, outside the image folder {folder}. Move the "
            "file into the folder, or allow paths outside it explicitly with `allow_outside_image_folder=True` "
            "(CLI: --allow-outside-image-folder)."
        )
    return str(path)


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`json.loads` hook: an object that names a key twice is refused (plain JSON keeps the last value and drops the
    other silently: two `image` paths, two `value`s of a turn)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        keys = [key for key, _ in pairs]
        repeated = next(key for index, key in enumerate(keys) if key in keys[:index])
        owner = f" (the record with `id` {record['id']!r})" if isinstance(record.get("id"), (str, int)) else (
            f" ({json.dumps(record, ensure_ascii=False)[:80]})")
        raise DuplicateKeyError(f"a JSON object gives the key `{repeated}` twice{owner}; JSON would keep only the "
                                "last value and drop the other silently. Keep one.")
    return record


def check_apart(output: str | os.PathLike, source: str | os.PathLike, what: str = "OUTPUT",
                source_what: str = "SOURCE") -> None:
    """Refuse an output that is the source, lies inside it, or holds it: replacing the output whole (`--overwrite`)
    would delete the source, and one written inside it would be read back as part of the source next time."""
    out, src = Path(os.path.realpath(output)), Path(os.path.realpath(source))
    if out == src:
        raise ValueError(f"{what} {output} is {source_what} itself; write to another folder.")
    if src in out.parents:
        raise ValueError(f"{what} {output} is inside {source_what} {source}; write outside it.")
    if out in src.parents:
        raise ValueError(f"{what} {output} holds {source_what} {source}: replacing it would delete {source_what}; "
                         "write to another folder.")


__all__ = ["TEMP_MARKER", "DuplicateKeyError", "atomic_path", "atomic_write_text", "check_apart", "check_local_or_hub", "check_writable",
           "disk_error", "remove_leftovers", "resolve_image_path", "saving_to", "unique_keys"]

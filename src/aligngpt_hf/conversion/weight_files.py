# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""A checkpoint's weight files, read without running pickled code: the shards of an index or one known file, each
opened one at a time (pickles through `torch.load(weights_only=True, mmap=True)`, safetensors through `safe_open`).

An index that disagrees with its shards, a key held by two files, a file that is neither a zip archive nor a pickle
are `ConversionError`s naming the file.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from aligngpt_hf.conversion.mapping import ConversionError, key_list

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "mm_projector_align.bin")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# safetensors' dtype names -> torch's (those this torch build lacks are left out and named as unreadable).
SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"), ("I64", "int64"), ("I32", "int32"), ("I16", "int16"),
    ("I8", "int8"), ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
) if hasattr(torch, attr)}


def weight_files_in(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards of an index, or one known single file."""
    return open_weight_files(folder).files


def open_weight_files(folder: Path) -> WeightFiles:
    """The checkpoint's weight files (see `weight_files_in`), with its index's `weight_map` when it has one, which
    must then list exactly the keys the shards hold (checked when they are read)."""
    for index_name in INDEX_NAMES:
        index = folder / index_name
        if index.is_file():
            shards, weight_map = _index_shards(index)
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shard(s) that are not in {folder}: {', '.join(missing)}.")
            return WeightFiles([folder / name for name in shards], (index, weight_map))
    for name in WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return WeightFiles([folder / name])
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise ConversionError(
        f"No weights found in {folder}: expected one of {', '.join(INDEX_NAMES + WEIGHT_FILE_NAMES)}; it holds {present}."
    )


def _index_shards(index: Path) -> tuple[list[str], dict]:
    """The shard names of an index file (plain file names in the checkpoint's own folder, each listed once) and its
    `weight_map`."""
    try:
        data = json.loads(index.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f":{error.lineno}:{error.colno}" if isinstance(error, json.JSONDecodeError) else ""
        raise ConversionError(f"{index}{where}: not valid JSON ({getattr(error, 'msg', error)}); restore the index "
                              "file of the checkpoint.") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no `weight_map` object ({{tensor name: shard file}}); restore the index "
                              "file of the checkpoint.")
    shards = list(dict.fromkeys(weight_map.values()))
    bad = [repr(name) for name in shards if not isinstance(name, str) or not name or Path(name).name != name
           or name in (".", "..")]
    if bad:
        raise ConversionError(f"{index}: `weight_map` names shard(s) {', '.join(bad[:5])} that are not plain file "
                              "names in the checkpoint folder (a path, or outside the folder); shards are read only "
                              "from the folder itself. Put the shards next to the index and list their names.")
    return shards, weight_map


class KeyIndex(dict):
    """source key -> shape, plus each key's dtype and file."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, torch.dtype] = {}
        self.files: dict[str, Path] = {}

    def dtype_of(self, key: str) -> torch.dtype:
        return self.dtypes[key]


class WeightFiles:
    """Original weight files opened one at a time: pickles through `torch.load(weights_only=True, mmap=True)`
    (zip format; legacy pickles are read whole), safetensors through `safe_open`. Never unpickles arbitrary objects."""

    def __init__(self, files: list[Path], index: tuple[Path, dict] | None = None):
        self.files = list(files)
        self.index = index  # (index file, its weight_map) of a sharded checkpoint
        self._index: KeyIndex | None = None
        self._open_path: Path | None = None
        self._open = None

    def shapes(self) -> KeyIndex:
        if self._index is None:
            index = KeyIndex()
            for path in self.files:
                opened = self._load(path)
                for key in opened.keys():
                    if key in index:
                        raise ConversionError(f"Key {key} appears in both {index.files[key].name} and {path.name}.")
                    index[key], index.dtypes[key], index.files[key] = opened.shape(key), opened.dtype(key), path
            self._check_index(index)
            self._index = index
        return self._index

    def _check_index(self, found: KeyIndex) -> None:
        """The index must describe the shards: a key it omits, lists twice over, or places in another shard means
        the index and the shards come from different saves (a shard replaced, a download mixed)."""
        if self.index is None:
            return
        path, weight_map = self.index
        problems = [f"{key}: in {found.files[key].name}, not listed" for key in found if key not in weight_map]
        problems += [f"{key}: listed in {weight_map[key]}, found in {found.files[key].name}" for key in found
                     if key in weight_map and weight_map[key] != found.files[key].name]
        problems += [f"{key}: listed in {shard}, in no shard" for key, shard in weight_map.items() if key not in found]
        if problems:
            raise ConversionError(f"{path} does not match its shards ({len(problems)} key(s)):{key_list(problems)}\n"
                                  "The index and the shards come from different saves; re-download or re-copy the "
                                  "checkpoint whole.")

    def get(self, key: str) -> torch.Tensor:
        path = self.shapes().files[key]
        if path != self._open_path:
            self._open, self._open_path = self._load(path), path
        return self._open.tensor(key)

    def close(self) -> None:
        self._open = self._open_path = None

    @staticmethod
    def _load(path: Path):
        if path.suffix == ".safetensors":
            return _SafetensorsFile(path)
        return _PickleFile(path)


class _PickleFile:
    def __init__(self, path: Path):
        is_zip = zipfile.is_zipfile(path)
        if not is_zip:
            _check_pickle_header(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as error:
            raise ConversionError(refused_pickle_message(path, error)) from None
        except (IndexError, KeyError, ValueError, TypeError) as error:  # the unpickler's own parse failures
            raise ConversionError(f"{path} is not a torch checkpoint (it cannot be parsed: {type(error).__name__}: "
                                  f"{error}); re-download or re-copy it.") from None
        except (RuntimeError, EOFError, OSError) as error:
            raise ConversionError(
                f"{path} is truncated or corrupt ({str(error).splitlines()[0][:120]}); re-download or re-copy it."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{path} does not hold a flat {{name: tensor}} state dict.")
        self.state = state

    def keys(self):
        return self.state.keys()

    def shape(self, key):
        return tuple(self.state[key].shape)

    def dtype(self, key):
        return self.state[key].dtype

    def tensor(self, key):
        return self.state[key]


def _check_pickle_header(path: Path) -> None:
    """A `.bin` that is neither a zip archive (torch >= 1.6) nor a pickle (legacy torch: protocol 2+, first byte
    0x80) is not a torch checkpoint at all: say so, instead of blaming a pickle payload."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return  # a zip cut short, or a pickle: torch.load names what is wrong with it
    raise ConversionError(
        f"{path} is not a torch checkpoint: it is neither a zip archive nor a pickle (it starts with bytes "
        f"{head.hex() or 'nothing: the file is empty'}). Re-download or re-copy it, or remove it from the folder."
    )


def refused_pickle_message(path: Path, error: Exception) -> str:
    """Why a pickle was refused, without torch's advice to load it with `weights_only=False` (that runs its code)."""
    if "truncated" in str(error) or "EOF" in str(error):
        return f"{path} is truncated or corrupt (the pickle ends early); re-download or re-copy it."
    return (
        f"{path} was refused: it is a pickle holding more than tensors, and unpickling it could run arbitrary code. "
        "AlignGPT only reads plain tensor state dicts (weights_only). Get the checkpoint from a source you trust in "
        "safetensors format, or convert it there."
    )


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{path} is truncated or corrupt ({error}); re-download or re-copy it.") from None

    def keys(self):
        return self.handle.keys()

    def shape(self, key):
        return tuple(self.handle.get_slice(key).get_shape())

    def dtype(self, key):
        name = self.handle.get_slice(key).get_dtype()
        if name not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{self.path}: tensor {key} has the dtype {name}, which this torch cannot read and no "
                                  "released AlignGPT weight has (they are F32/F16/BF16); re-export the checkpoint "
                                  "unquantized.")
        return SAFETENSORS_DTYPES[name]

    def tensor(self, key):
        return self.handle.get_tensor(key)


__all__ = ["INDEX_NAMES", "WEIGHT_FILE_NAMES", "KeyIndex", "WeightFiles", "open_weight_files", "refused_pickle_message",
           "weight_files_in"]

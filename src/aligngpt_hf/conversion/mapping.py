# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""Strict key mapping from the original AlignGPT state-dict layout to this package's layout.

Every source key must match exactly one anchored rule, which either renames it or drops it with a stated reason;
every key the target model expects must be filled, and every shape must agree. Anything else is a fatal
`ConversionError` that lists the offending keys, so a checkpoint with an unexpected layout never converts silently.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from aligngpt_hf.paths import atomic_write_text

# Rows of the LLM vocabulary tables may grow (new `<image>`/`<align>` rows, padding); the original rows are kept.
VOCAB_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as given; the message names the keys or files and the fix."""


@dataclass(frozen=True)
class Rule:
    """`pattern` is anchored with fullmatch; `target` is a `re` template, or None to drop the key for `reason`."""

    pattern: str
    target: str | None
    reason: str = ""

    def apply(self, key: str) -> tuple[bool, str | None]:
        match = re.fullmatch(self.pattern, key)
        if match is None:
            return False, None
        return True, (None if self.target is None else match.expand(self.target))


LLM_RULES = (
    Rule(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", None, "rotary buffer, recomputed from the config"),
    Rule(r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\.[\w.]+)", r"model.language_model.\1"),
    Rule(r"lm_head\.weight", "lm_head.weight"),
)

ALIGN_RULES = (
    Rule(r"align_indicators\.indicator_embs", "model.alignment.level_embeddings"),
    Rule(r"gated_weight_layer\.mlp\.0\.(weight|bias)", r"model.alignment.fc1.\1"),
    Rule(r"gated_weight_layer\.mlp\.2\.(weight|bias)", r"model.alignment.fc2.\1"),
)

PROJECTOR_RULES = {
    "mlp2x_gelu": (
        Rule(r"mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
        Rule(r"mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    ),
    "linear": (Rule(r"mm_projector\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),),
}

POSITION_IDS = "vision position_ids buffer, recomputed"
EMBEDDED_VISION_RULES = (
    Rule(r"vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids", None, POSITION_IDS),
    Rule(r"vision_tower\.vision_tower\.vision_model\.([\w.]+)", r"model.vision_tower.\1"),
)
EMBEDDED_VISION_DROPPED = (
    Rule(r"vision_tower\.vision_tower\.vision_model\.[\w.]+", None, "vision tower taken from --vision-tower"),
)

# A CLIPVisionModel folder (`vision_model.*`; flat keys when saved by transformers 5) or a full CLIPModel such as
# openai/clip-vit-large-patch14-336 (its text side is dropped).
VISION_FOLDER_RULES = (
    Rule(r"(?:vision_model\.)?embeddings\.position_ids", None, POSITION_IDS),
    Rule(r"vision_model\.([\w.]+)", r"model.vision_tower.\1"),
    Rule(r"((?:embeddings|pre_layrnorm|encoder|post_layernorm)\.[\w.]+)", r"model.vision_tower.\1"),
    Rule(r"(text_model\.[\w.]+|text_projection\.weight|visual_projection\.weight|logit_scale)", None, "CLIP text side"),
)


def full_rules(projector_type: str, vision_in_source: bool) -> tuple[Rule, ...]:
    """Rules for a stage-2 checkpoint (`pytorch_model*.bin`); the embedded vision copy is mapped or dropped."""
    vision = EMBEDDED_VISION_RULES if vision_in_source else EMBEDDED_VISION_DROPPED
    return LLM_RULES + projector_rules(projector_type) + ALIGN_RULES + vision


def pretrain_rules(projector_type: str) -> tuple[Rule, ...]:
    """Rules for a stage-1 `mm_projector_align.bin`: projector + level table, nothing else."""
    return projector_rules(projector_type) + ALIGN_RULES[:1]


def projector_rules(projector_type: str) -> tuple[Rule, ...]:
    if projector_type not in PROJECTOR_RULES:
        raise ConversionError(
            f"Unsupported `mm_projector_type` {projector_type!r}; the converter knows {sorted(PROJECTOR_RULES)}."
        )
    return PROJECTOR_RULES[projector_type]


def _listing(keys, limit: int = 25) -> str:
    keys = sorted(keys)
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {shown}{more}"


def map_keys(
    source_shapes: dict[str, tuple[int, ...]],
    rules: tuple[Rule, ...],
    expected_shapes: dict[str, tuple[int, ...]],
    origin: str = "checkpoint",
) -> tuple[dict[str, str], dict[str, str]]:
    """Return ({target: source}, {dropped source: reason}); raise on unknown, duplicate, missing or misshaped keys.

    `expected_shapes` may be a subset of the model's keys (the part this source must fill); a source key whose
    target lies outside it is unknown. Vocabulary tables may have fewer rows in the source than in the target.
    """
    mapping, dropped, unknown, duplicates = {}, {}, [], []
    for key in source_shapes:
        for rule in rules:
            matched, target = rule.apply(key)
            if matched:
                break
        if not matched:
            unknown.append(key)
        elif target is None:
            dropped[key] = rule.reason
        elif target not in expected_shapes:
            unknown.append(f"{key} (-> {target}, which the converted model does not have)")
        elif target in mapping:
            duplicates.append(f"{key} and {mapping[target]} -> {target}")
        else:
            mapping[target] = key
    if unknown:
        raise ConversionError(
            f"Unknown key(s) in the {origin}, not mapped by any conversion rule:{_listing(unknown)}\nThis is not the "
            "layout of a released AlignGPT checkpoint (spec §6); refusing to guess."
        )
    if duplicates:
        raise ConversionError(f"Several {origin} keys map to the same target:{_listing(duplicates)}")
    _check_shapes(source_shapes, mapping, expected_shapes, origin)
    _check_dtypes(source_shapes, mapping, origin)
    return mapping, dropped


def _check_dtypes(source_shapes, mapping, origin) -> None:
    """Every converted weight is a plain float: an integer or boolean tensor would be written as is and break the
    model, and a float8 one is a quantized weight whose scales live elsewhere (cast up, its values mean nothing)."""
    dtypes = getattr(source_shapes, "dtypes", {})
    bad = [f"{source} ({str(dtypes[source]).replace('torch.', '')})" for source in mapping.values()
           if source in dtypes and dtypes[source] not in WEIGHT_DTYPES]
    if bad:
        raise ConversionError(
            f"Non-floating or quantized tensor(s) in the {origin} where weights are expected:{_listing(bad)}\nThe "
            "file is not an AlignGPT checkpoint as released (weights are float32/float16/bfloat16); re-download or "
            "re-export it unquantized."
        )


def check_filled(filled: set[str], expected_shapes: dict[str, tuple[int, ...]], hint: str) -> None:
    """Every target key must have a source; `hint` says where the missing ones should have come from."""
    missing = sorted(set(expected_shapes) - filled)
    if missing:
        raise ConversionError(f"Missing key(s): the converted model needs{_listing(missing)}\n{hint}")


def _check_shapes(source_shapes, mapping, expected_shapes, origin) -> None:
    bad = []
    for target, source in mapping.items():
        have, want = tuple(source_shapes[source]), tuple(expected_shapes[target])
        if target in VOCAB_KEYS and len(have) == 2 and have[1:] == want[1:] and have[0] <= want[0]:
            continue
        if have != want:
            bad.append(f"{source} {list(have)} -> {target} expects {list(want)}")
    if bad:
        raise ConversionError(
            f"Shape mismatch between the {origin} and the config built from it:{_listing(bad)}\nCheck that "
            "config.json belongs to these weights (and --vision-tower to this checkpoint's tower)."
        )


def detect_kind(keys) -> str:
    """'full' (stage-2 model) or 'pretrain' (stage-1 projector + level table), from the key names alone."""
    keys = list(keys)
    has = {
        "llm": any(k.startswith(("model.layers.", "model.embed_tokens.")) or k == "lm_head.weight" for k in keys),
        "projector": any(k.startswith("mm_projector.") for k in keys),
        "levels": "align_indicators.indicator_embs" in keys,
        "hf": any(k.startswith(("model.language_model.", "model.multi_modal_projector.", "language_model.")) for k in keys),
    }
    if has["hf"]:
        return _wrong_kind("already in the Hugging Face layout; load it with `from_pretrained` instead", keys)
    if has["llm"] and has["projector"] and has["levels"]:
        return "full"
    if has["projector"] and has["levels"] and not has["llm"]:
        return "pretrain"
    if has["llm"] and not has["projector"]:
        return _wrong_kind("a plain language model (no `mm_projector.*`, no `align_indicators.*`)", keys)
    if has["projector"] and not has["levels"]:
        return _wrong_kind("a LLaVA-style projector without the AlignGPT level table `align_indicators.*`", keys)
    return _wrong_kind("not an AlignGPT checkpoint", keys)


def _wrong_kind(what: str, keys) -> str:
    raise ConversionError(
        f"Wrong kind of checkpoint: this is {what}. `aligngpt-hf convert` takes a released AlignGPT checkpoint: a "
        "stage-2 model (`pytorch_model*.bin` with `model.*`, `lm_head.weight`, `mm_projector.*`, "
        "`align_indicators.indicator_embs`, `gated_weight_layer.*`) or a stage-1 `mm_projector_align.bin` "
        f"(`mm_projector.*` + `align_indicators.indicator_embs`). Keys found:{_listing(keys, 12)}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Reading original weight files and writing safetensors shards, one source file's pages at a time.

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "mm_projector_align.bin")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# safetensors' dtype names -> torch's (those this torch build lacks are left out and named as unreadable).
SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"), ("I64", "int64"), ("I32", "int32"), ("I16", "int16"),
    ("I8", "int8"), ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
) if hasattr(torch, attr)}
# The dtypes a released weight may have; anything else (integers, booleans, float8) is refused by name.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
            raise ConversionError(f"{path} does not match its shards ({len(problems)} key(s)):{_listing(problems)}\n"
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


def parse_size(size: int | str | None) -> int | None:
    """'5GB' / '500MB' / '2GiB' / bytes -> bytes; None = one file."""
    if size is None:
        return size
    if isinstance(size, int):
        if size < 1:
            raise ConversionError(f"The shard size {size!r} is not positive; write it like 5GB or 500MB.")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if match is None:
        raise ConversionError(f"Cannot read the shard size {size!r}; write it like 5GB or 500MB.")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3}[unit[0]]
    parsed = int(float(match.group(1)) * base**power)
    if parsed < 1:
        raise ConversionError(f"The shard size {size!r} is not positive; write it like 5GB or 500MB.")
    return parsed


def plan_and_write(sources, expected, config, output: Path, max_shard_size, progress: bool, file_name=None):
    """Write every target tensor (originals bit-identical; vocabulary tables padded) as safetensors shards.

    `sources` is a list of (WeightFiles, {target: source key}). Tensors are taken in file order, so each source file
    is opened once per output shard; a shard holds at most `max_shard_size` bytes, about the most this keeps in
    memory (source pickles are memory-mapped and unmapped again after each shard).
    """
    from tqdm.auto import tqdm

    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype))
    items = []
    for files, mapping in sources:
        order = {key: i for i, key in enumerate(files.shapes())}
        items += [(target, files, mapping[target]) for target in sorted(mapping, key=lambda t: order[mapping[t]])]
    limit = parse_size(max_shard_size)
    shards, current, used = [], [], 0
    for item in items:
        size = math.prod(expected[item[0]]) * dtype.itemsize
        if current and limit is not None and used + size > limit:
            shards.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    shards.append(current)
    names = [file_name or "model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=len(items), desc="Converting tensors", unit="tensor", disable=not progress)
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {target: _converted(files.get(key), expected[target], dtype) for target, files, key in shard}
        _check_finite(tensors, {target: key for target, _, key in shard})
        save_file(tensors, str(output / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
        for files, _ in sources:  # unmap the source pages this shard touched, so RSS stays near one shard
            files.close()
        bar.update(len(shard))
    bar.close()
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(output / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    return names


def _check_finite(tensors: dict[str, torch.Tensor], sources: dict[str, str]) -> None:
    """NaN or infinite weights (a diverged run, a damaged file, an overflowing --dtype cast) are refused by name: the
    converted model would answer garbage, and `aligngpt-hf push` would refuse it only later."""
    bad = [f"{sources[name]} -> {name}" for name, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ConversionError(f"NaN or infinite values in {len(bad)} converted weight(s):{_listing(bad)}\nThe "
                              "checkpoint is damaged or diverged (or --dtype float16 overflowed it: keep --dtype auto "
                              "or use bfloat16); convert an earlier or re-downloaded checkpoint.")


def _converted(tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Cast floats to the model dtype; grow vocabulary tables with the mean row (original rows untouched)."""
    if tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if tuple(tensor.shape) != tuple(shape):
        grown = torch.empty(shape, dtype=tensor.dtype)
        grown[: tensor.shape[0]] = tensor
        grown[tensor.shape[0]:] = tensor.mean(0, dtype=torch.float32).to(tensor.dtype)
        return grown
    return tensor.contiguous()

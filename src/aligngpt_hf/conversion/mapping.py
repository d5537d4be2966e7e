# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""Strict key mapping from the original AlignGPT state-dict layout to this package's layout.

Every source key must match exactly one anchored rule, which either renames it or drops it with a stated reason;
every key the target model expects must be filled, and every shape must agree. Anything else is a fatal
`ConversionError` that lists the offending keys, so a checkpoint with an unexpected layout never converts silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from aligngpt_hf.paths import atomic_write_text

# Rows of the LLM vocabulary tables may grow (new `<image>`/`<align>` rows, padding); the original rows are kept.
VOCAB_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
# The dtypes a released weight may have; anything else (integers, booleans, float8) is refused by name.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def key_list(keys, limit: int = 25) -> str:
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
            f"Unknown key(s) in the {origin}, not mapped by any conversion rule:{key_list(unknown)}\nThis is not the "
            "layout of a released AlignGPT checkpoint (spec §6); refusing to guess."
        )
    if duplicates:
        raise ConversionError(f"Several {origin} keys map to the same target:{key_list(duplicates)}")
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
            f"Non-floating or quantized tensor(s) in the {origin} where weights are expected:{key_list(bad)}\nThe "
            "file is not an AlignGPT checkpoint as released (weights are float32/float16/bfloat16); re-download or "
            "re-export it unquantized."
        )


def check_filled(filled: set[str], expected_shapes: dict[str, tuple[int, ...]], hint: str) -> None:
    """Every target key must have a source; `hint` says where the missing ones should have come from."""
    missing = sorted(set(expected_shapes) - filled)
    if missing:
        raise ConversionError(f"Missing key(s): the converted model needs{key_list(missing)}\n{hint}")


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
            f"Shape mismatch between the {origin} and the config built from it:{key_list(bad)}\nCheck that "
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
        f"(`mm_projector.*` + `align_indicators.indicator_embs`). Keys found:{key_list(keys, 12)}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Writing safetensors shards, one source file's pages at a time (reading them: `weight_files.py`).

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
        raise ConversionError(f"NaN or infinite values in {len(bad)} converted weight(s):{key_list(bad)}\nThe "
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

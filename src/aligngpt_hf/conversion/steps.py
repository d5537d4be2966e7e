# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""The conversion steps both checkpoint layouts share: finding the folders, reading the weights, the vision tower, the
stage-1 artefact, and the side files of OUTPUT (config, remote code, generation config, processor).

Why a module of its own: `convert` (the original layout, and the dispatch by config.json) and `family` (the follow-up
code base's layout) both run these steps, so each imports them from here and neither imports the other's pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, CLIPVisionConfig, GenerationConfig, LlavaImageProcessorPil

from aligngpt_hf.conversion.mapping import (
    VISION_FOLDER_RULES,
    ConversionError,
    check_filled,
    detect_kind,
    map_keys,
    plan_and_write,
    pretrain_rules,
)
from aligngpt_hf.conversion.weight_files import open_weight_files, weight_files_in
from aligngpt_hf.hub.checks import config_values_checked
from aligngpt_hf.models.configuration_aligngpt import PROCESSOR_AUTO_MAP, REMOTE_AUTO_MAP, AlignGPTConfig
from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_CHAT_TEMPLATE, AlignGPTProcessor
from aligngpt_hf.paths import atomic_write_text, check_local_or_hub

STAGE_FILE = "aligngpt_stage.json"
STAGE1_WEIGHTS = "stage1.safetensors"
REMOTE_ENTRY_FILES = ("configuration_aligngpt.py", "modeling_aligngpt.py", "processing_aligngpt.py")
VOCAB_MULTIPLE = 64
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Towers the released checkpoints name in `mm_vision_tower`, so a stale path or no network still converts.
KNOWN_VISION_TOWERS = {
    "clip-vit-large-patch14-336": {"image_size": 336},
    "clip-vit-large-patch14": {"image_size": 224},
}
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VISION_TOWER_TYPES = ("clip", "siglip", "siglip2")  # dual encoders whose vision half is the tower
VISION_PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]


@dataclass
class ConversionResult:
    """What `convert_checkpoint` wrote: the kind, the files, the dropped source keys, and notes for the user."""

    output: Path
    kind: str
    files: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    has_processor: bool = False
    notes: list[str] = field(default_factory=list)


def resolve_folder(name: str | Path, allow_patterns: list[str], what: str) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (only the needed files) to the HF cache."""
    if not str(name).strip():  # Path("") is the working directory
        raise ConversionError(f"The {what} is an empty string; give a folder or a Hub repo id.")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"The {what} must be a folder or a Hub repo id, got the file {path}.")
    check_local_or_hub(name, what)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)):
        raise ConversionError(f"The {what} {name!r} is neither an existing folder nor a Hub repo id (owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=allow_patterns))
    except OSError as error:  # offline and not cached, no such repo, gated, no network (the Hub's errors are OSErrors)
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConversionError(f"Cannot get the {what} {name!r} from the Hub ({reason}). Pass a local folder instead, "
                              "or rerun online (or with the repo in the Hugging Face cache).") from None


def config_fields_checked(path: Path):
    """`config_values_checked` raising a ConversionError: a config.json value the model cannot be built from."""
    return config_values_checked(path, ConversionError)


def read_json_object(path: Path, what: str = "file") -> dict:
    """A JSON file that must hold one object; a broken or wrongly shaped file is named with its line and column."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is not UTF-8 text; restore the {what} file of the checkpoint.") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}); restore the "
                              f"{what} file of the checkpoint.") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not the {what} object it should be; "
                              f"restore the {what} file of the checkpoint.")
    return data


def read_weights(source_dir: Path, source, kind: str | None, vision_tower):
    """(weight files, their shapes, detected kind, whether the tower's weights must be found): the kind is read off
    the keys and must match `kind` when one is asked for; a full checkpoint without an embedded tower (or with
    `--vision-tower` given) takes the tower's weights from elsewhere."""
    files = open_weight_files(source_dir)
    shapes = files.shapes()
    detected = detect_kind(shapes)
    if kind not in (None, "auto", detected):
        raise ConversionError(f"Expected a {kind!r} checkpoint, but {source} holds a {detected!r} one (from its keys).")
    embedded_vision = any(k.startswith("vision_tower.vision_tower.vision_model.") for k in shapes)
    return files, shapes, detected, detected == "full" and (vision_tower is not None or not embedded_vision)


def unread_weights_note(folder: Path) -> str | None:
    """A note naming the weight-like files of `folder` the conversion does not read (the other format next to the one
    read, a shard the index does not list, trainer state), so nothing is left out unsaid; None when there are none."""
    read = sorted(path.name for path in weight_files_in(folder))
    unread = sorted(path.name for path in folder.iterdir() if path.is_file() and path.name not in read
                    and path.suffix in (".bin", ".safetensors", ".pt", ".pth", ".ckpt"))
    return f"Not read from SOURCE: {', '.join(unread)} (the weights came from {', '.join(read)})." if unread else None


def check_vocab_rows(shapes, orig: dict, path: Path) -> None:
    """The word tables must have exactly `vocab_size` rows: with fewer, the missing original tokens would get the mean
    row and `<image>` an id inside the trained vocabulary; with more, the config belongs to another model."""
    vocab = int(orig["vocab_size"])
    wrong = [f"{key} has {shapes[key][0]} rows" for key in ("model.embed_tokens.weight", "lm_head.weight")
             if key in shapes and shapes[key][0] != vocab]
    if wrong:
        raise ConversionError(f"{path}: `vocab_size` is {vocab}, but {' and '.join(wrong)}; the config and the weights "
                              "come from different models. Restore the checkpoint's own config.json.")


def resolve_vision(orig: dict, source_dir: Path, override, need_weights: bool):
    """(vision config, folder to take the tower weights from or None, image processor settings)."""
    if override is not None:
        folder = resolve_folder(override, VISION_PATTERNS, "vision tower")
        return _vision_config_from(folder), (folder if need_weights else None), _processor_settings(folder)
    name = str(orig.get("mm_vision_tower") or "")
    if escapes(name, source_dir):
        raise ConversionError(
            f"config.json names `mm_vision_tower` = {name!r}, a relative path that leads out of {source_dir}; only "
            "folders inside SOURCE are read. Pass the tower with `--vision-tower` (its folder or Hub id, e.g. "
            "openai/clip-vit-large-patch14-336).")
    local = [p for p in tower_candidates(name, source_dir) if p.is_dir()]
    if local:
        folder = local[0]
        return _vision_config_from(folder), (folder if need_weights else None), _processor_settings(folder)
    known = KNOWN_VISION_TOWERS.get(Path(name).name)
    if known is not None and not need_weights:
        config = CLIPVisionConfig(**CLIP_L14, **known)
        return config, None, _processor_settings(None, config.image_size)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).is_absolute():
        folder = resolve_folder(name, VISION_PATTERNS, "vision tower")
        return _vision_config_from(folder), (folder if need_weights else None), _processor_settings(folder)
    raise ConversionError(
        f"Missing vision tower: config.json names `mm_vision_tower` = {name!r}, which is neither a folder inside "
        f"{source_dir} nor an absolute path to a folder on this machine"
        + (" and the checkpoint has no embedded tower weights" if need_weights else "")
        + ". Pass `--vision-tower openai/clip-vit-large-patch14-336` (or the tower's local folder)."
    )


def tower_candidates(name: str, source_dir: Path) -> list[Path]:
    """Where `mm_vision_tower` may point: inside SOURCE, or an absolute path (the training machine's, when it exists
    here). Never relative to the working directory, which would read whatever folder happens to share the name."""
    if not name or escapes(name, source_dir):
        return []
    path = Path(name).expanduser()
    return [path] if path.is_absolute() else [source_dir / name]


def escapes(name: str, source_dir: Path) -> bool:
    """A relative `mm_vision_tower` whose `..` parts lead out of SOURCE (it is neither inside SOURCE nor a Hub id)."""
    path = Path(name).expanduser()
    if not name or path.is_absolute():
        return False
    inside = os.path.normpath(os.path.join(os.path.abspath(source_dir), name))
    return os.path.commonpath([inside, os.path.abspath(source_dir)]) != os.path.abspath(source_dir)


def _vision_config_from(folder: Path):
    """The vision config of a CLIP/SigLIP folder (a full dual encoder or its vision half); any other model is named."""
    if not (folder / "config.json").is_file():
        raise ConversionError(f"The vision tower folder {folder} has no config.json; pass a CLIP or SigLIP model "
                              "folder (e.g. a download of openai/clip-vit-large-patch14-336).")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as error:  # an unknown model_type, a broken or foreign config.json
        reason = " ".join(str(error).split())[:200]
        raise ConversionError(f"The vision tower folder {folder} has no readable CLIP or SigLIP config ({reason}); "
                              "pass the tower's own folder (e.g. openai/clip-vit-large-patch14-336).") from None
    model_type = str(getattr(config, "model_type", ""))
    if not (model_type in VISION_TOWER_TYPES or model_type.endswith("_vision_model")):
        raise ConversionError(f"The vision tower folder {folder} holds a {model_type!r} model, not a CLIP or SigLIP "
                              "vision tower; pass the tower's own folder (e.g. openai/clip-vit-large-patch14-336).")
    return getattr(config, "vision_config", None) or config


def _processor_settings(folder: Path | None, image_size: int = 336) -> dict:
    """CLIP preprocessing from the tower's preprocessor_config.json, else CLIP-336 defaults."""
    settings = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
                "resample": 3, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
    path = folder / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        found = read_json_object(path, "vision tower's preprocessor config")
        settings.update({k: found[k] for k in settings if k in found})
        try:  # what the converted processor will do to every image, tried once on a tiny one
            LlavaImageProcessorPil(**settings)(Image.new("RGB", (4, 4)))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            reason = " ".join(str(error).split())[:200]
            raise ConversionError(f"{path}: its settings ({', '.join(f'{k}={found[k]!r}' for k in settings if k in found)}"
                                  f") cannot preprocess an image ({type(error).__name__}: {reason}); restore the "
                                  "tower's own preprocessor_config.json.") from None
    return settings


def expected_shapes(config: AlignGPTConfig) -> dict[str, tuple[int, ...]]:
    """Every key (and shape) of the target model, built on the meta device: no memory, any size."""
    with torch.device("meta"):
        model = AlignGPTForConditionalGeneration(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def vision_folder_source(vision_dir: Path, expected: dict) -> tuple[tuple, dict[str, str]]:
    """The tower's weights from their own folder: ((files, {target: source key}), dropped keys named by folder)."""
    vision_files = open_weight_files(vision_dir)
    vision_expected = {k: v for k, v in expected.items() if k.startswith("model.vision_tower.")}
    mapping, dropped = map_keys(vision_files.shapes(), VISION_FOLDER_RULES, vision_expected,
                                f"vision tower {vision_dir}")
    return (vision_files, mapping), {f"{vision_dir.name}:{k}": v for k, v in dropped.items()}


def convert_pretrain(files, shapes, config, expected, output, orig, vision_tower, source) -> ConversionResult:
    """Stage-1 artefact: projector + level table under target names, the config, and the stage marker."""
    stage1 = {k: v for k, v in expected.items()
              if k.startswith("model.multi_modal_projector.") or k == "model.alignment.level_embeddings"}
    mapping, dropped = map_keys(shapes, pretrain_rules(config.projector_type), stage1, "stage-1 projector file")
    check_filled(set(mapping), stage1, "A stage-1 `mm_projector_align.bin` holds the projector and the level table.")
    written = plan_and_write([(files, mapping)], stage1, config, output, None, False, file_name=STAGE1_WEIGHTS)
    marker = {
        "stage": "pretrain",
        "format_version": 1,
        "weights": STAGE1_WEIGHTS,
        "tensors": sorted(mapping),
        "vision_tower": str(vision_tower or orig.get("mm_vision_tower")),
        "image_aspect_ratio": orig.get("image_aspect_ratio", "square"),
        "source": str(source),
        "note": "Stage-1 artefact: start stage 2 from a base LLM + this vision tower + these tensors.",
    }
    atomic_write_text(output / STAGE_FILE, json.dumps(marker, indent=2) + "\n")
    return ConversionResult(output=output, kind="pretrain", files=written + [STAGE_FILE], dropped=dropped)


def write_side_files(output, config, orig, source_dir, tokenizer, settings, kind) -> list[str]:
    """config.json, and for full models the remote-code trio, generation config and processor files."""
    aspect = orig.get("image_aspect_ratio", "pad" if kind == "full" else "square")
    image_processor = LlavaImageProcessorPil(do_pad=aspect == "pad", **settings)
    original_vocab = config.original_vocab_size
    del config.original_vocab_size
    if kind == "pretrain":
        config.save_pretrained(output)
        image_processor.save_pretrained(output)
        return ["config.json", "preprocessor_config.json"]
    config.architectures = ["AlignGPTForConditionalGeneration"]
    config.auto_map = {**REMOTE_AUTO_MAP, **PROCESSOR_AUTO_MAP}
    config.save_pretrained(output)
    remote_files = _remote_code_files()
    for path in remote_files:
        shutil.copyfile(path, output / path.name)
    generation = _generation_config(source_dir, orig, original_vocab, config.text_config.vocab_size)
    generation.save_pretrained(output)
    written = ["config.json", "generation_config.json", *(path.name for path in remote_files)]
    if tokenizer is None:
        image_processor.save_pretrained(output)
        return written + ["preprocessor_config.json"]
    tokenizer.model_max_length = orig.get("tokenizer_model_max_length", tokenizer.model_max_length)
    tokenizer.padding_side = orig.get("tokenizer_padding_side", "right")
    # AlignGPT was trained in vicuna_v1, whatever chat template the tokenizer carries
    processor = AlignGPTProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_length=config.image_seq_length, chat_template=VICUNA_V1_CHAT_TEMPLATE)
    processor.save_pretrained(output)
    return written + sorted(p.name for p in output.iterdir() if p.name not in written and p.suffix != ".safetensors")


def _remote_code_files() -> list[Path]:
    """The remote-code entry files plus their `from .x import` neighbours, as `save_pretrained` would copy them."""
    from transformers.dynamic_module_utils import get_relative_import_files

    package = Path(__file__).resolve().parents[1] / "models"  # the remote-code unit
    files = {package / name for name in REMOTE_ENTRY_FILES}
    for name in REMOTE_ENTRY_FILES:
        files.update(Path(path) for path in get_relative_import_files(str(package / name)))
    return sorted(files)


def _generation_config(source_dir: Path, orig: dict, vocab: int, padded: int) -> GenerationConfig:
    """The original generation settings (eos/pad), with every row added after the original vocabulary suppressed."""
    path = source_dir / "generation_config.json"
    found = read_json_object(path, "generation config") if path.is_file() else {}
    found = {k: v for k, v in found.items() if not k.startswith("_") and k != "transformers_version"}
    from_file = set(found)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if name not in found and orig.get(name) is not None:
            found[name] = orig[name]
        value = found.get(name)
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                         for i in (value if isinstance(value, list) else [value])):
            where = path if name in from_file else source_dir / "config.json"
            raise ConversionError(f"{where}: `{name}` is {value!r}; it must be a token id (an integer) or a list of "
                                  "them. Restore the checkpoint's own file.")
    return GenerationConfig(**found, suppress_tokens=list(range(vocab, padded)))


__all__ = ["STAGE_FILE", "ConversionResult", "check_vocab_rows", "unread_weights_note",
           "read_json_object", "convert_pretrain", "expected_shapes", "read_weights", "resolve_folder",
           "resolve_vision", "vision_folder_source", "write_side_files"]

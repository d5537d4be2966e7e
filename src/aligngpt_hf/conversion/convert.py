# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""`aligngpt-hf convert`: released original-layout AlignGPT checkpoints -> this package's HF-native layout.

Inputs (a local folder or a Hub id, e.g. `nlpzhaof/aligngpt-7b` or `nlpzhaof/aligngpt-7b-pretrain`); the kind is
detected from the weight keys (`convert_mapping.detect_kind`):

* **full** (stage 2): `config.json` + `pytorch_model.bin` or `pytorch_model-*.bin` with `pytorch_model.bin.index.json`.
  Output: sharded `model*.safetensors` (+ index), `config.json` with the full `auto_map`, the remote-code trio,
  `generation_config.json` (eos/pad, new vocabulary rows suppressed) and, when a tokenizer is available, the
  processor (tokenizer with `<image>`/`<align>`, vicuna_v1 chat template, CLIP `pad` preprocessing).
* **pretrain** (stage 1): `config.json` + `mm_projector_align.bin` (projector + level table, no LLM). Output, the
  *stage-1 artefact* that the stage-2 trainer starts from together with a base LLM and a vision tower:

      OUTPUT/aligngpt_stage.json      {"stage": "pretrain", "format_version": 1, "weights": "stage1.safetensors",
                                       "tensors": [...], "vision_tower": ..., "image_aspect_ratio": ..., "source": ...}
      OUTPUT/stage1.safetensors       model.multi_modal_projector.linear_1.{weight,bias},
                                      model.multi_modal_projector.linear_2.{weight,bias} (mlp2x_gelu only),
                                      model.alignment.level_embeddings [N, H]      (target-model key names)
      OUTPUT/config.json              AlignGPTConfig of the stage-2 model (LLM dims from the stage-1 config, vocab
                                      padded to a multiple of 64, `<image>` = V, `<align>` = V + 1)
      OUTPUT/preprocessor_config.json the stage-1 (`square`) image processor settings

  The weights file is deliberately not `model.safetensors`, so `from_pretrained` cannot mistake the artefact for a
  full model with a random LLM. Read it with `load_stage1_artefact(folder)`, which returns (config, state_dict)
  ready for `model.load_state_dict(state_dict, strict=False)` on a model built from a base LLM + vision tower.

Why the tower may come from elsewhere: the original `mm_vision_tower` is often a path on the training machine;
`vision_tower=` overrides it (a CLIPVisionModel/CLIPModel folder or Hub id). Original pickles are read with
`torch.load(weights_only=True, mmap=True)` one file at a time and written shard by shard, so converting a 7B model
holds about one output shard in memory, never a full copy.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaImageProcessorPil

from aligngpt_hf.conversion.mapping import (
    VISION_FOLDER_RULES,
    ConversionError,
    WeightFiles,
    check_filled,
    detect_kind,
    full_rules,
    map_keys,
    plan_and_write,
    pretrain_rules,
    weight_files_in,
)
from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
from aligngpt_hf.models.modeling_aligngpt import PROCESSOR_AUTO_MAP, REMOTE_AUTO_MAP, AlignGPTForConditionalGeneration
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_CHAT_TEMPLATE, AlignGPTProcessor
from aligngpt_hf.paths import atomic_path, check_local_or_hub, check_writable

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
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pretraining_tp",
               "rope_scaling", "rope_theta", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
               "tie_word_embeddings")
SOURCE_PATTERNS = ["*.json", "pytorch_model*.bin", "mm_projector_align.bin", "*.safetensors", "tokenizer.model",
                   "*.txt"]
VISION_PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConversionResult:
    """What `convert_checkpoint` wrote: the kind, the files, the dropped source keys, and notes for the user."""

    output: Path
    kind: str
    files: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    has_processor: bool = False
    notes: list[str] = field(default_factory=list)


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    vision_tower: str | Path | None = None,
    tokenizer: str | Path | None = None,
    push_to_hub: str | None = None,
    *,
    kind: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    private: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Convert an original AlignGPT checkpoint (folder or Hub id) into OUTPUT; see the module docstring.

    OUTPUT is built in a temporary folder next to it and renamed into place when complete, so a failed or killed
    conversion never leaves a half-written OUTPUT (and a rerun removes its leftovers)."""
    source_dir = resolve_folder(source, SOURCE_PATTERNS, "checkpoint")
    output = _prepare_output(Path(output), overwrite)
    with atomic_path(output, directory=True) as staging:
        result = _convert_into(source, source_dir, staging, vision_tower, tokenizer, kind, dtype, max_shard_size,
                               progress)
    result.output = output
    if push_to_hub:
        result.notes.append(f"Pushed to https://huggingface.co/{push_folder(output, push_to_hub, private=private)}")
    return result


def _convert_into(source, source_dir: Path, output: Path, vision_tower, tokenizer, kind, dtype, max_shard_size,
                  progress) -> ConversionResult:
    """Everything `convert_checkpoint` writes, into the (staging) folder `output`."""
    orig = _read_original_config(source_dir)
    from aligngpt_hf.conversion.family import convert_family, is_family_config  # it builds on this module

    if is_family_config(orig):  # AlignGPT_family: other LLM classes, n_indicators, SigLIP towers
        return convert_family(source_dir, output, orig, source, vision_tower, tokenizer, kind=kind, dtype=dtype,
                              max_shard_size=max_shard_size, progress=progress)
    files, shapes, detected, need_vision_weights = read_weights(source_dir, source, kind, vision_tower)
    vision_config, vision_dir, processor_settings = resolve_vision(orig, source_dir, vision_tower, need_vision_weights)
    tok = load_tokenizer(tokenizer, source_dir) if detected == "full" else None
    config = build_config(orig, vision_config, shapes, tok, _target_dtype(dtype, shapes), detected)
    expected = _expected_shapes(config)
    if detected == "pretrain":
        result = _convert_pretrain(files, shapes, config, expected, output, orig, vision_tower, source)
    else:
        result = _convert_full(files, shapes, config, expected, vision_dir, output, max_shard_size, progress)
    result.files += _write_side_files(output, config, orig, source_dir, tok, processor_settings, detected)
    result.has_processor = tok is not None
    if detected == "full" and tok is None:
        result.notes.append(
            "No tokenizer in SOURCE: weights and config were converted, but OUTPUT has no processor yet. Add one with "
            "`--tokenizer lmsys/vicuna-7b-v1.5` (or a local folder), or save an AlignGPTProcessor into OUTPUT; "
            f"`<image>` must be id {config.image_token_id} and `<align>` id {config.alignment_token_id}."
        )
    return result


def read_weights(source_dir: Path, source, kind: str | None, vision_tower):
    """(weight files, their shapes, detected kind, whether the tower's weights must be found): the kind is read off
    the keys and must match `kind` when one is asked for; a full checkpoint without an embedded tower (or with
    `--vision-tower` given) takes the tower's weights from elsewhere."""
    files = WeightFiles(weight_files_in(source_dir))
    shapes = files.shapes()
    detected = detect_kind(shapes)
    if kind not in (None, "auto", detected):
        raise ConversionError(f"Expected a {kind!r} checkpoint, but {source} holds a {detected!r} one (from its keys).")
    embedded_vision = any(k.startswith("vision_tower.vision_tower.vision_model.") for k in shapes)
    return files, shapes, detected, detected == "full" and (vision_tower is not None or not embedded_vision)


def _convert_full(files, shapes, config, expected, vision_dir, output, max_shard_size, progress) -> ConversionResult:
    """Map every key (LLM + projector + alignment from SOURCE; tower from SOURCE or `vision_dir`), then stream."""
    rules = full_rules(config.projector_type, vision_in_source=vision_dir is None)
    mapping, dropped = map_keys(shapes, rules, expected, "checkpoint")
    sources = [(files, mapping)]
    if vision_dir is not None:
        vision_files = WeightFiles(weight_files_in(vision_dir))
        vision_expected = {k: v for k, v in expected.items() if k.startswith("model.vision_tower.")}
        vision_mapping, vision_dropped = map_keys(
            vision_files.shapes(), VISION_FOLDER_RULES, vision_expected, f"vision tower {vision_dir}"
        )
        sources.append((vision_files, vision_mapping))
        dropped.update({f"{vision_dir.name}:{k}": v for k, v in vision_dropped.items()})
    filled = {target for _, m in sources for target in m}
    check_filled(filled, expected, "Was the checkpoint saved completely (all shards in the index)? For the vision "
                                   "tower pass `--vision-tower openai/clip-vit-large-patch14-336` (or its folder).")
    written = plan_and_write(sources, expected, config, output, max_shard_size, progress)
    return ConversionResult(output=output, kind="full", files=written, dropped=dropped)


def _convert_pretrain(files, shapes, config, expected, output, orig, vision_tower, source) -> ConversionResult:
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
    (output / STAGE_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return ConversionResult(output=output, kind="pretrain", files=written + [STAGE_FILE], dropped=dropped)


def load_stage1_artefact(folder: str | Path) -> tuple[AlignGPTConfig, dict[str, torch.Tensor]]:
    """Read a stage-1 artefact written by `convert_checkpoint`: (AlignGPTConfig, {target key: tensor})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_stage1_artefact(folder):
        raise ConversionError(f"{folder} is not a stage-1 artefact (no {STAGE_FILE} with stage 'pretrain').")
    marker = json.loads((folder / STAGE_FILE).read_text())
    weights = folder / marker["weights"]
    config = AlignGPTConfig.from_pretrained(folder)
    try:
        return config, load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{weights} is missing, truncated or corrupt ({error}); rerun stage 1 or restore it.") \
            from None


def is_stage1_artefact(folder: str | Path) -> bool:
    marker = Path(folder) / STAGE_FILE
    return marker.is_file() and json.loads(marker.read_text()).get("stage") == "pretrain"


def resolve_folder(name: str | Path, allow_patterns: list[str], what: str) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (only the needed files) to the HF cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"The {what} must be a folder or a Hub repo id, got the file {path}.")
    check_local_or_hub(name, what)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)):
        raise ConversionError(f"The {what} {name!r} is neither an existing folder nor a Hub repo id (owner/name).")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name), allow_patterns=allow_patterns))


def _prepare_output(output: Path, overwrite: bool) -> Path:
    """Refuse a non-empty OUTPUT without `overwrite` and an unwritable one, before any work (it is replaced whole)."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"OUTPUT {output} is a file; give a folder.")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"OUTPUT {output} exists and is not empty; pass --overwrite or another folder.")
    check_writable(output.parent, "OUTPUT's parent folder")
    return output


def _read_original_config(source_dir: Path) -> dict:
    path = source_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source_dir} has no config.json; an original AlignGPT checkpoint always has one.")
    orig = json.loads(path.read_text())
    if "mm_hidden_size" not in orig or "mm_vision_tower" not in orig:
        reason = "it is already in the HF layout" if orig.get("model_type") == "aligngpt" else "it has no mm_* fields"
        raise ConversionError(f"Wrong kind of config in {path}: {reason}; expected an original AlignGPT config.")
    return orig


def resolve_vision(orig: dict, source_dir: Path, override, need_weights: bool):
    """(vision config, folder to take the tower weights from or None, image processor settings)."""
    if override is not None:
        folder = resolve_folder(override, VISION_PATTERNS, "vision tower")
        return _vision_config_from(folder), (folder if need_weights else None), _processor_settings(folder)
    name = str(orig.get("mm_vision_tower") or "")
    local = [p for p in (Path(name).expanduser(), source_dir / name) if name and p.is_dir()]
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
        f"Missing vision tower: config.json names `mm_vision_tower` = {name!r}, which is not a folder here (also "
        f"tried relative to {source_dir})"
        + (" and the checkpoint has no embedded tower weights" if need_weights else "")
        + ". Pass `--vision-tower openai/clip-vit-large-patch14-336` (or the tower's local folder)."
    )


def _vision_config_from(folder: Path):
    config = AutoConfig.from_pretrained(folder)
    return getattr(config, "vision_config", None) or config


def _processor_settings(folder: Path | None, image_size: int = 336) -> dict:
    """CLIP preprocessing from the tower's preprocessor_config.json, else CLIP-336 defaults."""
    settings = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
                "resample": 3, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
    path = folder / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        found = json.loads(path.read_text())
        settings.update({k: found[k] for k in settings if k in found})
    return settings


def load_tokenizer(name, source_dir: Path):
    """The tokenizer from `name`, else from SOURCE when it has one, else None (weights-only conversion)."""
    from transformers import AutoTokenizer

    if name is None:
        has_tokenizer = any((source_dir / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))
        return AutoTokenizer.from_pretrained(source_dir) if has_tokenizer else None
    folder = resolve_folder(name, ["*.json", "tokenizer.model"], "tokenizer")
    return AutoTokenizer.from_pretrained(folder)


def _target_dtype(dtype: str | None, shapes) -> torch.dtype | None:
    """None = keep the source dtype (bit-identical); otherwise every floating tensor is cast."""
    if dtype in (None, "auto"):
        return None
    if dtype not in DTYPES:
        raise ConversionError(f"`dtype` must be one of auto, {', '.join(DTYPES)}; got {dtype!r}.")
    return DTYPES[dtype]


def build_config(orig: dict, vision_config, shapes, tokenizer, dtype, kind: str) -> AlignGPTConfig:
    """AlignGPTConfig from the original config + tensor shapes (N, gate width) + the new token ids."""
    vocab = int(orig["vocab_size"])
    image_id, align_id = vocab, vocab + 1
    if tokenizer is not None:
        image_id, align_id = add_special_tokens(tokenizer, vocab)
    padded = -(-max(vocab + 2, image_id + 1, align_id + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = LlamaConfig(vocab_size=padded, **{k: orig[k] for k in TEXT_FIELDS if k in orig and orig[k] is not None})
    levels = shapes["align_indicators.indicator_embs"][0]
    gate = shapes.get("gated_weight_layer.mlp.0.weight", (256,))[0]
    strategies = {"patch": "default", "cls_patch": "full"}
    select = orig.get("mm_vision_select_feature", "patch")
    if select not in strategies:
        raise ConversionError(f"Unsupported `mm_vision_select_feature` {select!r}; expected 'patch' or 'cls_patch'.")
    if orig.get("mm_use_im_start_end") or orig.get("mm_use_im_patch_token"):
        raise ConversionError("`mm_use_im_start_end`/`mm_use_im_patch_token` checkpoints are not AlignGPT releases.")
    config = AlignGPTConfig(
        vision_config=vision_config, text_config=text, num_alignment_levels=int(levels), gate_hidden_size=int(gate),
        projector_type=orig.get("mm_projector_type", "linear"), vision_feature_layer=orig["mm_vision_select_layer"],
        vision_feature_select_strategy=strategies[select], image_token_id=image_id, alignment_token_id=align_id,
    )
    llm_key = "model.embed_tokens.weight" if kind == "full" else "align_indicators.indicator_embs"
    config.dtype = dtype or shapes.dtype_of(llm_key)
    config.original_vocab_size = vocab
    # The released weights went through both stages: mark them so the trainers accept them as a starting point.
    config.aligngpt_stage = "instruct" if kind == "full" else "pretrain"
    return config


def add_special_tokens(tokenizer, vocab: int) -> tuple[int, int]:
    """Add `<image>` and `<align>`; they must land after the original rows so those stay untouched."""
    if len(tokenizer) > vocab:
        raise ConversionError(f"The tokenizer has {len(tokenizer)} tokens but the checkpoint only {vocab} rows.")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<align>"]})
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<align>"])
    if min(ids) < vocab:
        raise ConversionError(f"`<image>`/`<align>` got ids {ids} inside the original vocabulary (< {vocab}).")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # what the original vicuna_v1 training used
    return ids[0], ids[1]


def _expected_shapes(config: AlignGPTConfig) -> dict[str, tuple[int, ...]]:
    """Every key (and shape) of the target model, built on the meta device: no memory, any size."""
    with torch.device("meta"):
        model = AlignGPTForConditionalGeneration(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _write_side_files(output, config, orig, source_dir, tokenizer, settings, kind) -> list[str]:
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
    found = json.loads(path.read_text()) if path.is_file() else {}
    found = {k: v for k, v in found.items() if not k.startswith("_") and k != "transformers_version"}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if name not in found and orig.get(name) is not None:
            found[name] = orig[name]
    return GenerationConfig(**found, suppress_tokens=list(range(vocab, padded)))


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) the Hub repo and upload the converted folder; returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                      commit_message="Add AlignGPT converted with `aligngpt-hf convert`")
    return repo_id


def run_cli(args: argparse.Namespace) -> int:
    result = convert_checkpoint(
        args.source, args.output, vision_tower=args.vision_tower, tokenizer=args.tokenizer,
        push_to_hub=args.push_to_hub, kind=args.kind, dtype=args.dtype, max_shard_size=args.max_shard_size,
        private=args.private, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"Converted a {result.kind} checkpoint into {result.output}: {', '.join(result.files)}")
    if result.dropped:
        reasons = sorted(set(result.dropped.values()))
        print(f"Dropped {len(result.dropped)} source key(s) on purpose: {'; '.join(reasons)}")
    for note in result.notes:
        print(note)
    return 0

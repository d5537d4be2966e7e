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
from pathlib import Path

import torch
from transformers import LlamaConfig

from aligngpt_hf.conversion.family import convert_family, is_family_config
from aligngpt_hf.conversion.mapping import (
    ConversionError,
    check_filled,
    full_rules,
    map_keys,
    parse_size,
    plan_and_write,
)
from aligngpt_hf.conversion.steps import (
    STAGE_FILE,
    VOCAB_MULTIPLE,
    ConversionResult,
    check_vocab_rows,
    config_fields_checked,
    convert_pretrain,
    expected_shapes,
    read_json_object,
    read_weights,
    resolve_folder,
    resolve_vision,
    unread_weights_note,
    vision_folder_source,
    write_side_files,
)
from aligngpt_hf.hub.checks import check_private_repo, check_repo_id
from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
from aligngpt_hf.paths import atomic_path, check_apart, check_writable

TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pretraining_tp",
               "rope_scaling", "rope_theta", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
               "tie_word_embeddings")
SOURCE_PATTERNS = ["*.json", "pytorch_model*.bin", "mm_projector_align.bin", "*.safetensors", "tokenizer.model",
                   "*.txt"]
REQUIRED_INT_FIELDS = ("vocab_size", "hidden_size", "mm_hidden_size", "mm_vision_select_layer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if push_to_hub:  # a repo id the Hub would refuse is named before an hour of conversion, not after
        check_repo_id(push_to_hub, "--push-to-hub")
    parse_size(max_shard_size)
    if not str(output).strip():  # Path("") is the working directory
        raise ConversionError("OUTPUT is an empty string; give the folder to write the converted checkpoint into.")
    source_dir = resolve_folder(source, SOURCE_PATTERNS, "checkpoint")
    check_apart(output, source_dir)
    output = _prepare_output(Path(output), overwrite)
    with atomic_path(output, directory=True) as staging:
        result = _convert_into(source, source_dir, staging, vision_tower, tokenizer, kind, dtype, max_shard_size,
                               progress)
    result.output = output
    unread = unread_weights_note(source_dir)
    if unread:
        result.notes.append(unread)
    if push_to_hub:
        result.notes.append(f"Pushed to https://huggingface.co/{push_folder(output, push_to_hub, private=private)}")
    return result


def _convert_into(source, source_dir: Path, output: Path, vision_tower, tokenizer, kind, dtype, max_shard_size,
                  progress) -> ConversionResult:
    """Everything `convert_checkpoint` writes, into the (staging) folder `output`."""
    orig = _read_original_config(source_dir)
    target_dtype = _target_dtype(dtype)
    if is_family_config(orig):  # AlignGPT_family: other LLM classes, n_indicators, SigLIP towers
        return convert_family(source_dir, output, orig, source, vision_tower, tokenizer, kind=kind,
                              dtype=target_dtype, max_shard_size=max_shard_size, progress=progress)
    files, shapes, detected, need_vision_weights = read_weights(source_dir, source, kind, vision_tower)
    check_vocab_rows(shapes, orig, source_dir / "config.json")
    vision_config, vision_dir, processor_settings = resolve_vision(orig, source_dir, vision_tower, need_vision_weights)
    _check_clip_tower(vision_config, orig, vision_tower)
    if detected == "pretrain" and tokenizer is not None:  # it would be ignored: the artefact has no vocabulary rows
        raise ConversionError(f"--tokenizer applies to a full checkpoint, but {source} holds a stage-1 projector "
                              "(mm_projector_align.bin, no language model); drop --tokenizer. The stage-2 trainer "
                              "takes the tokenizer with the base LLM.")
    tok = load_tokenizer(tokenizer, source_dir) if detected == "full" else None
    with config_fields_checked(source_dir / "config.json"):
        config = build_config(orig, vision_config, shapes, tok, target_dtype, detected)
        expected = expected_shapes(config)
    if detected == "pretrain":
        result = convert_pretrain(files, shapes, config, expected, output, orig, vision_tower, source)
    else:
        result = _convert_full(files, shapes, config, expected, vision_dir, output, max_shard_size, progress)
    result.files += write_side_files(output, config, orig, source_dir, tok, processor_settings, detected)
    result.has_processor = tok is not None
    if detected == "full" and tok is None:
        result.notes.append(
            "No tokenizer in SOURCE: weights and config were converted, but OUTPUT has no processor yet. Add one with "
            "`--tokenizer lmsys/vicuna-7b-v1.5` (or a local folder), or save an AlignGPTProcessor into OUTPUT; "
            f"`<image>` must be id {config.image_token_id} and `<align>` id {config.alignment_token_id}."
        )
    return result


def _check_clip_tower(vision_config, orig: dict, override) -> None:
    """The original AlignGPT ran a CLIP tower (SigLIP towers are the family's, converted by `convert_family`): another
    tower would fail later with a message about CLS tokens that names neither the tower nor the option."""
    model_type = str(getattr(vision_config, "model_type", ""))
    if model_type.startswith("clip"):
        return
    where = f"--vision-tower {override}" if override is not None else f"`mm_vision_tower` {orig.get('mm_vision_tower')!r}"
    raise ConversionError(f"{where} is a {model_type!r} model, but this original AlignGPT checkpoint was trained with "
                          "a CLIP vision tower (its projector reads CLIP features); pass that CLIP tower with "
                          "--vision-tower (e.g. openai/clip-vit-large-patch14-336 or its folder).")


def _convert_full(files, shapes, config, expected, vision_dir, output, max_shard_size, progress) -> ConversionResult:
    """Map every key (LLM + projector + alignment from SOURCE; tower from SOURCE or `vision_dir`), then stream."""
    rules = full_rules(config.projector_type, vision_in_source=vision_dir is None)
    mapping, dropped = map_keys(shapes, rules, expected, "checkpoint")
    sources = [(files, mapping)]
    if vision_dir is not None:
        vision_source, vision_dropped = vision_folder_source(vision_dir, expected)
        sources.append(vision_source)
        dropped.update(vision_dropped)
    filled = {target for _, m in sources for target in m}
    check_filled(filled, expected, "Was the checkpoint saved completely (all shards in the index)? For the vision "
                                   "tower pass `--vision-tower openai/clip-vit-large-patch14-336` (or its folder).")
    written = plan_and_write(sources, expected, config, output, max_shard_size, progress)
    return ConversionResult(output=output, kind="full", files=written, dropped=dropped)


def load_stage1_artefact(folder: str | Path) -> tuple[AlignGPTConfig, dict[str, torch.Tensor]]:
    """Read a stage-1 artefact written by `convert_checkpoint`: (AlignGPTConfig, {target key: tensor})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_stage1_artefact(folder):
        raise ConversionError(f"{folder} is not a stage-1 artefact (no {STAGE_FILE} with stage 'pretrain').")
    name = read_json_object(folder / STAGE_FILE, "stage marker").get("weights")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ConversionError(f"{folder / STAGE_FILE}: `weights` is {name!r}, not the name of a file in {folder} "
                              "(the artefact's tensors are read from its own folder only); convert the stage-1 "
                              "checkpoint again (`aligngpt-hf convert`).")
    weights = folder / name
    config = AlignGPTConfig.from_pretrained(folder)
    try:
        return config, load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{weights} is missing, truncated or corrupt ({error}); rerun stage 1 or restore it.") \
            from None


def is_stage1_artefact(folder: str | Path) -> bool:
    marker = Path(folder) / STAGE_FILE
    return marker.is_file() and read_json_object(marker, "stage marker").get("stage") == "pretrain"


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
    orig = read_json_object(path, "config")
    if "mm_hidden_size" not in orig or "mm_vision_tower" not in orig:
        reasons = {
            "aligngpt": "it is already in the HF layout (load it with from_pretrained, or publish it with "
                        "`aligngpt-hf push`)",
            "llava": "it is a transformers LLaVA (model_type 'llava'); make an AlignGPT of it with "
                     "`aligngpt-hf from-llava SOURCE OUTPUT`",
        }
        reason = reasons.get(orig.get("model_type"), "it has no mm_* fields")
        raise ConversionError(f"Wrong kind of config in {path}: {reason}; expected an original AlignGPT config.")
    for name in REQUIRED_INT_FIELDS:
        value = orig.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or (name != "mm_vision_select_layer" and value < 1):
            problem = "is missing" if name not in orig else f"is {value!r}"
            raise ConversionError(f"{path}: `{name}` {problem}; an original AlignGPT config has it as "
                                  f"{'an integer' if name == 'mm_vision_select_layer' else 'a positive integer'}. "
                                  "Restore the checkpoint's own config.json.")
    return orig


def load_tokenizer(name, source_dir: Path):
    """The tokenizer from `name`, else from SOURCE when it has one, else None (weights-only conversion)."""
    from transformers import AutoTokenizer

    if name is None:
        if not _has_tokenizer_files(source_dir):
            return None
        folder, what = source_dir, "SOURCE's tokenizer"
    else:
        folder, what = resolve_folder(name, ["*.json", "tokenizer.model"], "tokenizer"), f"--tokenizer {name}"
        if not _has_tokenizer_files(folder):
            present = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
            raise ConversionError(f"--tokenizer {name}: {folder} has no tokenizer files (tokenizer.json or "
                                  f"tokenizer.model; it holds {present}). Pass the base LLM's folder or Hub id, e.g. "
                                  "lmsys/vicuna-7b-v1.5.")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 (the tokenizers library raises its own plain Exception types)
        reason = " ".join(str(error).split())[:200]
        raise ConversionError(f"{what}: the tokenizer files in {folder} cannot be loaded ({type(error).__name__}: "
                              f"{reason}); restore them, or pass the base LLM's tokenizer with --tokenizer.") from None


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))


def _target_dtype(dtype: str | None) -> torch.dtype | None:
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
        raise ConversionError(f"The tokenizer has {len(tokenizer)} tokens but the checkpoint only {vocab} rows: it is "
                              "not the tokenizer these weights were trained with (one that already has <image>/<align> "
                              "added?). Pass the base LLM's own tokenizer with --tokenizer, e.g. lmsys/vicuna-7b-v1.5.")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<align>"]})
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<align>"])
    if min(ids) < vocab:
        raise ConversionError(f"`<image>`/`<align>` got ids {ids} inside the original vocabulary (< {vocab}): the "
                              "tokenizer already has them, so it is not the one these weights were trained with. Pass "
                              "the base LLM's own tokenizer with --tokenizer, e.g. lmsys/vicuna-7b-v1.5.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # what the original vicuna_v1 training used
    return ids[0], ids[1]


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) the Hub repo and upload the converted folder; returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi()
    if private:
        check_private_repo(api, repo_id)
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


__all__ = ["DTYPES", "ConversionResult", "convert_checkpoint", "is_stage1_artefact", "load_stage1_artefact",
           "resolve_folder"]

# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""`aligngpt-hf from-llava SOURCE OUTPUT`: any transformers LLaVA checkpoint -> an AlignGPT folder.

SOURCE is a folder or Hub id holding a `LlavaForConditionalGeneration` and its `LlavaProcessor` (llava-hf's
llava-1.5-7b/13b-hf, bakLlava, their fine-tunes). OUTPUT gets:

* the model: LLaVA's vision tower, projector and language model bit for bit (with its feature layer, select strategy,
  `<image>` id, tying and pad id), a fresh level table and gate, and a vocabulary row for `<align>`
  (`AlignGPTForConditionalGeneration.from_llava`, which calls `models/llava_aligngpt.py`);
* the processor: LLaVA's tokenizer plus `<align>`, the AlignGPT chat template of the tokenizer's format (vicuna_v1 for
  LLaVA-1.5; generation also stops at the format's turn end), `image_seq_length`, and
  LLaVA's image preprocessing as a `LlavaImageProcessorPil` (so `image_aspect_ratio` can switch it to `pad`);
* the remote code and `auto_map`, so OUTPUT loads with transformers alone.

The level table is untrained: run the alignment warm-up (`aligngpt-hf pretrain pretrain_from_llava_7b`) before
stage 2, or start stage 2 with `--allow_untrained_alignment true`. Original-layout AlignGPT checkpoints take
`aligngpt-hf convert` instead.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from aligngpt_hf.conversion.convert import DTYPES, resolve_folder
from aligngpt_hf.conversion.mapping import ConversionError
from aligngpt_hf.conversion.steps import config_fields_checked, read_json_object, unread_weights_note
from aligngpt_hf.hub.checks import check_finite_weights, loading_problems
from aligngpt_hf.models.llava_aligngpt import config_from_llava
from aligngpt_hf.paths import check_apart, check_writable

SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
ALIGNMENT_TOKEN = "<align>"
# What LlavaProcessor.from_pretrained reads: the tokenizer, and the image settings (in their own file or, as
# transformers 5 saves them, inside processor_config.json).
PROCESSOR_PARTS = {
    "tokenizer (tokenizer.json or tokenizer.model)": ("tokenizer.json", "tokenizer.model"),
    "image processor settings (preprocessor_config.json or processor_config.json)": ("preprocessor_config.json",
                                                                                      "processor_config.json"),
}
IMAGE_SETTINGS = ("size", "crop_size", "image_mean", "image_std", "do_center_crop", "do_resize", "do_normalize",
                  "do_rescale", "rescale_factor", "resample", "do_convert_rgb")


@dataclass
class FromLlavaResult:
    """What `convert_llava` wrote: the folder, the `<align>` id, the vocabulary before/after, notes for the user."""

    output: Path
    alignment_token_id: int
    vocab_sizes: tuple[int, int]
    notes: list[str] = field(default_factory=list)


def check_llava_source(folder: Path, source) -> dict:
    """SOURCE's config.json, or an error that says what SOURCE is and which command takes it."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source} has no config.json: it is not a saved transformers LLaVA checkpoint.")
    config = read_json_object(path, "config")
    model_type = config.get("model_type")
    if model_type == "llava":
        if (folder / "generation_config.json").is_file():  # transformers would drop a broken one with a warning
            read_json_object(folder / "generation_config.json", "generation config")
        return config
    if "mm_vision_tower" in config:
        kind = "AlignGPT" if "align" in json.dumps(config.get("architectures", [])).lower() else "LLaVA"
        raise ConversionError(
            f"{source} is an original-layout {kind} checkpoint (its config.json has `mm_vision_tower`), not a "
            "transformers LLaVA one. For an original AlignGPT checkpoint use `aligngpt-hf convert SOURCE OUTPUT`; for "
            "an original LLaVA, start from its transformers conversion (e.g. llava-hf/llava-1.5-7b-hf).")
    if model_type == "aligngpt":
        raise ConversionError(f"{source} is already an AlignGPT model (model_type 'aligngpt'); load it directly.")
    raise ConversionError(
        f"{source} holds a {model_type!r} model ({', '.join(config.get('architectures') or ['no architectures'])}); "
        "from-llava takes a transformers LLaVA checkpoint (model_type 'llava', LlavaForConditionalGeneration).")


def add_alignment_token(tokenizer, reuse: bool = False) -> int:
    """Add `<align>` as a special token and return its id; a tokenizer that already has one is refused unless
    `reuse` (its rows are then kept, not re-initialised)."""
    existing = tokenizer.get_vocab().get(ALIGNMENT_TOKEN)
    if existing is not None:
        if reuse:
            return existing
        raise ConversionError(
            f"SOURCE's tokenizer already has {ALIGNMENT_TOKEN} (id {existing}), so it may carry another meaning there. "
            "Pass --reuse-alignment-token to use that id for AlignGPT's alignment token (its embedding rows stay as "
            "they are), or remove the token from SOURCE's tokenizer first.")
    tokenizer.add_special_tokens({"additional_special_tokens": [ALIGNMENT_TOKEN]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(ALIGNMENT_TOKEN)


def llava_image_processor(source, image_aspect_ratio: str | None = None):
    """SOURCE's preprocessing as a `LlavaImageProcessorPil`: identical pixels by default (`do_pad` as SOURCE has it,
    CLIP's processor has none), AlignGPT's expand-to-square with `image_aspect_ratio="pad"`."""
    from transformers import LlavaImageProcessorPil

    settings = {k: getattr(source, k) for k in IMAGE_SETTINGS if getattr(source, k, None) is not None}
    pad = getattr(source, "do_pad", False) if image_aspect_ratio is None else image_aspect_ratio == "pad"
    return LlavaImageProcessorPil(**settings, do_pad=bool(pad))


def _check_image_tokens(llava_processor, image_seq_length: int, source) -> None:
    """LLaVA's processor and the model config must agree on the tokens per image (else every image would fail)."""
    if getattr(llava_processor, "patch_size", None) is None:
        return  # older LlavaProcessors expand by `image_seq_length`, which the config derives
    found = llava_processor._get_num_multimodal_tokens(image_sizes=[[1, 1]]).num_image_tokens[0]  # from its crop size
    if found != image_seq_length:
        raise ConversionError(
            f"SOURCE's LlavaProcessor expands an image into {found} tokens, its model config into {image_seq_length} "
            f"(vision tower, `vision_feature_select_strategy`). Fix `patch_size`/`num_additional_image_tokens` in "
            f"{source}/processor_config.json to match the model.")


def load_llava_weights(folder: Path, source):
    """SOURCE's `LlavaForConditionalGeneration`, refused when its weights do not fill the model exactly: transformers
    would initialise missing tensors randomly and drop unknown ones, and OUTPUT would silently hold another model."""
    from safetensors import SafetensorError
    from transformers import LlavaForConditionalGeneration

    try:
        llava, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype="auto", output_loading_info=True,
                                                                    ignore_mismatched_sizes=True)
    except SafetensorError as error:  # transformers names neither the file nor the fix
        names = ", ".join(p.name for p in sorted(folder.glob("*.safetensors"))) or "its weights"
        raise ConversionError(f"{source}: weight file(s) {names} are truncated or corrupt ({error}); re-download or "
                              "re-copy them.") from None
    problems = loading_problems(info)
    if problems:
        raise ConversionError(f"{source}: the LLaVA weights do not match its config.json: {'; '.join(problems)}. "
                              "Re-download or re-save the checkpoint whole.")
    check_finite_weights(llava, str(source), "re-download it or start from another checkpoint", "LLaVA weight(s)",
                         ConversionError)
    return llava


def convert_llava(source, output, *, alignment_mode: str | None = None, num_alignment_levels: int | None = None,
                  image_aspect_ratio: str | None = None, dtype: str | None = None,
                  reuse_alignment_token: bool = False, overwrite: bool = False) -> FromLlavaResult:
    """Write OUTPUT (an AlignGPT folder) from the LLaVA checkpoint SOURCE; see the module docstring."""
    from transformers import AutoConfig, LlavaProcessor

    from aligngpt_hf.models.chat_templates_aligngpt import stop_token_ids
    from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
    from aligngpt_hf.models.processing_aligngpt import AlignGPTProcessor

    if not str(output).strip():  # Path("") is the working directory
        raise ConversionError("OUTPUT is an empty string; give the folder to write the AlignGPT model into.")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        what = "is a file" if not output.is_dir() else "exists and is not empty"
        raise ConversionError(f"OUTPUT {output} {what}; pass --overwrite or another folder.")
    folder = resolve_folder(source, SOURCE_PATTERNS, "LLaVA checkpoint")
    check_apart(output, folder)
    check_writable(output.parent, "OUTPUT's parent folder")
    check_llava_source(folder, source)
    missing = [part for part, names in PROCESSOR_PARTS.items() if not any((folder / n).is_file() for n in names)]
    if missing:
        raise ConversionError(f"{source} has no usable LlavaProcessor: no {' and no '.join(missing)}; save the "
                              "checkpoint's processor into it (`processor.save_pretrained(SOURCE)`).")
    try:  # the config before the processor (which reads it too): a bad value is named with its file
        with config_fields_checked(folder / "config.json"):
            llava_config = AutoConfig.from_pretrained(folder)
    except ConversionError:
        raise
    except ValueError as error:
        raise ConversionError(f"{folder / 'config.json'}: {error}") from None
    try:
        llava_processor = LlavaProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ConversionError(f"{source} has no usable LlavaProcessor ({type(error).__name__}: {reason}); save the "
                              "checkpoint's processor into it (`processor.save_pretrained(SOURCE)`).") from None
    tokenizer, notes = llava_processor.tokenizer, []
    alignment_token_id = add_alignment_token(tokenizer, reuse_alignment_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # LLaVA's rule: pad = unk
        notes.append(f"SOURCE's tokenizer has no pad token; padding uses {tokenizer.pad_token} (LLaVA's rule).")
    kwargs = {k: v for k, v in (("alignment_mode", alignment_mode), ("num_alignment_levels", num_alignment_levels))
              if v is not None}
    try:  # the config first: its refusals and the token count come before any weight is read
        with config_fields_checked(folder / "config.json"):
            config = config_from_llava(llava_config, alignment_token_id, **kwargs)
            _check_image_tokens(llava_processor, config.image_seq_length, source)
            llava = load_llava_weights(folder, source)
            model = AlignGPTForConditionalGeneration.from_llava(llava, alignment_token_id=alignment_token_id, **kwargs)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    except (MemoryError, RuntimeError) as error:  # e.g. a level table of --num-alignment-levels rows does not fit
        if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        raise ConversionError(f"Building the AlignGPT model ran out of memory ({str(error).splitlines()[0][:160]}); "
                              f"check --num-alignment-levels ({num_alignment_levels}) and the free memory.") from None
    if dtype not in (None, "auto"):
        model = model.to(DTYPES[dtype])
    image_processor = llava_image_processor(llava_processor.image_processor, image_aspect_ratio)
    try:  # the chat template follows the tokenizer's format (LLaVA-1.5's is vicuna_v1), stopping at its turn end
        processor = AlignGPTProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      image_seq_length=model.config.image_seq_length,
                                      image_token=llava_processor.image_token, alignment_token=ALIGNMENT_TOKEN,
                                      add_alignment_token=model.config.uses_alignment_token)
    except ValueError as error:
        raise ConversionError(f"{source}: {error}") from None
    generation = model.generation_config
    generation.eos_token_id = stop_token_ids(tokenizer, processor.chat_template, generation.eos_token_id)
    _write_folder(output, model, processor)
    if model.config.uses_alignment_token:
        notes.append("The level table and gate are untrained: run the alignment warm-up (`aligngpt-hf pretrain "
                     f"pretrain_from_llava_7b --model_name_or_path {output}`) before stage 2.")
    unread = unread_weights_note(folder)
    if unread:
        notes.append(unread)
    vocab_sizes = (llava_config.text_config.vocab_size, model.config.text_config.vocab_size)
    return FromLlavaResult(output, alignment_token_id, vocab_sizes, notes)


def _write_folder(output: Path, model, processor) -> None:
    """Save into a temporary folder beside OUTPUT, then swap it into place: OUTPUT is never half-written, and an old
    OUTPUT (`--overwrite`) is only moved aside once the new one is complete."""
    from aligngpt_hf.paths import atomic_path

    if output.exists() and not output.is_dir():
        output.unlink()  # --overwrite of a file: a folder takes its place
    with atomic_path(output, directory=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)


def run_cli(args: argparse.Namespace) -> int:
    # a ConversionError (a ValueError) becomes the one-line `aligngpt-hf from-llava: error: ...` in aligngpt_hf.cli
    result = convert_llava(
        args.source, args.output, alignment_mode=args.alignment_mode,
        num_alignment_levels=args.num_alignment_levels, image_aspect_ratio=args.image_aspect_ratio,
        dtype=args.dtype, reuse_alignment_token=args.reuse_alignment_token, overwrite=args.overwrite,
    )
    before, after = result.vocab_sizes
    print(f"Wrote an AlignGPT model into {result.output}: `{ALIGNMENT_TOKEN}` = id {result.alignment_token_id}, "
          f"vocabulary {before} -> {after} rows (LLaVA's rows unchanged).")
    for note in result.notes:
        print(note)
    return 0

# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""The folder to publish, loaded with the in-library classes and checked whole: weights that fill the model exactly and
are finite, a processor that fits it, side files transformers would otherwise drop or replace silently."""

from __future__ import annotations

from pathlib import Path

from aligngpt_hf.hub.checks import (
    check_finite_weights,
    check_generation_config_file,
    check_model_type,
    check_not_partial,
    config_values_checked,
    loading_problems,
)


def load_for_publishing(folder: str | Path):
    """Model (saved dtype) and processor of `folder`, checked against each other; clear errors for what is missing."""
    from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
    from aligngpt_hf.models.processing_aligngpt import AlignGPTProcessor

    folder = Path(folder)
    if folder.is_dir():
        check_not_partial(folder)
    if folder.is_file():
        raise NotADirectoryError(f"the model folder {folder} is a file; pass the folder written by save_pretrained, "
                                 "a training run or convert.")
    if not folder.is_dir():
        raise FileNotFoundError(f"the model folder {folder} does not exist; pass the folder written by "
                                "save_pretrained, a training run or convert.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a folder written by save_pretrained or convert.")
    check_model_type(folder)
    if not any(folder.glob("model*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:8])
        raise FileNotFoundError(f"{folder} has no weights (model.safetensors or its shards; it holds {present}); "
                                "save the model into it first (`model.save_pretrained(FOLDER)`).")
    if not (folder / "processor_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no processor (processor_config.json). Harnesses load the processor and tokenizer from the "
            "repository: save one first, e.g. "
            "`AlignGPTProcessor(image_processor=..., tokenizer=..., image_seq_length=...).save_pretrained(FOLDER)` "
            "(or `aligngpt-hf convert ... --tokenizer SRC`)."
        )
    if (folder / "generation_config.json").is_file():  # transformers would drop a broken one with a warning
        check_generation_config_file(folder / "generation_config.json")
    with config_values_checked(folder / "config.json"):
        model = _load_weights(AlignGPTForConditionalGeneration, folder)
    try:
        processor = AlignGPTProcessor.from_pretrained(folder)
    except (KeyError, ValueError, TypeError, AttributeError, OSError) as error:  # a damaged tokenizer/processor file
        raise ValueError(f"{folder}: its processor cannot be loaded ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]}); re-save it (`processor.save_pretrained(FOLDER)`)."
                         ) from None
    _check_model_matches_processor(model.config, processor)
    return model.eval(), processor


def _load_weights(model_class, folder: Path):
    """`from_pretrained`, with a truncated shard or a refused pickle named (transformers' errors omit the file, and
    torch's advice to retry with `weights_only=False` would run the pickle's code)."""
    import pickle

    from safetensors import SafetensorError

    try:
        model, info = model_class.from_pretrained(folder, dtype="auto", output_loading_info=True,
                                                  ignore_mismatched_sizes=True)
    except pickle.UnpicklingError:
        names = ", ".join(p.name for p in sorted(folder.glob("*.bin")))
        raise ValueError(
            f"{folder}: the pickle weights ({names}) were refused: they hold more than tensors, and unpickling them "
            "could run arbitrary code. Publish safetensors weights only (`model.save_pretrained(FOLDER)` writes them)."
        ) from None
    except (SafetensorError, OSError, RuntimeError) as error:
        broken = [p.name for p in sorted(folder.glob("*.safetensors")) if _safetensors_problem(p)]
        if not broken:
            raise
        raise ValueError(
            f"{folder}: weight file(s) {', '.join(broken)} are truncated or corrupt ({error}); re-download or "
            "re-save them (`model.save_pretrained(FOLDER)`)."
        ) from None
    _check_loaded(folder, model, info)
    return model


def _check_loaded(folder: Path, model, info: dict) -> None:
    """Refuse weights that do not fill the model exactly (transformers would initialise the gaps randomly, or drop
    the extras, and the repository would hold a different model), and weights that are NaN or infinite."""
    problems = loading_problems(info)
    if problems:
        raise ValueError(f"{folder}: the weights do not match its config.json: {'; '.join(problems)}. Publish the "
                         "folder the model was saved to whole (`model.save_pretrained(FOLDER)`).")
    check_finite_weights(model, str(folder), "publish an earlier checkpoint")


def _safetensors_problem(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return False
    except (SafetensorError, OSError):
        return True


def _check_model_matches_processor(config, processor) -> None:
    problems = []
    if processor.image_token_id != config.image_token_id:
        problems.append(
            f"`<image>` is id {processor.image_token_id} in the tokenizer, {config.image_token_id} in config"
        )
    if processor.alignment_token_id != config.alignment_token_id:
        problems.append(
            f"`<align>` is id {processor.alignment_token_id} in the tokenizer, {config.alignment_token_id} in config"
        )
    if processor.image_seq_length != config.image_seq_length:
        problems.append(
            f"processor image_seq_length {processor.image_seq_length} != "
            f"model image_seq_length {config.image_seq_length}"
        )
    if len(processor.tokenizer) > config.text_config.vocab_size:
        problems.append(f"tokenizer has {len(processor.tokenizer)} tokens, the model {config.text_config.vocab_size}")
    if problems:
        raise ValueError("The folder's processor does not fit its model: " + "; ".join(problems) + ".")


__all__ = ["load_for_publishing"]

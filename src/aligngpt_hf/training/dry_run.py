"""`aligngpt-hf pretrain|instruct RECIPE --dry-run`: plan a run on any machine, before renting GPUs.

The recipe and overrides are resolved as a real run resolves them; the full-size model is built on the meta device
(shapes only: no weights are allocated or downloaded), the stage's freezing, LoRA and packing settings are applied,
the data path and its first records are checked, and OUTPUT_DIR/dry_run.json gets the parameter counts and the
estimated GPU memory per device for each distributed strategy (`aligngpt_hf.training.memory`).

Configs are read offline only: a local folder, then the Hugging Face cache (`local_files_only`), then the published
layouts of the shipped recipes' components (the configs in `hub_configs/`). A stage-1 folder that does not exist yet
(the shipped stage-2 recipes start from one) is planned from the shipped recipe that writes it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

import torch
import yaml

from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
from aligngpt_hf.paths import DuplicateKeyError, atomic_write_text, check_writable, unique_keys
from aligngpt_hf.training.configs import AlignGPTScriptArguments
from aligngpt_hf.training.memory import STRATEGIES, TrainingShape, estimate_memory
from aligngpt_hf.training.model_setup import (
    SAVED_DATASET_MARKERS,
    check_fresh_model_options,
    check_part_configs,
    config_overrides,
    is_stage1_artefact,
    lora_config,
    stage1_config,
    tokenizer_with_image_tokens,
)

logger = logging.getLogger(__name__)
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
PREVIEW_RECORDS = 8
# Hub ids of the shipped recipes' components -> (published variant in hub_configs/, which part of it)
PUBLISHED_COMPONENTS = {
    "lmsys/vicuna-7b-v1.5": ("aligngpt-7b", "text_config"),
    "lmsys/vicuna-13b-v1.5": ("aligngpt-13b", "text_config"),
    "openai/clip-vit-large-patch14-336": ("aligngpt-7b", "vision_config"),
    "huggyllama/llama-7b": ("aligngpt-mplug-owl-7b", "text_config"),
    "openai/clip-vit-large-patch14": ("aligngpt-mplug-owl-7b", "vision_config"),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("aligngpt-llama3-8b-instruct-siglip", "text_config"),
    "google/siglip-so400m-patch14-384": ("aligngpt-llama3-8b-instruct-siglip", "vision_config"),
    "google/gemma-7b": ("aligngpt-gemma-7b", "text_config"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("aligngpt-mistral-7b-instruct", "text_config"),
    "microsoft/phi-2": ("aligngpt-phi-2", "text_config"),
}


def _published_variant(name: str) -> AlignGPTConfig:
    from aligngpt_hf.hub.hub_configs import FAMILY_VARIANTS, family_config, mplug_owl_config, released_config

    if name in FAMILY_VARIANTS:
        return family_config(name)
    return mplug_owl_config() if name == "aligngpt-mplug-owl-7b" else released_config(name)


def _published_name(source: str) -> str:
    variant, part = PUBLISHED_COMPONENTS.get(source, ("?", "?"))
    return f"published: hub_configs/{variant} {part}"


def _offline_config(source: str, config_class=None):
    """A config from a local folder or the Hugging Face cache, never the network; None when neither has it."""
    from transformers import AutoConfig

    try:
        return (config_class or AutoConfig).from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return None


def _missing_config_error(what: str, source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dry run: no config for {what} {source!r}: not a local folder, not in the Hugging Face cache, and not one of "
        f"the published components ({', '.join(sorted(PUBLISHED_COMPONENTS))}). The dry run never downloads: fetch "
        f"its config first (`hf download {source} config.json`), or pass a local folder."
    )


def _parts_config(script_args: AlignGPTScriptArguments) -> tuple[AlignGPTConfig, str]:
    """The config `build_from_components` would build, from configs found offline."""
    llm, tower = script_args.language_model, script_args.vision_tower
    text, vision = _offline_config(llm), _offline_config(tower)
    sources = [f"{source} ({'local config' if config is not None else _published_name(source)})"
               for source, config in ((llm, text), (tower, vision))]
    if text is not None and vision is not None:
        check_part_configs(text, vision, llm, tower)
    if text is not None:
        try:
            tokenizer = tokenizer_with_image_tokens(llm, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = _AppendedTokens(text.vocab_size)
    elif llm in PUBLISHED_COMPONENTS:
        variant = _published_variant(PUBLISHED_COMPONENTS[llm][0])
        # the published vocabulary is the LLM's with `<image>`, `<align>` appended at V, V+1, padded
        text, tokenizer = variant.text_config, _AppendedTokens(variant.image_token_id)
    else:
        raise _missing_config_error("language_model", llm)
    if vision is None:
        if tower not in PUBLISHED_COMPONENTS:
            raise _missing_config_error("vision_tower", tower)
        vision = _published_variant(PUBLISHED_COMPONENTS[tower][0]).vision_config
    config = stage1_config(text, vision, tokenizer, num_alignment_levels=script_args.num_alignment_levels,
                           **config_overrides(script_args))
    return config, " + ".join(sources)


class _AppendedTokens:
    """Stands in for a tokenizer that is not available offline: `<image>`/`<align>` appended to the vocabulary, as
    `tokenizer_with_image_tokens` does for an LLM that lacks them."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size + 2

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab_size + ("<image>", "<align>").index(token)


def _pretrain_config(script_args: AlignGPTScriptArguments) -> tuple[AlignGPTConfig, str]:
    check_fresh_model_options(script_args)
    name = script_args.model_name_or_path
    if name == "tiny":
        from aligngpt_hf.tiny import build_config, build_tokenizer

        config = build_config(build_tokenizer(), num_alignment_levels=script_args.num_alignment_levels,
                              **config_overrides(script_args, tiny=True))
        return config, "tiny (random weights)"
    if name is None:
        return _parts_config(script_args)
    config = _offline_config(name, AlignGPTConfig)
    return (config, f"{name}/config.json") if config is not None else _planned_start(name)


def _recipe_writing(folder: str) -> Path | None:
    """The shipped stage-1 recipe whose `output_dir` is `folder` (the run a later stage starts from)."""
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        if not path.stem.startswith("pretrain") and "stage1" not in path.stem:
            continue
        recipe = yaml.safe_load(path.read_text())
        if Path(str(recipe.get("output_dir"))) == Path(folder) and recipe.get("model_name_or_path") != folder:
            return path
    return None


def _planned_start(name: str) -> tuple[AlignGPTConfig, str]:
    """The config of a start folder that does not exist yet, from the shipped recipe that writes it."""
    from trl import TrlParser

    recipe = _recipe_writing(name)
    if recipe is None:
        raise FileNotFoundError(
            f"dry run: the run starts from {name!r} (model_name_or_path), which is not a folder with a config.json, "
            "not in the Hugging Face cache, and not the output_dir of a shipped recipe; the dry run never downloads. "
            "Plan from a folder holding its config instead: a saved model, `hf download ID config.json --local-dir "
            "DIR`, or a published layout, e.g. `--model_name_or_path hub_configs/aligngpt-7b` (stage 2 also "
            "`--allow_untrained_alignment true`).")
    stage1_args = TrlParser((AlignGPTScriptArguments,)).parse_args_and_config(
        args=["--config", str(recipe)], return_remaining_strings=True)[0]
    config, source = _pretrain_config(stage1_args)
    return config, f"{name} does not exist yet: planned as recipe {recipe.stem} writes it ({source})"


def _instruct_config(script_args: AlignGPTScriptArguments, training_args) -> tuple[AlignGPTConfig, str]:
    from aligngpt_hf.training.stage_handoff import check_alignment_trained

    name = script_args.model_name_or_path
    if name is None:
        raise ValueError("Stage 2 starts from a stage-1 output folder: set `model_name_or_path`.")
    if os.path.isdir(name) and is_stage1_artefact(name):
        from aligngpt_hf.conversion.convert import load_stage1_artefact

        if script_args.language_model is None:
            raise ValueError(f"{name} is a converted stage-1 artefact (projector + level table only): pass "
                             "`language_model` (the base LLM, e.g. lmsys/vicuna-7b-v1.5).")
        return load_stage1_artefact(name)[0], f"{name} (converted stage-1 artefact)"
    config = _offline_config(name, AlignGPTConfig)
    if config is None:
        return _planned_start(name)
    check_alignment_trained(config, training_args.allow_untrained_alignment)
    return config, f"{name}/config.json"


def _module_key(name: str) -> str:
    """`model.vision_tower.x.y` -> `model.vision_tower`; the level table and the gate are told apart."""
    parts = name.removeprefix("base_model.model.").split(".")
    if parts[0] != "model":
        return parts[0]
    return ".".join(parts[:3] if parts[1] == "alignment" and parts[2] == "level_embeddings" else parts[:2])


def parameter_counts(model) -> dict:
    """Total, trainable and per-module parameter counts (LoRA adapters counted apart as well)."""
    modules, lora = {}, 0
    for name, param in model.named_parameters():
        entry = modules.setdefault(_module_key(name), {"params": 0, "trainable": 0})
        entry["params"] += param.numel()
        entry["trainable"] += param.numel() if param.requires_grad else 0
        lora += param.numel() if "lora_" in name else 0
    total = sum(entry["params"] for entry in modules.values())
    trainable = sum(entry["trainable"] for entry in modules.values())
    return {"total_params": total, "trainable_params": trainable, "lora_params": lora, "modules": modules}


def build_planned_model(stage: str, script_args: AlignGPTScriptArguments, training_args):
    """(model on the meta device, frozen as the stage's trainer freezes it, LoRA applied; source of its config)."""
    from aligngpt_hf.training import trainers
    from aligngpt_hf.training.packing import check_packed_attention

    config, source = (_pretrain_config(script_args) if stage == "pretrain"
                      else _instruct_config(script_args, training_args))
    peft_config = lora_config(stage, script_args)
    with torch.device("meta"):
        model = AlignGPTForConditionalGeneration(config)
        if stage == "pretrain":
            trainers.freeze_for_pretrain(model, training_args.train_vision_tower, training_args.train_level_table,
                                         training_args.train_projector)
        elif peft_config is None:
            trainers.freeze_for_instruct(model, training_args.train_projector)
        else:
            from peft import get_peft_model

            from aligngpt_hf.training.lora_presets import check_peft_model, prepare_peft_config

            peft_config = prepare_peft_config(peft_config, model, training_args.train_projector)
            model = get_peft_model(model, peft_config)
            check_peft_model(model)
    if training_args.packing or training_args.padding_free:
        check_packed_attention(model)
    return model, source


def _first_records(path: Path, count: int) -> list:
    """The first `count` records of a LLaVA JSON list or JSONL file, without reading the whole file; a file that is
    empty, not UTF-8, not a list or not JSON is named with the place, as `load_llava_json` names it."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            records = _jsonl_head(path, handle, count) if path.suffix == ".jsonl" else _json_head(path, handle, count)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 (byte {error.start}); re-save the file as UTF-8.") from None
    if not records:
        raise ValueError(f"{path} holds no records: there is nothing to train on.")
    return records


def _jsonl_head(path: Path, handle, count: int) -> list:
    records = []
    for number, line in enumerate(handle, start=1):
        if len(records) == count:
            break
        if line.strip():
            try:
                records.append(json.loads(line, object_pairs_hook=unique_keys))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}).") from None
            except DuplicateKeyError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    return records


def _json_head(path: Path, handle, count: int) -> list:
    decoder, text, records = json.JSONDecoder(object_pairs_hook=unique_keys), handle.read(1 << 20), []
    stripped = text.lstrip()
    if not stripped.startswith("["):
        kind = "an empty file" if not stripped else "an object" if stripped.startswith("{") else "no list"
        raise ValueError(f"{path} must hold a JSON list of LLaVA records, got {kind}. A file with one record per "
                         "line must be named *.jsonl.")
    position = len(text) - len(stripped) + 1
    while len(records) < count:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position < len(text) and text[position] == "]":
            break
        try:
            record, position = decoder.raw_decode(text, position)
        except DuplicateKeyError as error:
            raise ValueError(f"{path}: {error}") from None
        except json.JSONDecodeError as error:
            more = handle.read(1 << 20)
            if not more:
                raise ValueError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}).") from None
            text += more
            continue
        records.append(record)
    return records


def check_data(stage: str, script_args: AlignGPTScriptArguments, num_levels: int) -> dict:
    """What can be checked of the training data without loading it all."""
    from aligngpt_hf.training.llava_json import _check_image_files, _check_supervised, _convert_record

    if script_args.data_path is None:
        name = script_args.dataset_name
        if name == "synthetic":
            return {"source": "synthetic", "status": f"{script_args.synthetic_samples} rows made at start"}
        if name is not None and any((Path(name) / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            return {"source": name, "status": "saved datasets folder present (rows not checked)"}
        return {"source": name, "status": "not checked: a Hub dataset is not read offline"}
    path = Path(script_args.data_path)
    if not path.is_file():
        place = "" if path.is_absolute() else f" in the working directory {Path.cwd()}"
        return {"source": str(path), "status": "missing",
                "message": f"{path} does not exist{place}: a real run stops here. Download or point `data_path` at it."}
    folder = Path(script_args.image_folder) if script_args.image_folder is not None else path.parent
    records = _first_records(path, PREVIEW_RECORDS)
    rows = [_convert_record(record, index, folder, path, script_args.allow_outside_image_folder,
                            num_levels if stage == "pretrain" else None) for index, record in enumerate(records)]
    _check_supervised(rows, path)
    _check_image_files(rows, path)
    return {"source": str(path), "status": f"first {len(rows)} records valid, their images present",
            "size_mib": round(path.stat().st_size / 2**20, 1)}


def training_shape(model, counts: dict, batch_size: int, seq_length: int, mixed_precision: bool,
                   activation_checkpointing: bool, num_gpus: int) -> TrainingShape:
    """What the memory estimate needs from a (meta or real) model and its parameter counts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text, vision = base.config.text_config, base.config.vision_config
    layers = base.model.language_model.layers
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    tower_trains = counts["modules"].get("model.vision_tower", {}).get("trainable", 0) > 0
    return TrainingShape(
        total_params=counts["total_params"], trainable_params=counts["trainable_params"],
        decoder_layer_params=layer_params, root_params=counts["total_params"] - layer_params * len(layers),
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        batch_size=batch_size, seq_length=seq_length, mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing, num_gpus=num_gpus,
        vision_layers=vision.num_hidden_layers if tower_trains else 0, vision_hidden_size=vision.hidden_size,
        vision_intermediate_size=vision.intermediate_size,
        vision_tokens=(vision.image_size // vision.patch_size) ** 2 + 1,
    )


def planned_dtype(precision: dict, use_cpu: bool) -> str:
    """The compute dtype a real run on GPUs would use (bf16 unset: on where supported, as the trainer configs do)."""
    if precision.get("fp16"):
        return "float16"
    bf16 = precision.get("bf16")
    return "bfloat16" if bf16 or (bf16 is None and not use_cpu) else "float32"


def plan(stage: str, script_args: AlignGPTScriptArguments, training_args, precision: dict | None = None) -> dict:
    """Everything `dry_run.json` holds (see the module docstring)."""
    start = time.perf_counter()
    precision = precision or {}
    model, source = build_planned_model(stage, script_args, training_args)
    counts = parameter_counts(model)
    num_gpus = script_args.num_gpus or (1 if training_args.use_cpu else 8)
    dtype = planned_dtype(precision, training_args.use_cpu)
    shape = training_shape(model, counts, training_args.per_device_train_batch_size, training_args.max_length,
                           dtype != "float32", bool(training_args.activation_checkpointing), num_gpus)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    data = check_data(stage, script_args, base.config.num_alignment_levels)
    return {
        "stage": stage, "model_source": source, **counts,
        "num_gpus": num_gpus, "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "global_batch_size": training_args.per_device_train_batch_size * num_gpus
        * training_args.gradient_accumulation_steps,
        "seq_length": training_args.max_length, "dtype": dtype, "tf32": bool(precision.get("tf32")),
        "activation_checkpointing": bool(training_args.activation_checkpointing),
        "packing": bool(training_args.packing), "padding_free": bool(training_args.padding_free),
        "use_lora": script_args.use_lora, "image_tokens": base.config.image_seq_length,
        "memory_gib": estimate_memory(shape), "memory_formula": "docs/multi-gpu.md#memory-estimate",
        "data": data, "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def summary(report: dict) -> str:
    """The readable version of `dry_run.json`."""
    lines = [f"aligngpt-hf {report['stage']} dry run: {report['model_source']}",
             f"  parameters: {report['total_params']:,} total, {report['trainable_params']:,} trainable"]
    lines += [f"    {name:<36} {entry['params']:>15,} {entry['trainable']:>15,} trainable"
              for name, entry in report["modules"].items()]
    lines.append(f"  batch {report['per_device_train_batch_size']} per device x {report['num_gpus']} GPU(s) x "
                 f"{report['gradient_accumulation_steps']} accumulation = {report['global_batch_size']}; seq length "
                 f"{report['seq_length']}; {report['dtype']}; activation checkpointing "
                 f"{'on' if report['activation_checkpointing'] else 'off'}; packing "
                 f"{'on' if report['packing'] else 'off'}")
    lines.append("  estimated peak GPU memory per device (GiB; weights + gradients + optimizer + gathered + "
                 "activations):")
    lines += [f"    {strategy:<6} {report['memory_gib'][strategy]['total']:>8.2f}" for strategy in STRATEGIES]
    data = report["data"]
    lines.append(f"  data: {data['source']}: {data['status']}" + (f" ({data['message']})" if "message" in data else ""))
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """Atomic write (a marked temp file in the same folder, removed on failure, then one rename)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def dry_run(stage: str, script_args: AlignGPTScriptArguments, training_args, precision: dict | None = None) -> dict:
    """Plan the run, write OUTPUT_DIR/dry_run.json, print the summary; returns the report. An output folder that
    cannot be written is refused before the planning."""
    check_writable(training_args.output_dir, "output_dir")
    report = plan(stage, script_args, training_args, precision)
    write_json(Path(training_args.output_dir) / "dry_run.json", report)
    print(summary(report))
    print(f"  written: {Path(training_args.output_dir) / 'dry_run.json'}")
    return report


__all__ = ["build_planned_model", "dry_run", "parameter_counts", "plan", "planned_dtype", "training_shape"]

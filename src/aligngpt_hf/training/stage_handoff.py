"""Handing a model from stage 1 to stage 2: the stage marker, `load_for_instruct` and `merge_lora`.

Stage 2 starts from a stage-1 output folder or from a converted stage-1 artefact (`mm_projector_align.bin`: projector
+ level table only) plus a base LLM; the marker in the config refuses to start from an alignment stage 1 never
trained. Kept apart from the trainers so the hand-off can be used (and read) without TRL's trainer machinery.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM

from aligngpt_hf.conversion.convert import load_stage1_artefact
from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
from aligngpt_hf.paths import atomic_path

STAGE_ATTRIBUTE = "aligngpt_stage"  # written into the model config: "pretrain" after stage-1 steps, then "instruct"


def check_alignment_trained(config, allow_untrained: bool = False) -> None:
    """Refuse to start stage 2 from a projector/level table that stage 1 never trained."""
    if allow_untrained or not getattr(config, "uses_alignment_token", True):
        return
    stage = getattr(config, STAGE_ATTRIBUTE, None)
    if stage not in ("pretrain", "instruct"):
        found = "no" if stage is None else f"an unknown ({stage!r}, not 'pretrain' or 'instruct')"
        raise ValueError(
            f"This model's projector and level table were never trained by stage 1 (its config has {found} "
            f"`{STAGE_ATTRIBUTE}` marker). Start stage 2 from a stage-1 output folder (`aligngpt-hf pretrain`, or "
            "`load_for_instruct(stage1_folder)`), or pass `allow_untrained_alignment=True` if the weights are "
            "trained (e.g. a converted checkpoint)."
        )


def merge_lora(model, output_dir=None, processor=None):
    """Fold a stage-2 LoRA adapter (and its saved projector/gate copies) into a plain AlignGPT model; optionally save
    it (with the processor) as a normal checkpoint that loads through the Auto classes. `output_dir` is built in a
    temporary folder and renamed into place, so a failed save leaves the earlier folder (or none), never half of one."""
    merged = model.merge_and_unload()
    merged.__dict__.pop("forward", None)  # drop TRL's fused-head patch from the instance
    if output_dir is not None:
        with atomic_path(output_dir, directory=True) as staging:
            merged.save_pretrained(staging)
            if processor is not None:
                processor.save_pretrained(staging)
    return merged


def load_for_instruct(stage1_folder, base_language_model=None, allow_untrained_alignment: bool = False,
                      vision_tower=None, **kwargs):
    """The stage-2 starting model from a stage-1 output folder, or from a converted stage-1 artefact
    (`aligngpt-hf convert` of `mm_projector_align.bin`: projector + level table only) plus a base LLM.

    `base_language_model` (a causal-LM folder/id or model) replaces the language model (embeddings and LM head
    included); rows it lacks (`<image>`, `<align>`, vocabulary padding) keep the folder's values and every other tensor
    must match exactly. For an artefact it is required, and `vision_tower` defaults to the one its marker names."""
    kwargs.setdefault("dtype", torch.float32)
    if _is_stage1_artefact(stage1_folder):
        return _from_stage1_artefact(stage1_folder, base_language_model, vision_tower, kwargs)
    check_stage1_folder(stage1_folder)
    model = AlignGPTForConditionalGeneration.from_pretrained(stage1_folder, **kwargs)
    check_alignment_trained(model.config, allow_untrained_alignment)
    if base_language_model is not None:
        _copy_language_model(_causal_lm(base_language_model, kwargs), model)
    return model


FROM_STAGE_1 = ("Start stage 2 from the folder `aligngpt-hf pretrain` saved (its output_dir), or from a converted "
                "stage-1 artefact plus the base LLM (--language_model).")


def check_stage1_folder(folder) -> None:
    """A local folder stage 2 starts from must hold an AlignGPT config and readable weights: anything else (a file,
    an empty folder, a plain LLM or LLaVA checkpoint, weights cut short) is named here, not deep in the loader."""
    from aligngpt_hf.training.checkpoints import weight_file_problem

    path = Path(folder)
    if not path.exists():
        return  # a Hub id: the loader resolves it
    if not path.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a stage-1 output folder. {FROM_STAGE_1}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a stage-1 output folder. {FROM_STAGE_1}")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{config_file} is cut short or not a JSON object. {FROM_STAGE_1}") from None
    if model_type != "aligngpt":
        if model_type is None:
            raise ValueError(f"{config_file} names no `model_type`: it is not an AlignGPT stage-1 output. {FROM_STAGE_1}")
        hint = " For a LLaVA checkpoint, run `aligngpt-hf from-llava` first." if model_type == "llava" else ""
        raise ValueError(f"{folder} holds a {model_type!r} model, not an AlignGPT stage-1 output. {FROM_STAGE_1}{hint}")
    weights = sorted({*path.glob("model*.safetensors"), *path.glob("pytorch_model*.bin")})
    if not weights:
        raise FileNotFoundError(f"{folder} holds no model weights (model.safetensors): the stage-1 save did not "
                                f"finish. {FROM_STAGE_1}")
    for weight in weights:
        problem = weight_file_problem(weight)
        if problem:
            raise ValueError(f"{folder}: {problem}; the stage-1 save did not finish. Rerun stage 1, or start from one "
                             "of its complete checkpoints.")


def _is_stage1_artefact(folder) -> bool:
    return (Path(folder) / "aligngpt_stage.json").is_file() and not (Path(folder) / "model.safetensors").is_file()


def _causal_lm(model_or_name, kwargs):
    if isinstance(model_or_name, str):
        return AutoModelForCausalLM.from_pretrained(model_or_name, **kwargs)
    return model_or_name


def _from_stage1_artefact(folder, base_language_model, vision_tower, kwargs):
    """Base LLM + vision tower + the artefact's projector and level table, every artefact tensor matched."""
    marker_file = Path(folder) / "aligngpt_stage.json"
    try:
        marker = json.loads(marker_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{marker_file} is cut short or not JSON; convert the stage-1 artefact again "
                         "(`aligngpt-hf convert`).") from None
    if not isinstance(marker, dict):
        raise ValueError(f"{marker_file} must hold a JSON object; convert the stage-1 artefact again "
                         "(`aligngpt-hf convert`).")
    if base_language_model is None:
        raise ValueError(f"{folder} is a converted stage-1 artefact (projector + level table only): pass "
                         "`base_language_model` (e.g. lmsys/vicuna-7b-v1.5; CLI: --language_model).")
    config, state = load_stage1_artefact(folder)
    model = AlignGPTForConditionalGeneration(config).to(kwargs["dtype"])
    tower = vision_tower or marker.get("vision_tower")
    vision = AutoModel.from_pretrained(tower, config=config.vision_config, dtype=kwargs["dtype"])
    model.model.vision_tower.load_state_dict(vision.state_dict())
    _copy_language_model(_causal_lm(base_language_model, kwargs), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or len(state) != len(marker.get("tensors", state)):
        raise ValueError(f"The stage-1 artefact in {folder} does not fit the model: unexpected {unexpected[:3]}.")
    setattr(model.config, STAGE_ATTRIBUTE, "pretrain")
    return model


def _copy_language_model(source, model) -> None:
    target = model.model.language_model
    state = {k: v for k, v in source.get_decoder().state_dict().items()}
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[embed_key] = _overlay_rows(state[embed_key], target.get_input_embeddings().weight, "embed_tokens")
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"The base language model does not match the stage-1 language model: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}.")
    head = _overlay_rows(source.get_output_embeddings().weight, model.lm_head.weight, "lm_head")
    with torch.no_grad():
        model.lm_head.weight.copy_(head)


def _overlay_rows(source: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    if source.shape[1] != target.shape[1] or source.shape[0] > target.shape[0]:
        raise ValueError(f"Base language model `{name}` has shape {tuple(source.shape)}, the stage-1 model "
                         f"{tuple(target.shape)}: hidden sizes must match and the base vocabulary must not be larger.")
    merged = target.detach().clone()
    merged[: source.shape[0]] = source.to(merged.dtype)
    return merged


__all__ = ["STAGE_ATTRIBUTE", "check_alignment_trained", "load_for_instruct", "merge_lora"]

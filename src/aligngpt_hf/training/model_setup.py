"""Assembling what a training stage starts from: model, processor, training rows and LoRA config.

What `aligngpt-hf pretrain|instruct` (and its dry run) build from the script arguments, kept beside the trainers so
the command line stays a thin shell: stage 1 starts from an AlignGPT folder, the random `tiny` model, or a causal LM
plus a vision encoder (`build_from_components`); stage 2 from a stage-1 output folder or converted artefact.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
from aligngpt_hf.training.configs import AlignGPTScriptArguments

logger = logging.getLogger(__name__)
EMBEDDING_MULTIPLE = 64  # the original stage 1 pads the resized vocabulary to a multiple of 64


def padded_vocab_size(num_tokens: int, multiple: int = EMBEDDING_MULTIPLE) -> int:
    return -(-num_tokens // multiple) * multiple


def config_overrides(script_args: AlignGPTScriptArguments, tiny: bool = False) -> dict:
    """Model-config overrides of a fresh stage-1 model (`model_preset`, `alignment_mode`)."""
    from aligngpt_hf.training.mplug_owl import model_preset

    overrides = model_preset(script_args.model_preset, tiny=tiny)
    if script_args.alignment_mode is not None:
        overrides["alignment_mode"] = script_args.alignment_mode
    if script_args.vision_feature_select_strategy is not None:
        overrides["vision_feature_select_strategy"] = script_args.vision_feature_select_strategy
    return overrides


def check_fresh_model_options(script_args: AlignGPTScriptArguments) -> None:
    """`model_preset`/`alignment_mode` shape a fresh model; a saved folder already has its layout."""
    name = script_args.model_name_or_path
    if name not in (None, "tiny") and (script_args.model_preset or script_args.alignment_mode):
        raise ValueError("`model_preset`/`alignment_mode` shape a fresh stage-1 model (from `language_model` + "
                         f"`vision_tower`, or `tiny`); {name!r} already has its layout.")
    parts = [part for part in ("language_model", "vision_tower") if getattr(script_args, part) is not None]
    if name is not None and parts:
        raise ValueError(f"{' and '.join(f'`{part}`' for part in parts)} build a fresh stage-1 model, but "
                         f"`model_name_or_path` {name!r} is used as it is, so they would be ignored. Set "
                         "`model_name_or_path` or the parts, not both (an empty value unsets one: `--vision_tower \"\"`).")
    if name is None and (script_args.language_model is None or script_args.vision_tower is None):
        raise ValueError("Stage 1 needs `model_name_or_path` (an AlignGPT folder, or `tiny`) or both "
                         "`language_model` and `vision_tower`.")
    check_chat_format(script_args.chat_format, name)


def check_chat_format(chat_format: str | None, saved: str | None = None) -> None:
    """`chat_format` names a known format, and only where a processor is built from parts (`saved` is None): a saved
    folder or the tiny model brings its own processor, whose format would silently win."""
    from aligngpt_hf.models.chat_templates_aligngpt import FORMATS

    if chat_format is None:
        return
    if chat_format not in FORMATS:
        raise ValueError(f"`chat_format` is {chat_format!r}; use one of {', '.join(FORMATS)}, or leave it unset for "
                         "the language model tokenizer's own format.")
    if saved is not None:
        raise ValueError(f"`chat_format` picks the format of a processor built from parts (stage 1 from "
                         f"`language_model` + `vision_tower`, stage 2 from a converted stage-1 artefact); {saved!r} "
                         "brings its own processor and format: leave `chat_format` unset.")


def build_stage_model(stage: str, script_args: AlignGPTScriptArguments, training_args):
    """(model, processor) to start `stage` from, as the script arguments say."""
    from transformers import AutoProcessor

    from aligngpt_hf.paths import check_local_or_hub

    name = script_args.model_name_or_path
    if name not in (None, "tiny"):
        check_local_or_hub(name, "model_name_or_path")  # a missing local folder is named as one, not as a Hub id
    for part in ("language_model", "vision_tower"):
        if getattr(script_args, part) is not None:
            check_local_or_hub(getattr(script_args, part), part)
    if stage == "instruct":
        return _instruct_start(script_args, training_args)
    check_fresh_model_options(script_args)
    if name == "tiny":
        from aligngpt_hf.tiny import build_model, build_processor, build_tokenizer

        tokenizer = build_tokenizer()
        torch.manual_seed(training_args.seed)
        model = build_model(tokenizer, num_alignment_levels=script_args.num_alignment_levels,
                            **config_overrides(script_args, tiny=True))
        return with_stop_tokens(model, build_processor(tokenizer, image_seq_length=model.config.image_seq_length,
                                                       add_alignment_token=model.config.uses_alignment_token))
    if name is not None:
        model = AlignGPTForConditionalGeneration.from_pretrained(name, dtype=torch.float32)
        return model, AutoProcessor.from_pretrained(name, trust_remote_code=training_args.trust_remote_code)
    return build_from_components(script_args.language_model, script_args.vision_tower,
                                 num_alignment_levels=script_args.num_alignment_levels,
                                 image_aspect_ratio=script_args.image_aspect_ratio or "pad",
                                 chat_format=script_args.chat_format, **config_overrides(script_args))


def _instruct_start(script_args: AlignGPTScriptArguments, training_args):
    from transformers import AutoProcessor

    from aligngpt_hf.training.stage_handoff import load_for_instruct

    name = script_args.model_name_or_path
    if name is None:
        raise ValueError("Stage 2 starts from a stage-1 output folder: set `model_name_or_path`.")
    check_chat_format(script_args.chat_format, None if is_stage1_artefact(name) else name)
    model = load_for_instruct(name, base_language_model=script_args.language_model,
                              allow_untrained_alignment=training_args.allow_untrained_alignment,
                              vision_tower=script_args.vision_tower)
    if is_stage1_artefact(name):
        # converted stage-1 artefact: tokenizer from the base LLM, image settings from the artefact
        return with_stop_tokens(model, processor_from_parts(script_args.language_model, name, model.config,
                                                            chat_format=script_args.chat_format))
    return model, AutoProcessor.from_pretrained(name, trust_remote_code=training_args.trust_remote_code)


def is_stage1_artefact(folder) -> bool:
    """A converted stage-1 artefact: projector + level table only, no model weights."""
    return (Path(folder) / "aligngpt_stage.json").is_file() and not (Path(folder) / "model.safetensors").is_file()


def check_part_configs(text_config, vision_config, language_model: str, vision_tower: str) -> None:
    """The causal LM and the vision encoder of a fresh stage-1 model, each of its kind: swapped or wrong parts fail
    later with a message about tokenizers or missing attributes that names neither."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    def is_vision(config) -> bool:
        return hasattr(config, "image_size") or hasattr(getattr(config, "vision_config", None), "image_size")

    kinds = {"language_model": (language_model, text_config), "vision_tower": (vision_tower, vision_config)}
    for part, (name, config) in kinds.items():
        ok = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING if part == "language_model" else is_vision(config)
        if not ok:
            want = "a causal language model" if part == "language_model" else "a vision encoder (CLIP, SigLIP)"
            swapped = (" Are `language_model` and `vision_tower` swapped?"
                       if is_vision(text_config) and type(vision_config) in MODEL_FOR_CAUSAL_LM_MAPPING else "")
            raise ValueError(f"`{part}` {name} holds a {getattr(config, 'model_type', type(config).__name__)!r} "
                             f"model, not {want}.{swapped}")


def stage1_config(text_config, vision_config, tokenizer, num_alignment_levels: int = 8,
                  **config_overrides) -> AlignGPTConfig:
    """The config of a fresh stage-1 model: the LLM's config with its vocabulary resized to hold `tokenizer` (padded
    to a multiple of 64), the vision encoder's config, and `<image>`/`<align>` ids from the tokenizer."""
    text_config = copy.deepcopy(text_config)
    text_config.vocab_size = padded_vocab_size(len(tokenizer))
    return AlignGPTConfig(
        vision_config=vision_config, text_config=text_config, num_alignment_levels=num_alignment_levels,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        alignment_token_id=tokenizer.convert_tokens_to_ids("<align>"), **config_overrides,
    )


def build_from_components(language_model: str, vision_tower: str, num_alignment_levels: int = 8,
                          image_aspect_ratio: str = "pad", chat_format: str | None = None, **config_overrides):
    """A fresh AlignGPT (model, processor) from a causal LM and a vision encoder, as the original stage 1 starts:
    `<image>`/`<align>` added to the tokenizer, embeddings resized to a multiple of 64, pretrained LLM and vision
    weights copied in, projector/level table/gate freshly initialised."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    check_part_configs(AutoConfig.from_pretrained(language_model), AutoConfig.from_pretrained(vision_tower),
                       language_model, vision_tower)
    tokenizer = tokenizer_with_image_tokens(language_model)
    llm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
    config = stage1_config(llm.config, AutoConfig.from_pretrained(vision_tower), tokenizer,
                           num_alignment_levels=num_alignment_levels, **config_overrides)
    model = AlignGPTForConditionalGeneration(config)
    vision = AutoModel.from_pretrained(vision_tower, config=config.vision_config, dtype=torch.float32)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    with torch.no_grad():
        model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())  # with Phi's head bias
    return with_stop_tokens(model, processor_from_parts(tokenizer, vision_tower, config, image_aspect_ratio,
                                                        chat_format))


def with_stop_tokens(model, processor):
    """(model, processor), generation stopping at the chat format's turn end (`<|eot_id|>`, `<|im_end|>`,
    `<end_of_turn>`, `<|end|>`) as well as at EOS: an instruct model ends its answers with the turn end."""
    from aligngpt_hf.models.chat_templates_aligngpt import stop_token_ids

    generation = model.generation_config
    generation.eos_token_id = stop_token_ids(processor.tokenizer, processor.chat_template, generation.eos_token_id)
    return model, processor


def tokenizer_with_image_tokens(language_model, **hub_kwargs):
    """The LLM's tokenizer with `<image>`/`<align>` appended (ids V, V+1 as in conversion) and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(language_model, **hub_kwargs)
    missing = [token for token in ("<image>", "<align>") if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # LLaVA: pad = unk
    return tokenizer


def processor_from_parts(tokenizer, image_processor_source: str, config, image_aspect_ratio: str | None = "pad",
                         chat_format: str | None = None):
    """AlignGPTProcessor from a tokenizer (or LLM id) and a CLIP-style image processor folder; ids must match. The
    chat template is `chat_format`'s, else the tokenizer's own format (Llama-3, ChatML, Gemma, Mistral, Phi-3;
    vicuna_v1 without one)."""
    from transformers import AutoImageProcessor, LlavaImageProcessorPil

    from aligngpt_hf.models.chat_templates_aligngpt import chat_template
    from aligngpt_hf.models.processing_aligngpt import AlignGPTProcessor

    check_chat_format(chat_format)
    if isinstance(tokenizer, str):
        tokenizer = tokenizer_with_image_tokens(tokenizer)
    ids = (tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<align>"))
    if ids != (config.image_token_id, config.alignment_token_id):
        raise ValueError(f"The tokenizer gives `<image>`/`<align>` ids {ids}, the model expects "
                         f"{(config.image_token_id, config.alignment_token_id)}; use the LLM the model was built from.")
    source = AutoImageProcessor.from_pretrained(image_processor_source)
    keys = ("size", "crop_size", "image_mean", "image_std", "do_center_crop", "do_resize", "do_normalize", "do_rescale",
            "rescale_factor", "resample")
    settings = {k: getattr(source, k) for k in keys if getattr(source, k, None) is not None}
    pad = getattr(source, "do_pad", False) if image_aspect_ratio is None else image_aspect_ratio == "pad"
    image_processor = LlavaImageProcessorPil(**settings, do_pad=pad)
    return AlignGPTProcessor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_length=config.image_seq_length, add_alignment_token=config.uses_alignment_token,
                             chat_template=chat_template(chat_format) if chat_format else None)


def lora_config(stage: str, script_args: AlignGPTScriptArguments):
    """The run's LoRA config (None without `use_lora`); `modules_to_save` is left to the trainer (gate, and projector
    per `train_projector`)."""
    if not script_args.use_lora:
        return None
    if stage == "pretrain":
        raise ValueError("`use_lora` is a stage-2 option; stage 1 trains the projector and level table in full.")
    from aligngpt_hf.training.mplug_owl import MPLUG_OWL_LORA_TARGETS
    from aligngpt_hf.training.trainers import aligngpt_lora_config

    targets = script_args.lora_target_modules
    if targets not in (None, "mplug-owl"):
        import re

        try:
            re.compile(targets)
        except re.error as error:
            raise ValueError(f"`lora_target_modules` {targets!r} is not a valid regular expression ({error}); it "
                             "names the language-model modules to adapt, e.g. '.*language_model.*\\.(q_proj|v_proj)'."
                             ) from None
    extra = {} if targets is None else {"target_modules": MPLUG_OWL_LORA_TARGETS if targets == "mplug-owl" else targets}
    return aligngpt_lora_config(script_args.lora_r, script_args.lora_alpha, script_args.lora_dropout,
                                modules_to_save=[], **extra)


def load_training_data(stage: str, script_args: AlignGPTScriptArguments, num_alignment_levels: int | None = None):
    """The training rows: LLaVA JSON, a datasets id/folder, or the synthetic smoke set. With the model's
    `num_alignment_levels`, a LLaVA JSON level outside 0..N-1 is refused at load, naming its record."""
    from aligngpt_hf.training.data import load_llava_json, synthetic_dataset

    if script_args.data_path is not None:
        if script_args.dataset_name is not None:
            logger.warning("Training on data_path %s; dataset_name %r is not used.",
                                                script_args.data_path, script_args.dataset_name)
        return load_llava_json(script_args.data_path, script_args.image_folder,
                               allow_outside_image_folder=script_args.allow_outside_image_folder,
                               num_alignment_levels=num_alignment_levels)
    name = script_args.dataset_name
    if name == "synthetic":
        return synthetic_dataset(script_args.synthetic_samples, stage, text_only_every=4 if stage == "instruct" else 0)
    if name is None:
        raise ValueError("Set `data_path` (LLaVA JSON) or `dataset_name` (datasets id/folder, or `synthetic`).")
    import datasets

    if os.path.isdir(name) and any((Path(name) / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return load_saved_dataset(name, script_args.dataset_split, script_args.dataset_config)
    return datasets.load_dataset(name, script_args.dataset_config, split=script_args.dataset_split)


# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def load_saved_dataset(folder: str, split: str, config: str | None = None):
    """A `save_to_disk` folder: a Dataset, or one split of a DatasetDict. Read with `load_from_disk` (not
    `load_dataset`, which would rebuild it through the Hub cache), a split or config that does not apply is named."""
    import datasets

    if config is not None:
        raise ValueError(f"`dataset_config` {config!r} names a config of a Hub dataset, but {folder} is a folder saved "
                         "with `save_to_disk`, which has none; drop `dataset_config`.")
    try:
        dataset = datasets.load_from_disk(folder)
    except IndexError:  # datasets cannot open a saved dataset without rows
        raise ValueError(f"{folder} is a saved dataset without rows: there is nothing to train on.") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{folder} holds the splits {list(dataset)}, not {split!r}; set `dataset_split` "
                             "(CLI: --dataset_split) to one of them.")
        dataset = dataset[split]
    elif split != "train":
        raise ValueError(f"`dataset_split` is {split!r}, but {folder} holds one dataset without splits; drop "
                         "`dataset_split` (it defaults to train).")
    if len(dataset) == 0:
        raise ValueError(f"{folder} is a saved dataset without rows: there is nothing to train on.")
    return dataset


__all__ = [
    "build_from_components",
    "build_stage_model",
    "check_chat_format",
    "load_training_data",
    "lora_config",
    "processor_from_parts",
    "stage1_config",
    "with_stop_tokens",
    "tokenizer_with_image_tokens",
]

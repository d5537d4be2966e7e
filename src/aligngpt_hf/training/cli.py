"""`aligngpt-hf pretrain|instruct RECIPE.yaml [--field value ...]`: TrlParser-style YAML recipes plus overrides.

A thin shell over the library: the recipe fills `AlignGPTScriptArguments` (model and data) and the stage's
`AlignGPTPretrainConfig`/`AlignGPTInstructConfig`; command-line `--field value` pairs override it. RECIPE may be a path
or the name of a shipped recipe (`pretrain_7b`, `instruct_13b`, `pretrain_tiny`, `mplug-owl-stage1`, ...; `-` and `_`
are interchangeable in names). Multi-GPU: run the same command
under `accelerate launch --config_file <shipped config> -m aligngpt_hf.cli ...` (see docs/training.md#paper-runs-on-8-gpus).

Heavy imports (TRL, datasets) happen inside the functions, so `aligngpt-hf --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
ACCELERATE_CONFIGS_DIR = PACKAGE_DIR / "accelerate_configs"
logger = logging.getLogger(__name__)


@dataclass
class AlignGPTScriptArguments:
    """Model and data of a training run (everything else is the stage's trainer config)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Stage 1: an AlignGPT folder/Hub id to start from, or `tiny` (random tiny model). Stage 2: "
                  "the stage-1 output folder."},
    )
    language_model: str | None = field(
        default=None,
        metadata={"help": "Stage 1 from parts: the causal LM (e.g. lmsys/vicuna-7b-v1.5). Stage 2: optional base LLM "
                  "whose weights replace the stage-1 copy of the language model."},
    )
    vision_tower: str | None = field(
        default=None, metadata={"help": "Stage 1 from parts: the vision encoder (e.g. openai/clip-vit-large-patch14-336)."}
    )
    num_alignment_levels: int = field(default=8, metadata={"help": "Stage 1 from parts: rows of the level table (N)."})
    model_preset: str | None = field(
        default=None,
        metadata={"help": "Stage 1 from parts or `tiny`: a named model layout; `mplug-owl` = last-layer CLIP features "
                  "with CLS and post-LN + the visual abstractor (65 tokens per image). None: AlignGPT's MLP projector."},
    )
    vision_feature_select_strategy: str | None = field(
        default=None,
        metadata={"help": "Stage 1 from parts: `default` drops the tower's CLS token (CLIP), `full` keeps every token "
                  "(SigLIP has no CLS: all 729 tokens of so400m-384). None: the config default (`default`)."},
    )
    alignment_mode: str | None = field(
        default=None,
        metadata={"help": "Stage 1 from parts or `tiny`: `adaptive` (AlignGPT, default) ... or `none` (no level "
                  "table/gate: pure LLaVA/mPLUG-Owl; pair with `train_level_table: false`)."},
    )
    image_aspect_ratio: str | None = field(
        default=None,
        metadata={"help": "`pad` (expand to a square of the mean colour; paper stage 2) or `square` (resize + crop; "
                  "paper stage 1); None keeps the processor's setting."},
    )
    data_path: str | None = field(default=None, metadata={"help": "LLaVA-format JSON/JSONL file."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the JSON's image paths are relative to."})
    allow_outside_image_folder: bool = field(
        default=False, metadata={"help": "Read `image` paths that resolve outside --image_folder (refused by default)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A datasets Hub id or saved folder in TRL's `messages` + `images` format, or `synthetic` "
                  "(coloured squares, for smoke runs)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name for `dataset_name`."})
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset_name`."})
    synthetic_samples: int = field(default=32, metadata={"help": "Rows of the `synthetic` dataset."})
    use_lora: bool = field(default=False, metadata={"help": "Stage 2: LoRA on the language model (projector and gate "
                                                           "trained in full and saved with the adapter)."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (LLaVA's LoRA recipe: 128)."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (LLaVA's LoRA recipe: 256)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "LoRA target regex; `mplug-owl` = the LLM's q_proj/v_proj only. None: every linear layer of "
                  "the LLM (LLaVA). Adapters in the vision tower or projector are refused either way."},
    )
    merge_lora: bool = field(default=True, metadata={"help": "After LoRA training, also write a merged normal "
                                                            "checkpoint to OUTPUT_DIR/merged."})


def resolve_recipe(name: str) -> Path:
    """A recipe path, or the name of a shipped recipe (with or without `.yaml`; `-` and `_` interchangeable)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = name.removesuffix(".yaml")
    for candidate in (stem, stem.replace("_", "-"), stem.replace("-", "_")):
        shipped = RECIPES_DIR / f"{candidate}.yaml"
        if shipped.is_file():
            return shipped
    available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"No recipe {name!r}: not a file, nor a shipped recipe ({available}).")


def accelerate_config_path(name: str) -> Path:
    """Path of a shipped accelerate config: ddp, zero2, zero3 or fsdp."""
    path = ACCELERATE_CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"No accelerate config {name!r}; shipped: {available}.")
    return path


def parse_recipe(stage: str, recipe: str, overrides: list[str] | None = None):
    """(script arguments, trainer config) from a recipe plus `--field value` overrides."""
    from trl import TrlParser

    from aligngpt_hf.training.trainers import AlignGPTInstructConfig, AlignGPTPretrainConfig

    config_class = AlignGPTPretrainConfig if stage == "pretrain" else AlignGPTInstructConfig
    parser = TrlParser((AlignGPTScriptArguments, config_class))
    return parser.parse_args_and_config(args=["--config", str(resolve_recipe(recipe)), *(overrides or [])])


def run_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    script_args, training_args = parse_recipe(args._command, args.recipe, args.overrides)
    if train(args._command, script_args, training_args).args.should_save:  # the run's last line: where the model is
        print(f"aligngpt-hf {args._command}: model saved to {os.path.abspath(training_args.output_dir)}", flush=True)
    return 0


def train(stage: str, script_args: AlignGPTScriptArguments, training_args):
    """Build the model, processor and data of `stage`, train, save (and merge a LoRA adapter); returns the trainer."""
    from aligngpt_hf.training.stage_handoff import merge_lora
    from aligngpt_hf.training.trainers import AlignGPTInstructTrainer, AlignGPTPretrainTrainer, aligngpt_lora_config

    model, processor = build_stage_model(stage, script_args, training_args)
    if script_args.image_aspect_ratio is not None:
        processor.image_processor.do_pad = script_args.image_aspect_ratio == "pad"
    dataset = load_training_data(stage, script_args)
    peft_config = None
    if script_args.use_lora:
        if stage == "pretrain":
            raise ValueError("`use_lora` is a stage-2 option; stage 1 trains the projector and level table in full.")
        peft_config = _lora_config(script_args, aligngpt_lora_config)
    trainer_class = AlignGPTPretrainTrainer if stage == "pretrain" else AlignGPTInstructTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=dataset, processing_class=processor,
                            peft_config=peft_config)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if peft_config is not None and script_args.merge_lora and trainer.args.should_save:
        merge_lora(trainer.model, os.path.join(training_args.output_dir, "merged"), processor)
    return trainer


def _lora_config(script_args: AlignGPTScriptArguments, make_config):
    """The CLI's LoRA config; `modules_to_save` is left to the trainer (gate, and projector per `train_projector`)."""
    from aligngpt_hf.training.mplug_owl import MPLUG_OWL_LORA_TARGETS

    targets = script_args.lora_target_modules
    extra = {} if targets is None else {"target_modules": MPLUG_OWL_LORA_TARGETS if targets == "mplug-owl" else targets}
    return make_config(script_args.lora_r, script_args.lora_alpha, script_args.lora_dropout, modules_to_save=[],
                       **extra)


def _config_overrides(script_args: AlignGPTScriptArguments, tiny: bool = False) -> dict:
    """Model-config overrides of a fresh stage-1 model (`model_preset`, `alignment_mode`)."""
    from aligngpt_hf.training.mplug_owl import model_preset

    overrides = model_preset(script_args.model_preset, tiny=tiny)
    if script_args.alignment_mode is not None:
        overrides["alignment_mode"] = script_args.alignment_mode
    if script_args.vision_feature_select_strategy is not None:
        overrides["vision_feature_select_strategy"] = script_args.vision_feature_select_strategy
    return overrides


def build_stage_model(stage: str, script_args: AlignGPTScriptArguments, training_args):
    """(model, processor) to start `stage` from, as the script arguments say."""
    import torch
    from transformers import AutoProcessor

    name = script_args.model_name_or_path
    if name not in (None, "tiny"):
        from aligngpt_hf.paths import check_local_or_hub

        check_local_or_hub(name, "model_name_or_path")  # a missing local folder is named as one, not as a Hub id
    if stage == "instruct":
        from aligngpt_hf.training.stage_handoff import load_for_instruct

        if name is None:
            raise ValueError("Stage 2 starts from a stage-1 output folder: set `model_name_or_path`.")
        model = load_for_instruct(name, base_language_model=script_args.language_model,
                                  allow_untrained_alignment=training_args.allow_untrained_alignment,
                                  vision_tower=script_args.vision_tower)
        if (Path(name) / "aligngpt_stage.json").is_file() and not (Path(name) / "model.safetensors").is_file():
            # converted stage-1 artefact: tokenizer from the base LLM, image settings from the artefact
            processor = processor_from_parts(script_args.language_model, name, model.config)
            return model, processor
        return model, AutoProcessor.from_pretrained(name, trust_remote_code=training_args.trust_remote_code)
    if name == "tiny":
        from aligngpt_hf.tiny import build_model, build_processor, build_tokenizer

        tokenizer = build_tokenizer()
        torch.manual_seed(training_args.seed)
        model = build_model(tokenizer, num_alignment_levels=script_args.num_alignment_levels,
                            **_config_overrides(script_args, tiny=True))
        return model, build_processor(tokenizer, image_seq_length=model.config.image_seq_length,
                                      add_alignment_token=model.config.uses_alignment_token)
    if name is not None and (script_args.model_preset or script_args.alignment_mode):
        raise ValueError("`model_preset`/`alignment_mode` shape a fresh stage-1 model (from `language_model` + "
                         f"`vision_tower`, or `tiny`); {name!r} already has its layout.")
    if name is not None:
        from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration

        model = AlignGPTForConditionalGeneration.from_pretrained(name, dtype=torch.float32)
        return model, AutoProcessor.from_pretrained(name, trust_remote_code=training_args.trust_remote_code)
    if script_args.language_model is None or script_args.vision_tower is None:
        raise ValueError("Stage 1 needs `model_name_or_path` (an AlignGPT folder, or `tiny`) or both "
                         "`language_model` and `vision_tower`.")
    return build_from_components(script_args.language_model, script_args.vision_tower,
                                 num_alignment_levels=script_args.num_alignment_levels,
                                 image_aspect_ratio=script_args.image_aspect_ratio or "pad",
                                 **_config_overrides(script_args))


def build_from_components(language_model: str, vision_tower: str, num_alignment_levels: int = 8,
                          image_aspect_ratio: str = "pad", **config_overrides):
    """A fresh AlignGPT (model, processor) from a causal LM and a vision encoder, as the original stage 1 starts:
    `<image>`/`<align>` added to the tokenizer, embeddings resized to a multiple of 64, pretrained LLM and vision
    weights copied in, projector/level table/gate freshly initialised."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
    )

    from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
    from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration

    tokenizer = tokenizer_with_image_tokens(language_model)
    llm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    config = AlignGPTConfig(
        vision_config=AutoConfig.from_pretrained(vision_tower), text_config=llm.config,
        num_alignment_levels=num_alignment_levels, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        alignment_token_id=tokenizer.convert_tokens_to_ids("<align>"), **config_overrides,
    )
    model = AlignGPTForConditionalGeneration(config)
    vision = AutoModel.from_pretrained(vision_tower, config=config.vision_config, dtype=torch.float32)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    with torch.no_grad():
        model.lm_head.weight.copy_(llm.get_output_embeddings().weight)
    return model, processor_from_parts(tokenizer, vision_tower, config, image_aspect_ratio)


def tokenizer_with_image_tokens(language_model):
    """The LLM's tokenizer with `<image>`/`<align>` appended (ids V, V+1 as in conversion) and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(language_model)
    missing = [token for token in ("<image>", "<align>") if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # LLaVA: pad = unk
    return tokenizer


def processor_from_parts(tokenizer, image_processor_source: str, config, image_aspect_ratio: str | None = "pad"):
    """AlignGPTProcessor from a tokenizer (or LLM id) and a CLIP-style image processor folder; ids must match."""
    from transformers import AutoImageProcessor, LlavaImageProcessorPil

    from aligngpt_hf.models.processing_aligngpt import AlignGPTProcessor

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
                             image_seq_length=config.image_seq_length,
                             add_alignment_token=config.uses_alignment_token)


def load_training_data(stage: str, script_args: AlignGPTScriptArguments):
    """The training rows: LLaVA JSON, a datasets id/folder, or the synthetic smoke set."""
    from aligngpt_hf.training.data import load_llava_json, synthetic_dataset

    if script_args.data_path is not None:
        return load_llava_json(script_args.data_path, script_args.image_folder,
                               allow_outside_image_folder=script_args.allow_outside_image_folder)
    name = script_args.dataset_name
    if name == "synthetic":
        return synthetic_dataset(script_args.synthetic_samples, stage, text_only_every=4 if stage == "instruct" else 0)
    if name is None:
        raise ValueError("Set `data_path` (LLaVA JSON) or `dataset_name` (datasets id/folder, or `synthetic`).")
    import datasets

    if os.path.isdir(name) and (Path(name) / "dataset_info.json").is_file():
        return datasets.load_from_disk(name)
    return datasets.load_dataset(name, script_args.dataset_config, split=script_args.dataset_split)


def main(argv: list[str] | None = None) -> int:
    """`python -m aligngpt_hf.training.cli --accelerate-config zero2` prints a shipped accelerate config's path."""
    parser = argparse.ArgumentParser(prog="python -m aligngpt_hf.training.cli")
    parser.add_argument("--accelerate-config", required=True, help="ddp | zero2 | zero3 | fsdp")
    args = parser.parse_args(argv)
    print(accelerate_config_path(args.accelerate_config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

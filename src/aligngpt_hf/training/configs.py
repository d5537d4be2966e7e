"""The trainer configs of both stages (TRL's `SFTConfig` plus AlignGPT's fields, with the paper's defaults) and the
script arguments of a run (model and data), which a recipe fills together.

Kept apart from the trainers (as TRL keeps `sft_config.py` apart from `sft_trainer.py`) so a recipe can be validated
and `aligngpt-hf pretrain --help` can list the fields without building a trainer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from aligngpt_hf.training import packing as packing_support
from aligngpt_hf.training.data import LEVEL_COLUMN
from aligngpt_hf.training.sampler import EXHAUSTION_MODES

MODALITY_BATCHING = ("mixed", "separate")
IMAGE_ASPECT_RATIOS = (None, "pad", "square")
MODALITY_GROUPING_HELP = "LLaVA's sampler: batches of one modality (image or text-only), grouped by length."


def _number_problem(value, positive: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "must be a finite number"
    if positive and value <= 0:
        return "must be > 0"
    if value < 0:
        return "must be >= 0"
    return None


def check_training_numbers(config) -> None:
    """Refuse settings that would train nothing, diverge or crash deep inside the Trainer: a negative, NaN or infinite
    learning rate trains silently on garbage, `num_train_epochs <= 0` saves an untrained model, zero accumulation
    steps divide by zero."""
    checks = [("learning_rate", config.learning_rate, True), ("weight_decay", config.weight_decay, False),
              ("warmup_steps", config.warmup_steps, False)]
    optional = [("projector_lr", config.projector_lr, True), ("max_grad_norm", config.max_grad_norm, False),
                ("vision_lr_multiplier", getattr(config, "vision_lr_multiplier", None), True)]
    checks += [check for check in optional if check[1] is not None]
    if config.max_steps is None or config.max_steps <= 0:  # the epochs decide the run's length
        checks.append(("num_train_epochs", config.num_train_epochs, True))
    for name, value, positive in checks:
        problem = _number_problem(value, positive)
        if problem:
            raise ValueError(f"`{name}` is {value!r}; it {problem}.")
    for name in ("gradient_accumulation_steps", "per_device_train_batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` is {value!r}; it must be an integer >= 1.")
    if config.max_length is not None and (isinstance(config.max_length, bool) or config.max_length < 1):
        raise ValueError(f"`max_length` is {config.max_length!r}; it must be >= 1 (tokens per sample, image tokens "
                         "included), or None for no limit.")
    if str(getattr(config.save_strategy, "value", config.save_strategy)) == "steps" and not config.save_steps > 0:
        raise ValueError(f"`save_steps` is {config.save_steps!r} with save_strategy='steps'; it must be > 0.")


def _bf16_default(config) -> bool:
    """bf16 where the hardware has it (TRL's unconditional default breaks CPU runs)."""
    if config.fp16 or config.use_cpu or not torch.cuda.is_available():
        return False
    return torch.cuda.is_bf16_supported()


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
    chat_format: str | None = field(
        default=None,
        metadata={"help": "Stage 1 from parts: the processor's chat format, one of vicuna_v1, llama3, chatml, gemma, "
                  "mistral, phi3 (stage 2 keeps it). None: the language model tokenizer's own (vicuna_v1 without one)."},
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
    dry_run: bool = field(
        default=False,
        metadata={"help": "Plan the run instead of training: build the full-size model on the meta device (no "
                  "weights, nothing downloaded), apply the stage's freezing, LoRA and packing, check the data, write "
                  "OUTPUT_DIR/dry_run.json (parameters, memory per strategy) and print a summary."},
    )
    num_gpus: int | None = field(
        default=None,
        metadata={"help": "GPUs the run is planned for (the dry run's memory estimate; a real run takes the process "
                  "count from its launcher). None: 1 with `use_cpu`, else 8 as in the paper's runs."},
    )

    def __post_init__(self):
        for name in ("model_name_or_path", "language_model", "vision_tower", "data_path", "image_folder",
                     "dataset_name", "dataset_config", "lora_target_modules", "chat_format", "model_preset"):
            if getattr(self, name) == "":  # the one way a command line can unset a field its recipe sets
                setattr(self, name, None)
        for name in ("model_name_or_path", "language_model", "vision_tower", "data_path", "image_folder",
                     "dataset_name"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):  # as transformers expands `output_dir`
                setattr(self, name, os.path.expanduser(value))
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"`image_aspect_ratio` is {self.image_aspect_ratio!r}; use `pad` or `square`, or leave it "
                             "unset to keep the processor's setting.")
        if self.num_gpus is not None and (isinstance(self.num_gpus, bool) or self.num_gpus < 1):
            raise ValueError(f"`num_gpus` is {self.num_gpus!r}; it must be an integer >= 1, or unset.")
        if self.synthetic_samples < 1:
            raise ValueError(f"`synthetic_samples` is {self.synthetic_samples!r}; it must be >= 1.")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"`lora_r` is {self.lora_r!r}; the LoRA rank must be an integer >= 1.")
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):  # False for NaN too
            raise ValueError(f"`lora_dropout` is {self.lora_dropout!r}; it must be a probability in [0, 1) (NaN "
                             "would zero or garble every adapter activation).")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"`lora_alpha` is {self.lora_alpha!r}; it must be > 0 (LoRA scales its update by "
                             "lora_alpha / lora_r: 0 trains nothing, a negative value flips it).")


@dataclass
class _AlignGPTTrainingConfig(SFTConfig):
    projector_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the multimodal projector (LLaVA's `mm_projector_lr`); None = `learning_rate`."},
    )
    group_by_modality_length: bool = field(
        default=False,
        metadata={"help": MODALITY_GROUPING_HELP},
    )
    skip_overlong_samples: bool = field(
        default=False,
        metadata={
            "help": "Drop (and count) samples longer than `max_length` before training instead of raising. Image "
            "tokens are never truncated. Costs one tokenisation pass over the dataset at start-up."
        },
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warm-up steps; a value < 1 is a ratio (paper: 0.03)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (paper: 1)."})
    max_length: int | None = field(
        default=2048,
        metadata={"help": "Longest sample in tokens, image tokens and `<align>` included; longer samples raise."},
    )
    # transformers >= 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the old name,
    # which TRL still sets to True by default: both default to None here and `__post_init__` applies TRL's default
    # (on) under the new name only when neither is given, so no run warns and an explicit old name still counts.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (honoured, with a warning)."}
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (None: on, TRL's default); off "
                  "is faster for small models."},
    )

    packing: bool = packing_support.packing_field()
    padding_free: bool = packing_support.padding_free_field()

    def __post_init__(self):
        check_training_numbers(self)
        if self.bf16 is None:
            self.bf16 = _bf16_default(self)
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()
        packing_support.check_packing_args(self)


@dataclass
class AlignGPTPretrainConfig(_AlignGPTTrainingConfig):
    """Stage-1 settings (paper defaults: lr 1e-3, cosine, warm-up 0.03, 1 epoch, max length 2048).

    Example:

    ```python
    >>> from aligngpt_hf import AlignGPTPretrainConfig
    >>> args = AlignGPTPretrainConfig(output_dir="out/stage1", per_device_train_batch_size=2, max_steps=3)
    >>> args.learning_rate, args.lr_scheduler_type.value
    (0.001, 'cosine')
    ```
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate (paper stage 1: 1e-3)."})
    train_vision_tower: bool = field(
        default=False,
        metadata={"help": "Also train the vision tower (mPLUG-Owl recipe); AlignGPT keeps it frozen."},
    )
    vision_lr_multiplier: float | None = field(
        default=None,
        metadata={"help": "With `train_vision_tower`: vision-tower learning rate = `learning_rate` x this (mPLUG-Owl "
                  "v1 gives no value; its released code hints 0.1). None = `learning_rate`."},
    )
    train_level_table: bool = field(
        default=True,
        metadata={"help": "Train the level table (AlignGPT). False for a pure mPLUG-Owl stage 1 (e.g. with "
                  "`alignment_mode='none'`, which has no table)."},
    )
    level_column: str = field(
        default=LEVEL_COLUMN, metadata={"help": "Dataset column holding each pair's alignment level (0..N-1)."}
    )
    train_projector: bool = field(
        default=True,
        metadata={"help": "Train the multimodal projector (AlignGPT's stage 1). False for the alignment warm-up of a "
                  "model started from LLaVA (`aligngpt-hf from-llava`): its projector is trained, the level table not."},
    )

    def __post_init__(self):
        if self.vision_lr_multiplier is not None and not self.train_vision_tower:
            raise ValueError("`vision_lr_multiplier` sets the vision tower's learning rate, but the vision tower is "
                             "frozen; set `train_vision_tower=True` (or drop the multiplier).")
        super().__post_init__()


@dataclass
class AlignGPTInstructConfig(_AlignGPTTrainingConfig):
    """Stage-2 settings (paper defaults: lr 2e-5, cosine, warm-up 0.03, 1 epoch, max length 2048, modality grouping).

    Example:

    ```python
    >>> from aligngpt_hf import AlignGPTInstructConfig
    >>> args = AlignGPTInstructConfig(output_dir="out/stage2", per_device_train_batch_size=2, max_steps=3)
    >>> args.learning_rate, args.assistant_only_loss, args.group_by_modality_length
    (2e-05, True, True)
    ```
    """

    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate (paper stage 2: 2e-5)."})
    assistant_only_loss: bool = field(
        default=True, metadata={"help": "Supervise only assistant answers and their EOS (vicuna_v1 `</s>`)."}
    )
    group_by_modality_length: bool = field(
        default=True,
        metadata={"help": MODALITY_GROUPING_HELP},
    )
    allow_untrained_alignment: bool = field(
        default=False,
        metadata={
            "help": "Start stage 2 from a model whose projector and level table carry no stage-1 marker (e.g. an "
            "old converted checkpoint). Off by default: training the gate on an untrained level table is silent waste."
        },
    )
    train_projector: bool = field(
        default=True,
        metadata={"help": "Train the multimodal projector in stage 2 (full fine-tuning: unfrozen; LoRA: saved in "
                  "`modules_to_save`). AlignGPT/LLaVA: True. mPLUG-Owl: its paper's abstract says True, its §3.2 "
                  "and released code False."},
    )
    modality_batching: str = field(
        default="mixed",
        metadata={"help": "`mixed`: batches as `group_by_modality_length` says. `separate` (mPLUG-Owl paper): "
                  "micro-batches alternate one text-only and one image batch, so each optimizer step sees them 1:1 "
                  "when processes x gradient_accumulation_steps is even; overrides `group_by_modality_length`."},
    )
    modality_batching_on_exhausted: str = field(
        default="cycle",
        metadata={"help": "`separate` batching when one modality runs out: `cycle` (reshuffle and reuse the "
                  "shorter one until the longer is used once per epoch) or `stop` (end the epoch at the shorter one). "
                  "Repeated/unused counts are logged and kept in `trainer.modality_batching_counts`."},
    )

    def __post_init__(self):
        if self.modality_batching not in MODALITY_BATCHING:
            raise ValueError(f"`modality_batching` must be one of {MODALITY_BATCHING}, got {self.modality_batching!r}.")
        if self.modality_batching_on_exhausted not in EXHAUSTION_MODES:
            raise ValueError(f"`modality_batching_on_exhausted` must be one of {EXHAUSTION_MODES}, got "
                             f"{self.modality_batching_on_exhausted!r}.")
        super().__post_init__()


__all__ = ["AlignGPTInstructConfig", "AlignGPTPretrainConfig", "AlignGPTScriptArguments"]

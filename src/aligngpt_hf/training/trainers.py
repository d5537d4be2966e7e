"""AlignGPT's two training stages as TRL `SFTTrainer` subclasses: stage 1 trains the projector and the level table on
captions, stage 2 everything but the vision tower on instructions (the gate learning from the prompt).

Only documented hooks are overridden: the data collator (rendering, labels, levels, gate mask, length safety),
`create_optimizer` (separate projector / vision-tower learning rates), `_get_train_sampler` (`group_by_modality_length`,
mPLUG-Owl's 1:1 `modality_batching="separate"`) and
`_set_signature_columns_if_needed` (keeps the level column). Training runs through TRL's fused LM head, which passes
every extra batch key (`alignment_levels`, `gate_text_mask`) on to `model.model`, where the alignment logic lives.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from aligngpt_hf.paths import check_writable, saving_to, staged_files
from aligngpt_hf.training import packing as packing_support
from aligngpt_hf.training.checkpoints import check_finite_loss, check_resumable, resolve_resume
from aligngpt_hf.training.configs import AlignGPTInstructConfig, AlignGPTPretrainConfig, _AlignGPTTrainingConfig
from aligngpt_hf.training.data import (
    LEVEL_COLUMN,
    PLAIN_CHAT_TEMPLATE,
    AlignGPTDataCollator,
    check_image_paths,
    check_row_format,
    check_stage1_data,
    sample_token_lengths,
    undecoded,
    with_images_column,
)
from aligngpt_hf.training.lora_presets import (
    PROJECTOR,
    VISION_TOWER,
    aligngpt_lora_config,
    check_peft_model,
    prepare_peft_config,
)
from aligngpt_hf.training.sampler import (
    ModalityLengthGroupedSampler,
    SeparateModalitySampler,
    modality_lengths,
)
from aligngpt_hf.training.stage_handoff import STAGE_ATTRIBUTE, check_alignment_trained, load_for_instruct, merge_lora
from aligngpt_hf.training.static_graph import attach_static_graph

logger = logging.getLogger(__name__)



class _StageMarkerCallback(TrainerCallback):
    """Marks the config once an optimizer step has run, so saved folders and checkpoints say what was trained."""

    def __init__(self, config, stage: str):
        self.config, self.stage = config, stage

    def on_step_end(self, args, state, control, **kwargs):
        setattr(self.config, STAGE_ATTRIBUTE, self.stage)


def freeze_for_pretrain(model, train_vision_tower: bool = False, train_level_table: bool = True,
                        train_projector: bool = True) -> None:
    """Stage 1: only the projector and the level table (plus the vision tower for the mPLUG-Owl recipe) train;
    `train_projector=False` keeps a trained projector (the alignment warm-up of a model started from LLaVA)."""
    base = model.model
    if train_level_table and not hasattr(base, "alignment"):
        raise ValueError("Stage 1 trains the level table, but this model has none (`alignment_mode='none'`); pass "
                         "`train_level_table=False` for a projector(+vision)-only stage 1.")
    if not (train_projector or train_level_table or train_vision_tower):
        raise ValueError("`train_projector`, `train_level_table` and `train_vision_tower` are all False: stage 1 "
                         "would train nothing. Set at least one of them.")
    model.requires_grad_(False)
    base.multi_modal_projector.requires_grad_(train_projector)
    if train_level_table:
        base.alignment.level_embeddings.requires_grad_(True)
    base.vision_tower.requires_grad_(train_vision_tower)


def freeze_for_instruct(model, train_projector: bool = True) -> None:
    """Stage 2: LLM (embeddings and LM head included), projector and gate train; vision tower and level table don't.
    `train_projector=False` also freezes the projector (mPLUG-Owl's released stage 2)."""
    model.requires_grad_(True)
    model.model.vision_tower.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(train_projector)
    if hasattr(model.model, "alignment"):
        model.model.alignment.level_embeddings.requires_grad_(False)


class _AlignGPTTrainer(SFTTrainer):
    """Shared machinery of both stages; see the public subclasses."""

    _config_class = _AlignGPTTrainingConfig
    _stage = ""

    def __init__(self, model, args=None, train_dataset=None, processing_class=None, data_collator=None,
                 peft_config=None, **kwargs):
        if args is None:
            args = self._config_class(output_dir=f"aligngpt-{self._stage}")
        if not isinstance(args, self._config_class):
            raise TypeError(f"{type(self).__name__} takes `args={self._config_class.__name__}(...)`, "
                            f"got {type(args).__name__}.")
        model, processing_class = self._load(model, processing_class, args)
        self._check_start(model, args, peft_config)
        check_writable(args.output_dir, "output_dir")  # before any step is spent, not at the first checkpoint
        if train_dataset is not None:
            check_row_format(train_dataset)
            check_image_paths(train_dataset)
            train_dataset = with_images_column(train_dataset)
        if train_dataset is not None and getattr(train_dataset, "features", None) is not None:
            train_dataset = undecoded(train_dataset)  # images open in the collator: the one loader, errors name rows
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("`train_dataset` is empty (0 rows): there is nothing to train on. Check the data file "
                             "and any filtering before the trainer.")
        self._check_data(train_dataset, model, args)
        _check_batching(train_dataset, args)
        self.num_skipped_samples = 0
        self.modality_batching_counts = None  # `modality_batching='separate'`: repeated/unused samples per modality
        if args.skip_overlong_samples and args.max_length is not None and train_dataset is not None:
            train_dataset = self._drop_overlong(train_dataset, processing_class, args)
        if data_collator is None:
            data_collator = self._collator(model, processing_class, args)
        template = PLAIN_CHAT_TEMPLATE if self._stage == "pretrain" else None
        data_collator, packed_dataset = packing_support.prepare_packing(  # unchanged without packing/padding_free
            args, processing_class, train_dataset, data_collator, template, model)
        if peft_config is None:
            self._freeze(model, args)
        else:
            peft_config = prepare_peft_config(peft_config, model, getattr(args, "train_projector", True))
        with packing_support.hidden_from_trl(args):
            super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             processing_class=processing_class, peft_config=peft_config, **kwargs)
        packing_support.finish_packing(self, packed_dataset)
        if peft_config is not None:
            check_peft_model(self.model)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        attach_static_graph(base)  # image-free batches reach every trainable module too (DDP, ZeRO-3, FSDP)
        self.add_callback(_StageMarkerCallback(base.config, self._stage))

    @staticmethod
    def _load(model, processing_class, args):
        if isinstance(model, str):
            from transformers import AutoModelForImageTextToText

            init_kwargs = {"dtype": torch.float32, **(args.model_init_kwargs or {})}
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            name = model
            model = AutoModelForImageTextToText.from_pretrained(name, **init_kwargs)
        if processing_class is None:
            from transformers import AutoProcessor

            processing_class = AutoProcessor.from_pretrained(model.name_or_path, trust_remote_code=args.trust_remote_code)
        return model, processing_class

    def _check_start(self, model, args, peft_config) -> None:
        """Stage-specific preconditions (overridden)."""

    def _check_data(self, train_dataset, model, args) -> None:
        """Stage-specific checks of the whole dataset before training (overridden)."""

    def _freeze(self, model, args) -> None:
        raise NotImplementedError

    def _collator(self, model, processor, args) -> AlignGPTDataCollator:
        raise NotImplementedError

    def _drop_overlong(self, dataset, processor, args):
        """Drop and count samples that do not fit `max_length` (never truncate: image tokens must stay whole)."""
        if not hasattr(dataset, "select"):
            raise ValueError(
                f"skip_overlong_samples=True measures every sample before training, which a streaming "
                f"{type(dataset).__name__} cannot offer. Load the data without streaming, or drop long samples "
                "yourself (`dataset.filter(...)`) and set skip_overlong_samples=False."
            )
        template = PLAIN_CHAT_TEMPLATE if self._stage == "pretrain" else None
        lengths = sample_token_lengths(dataset, processor, chat_template=template)
        keep = [index for index, length in enumerate(lengths) if length <= args.max_length]
        self.num_skipped_samples = len(lengths) - len(keep)
        if not keep:
            raise ValueError(f"All {len(lengths)} samples are longer than max_length={args.max_length} (image tokens "
                             "and `<align>` included); raise `max_length`.")
        if self.num_skipped_samples:
            logger.warning(
                "Skipped %d of %d samples longer than max_length=%d (skip_overlong_samples=True).",
                self.num_skipped_samples, len(lengths), args.max_length,
            )
            dataset = dataset.select(keep)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = ["id", getattr(self.args, "level_column", LEVEL_COLUMN)]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _group_learning_rates(self) -> dict[str, float]:
        """Module name -> learning rate for modules that do not use `learning_rate`."""
        rates = {}
        if self.args.projector_lr is not None:
            rates[PROJECTOR] = self.args.projector_lr
        multiplier = getattr(self.args, "vision_lr_multiplier", None)
        if multiplier is not None:
            rates[VISION_TOWER] = self.args.learning_rate * multiplier
        return rates

    def create_optimizer(self, model=None):
        """With `projector_lr` / `vision_lr_multiplier`, the projector / vision tower get their own parameter groups
        and learning rates (each split by weight decay as usual)."""
        rates = self._group_learning_rates()
        if not rates or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            module = next((m for m in rates if f"{m}." in name), None)
            groups.setdefault((module, name in decay), []).append(param)
        param_groups = []
        for (module, decays), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if module is not None:
                group["lr"] = rates[module]
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, but an image-token mismatch keeps its own message: TRL blames `max_length` for it, while our
        collator never truncates, so the cause lies elsewhere (processor `image_seq_length`, hand-built inputs)."""
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        except ValueError as error:
            cause = error.__cause__
            if isinstance(cause, ValueError) and "Image features and image tokens do not match" in str(cause):
                raise cause from None
            raise
        check_finite_loss(result[0] if return_outputs else result, inputs, self.state.global_step)
        return result

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`resume_from_checkpoint=True` resumes from the newest COMPLETE checkpoint (a half-written one is skipped,
        with a warning naming it and why); a given folder is checked first, naming a broken file."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint:
            check_resumable(resume_from_checkpoint, self.args, self._stage)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except (RuntimeError, ValueError) as error:
            if resume_from_checkpoint:
                _explain_resume_mismatch(error, resume_from_checkpoint)
            raise

    def _save(self, output_dir=None, state_dict=None):
        """transformers' save, staged: files are written in a folder inside `output_dir`, then renamed into place one
        by one, so a crash or a full disk mid-write leaves the previous model whole (and the error names the folder);
        the arguments go to `training_args.json` instead of transformers' `training_args.bin` pickle."""
        output_dir = str(output_dir or self.args.output_dir)
        if not self.args.should_save:  # a rank that only joins the collective gathers of a sharded save
            return super()._save(output_dir, state_dict)
        pickle = ("training_args.bin",)
        with saving_to(output_dir, "save the model to"), staged_files(output_dir, drop=pickle) as staged:
            super()._save(str(staged), state_dict)
            (staged / "training_args.json").write_text(self.args.to_json_string() + "\n", encoding="utf-8")

    def _save_checkpoint(self, model, trial):
        with saving_to(self.args.output_dir, "save a checkpoint to"):
            return super()._save_checkpoint(model, trial)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if getattr(self.args, "modality_batching", "mixed") == "separate" and dataset is not None:
            return self._separate_modality_sampler(dataset)
        if isinstance(dataset, packing_support.PackedDataset):
            return packing_support.pack_sampler(dataset, self.args) or super()._get_train_sampler(train_dataset)
        if not self.args.group_by_modality_length or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthGroupedSampler(
            modality_lengths(dataset),
            batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.seed,
        )


    def _separate_modality_sampler(self, dataset) -> SeparateModalitySampler:
        """mPLUG-Owl's 1:1 text-only / image micro-batches; warns when a step cannot hold one of each."""
        if not hasattr(dataset, "__len__"):
            raise ValueError("modality_batching='separate' needs a dataset with a length (not an iterable dataset).")
        if (self.args.world_size * self.args.gradient_accumulation_steps) % 2:
            logger.warning("modality_batching='separate' with processes x gradient_accumulation_steps = %d (odd): "
                           "optimizer steps alternate between modalities instead of holding one batch of each.",
                           self.args.world_size * self.args.gradient_accumulation_steps)
        sampler = SeparateModalitySampler(modality_lengths(dataset), batch_size=self.args.per_device_train_batch_size,
                                          seed=self.args.seed, on_exhausted=self.args.modality_batching_on_exhausted)
        self.modality_batching_counts = sampler.counts
        return sampler


def _check_batching(train_dataset, args) -> None:
    """Batch settings the data cannot honour, found before training: a streaming dataset has no sampler (so
    `separate` modality batching would be ignored, and modality grouping is), and `dataloader_drop_last` with fewer
    rows than one batch would run zero steps and save the untrained model as the result."""
    if train_dataset is None:
        return
    if not hasattr(train_dataset, "__len__"):
        if getattr(args, "modality_batching", "mixed") == "separate":
            raise ValueError("modality_batching='separate' needs a dataset with a length (not an iterable dataset): a "
                             "stream is read in its own order. Load it without streaming, or use 'mixed'.")
        if args.group_by_modality_length:
            logger.warning("group_by_modality_length=True has no effect on an iterable (streaming) dataset: its rows "
                           "are batched in the order they stream. Set it to false to silence this.")
        return
    batch = args.per_device_train_batch_size * args.world_size
    if args.dataloader_drop_last and len(train_dataset) < batch:
        raise ValueError(f"`dataloader_drop_last` drops the last incomplete batch, and the {len(train_dataset)} row(s) "
                         f"of `train_dataset` do not fill one batch of {batch}: the run would train zero steps. "
                         "Add data, lower `per_device_train_batch_size`, or set `dataloader_drop_last` to false.")


def _explain_resume_mismatch(error: Exception, checkpoint) -> None:
    """torch's words for a checkpoint saved by a run with other settings, as one error naming it and the fix."""
    message = str(error)
    fix = "Resume with the settings that run used, or train in a new output_dir."
    if isinstance(error, RuntimeError) and "Error(s) in loading state_dict" in message:
        detail = next((line.strip() for line in message.splitlines()[1:] if line.strip()), "")
        raise ValueError(f"{checkpoint} does not fit this model ({detail}): it was saved by a run with other model "
                         f"settings (its config.json). {fix}") from None
    if isinstance(error, ValueError) and "parameter group" in message:
        raise ValueError(f"{checkpoint}'s optimizer state does not fit this run ({message}): the run that saved it "
                         "trained other modules or gave them other learning rates (train_projector, "
                         f"train_level_table, train_vision_tower, projector_lr, vision_lr_multiplier). {fix}") from None


class AlignGPTPretrainTrainer(_AlignGPTTrainer):
    """Stage 1 (paper §4.1): `[BOS][ALIGN][IMG x K] caption \\n`, loss on the caption and "\\n" only, each pair's level
    fed as `alignment_levels`; trains the projector and the level table (and the vision tower with
    `train_vision_tower=True`). Rows in TRL's vision format; any row is rendered with the plain template.

    Example:

    ```python
    >>> import torch
    >>> from datasets import Dataset
    >>> from PIL import Image
    >>> from aligngpt_hf import AlignGPTPretrainConfig, AlignGPTPretrainTrainer
    >>> from aligngpt_hf.tiny import build_model, build_processor, build_tokenizer
    >>> tokenizer = build_tokenizer(); processor = build_processor(tokenizer)
    >>> model = build_model(tokenizer)
    >>> rows = [{"images": [Image.new("RGB", (32, 32), (200, 0, 0))], "alignment_level": 3,
    ...          "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red square."}]}]
    >>> args = AlignGPTPretrainConfig(output_dir="/tmp/aligngpt-stage1", max_steps=2, per_device_train_batch_size=1,
    ...                               report_to="none", save_strategy="no", activation_checkpointing=False, use_cpu=True)
    >>> trainer = AlignGPTPretrainTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
    ...                                   processing_class=processor)
    >>> trainer.train().global_step  # doctest: +ELLIPSIS
    {...}
    2
    ```
    """

    _config_class = AlignGPTPretrainConfig
    _stage = "pretrain"

    def _check_start(self, model, args, peft_config) -> None:
        if peft_config is not None:
            raise ValueError("Stage 1 trains the projector and level table in full; LoRA (`peft_config`) is a "
                             "stage-2 option (AlignGPTInstructTrainer).")

    def _check_data(self, train_dataset, model, args) -> None:
        if train_dataset is not None:
            level_column = args.level_column if model.config.uses_alignment_token else None
            check_stage1_data(train_dataset, level_column, model.config.num_alignment_levels)

    def _freeze(self, model, args) -> None:
        freeze_for_pretrain(model, args.train_vision_tower, args.train_level_table, args.train_projector)

    def _collator(self, model, processor, args) -> AlignGPTDataCollator:
        return AlignGPTDataCollator(processor=processor, max_length=args.max_length,
                                    pad_to_multiple_of=args.pad_to_multiple_of, assistant_only_loss=True,
                                    chat_template=PLAIN_CHAT_TEMPLATE,
                                    level_column=args.level_column if model.config.uses_alignment_token else None,
                                    num_alignment_levels=model.config.num_alignment_levels)


class AlignGPTInstructTrainer(_AlignGPTTrainer):
    """Stage 2 (paper §4.1): vicuna_v1 conversations, loss on assistant answers + `</s>`, adaptive gate fed the prompt
    only; trains LLM + projector + gate, the vision tower and level table stay frozen. With `peft_config` (see
    `aligngpt_lora_config`): LoRA on the language model, projector and gate saved alongside; `merge_lora` folds it.
    Text-only rows may be mixed with image rows (they get no `<align>`). Refuses an untrained level table/projector.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from PIL import Image
    >>> from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer
    >>> from aligngpt_hf.tiny import build_model, build_processor, build_tokenizer
    >>> tokenizer = build_tokenizer(); processor = build_processor(tokenizer)
    >>> model = build_model(tokenizer)
    >>> rows = [{"images": [Image.new("RGB", (32, 32), (200, 0, 0))],
    ...          "messages": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}]},
    ...         {"images": [], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi."}]}]
    >>> args = AlignGPTInstructConfig(output_dir="/tmp/aligngpt-stage2", max_steps=2, per_device_train_batch_size=2,
    ...                               report_to="none", save_strategy="no", activation_checkpointing=False, use_cpu=True,
    ...                               allow_untrained_alignment=True)  # a real run starts from a stage-1 folder
    >>> trainer = AlignGPTInstructTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
    ...                                   processing_class=processor)
    >>> trainer.train().global_step  # doctest: +ELLIPSIS
    {...}
    2
    ```
    """

    _config_class = AlignGPTInstructConfig
    _stage = "instruct"

    def _check_start(self, model, args, peft_config) -> None:
        check_alignment_trained(model.config, args.allow_untrained_alignment)

    def _freeze(self, model, args) -> None:
        freeze_for_instruct(model, args.train_projector)

    def _collator(self, model, processor, args) -> AlignGPTDataCollator:
        scope_prompt = getattr(model.config, "gate_text_scope", "prompt") == "prompt"
        return AlignGPTDataCollator(processor=processor, max_length=args.max_length,
                                    pad_to_multiple_of=args.pad_to_multiple_of,
                                    assistant_only_loss=args.assistant_only_loss, gate_text_mask=scope_prompt)


__all__ = [
    "AlignGPTInstructConfig",
    "AlignGPTInstructTrainer",
    "AlignGPTPretrainConfig",
    "AlignGPTPretrainTrainer",
    "aligngpt_lora_config",
    "check_alignment_trained",
    "freeze_for_instruct",
    "freeze_for_pretrain",
    "load_for_instruct",
    "merge_lora",
]

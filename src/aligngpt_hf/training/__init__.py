"""Both training stages: TRL `SFTTrainer` subclasses and their configs, data adapters and collator, samplers,
the stage-1 -> stage-2 hand-off, the mPLUG-Owl presets, model assembly (`model_setup`), the dry run and its memory
estimate (`dry_run`, `memory`), the `pretrain`/`instruct` CLI, and the shipped `recipes/*.yaml` and
`accelerate_configs/*.yaml`.

May import `aligngpt_hf.models`, `aligngpt_hf.paths` (writability, disk errors named),
`aligngpt_hf.conversion.convert.load_stage1_artefact` (stage-1 artefacts of the original layout) and
`aligngpt_hf.hub.hub_configs` (the published layouts a dry run plans from offline). Imports nothing at package import:
TRL loads on first use.
"""

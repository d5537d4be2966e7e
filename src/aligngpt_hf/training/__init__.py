"""Both training stages: TRL `SFTTrainer` subclasses and their configs, data adapters and collator, samplers,
the stage-1 -> stage-2 hand-off, the mPLUG-Owl presets, the `pretrain`/`instruct` CLI, and the shipped
`recipes/*.yaml` and `accelerate_configs/*.yaml`.

May import `aligngpt_hf.models`, `aligngpt_hf.paths` (writability, disk errors named), and
`aligngpt_hf.conversion.convert.load_stage1_artefact` (stage-1 artefacts of the original layout).
Imports nothing at package import: TRL loads on first use.
"""

"""Released original-layout AlignGPT checkpoints -> this layout (`convert`), with the key mapping and the
original-config translation (`mapping`), the follow-up code base's checkpoints (`family`), the steps both share
(`steps`), and the stage-1 artefact loader the trainers use; transformers LLaVA checkpoints -> an AlignGPT folder
(`from_llava`).

May import `aligngpt_hf.models` and `aligngpt_hf.paths` (atomic output folder, writability) only.
"""

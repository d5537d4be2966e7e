"""Publishing: `aligngpt-hf push` (remote code, processor, chat template, model card; `push`), the model card
(`model_card`) and the generated Hub-ready configs of the published variants (`hub_configs`).

May import `aligngpt_hf.models`, `aligngpt_hf.tiny` and `aligngpt_hf.paths` (atomic publish folder) only.
"""

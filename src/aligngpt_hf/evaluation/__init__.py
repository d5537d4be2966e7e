"""Evaluation: the `aligngpt-hf answer` benchmark CLI (`answer`), the lmms-eval plugin registered under the
`lmms_eval.models` entry point (`lmms_eval_plugin`), and gate inspection (`inspect_alignment`).

May import `aligngpt_hf.models` and `aligngpt_hf.paths`; lmms-eval and matplotlib are imported lazily.
"""

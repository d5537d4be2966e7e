"""The remote-code unit: configuration, modeling and processing of AlignGPT, and their `*_aligngpt.py` helpers.

These files travel next to the weights (`save_pretrained` and `aligngpt-hf push` copy them) and load with
`trust_remote_code=True` for users who have only transformers installed. So they import only torch, transformers,
the standard library and each other through relative imports (`from .configuration_aligngpt import X`); nothing
else of `aligngpt_hf` (a test enforces it). This `__init__` imports nothing.
"""

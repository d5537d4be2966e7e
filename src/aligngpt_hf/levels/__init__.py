"""Alignment levels for stage 1: CLIP/SigLIP scoring of image-caption pairs (`scorer`), bucketing into N levels
and the `aligngpt-hf levels` command (`compute`), the report and plots (`report`).

Imports only torch, transformers, numpy and the standard library (matplotlib lazily for plots), plus
`aligngpt_hf.models` (the one image loader) and `aligngpt_hf.paths` (atomic writes); no other capability.
"""

"""`aligngpt-hf demo`: the whole pipeline (tiny CLIP -> levels -> stage 1 -> stage 2 -> evaluation) on an
embedded synthetic shapes task, offline on a CPU in minutes. `task` makes the data, `stages` holds the steps,
`pipeline` runs them (and the CLI), `runs` holds what a run and `--compare` share (folder, seeding, held-out set,
summary), `evaluate` answers held-out questions, `compare` trains AlignGPT, plain LLaVA and AlignGPT with shuffled
levels side by side.

The demo is a client of the other capabilities: it may import any of them through their documented functions.
"""

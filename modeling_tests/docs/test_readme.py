"""The README's quick-start code runs as pasted."""

from __future__ import annotations

import re

import torch

from conftest import REPO_ROOT


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(blocks[0], namespace)  # noqa: S102 - the README's own snippet
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert (tmp_path / "tiny-aligngpt" / "modeling_aligngpt.py").is_file()
    with torch.no_grad():
        before = namespace["model"](**namespace["inputs"]).logits
        exec(blocks[1], namespace)  # noqa: S102 - reloads the saved folder into `model`
        after = namespace["model"](**namespace["inputs"]).logits
    # Same weights (the round trip is checked bit for bit elsewhere); BLAS may pick another kernel for a fresh
    # allocation, which moves the last float32 bit.
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

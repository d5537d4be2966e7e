"""Alignment weights on request (per prompt, for one image) and the `aligngpt-hf inspect` bar charts."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.evaluation.inspect_alignment import (
    PLOT_EXTRA_HINT,
    alignment_weights_for_prompts,
    format_weights_table,
    plot_alignment_weights,
)
from conftest import user_message

PROMPTS = ["What colour is the shape?", "Describe the picture in detail, including every object.", "How many?"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_weights_per_prompt_match_single_forwards_and_differ(make_model, processor, images):
    model = make_model(seed=3)
    weights = alignment_weights_for_prompts(model, processor, images[0], PROMPTS, batch_size=2)
    assert weights.shape == (3, model.config.num_alignment_levels - 1) and weights.dtype == torch.float32
    assert torch.allclose(weights.sum(-1), torch.ones(3), atol=1e-5)
    for index, prompt in enumerate(PROMPTS):
        text = processor.apply_chat_template(user_message(prompt), add_generation_prompt=True)
        with torch.no_grad():
            single = model(**processor(text=[text], images=[images[0]], return_tensors="pt")).alignment_weights
        assert torch.allclose(weights[index], single[0], atol=1e-6), prompt
    assert not torch.allclose(weights[0], weights[1])  # the instruction changes the gate's choice


def test_gate_free_mode_is_explained(make_model, processor, images):
    with pytest.raises(ValueError, match="alignment_mode='global' has no gate"):
        alignment_weights_for_prompts(make_model(alignment_mode="global"), processor, images[0], PROMPTS)
    with pytest.raises(ValueError, match="at least one prompt"):
        alignment_weights_for_prompts(make_model(), processor, images[0], [])


def test_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the plots (`.[plot]`, included in `.[test]`)")
    weights = torch.softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), -1)
    table = format_weights_table(weights, PROMPTS)
    assert "L6" in table and "What colour is the shape?" in table and "global level L7" in table
    assert f"L{int(weights[0].argmax())}" in table.splitlines()[2].split()[-1]
    path = plot_alignment_weights(weights, PROMPTS, tmp_path / "nested" / "gate.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        plot_alignment_weights(torch.full((1, 7), 1 / 7), ["q"], tmp_path / "x.png")
    assert "pip install matplotlib" in PLOT_EXTRA_HINT


def test_inspect_cli_on_a_saved_folder(make_model, processor, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib draws the plots (`.[plot]`, included in `.[test]`)")
    folder = tmp_path / "model"
    make_model(seed=5).save_pretrained(folder)
    processor.save_pretrained(folder)
    image = tmp_path / "shape.png"
    Image.new("RGB", (48, 30), (20, 40, 220)).save(image)
    out, record = tmp_path / "plot.png", tmp_path / "weights.json"
    argv = ["inspect", str(folder), "--image", str(image), "--out", str(out), "--json", str(record)]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"Plot written to {out}" in printed and "How many?" in printed
    assert out.read_bytes()[:8] == PNG_MAGIC
    saved = json.loads(record.read_text())
    assert saved["prompts"] == PROMPTS and len(saved["weights"]) == 3 and len(saved["weights"][0]) == 7

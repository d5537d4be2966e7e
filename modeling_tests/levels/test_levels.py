"""Alignment levels: CLIP scoring, bucketing, resume, sharding, bad input, report and plot.

Everything runs offline on a tiny random CLIP built from a config with a locally trained byte-level BPE
tokenizer whose end token is the id CLIP pools at (with eos_token_id == 2 CLIP would pool at argmax(ids)).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from aligngpt_hf.levels.compute import (
    assign_levels,
    compute_alignment_levels,
    load_scorer,
    pairs_from_llava_json,
    score_pairs,
)

WORDS = ["red", "blue", "green", "yellow", "square", "circle", "triangle", "small", "large", "a", "photo", "of"]
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 230, 20)}
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tiny_clip():
    from aligngpt_hf.tiny import build_clip

    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    torch.manual_seed(0)
    model, processor = build_clip(corpus, hidden_size=32, num_layers=2, image_size=32, patch_size=8,
                                  max_length=MAX_LENGTH)
    eos = processor.tokenizer.eos_token_id
    assert eos != 2 and model.eval().text_model.eos_token_id == eos
    return model, processor


def _caption(i: int) -> str:
    color = list(COLORS)[i % 4]
    return f"a {['small', 'large'][i % 2]} {color} {['square', 'circle', 'triangle'][i % 3]}"


def _image(i: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 60, size=(40, 48, 3), dtype=np.uint8)
    pixels[8:32, 10:38] = COLORS[list(COLORS)[(i * 7) % 4]]
    image = Image.fromarray(pixels)
    return image if mode == "RGB" else image.convert(mode)


def _write_pairs(folder, n: int, modes=None):
    """n LLaVA pre-training records with PNG images under folder/images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        mode = (modes or {}).get(i, "RGB")
        name = f"{i:03d}.jpg" if mode == "CMYK" else f"{i:03d}.png"  # PNG has no CMYK
        _image(i, mode).save(folder / "images" / name)
        records.append({"id": f"pair-{i:03d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nRender a short caption."}, {"from": "gpt", "value": _caption(i)}]})
    return records


def _save_json(records, path):
    path.write_text(json.dumps(records))
    return path


def _reference_cosine(model, processor, image: Image.Image, caption: str) -> float:
    """Independent computation from the model's parts: CLS -> post-LN -> projection; EOS state -> projection."""
    with torch.no_grad():
        pixels = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        vision = model.vision_model.post_layernorm(model.vision_model(pixel_values=pixels).last_hidden_state[:, 0])
        image_emb = model.visual_projection(vision)[0]
        ids = processor.tokenizer(caption, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")["input_ids"]
        eos_position = (ids[0] == processor.tokenizer.eos_token_id).nonzero()[0, 0]
        hidden = model.text_model(input_ids=ids).last_hidden_state[0, eos_position]
        text_emb = model.text_projection(hidden)
        return torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=0).item()


def test_scores_equal_independent_cosine(tiny_clip, tmp_path):
    model, processor = tiny_clip
    records = _write_pairs(tmp_path, 9)
    records[4]["conversations"][1]["value"] = "a " * 30 + "long caption"  # truncated to 16 tokens
    _, pairs = pairs_from_llava_json(_save_json(records, tmp_path / "pairs.json"))
    scored = score_pairs(pairs, load_scorer(tiny_clip, device="cpu"), image_folder=str(tmp_path / "images"),
                         batch_size=4, num_workers=2, progress=False)
    expected = [_reference_cosine(model, processor, Image.open(tmp_path / "images" / f"{i:03d}.png"),
                                  pairs[i]["caption"]) for i in range(9)]
    np.testing.assert_allclose(scored["alignment_score"], expected, atol=1e-5)
    assert scored["alignment_truncated"] == [i == 4 for i in range(9)]
    assert all(-1 <= s <= 1 for s in scored["alignment_score"]) and len(set(scored["alignment_score"])) == 9


@pytest.mark.parametrize("count,num_levels", [(103, 8), (16, 8), (9, 2), (50, 7), (8, 8)])
def test_quantile_levels_balanced_and_ascending(count, num_levels):
    rng = np.random.default_rng(count)
    scores = rng.normal(0.2, 0.05, size=count)  # distinct scores (ties: test_quantile_ties_share_one_level)
    levels, edges = assign_levels(scores, num_levels, "quantile", tie_tolerance=0)
    counts = np.bincount(levels, minlength=num_levels)
    assert counts.sum() == count and counts.max() - counts.min() <= 1 and len(counts) == num_levels
    order = np.lexsort((np.arange(count), scores))  # score, then original index
    assert np.all(np.diff(levels[order]) >= 0)
    assert levels.dtype == np.int64 and levels.min() == 0 and levels.max() == num_levels - 1
    assert len(edges) == num_levels + 1 and np.all(np.diff(edges) >= 0)
    np.testing.assert_array_equal(levels, assign_levels(scores, num_levels, "quantile", tie_tolerance=0)[0])


def test_quantile_ties_share_one_level():
    levels, _, ties = assign_levels([0.2, 0.1, 0.2, 0.2, 0.1, 0.3], 3, "quantile", return_ties=True)
    # ranks: 0.1@1, 0.1@4 | 0.2@0, 0.2@2, 0.2@3 | 0.3@5; by rank the 0.2s would get 1,1,2: the group takes the
    # level of its middle rank (3 * 3 // 6 = 1), and the report counts it as a tie across a boundary
    assert levels.tolist() == [1, 0, 1, 1, 0, 2]
    assert ties == {"tie_tolerance": 1e-4, "num_tie_groups_across_boundary": 1, "num_pairs_in_those_groups": 3}


def test_uniform_bins_match_hand_computed_edges():
    scores = [0.0, 0.25, 0.3, 0.5, 0.74, 0.75, 1.0, 0.1]
    levels, edges = assign_levels(scores, 4, "uniform")
    assert edges.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert levels.tolist() == [0, 1, 1, 2, 2, 3, 3, 0]  # inner edge -> upper bin; max -> top bin
    scores = np.array([0.11, 0.29, 0.17, 0.23, 0.13, 0.2])
    levels, edges = assign_levels(scores, 3, "uniform")
    np.testing.assert_allclose(edges, [0.11, 0.17, 0.23, 0.29])
    assert levels.tolist() == [0, 2, 1, 2, 0, 1]


@pytest.mark.parametrize("args,message", [
    (([0.1, 0.2], 1, "quantile"), "num_levels must be an integer >= 2, got 1"),
    (([0.1, 0.2], 3, "quantile"), r"num_levels=3 is larger than the number of scored pairs \(2\)"),
    (([], 2, "quantile"), "no scores to bucket"),
    (([0.1, 0.2], 2, "equal"), "binning must be one of"),
    (([0.2, 0.2, 0.2], 2, "uniform"), "all 3 scores are equal"),
    (([0.2, float("nan")], 2, "quantile"), "scores contain NaN"),
])
def test_assign_levels_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        assign_levels(*args)


def test_cli_names_scorer_in_one_line_when_the_scorer_cannot_be_loaded(tmp_path, capsys):
    """Offline (the test suite runs with HF_HUB_OFFLINE=1) with an uncached Hub id: one line, naming the fix."""
    from aligngpt_hf.cli import main

    source = _save_json(_write_pairs(tmp_path, 2), tmp_path / "pairs.json")
    assert main(["levels", str(source), str(tmp_path / "out.json"), "--image-folder", str(tmp_path / "images"),
                 "--scorer", "nobody/no-such-clip", "--num-levels", "2", "--device", "cpu"]) == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("aligngpt-hf levels: error: cannot load the scorer 'nobody/no-such-clip' (")
    assert "\n" not in message
    assert "Pass --scorer a local CLIP or SigLIP folder" in message and "docs/levels.md" in message


def test_cli_end_to_end_writes_json_report_and_plot(tiny_clip, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the plots (`.[plot]`, included in `.[test]`)")
    from aligngpt_hf.cli import main

    model, processor = tiny_clip
    model.save_pretrained(tmp_path / "scorer")
    processor.save_pretrained(tmp_path / "scorer")
    records = _write_pairs(tmp_path, 20)
    source = _save_json(records, tmp_path / "pairs.json")
    output = tmp_path / "out" / "pairs_levels.json"
    assert main(["levels", str(source), str(output), "--image-folder", str(tmp_path / "images"), "--scorer",
                 str(tmp_path / "scorer"), "--num-levels", "4", "--batch-size", "8", "--device", "cpu"]) == 0
    written = json.loads(output.read_text())
    assert [r["id"] for r in written] == [r["id"] for r in records]
    assert all(r["similarity"] == r["alignment_level"] and isinstance(r["similarity"], int) for r in written)
    assert all(r["conversations"] == s["conversations"] for r, s in zip(written, records))
    expected = [_reference_cosine(model, processor, _image(i), _caption(i)) for i in range(20)]
    np.testing.assert_allclose([r["alignment_score"] for r in written], expected, atol=1e-5)
    np.testing.assert_array_equal([r["alignment_level"] for r in written], assign_levels(expected, 4)[0])
    report = json.loads((output.parent / "pairs_levels.report.json").read_text())
    assert [level["count"] for level in report["levels"]] == [5, 5, 5, 5]
    assert report["num_records"] == report["num_scored"] == 20 and report["num_skipped"] == 0
    assert all(len(level["examples"]) == 3 for level in report["levels"])
    ranges = [(level["min_score"], level["max_score"]) for level in report["levels"]]
    assert all(high < next_low for (_, high), (next_low, _) in zip(ranges, ranges[1:]))
    assert "| level | count |" in (output.parent / "pairs_levels.report.md").read_text()
    png = output.parent / "pairs_levels.scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 500


def test_interrupted_run_resumes_with_identical_levels(tiny_clip, tmp_path):
    model, _ = tiny_clip
    source = _save_json(_write_pairs(tmp_path, 12), tmp_path / "pairs.json")
    options = dict(image_folder=str(tmp_path / "images"), scorer=tiny_clip, num_levels=3, batch_size=4,
                   chunk_size=4, plot=False, device="cpu", progress=False)
    reference = compute_alignment_levels(source, tmp_path / "full" / "levels.json", **options)
    calls = []
    original = model.get_image_features

    def crash_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated interruption")
        return original(*args, **kwargs)

    cache = tmp_path / "cache"
    model.get_image_features = crash_on_third_batch
    try:
        with pytest.raises(RuntimeError, match="simulated interruption"):
            compute_alignment_levels(source, tmp_path / "resumed" / "levels.json", cache_dir=cache, **options)
        assert len(sorted(cache.glob("scores-*.arrow"))) == 2  # two finished chunks, no partial third
        calls.clear()
        resumed = compute_alignment_levels(source, tmp_path / "resumed" / "levels.json", cache_dir=cache, **options)
    finally:
        del model.get_image_features
    assert len(calls) == 1  # only the unfinished chunk was scored again
    assert resumed.dataset["alignment_level"] == reference.dataset["alignment_level"]
    assert resumed.dataset["alignment_score"] == reference.dataset["alignment_score"]
    assert json.loads(resumed.output.read_text()) == json.loads(reference.output.read_text())


def test_shards_then_merge_scores_each_chunk_once(tiny_clip, tmp_path):
    model, _ = tiny_clip
    source = _save_json(_write_pairs(tmp_path, 10), tmp_path / "pairs.json")
    options = dict(image_folder=str(tmp_path / "images"), scorer=tiny_clip, num_levels=4, batch_size=4,
                   chunk_size=3, plot=False, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    output = tmp_path / "levels.json"
    first = compute_alignment_levels(source, output, num_shards=2, shard_index=0, **options)
    second = compute_alignment_levels(source, output, num_shards=2, shard_index=1, **options)
    assert not first.complete and not output.exists()
    assert len(first.dataset) + len(second.dataset) == 10 and first.dataset["id"][:4] == ["pair-000", "pair-001",
                                                                                           "pair-002", "pair-006"]
    calls = []
    original = model.get_image_features
    model.get_image_features = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        merged = compute_alignment_levels(source, output, **options)
    finally:
        del model.get_image_features
    assert calls == [] and merged.complete and len(json.loads(output.read_text())) == 10
    assert np.bincount(merged.dataset["alignment_level"]).tolist() == [3, 2, 3, 2]  # floor(rank * 4 / 10)


def _bad_records(tmp_path):
    modes = {1: "RGBA", 2: "L", 3: "P", 4: "CMYK"}
    records = _write_pairs(tmp_path, 12, modes)
    records[5]["image"] = "missing.png"
    (tmp_path / "images" / "006.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    records[7]["conversations"] = records[7]["conversations"][:1]  # no gpt turn
    records[8]["conversations"][1]["value"] = "   "
    del records[9]["image"]  # text-only record
    return records


def test_bad_records_raise_naming_the_record(tiny_clip, tmp_path):
    source = _save_json(_bad_records(tmp_path), tmp_path / "pairs.json")
    options = dict(image_folder=str(tmp_path / "images"), scorer=tiny_clip, num_levels=2, plot=False,
                   device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"record 'pair-005' \(row 5\): image file not found: .*missing.png\. "
                                         r"Fix the record or pass --skip-bad"):
        compute_alignment_levels(source, tmp_path / "levels.json", **options)
    assert not (tmp_path / "levels.json").exists()


def test_skip_bad_counts_and_lists_every_skip(tiny_clip, tmp_path):
    records = _bad_records(tmp_path)
    source = _save_json(records, tmp_path / "pairs.json")
    result = compute_alignment_levels(source, tmp_path / "levels.json", image_folder=str(tmp_path / "images"),
                                      scorer=tiny_clip, num_levels=2, skip_bad=True, plot=False, device="cpu",
                                      progress=False)
    report = result.report
    reasons = {s["id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"pair-005", "pair-006", "pair-007", "pair-008", "pair-009"}
    assert reasons["pair-005"].startswith("image file not found")
    assert reasons["pair-006"].startswith("corrupt or unreadable image")
    assert reasons["pair-007"] == reasons["pair-008"] == "caption missing or empty"
    assert reasons["pair-009"] == "no image"
    assert report["num_records"] == 12 and report["num_scored"] == 7 and report["num_skipped"] == 5
    assert report["converted_from_mode"] == {"RGBA": 1, "L": 1, "P": 1, "CMYK": 1}
    written = json.loads(result.output.read_text())
    assert [r["id"] for r in written] == ["pair-000", "pair-001", "pair-002", "pair-003", "pair-004", "pair-010",
                                          "pair-011"]
    assert "pair-006" in (tmp_path / "levels.report.md").read_text()
    # the cached scores (with their recorded errors) do not let a strict rerun pass silently
    with pytest.raises(ValueError, match=r"record 'pair-005' \(row 5\).*5 bad record\(s\) in total"):
        compute_alignment_levels(source, tmp_path / "levels.json", image_folder=str(tmp_path / "images"),
                                 scorer=tiny_clip, num_levels=2, plot=False, device="cpu", progress=False)


def test_empty_input_and_too_many_levels(tiny_clip, tmp_path):
    options = dict(image_folder=str(tmp_path), scorer=tiny_clip, plot=False, device="cpu", progress=False)
    with pytest.raises(ValueError, match="is empty: there are no image-caption pairs"):
        compute_alignment_levels(_save_json([], tmp_path / "empty.json"), tmp_path / "o.json", **options)
    source = _save_json(_write_pairs(tmp_path, 3), tmp_path / "three.json")
    with pytest.raises(ValueError, match=r"num_levels=4 is larger than the number of pairs \(3\)"):
        compute_alignment_levels(source, tmp_path / "o.json", num_levels=4, **options)
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
        compute_alignment_levels(source, tmp_path / "o.json", num_levels=1, **options)


def test_datasets_input_with_image_and_text_columns(tiny_clip, tmp_path):
    from datasets import Dataset, Features, Value, load_from_disk
    from datasets import Image as ImageFeature

    model, processor = tiny_clip
    images = [_image(i, "RGBA" if i == 2 else "RGB") for i in range(8)]
    features = Features({"img": ImageFeature(), "text": Value("string")})
    dataset = Dataset.from_dict({"img": images, "text": [_caption(i) for i in range(8)]}, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    result = compute_alignment_levels(str(tmp_path / "saved"), tmp_path / "levels.json", scorer=tiny_clip,
                                      num_levels=2, binning="uniform", image_column="img", text_column="text",
                                      plot=False, device="cpu", progress=False)
    expected = [_reference_cosine(model, processor, images[i], _caption(i)) for i in range(8)]
    np.testing.assert_allclose(result.dataset["alignment_score"], expected, atol=1e-5)
    np.testing.assert_array_equal(result.dataset["alignment_level"], assign_levels(expected, 2, "uniform")[0])
    assert result.report["converted_from_mode"] == {"RGBA": 1}
    saved = load_from_disk(result.files["dataset"])
    assert saved["alignment_level"] == result.dataset["alignment_level"] and "img" in saved.column_names
    written = json.loads((tmp_path / "levels.json").read_text())
    assert written[0]["conversations"][1] == {"from": "gpt", "value": _caption(0)}
    assert [r["similarity"] for r in written] == result.dataset["alignment_level"]


def test_missing_matplotlib_gives_install_hint(monkeypatch):
    from aligngpt_hf.levels.report import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib \(or pass --no-plot\)"):
        require_matplotlib()


def test_siglip_scorer_matches_its_own_towers(tiny_clip, tmp_path):
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    tokenizer = tiny_clip[1].tokenizer
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4))
    torch.manual_seed(1)
    model = SiglipModel(config).eval()
    processor = SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
                                tokenizer=tokenizer)
    records = _write_pairs(tmp_path, 5)
    _, pairs = pairs_from_llava_json(_save_json(records, tmp_path / "pairs.json"))
    scored = score_pairs(pairs, load_scorer((model, processor), device="cpu"), image_folder=str(tmp_path / "images"),
                         batch_size=2, progress=False)
    with torch.no_grad():  # SigLIP pools the last position: text is padded to max_length as in its training
        pixels = processor.image_processor(images=[_image(i) for i in range(5)], return_tensors="pt")
        image_emb = model.vision_model(**pixels).pooler_output
        ids = tokenizer([_caption(i) for i in range(5)], padding="max_length", max_length=MAX_LENGTH,
                        return_tensors="pt")["input_ids"]
        text_emb = model.text_model(input_ids=ids).pooler_output
    expected = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    np.testing.assert_allclose(scored["alignment_score"], expected.numpy(), atol=1e-5)

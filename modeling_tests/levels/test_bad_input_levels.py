"""Bad input, levels layer: ties within float noise, paths outside the image folder, cut-short cache chunks, image modes.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from aligngpt_hf.levels.compute import _open_image, assign_levels, compute_alignment_levels

CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a small red circle", "a large blue square"]


@pytest.fixture(scope="module")
def tiny_clip():
    from aligngpt_hf.tiny import build_clip

    torch.manual_seed(0)
    corpus = [" ".join(CAPTIONS[i:] + CAPTIONS[:i]) for i in range(len(CAPTIONS))]
    return build_clip(corpus, hidden_size=32, num_layers=2, image_size=32, patch_size=8, max_length=16)


def write_pairs(folder, images, captions=None):
    (folder / "images").mkdir(exist_ok=True)
    records = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            image.save(folder / "images" / f"{i}.png")
            image = f"{i}.png"
        caption = (captions or CAPTIONS)[i % len(captions or CAPTIONS)]
        records.append({"id": f"pair-{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nCaption it."}, {"from": "gpt", "value": caption}]})
    path = folder / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def coloured(i):
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ ties


def test_quantile_ties_within_float_noise_share_a_level():
    # three copies of one pair scored in different batches: 0.2 +- 1e-7; by rank they would straddle levels 0|1
    scores = [0.1, 0.2 + 1e-7, 0.2, 0.2 - 1e-7, 0.3, 0.4]
    levels, _, ties = assign_levels(scores, 2, "quantile", return_ties=True)
    assert levels[1] == levels[2] == levels[3]
    assert levels.tolist() == [0, 1, 1, 1, 1, 1] or levels.tolist() == [0, 0, 0, 0, 1, 1]
    assert ties["num_tie_groups_across_boundary"] == 1 and ties["num_pairs_in_those_groups"] == 3
    exact, _ = assign_levels(scores, 2, "quantile", tie_tolerance=0)
    assert len(set(exact[1:4].tolist())) == 2  # without a tolerance the noise splits them (the old behaviour)


def test_uniform_ties_within_float_noise_at_an_edge_share_a_level():
    scores = [0.0, 0.5 - 1e-7, 0.5 + 1e-8, 1.0]  # the inner edge is 0.5
    levels, edges, ties = assign_levels(scores, 2, "uniform", return_ties=True)
    assert edges.tolist() == [0.0, 0.5, 1.0]
    assert levels.tolist() == [0, 0, 0, 1]  # the group's mean (0.5 - 4.5e-8) is below the edge
    assert ties == {"tie_tolerance": 1e-4, "num_tie_groups_across_boundary": 1, "num_pairs_in_those_groups": 2}


def test_tie_groups_do_not_chain_through_dense_scores():
    scores = np.arange(1000) * 5e-5  # every neighbour within the tolerance, the whole range 0.05 wide
    levels, _, ties = assign_levels(scores, 4, "quantile", return_ties=True)
    assert np.bincount(levels).tolist() == [251, 250, 250, 249]  # groups of 2-3 scores, not one group of 1000
    assert ties["num_tie_groups_across_boundary"] == 3


def test_uniform_scores_all_equal_within_noise():
    with pytest.raises(ValueError, match=r"^all 3 scores are equal within tie_tolerance=0\.0001 .* uniform bins are "
                                         r"undefined, use quantile$"):
        assign_levels([0.3, 0.3 + 1e-9, 0.3 - 1e-9], 2, "uniform")


def test_negative_tie_tolerance():
    with pytest.raises(ValueError, match=r"^tie_tolerance must be >= 0, got -1$"):
        assign_levels([0.1, 0.2], 2, tie_tolerance=-1)


def test_identical_pairs_end_to_end_share_a_level_and_the_report_counts_ties(tiny_clip, tmp_path):
    images = [coloured(i) for i in range(5)] + [coloured(2)] * 3
    path = write_pairs(tmp_path, images, CAPTIONS + [CAPTIONS[2]] * 3)
    result = compute_alignment_levels(path, tmp_path / "out.json", image_folder=str(tmp_path / "images"),
                                      scorer=tiny_clip, num_levels=4, plot=False, progress=False, batch_size=3)
    levels = [r["similarity"] for r in json.loads((tmp_path / "out.json").read_text())]
    assert levels[2] == levels[5] == levels[6] == levels[7]
    assert set(result.report["ties"]) == {"tie_tolerance", "num_tie_groups_across_boundary",
                                          "num_pairs_in_those_groups"}
    markdown = (tmp_path / "out.report.md").read_text()
    assert "* ties (scores within 0.0001) kept in one level across a boundary: " in markdown


# ------------------------------------------------------------------------------------------------ paths, files


@pytest.mark.parametrize("image", ["../outside.png", "ABSOLUTE"])
def test_image_path_escaping_the_image_folder(tiny_clip, tmp_path, image):
    coloured(9).save(tmp_path / "outside.png")
    image = str(tmp_path / "outside.png") if image == "ABSOLUTE" else image
    path = write_pairs(tmp_path, [coloured(i) for i in range(3)] + [image])
    with pytest.raises(ValueError, match=r"^record 'pair-3' \(row 3\): `image`: image path .* outside the image "
                                         r"folder .*--allow-outside-image-folder"):
        compute_alignment_levels(path, tmp_path / "out.json", image_folder=str(tmp_path / "images"),
                                 scorer=tiny_clip, num_levels=2, plot=False, progress=False)
    result = compute_alignment_levels(path, tmp_path / "out2.json", image_folder=str(tmp_path / "images"),
                                      scorer=tiny_clip, num_levels=2, plot=False, progress=False,
                                      allow_outside_image_folder=True)
    assert result.report["num_scored"] == 4


def test_truncated_cache_chunk_names_the_file(tiny_clip, tmp_path):
    path = write_pairs(tmp_path, [coloured(i) for i in range(6)])
    options = dict(image_folder=str(tmp_path / "images"), scorer=tiny_clip, num_levels=2, plot=False,
                   progress=False, chunk_size=3, cache_dir=tmp_path / "cache")
    compute_alignment_levels(path, tmp_path / "out.json", **options)
    chunk = sorted((tmp_path / "cache").glob("scores-*-00001-of-00002.arrow"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])  # the run was killed while writing it
    with pytest.raises(ValueError, match=rf"^levels cache chunk .*{chunk.name} is truncated or corrupt .*; delete that "
                                         r"file \(or the whole cache folder\) and rerun"):
        compute_alignment_levels(path, tmp_path / "out.json", **options)
    chunk.unlink()
    assert compute_alignment_levels(path, tmp_path / "out.json", **options).report["num_scored"] == 6


def test_levels_images_use_the_processors_conversion(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((4, 4), 4112, dtype=np.uint16)).save(tmp_path / "deep.png")
    image, mode = _open_image("rgba.png", str(tmp_path))
    assert mode == "RGBA" and image.getpixel((0, 0)) == (255, 255, 255)
    image, mode = _open_image("deep.png", str(tmp_path))
    assert mode == "I;16" and image.getpixel((0, 0)) == (16, 16, 16)
    with pytest.raises(ValueError, match=r"^image is empty \(0x0 pixels\)"):
        _open_image(Image.new("RGB", (0, 0)), None)


def test_llava_json_not_utf8_or_not_json(tiny_clip, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_bytes(b'[\n{"id": "caf\xe9"}]')
    options = dict(image_folder=str(tmp_path), scorer=tiny_clip, num_levels=2, plot=False, progress=False)
    with pytest.raises(ValueError, match=r"pairs\.json:2: not UTF-8 \(byte \d+\); re-save the file as UTF-8\.$"):
        compute_alignment_levels(path, tmp_path / "out.json", **options)
    path.write_text('[\n{"id": 1,,}]')
    with pytest.raises(ValueError, match=r"pairs\.json:2:10: not valid JSON \(Expecting property name"):
        compute_alignment_levels(path, tmp_path / "out.json", **options)


def test_chunk_size_zero(tiny_clip, tmp_path):
    path = write_pairs(tmp_path, [coloured(i) for i in range(3)])
    with pytest.raises(ValueError, match=r"^chunk_size and batch_size must be integers >= 1, got 0 and 64$"):
        compute_alignment_levels(path, tmp_path / "out.json", image_folder=str(tmp_path / "images"),
                                 scorer=tiny_clip, num_levels=2, plot=False, progress=False, chunk_size=0)

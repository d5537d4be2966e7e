"""Bad input, levels layer (found by probing): records of the wrong JSON shape named by field, OUTPUT that is a
folder, INPUT itself or inside INPUT, options that a LLaVA JSON input would silently ignore, a scorer that gives NaN,
scores with no signal, duplicate ids, empty levels in the plot, and tracebacks for a bad device, a bad split or an
empty saved dataset.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from modeling_tests.levels.test_bad_input_levels import coloured, tiny_clip, write_pairs  # noqa: F401 (fixture)

from aligngpt_hf.cli import main
from aligngpt_hf.levels import report as levels_report
from aligngpt_hf.levels.compute import _open_image, assign_levels, compute_alignment_levels


@pytest.fixture(scope="module")
def clip_folder(tiny_clip, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("clip")
    for part in tiny_clip:
        part.save_pretrained(folder)
    return folder


def options(tmp_path, clip, **extra):
    return dict(image_folder=str(tmp_path / "images"), scorer=clip, num_levels=2, plot=False, progress=False,
                device="cpu", **extra)


def with_record(path, row, edit):
    records = json.loads(path.read_text())
    edit(records, records[row])
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("edit, reason", [
    (lambda rs, r: rs.__setitem__(3, 7), r"the record is a JSON number, not an object with `image` and "
                                         r"`conversations`"),
    (lambda rs, r: r.__setitem__("image", 7), r"`image` must be one file name \(a string\), got a JSON number \(7\)"),
    (lambda rs, r: r.__setitem__("image", ["0.png", "1.png"]), r"`image` lists 2 images; a pre-training pair has "
                                                               r"exactly one"),
    (lambda rs, r: r.__setitem__("image", {"path": "0.png"}), r"`image` must be one file name \(a string\), got a "
                                                              r"JSON object"),
    (lambda rs, r: r.__setitem__("image", ""), r"`image` is an empty string; give the image's file name"),
    (lambda rs, r: r.__setitem__("conversations", "a red square"), r"`conversations` must be a JSON array of turns, "
                                                                    r"got a JSON string"),
    (lambda rs, r: r["conversations"][1].__setitem__("value", ["a"]), r"the caption \(`value` of the first `gpt` "
                                                                       r"turn\) must be a string, got a JSON array"),
    (lambda rs, r: r.__setitem__("image", "0\x00.png"), r"`image` path '0\\x00\.png' contains a NUL byte"),
    (lambda rs, r: r.__setitem__("image", "."), r"`image` names a folder, not an image file: "),
])
def test_record_of_the_wrong_shape_names_the_field(tiny_clip, tmp_path, edit, reason):  # noqa: F811
    path = with_record(write_pairs(tmp_path, [coloured(i) for i in range(5)]), 3, edit)
    with pytest.raises(ValueError, match=rf"^record '(pair-3|row 3)' \(row 3\): {reason}.*\. Fix the record or pass "
                                         r"--skip-bad"):
        compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, tiny_clip))
    result = compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, tiny_clip, skip_bad=True))
    assert result.report["num_skipped"] == 1 and result.report["skipped"][0]["row"] == 3
    assert len(json.loads((tmp_path / "out.json").read_text())) == 4


def test_output_that_is_a_folder_is_refused_before_scoring(tiny_clip, tmp_path):  # noqa: F811
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=rf"^OUTPUT {tmp_path / 'out'} is a folder; give the path of the JSON file to "
                                         rf"write, e\.g\. {tmp_path / 'out' / 'levels.json'}$"):
        compute_alignment_levels(path, tmp_path / "out", **options(tmp_path, tiny_clip))
    assert not list(tmp_path.glob(".out.levels-cache"))


def test_output_that_is_the_input_is_refused_and_the_input_kept(tiny_clip, tmp_path):  # noqa: F811
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    before = path.read_text()
    with pytest.raises(ValueError, match=rf"^OUTPUT {path} is INPUT itself; write to another folder"):
        compute_alignment_levels(path, path, **options(tmp_path, tiny_clip))
    assert path.read_text() == before


def test_output_inside_a_saved_dataset_input_is_refused(tiny_clip, tmp_path):  # noqa: F811
    images = [coloured(i) for i in range(4)]
    Dataset.from_dict({"image": images, "caption": ["a red square"] * 4}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=rf"^OUTPUT {tmp_path / 'ds' / 'out.json'} is inside INPUT {tmp_path / 'ds'}"):
        compute_alignment_levels(tmp_path / "ds", tmp_path / "ds" / "out.json", scorer=tiny_clip, num_levels=2,
                                 plot=False, progress=False, device="cpu")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json",
                                                                   "state.json"]


@pytest.mark.parametrize("flag, value", [("--split", "train"), ("--image-column", "img"), ("--text-column", "text")])
def test_dataset_options_with_llava_json_input_are_refused_not_ignored(tmp_path, capsys, flag, value):
    path = write_pairs(tmp_path, [coloured(i) for i in range(2)])
    assert main(["levels", str(path), str(tmp_path / "out.json"), "--image-folder", str(tmp_path / "images"),
                 "--scorer", "nobody/unused", "--no-plot", flag, value]) == 1
    assert capsys.readouterr().err.startswith(f"aligngpt-hf levels: error: {flag} applies to a saved dataset, but "
                                              f"{path} is LLaVA JSON")


@pytest.mark.parametrize("folder, what", [("missing", "does not exist"), ("pairs.json", "is a file")])
def test_image_folder_that_is_not_a_folder_is_named_once(tiny_clip, tmp_path, folder, what):  # noqa: F811
    path = write_pairs(tmp_path, [coloured(i) for i in range(3)])
    with pytest.raises(ValueError, match=rf"^--image-folder {tmp_path / folder} {what}; pass the folder"):
        compute_alignment_levels(path, tmp_path / "out.json", **{**options(tmp_path, tiny_clip),
                                                                  "image_folder": str(tmp_path / folder)})


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu9"], r"--device 'tpu9' is not a torch device \(.*\); use cpu, cuda or cuda:N"),
    (["--num-workers", "-1"], r"num_workers \(--num-workers, image decoding threads\) must be an integer >= 1, got -1"),
    (["--num-workers", "0"], r"num_workers \(--num-workers, image decoding threads\) must be an integer >= 1, got 0"),
    (["--num-shards", "0"], r"num_shards \(--num-shards\) must be an integer >= 1, got 0"),
    (["--shard-index", "1"], r"shard_index must be in 0\.\.0, got 1; pass --num-shards with --shard-index"),
    (["--tie-tolerance", "inf"], r"tie_tolerance \(--tie-tolerance\) must be a finite number >= 0, got inf"),
])
def test_bad_options_are_one_line_errors(clip_folder, tmp_path, capsys, argv, message):
    path = write_pairs(tmp_path, [coloured(i) for i in range(3)])
    clip = clip_folder
    assert main(["levels", str(path), str(tmp_path / "out.json"), "--image-folder", str(tmp_path / "images"),
                 "--scorer", str(clip), "--no-plot", "--num-levels", "2", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(rf"aligngpt-hf levels: error: {message}", err.splitlines()[-1]), err


def test_scorer_that_is_a_file_is_named(tmp_path, capsys):
    path = write_pairs(tmp_path, [coloured(i) for i in range(2)])
    assert main(["levels", str(path), str(tmp_path / "out.json"), "--image-folder", str(tmp_path / "images"),
                 "--scorer", str(path), "--no-plot", "--num-levels", "2"]) == 1
    assert capsys.readouterr().err.startswith(f"aligngpt-hf levels: error: the scorer '{path}' is a file; pass "
                                              "--scorer a CLIP or SigLIP model folder")


def test_saved_dataset_problems_are_named_not_tracebacks(tiny_clip, tmp_path):  # noqa: F811
    data = {"image": [coloured(i) for i in range(3)], "caption": ["a red square"] * 3}
    DatasetDict({"train": Dataset.from_dict(data), "test": Dataset.from_dict(data)}).save_to_disk(str(tmp_path / "dd"))
    run = dict(scorer=tiny_clip, num_levels=2, plot=False, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"dd has no split 'nope'; it holds \['train', 'test'\]: pass one of them"):
        compute_alignment_levels(tmp_path / "dd", tmp_path / "o.json", split="nope", **run)
    Dataset.from_dict({"image": [], "caption": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"empty is empty: there are no image-caption pairs to score"):
        compute_alignment_levels(tmp_path / "empty", tmp_path / "o.json", **run)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain is a folder but not a saved dataset"):
        compute_alignment_levels(tmp_path / "plain", tmp_path / "o.json", **run)
    Dataset.from_dict({"image": [1, 2, 3], "caption": ["a"] * 3}).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(ValueError, match=r"^record 'row 0' \(row 0\): `image` must be a file path, image bytes or a "
                                         r"PIL image, got int \(1\)"):
        compute_alignment_levels(tmp_path / "ints", tmp_path / "o.json", **run)


def test_scorer_giving_nan_names_the_record_and_skip_bad_counts_it(tiny_clip, tmp_path):  # noqa: F811
    model, processor = tiny_clip
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.visual_projection.weight[0, 0] = float("nan")
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    with pytest.raises(ValueError, match=r"^record 'pair-0' \(row 0\): the scorer gave a non-finite score \(nan\); "
                                         r"check the scorer's weights"):
        compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, (model, processor)))
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match=r"^every one of the 4 records was skipped"):  # NaN weights: every row
        compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, (model, processor), skip_bad=True))


def test_scores_without_signal_are_refused_for_quantile_too():
    with pytest.raises(ValueError, match=r"^all 3 scores are equal within tie_tolerance=0\.0001 .*: every pair would "
                                         r"get the same level; the scorer gives no signal"):
        assign_levels([0.3, 0.3 + 1e-9, 0.3 - 1e-9], 2, "quantile")


def test_duplicate_ids_and_empty_levels_are_reported_and_plotted(tmp_path, capsys):
    scores = np.array([0.1, 0.2, 0.2, 0.2, 0.2, 0.3])
    levels, edges = assign_levels(scores, 4)
    assert np.bincount(levels, minlength=4).tolist() == [1, 4, 0, 1]  # the tie group leaves level 2 empty
    report = levels_report.build_report(
        scores=scores, levels=levels, edges=edges, num_levels=4, binning="quantile", scorer="s",
        captions=["c"] * 6, ids=["a", "b", "a", "c", "a", "d"], errors=[""] * 6, modes=["RGB"] * 6,
        truncated=[False] * 6, max_length=16, seconds=1.0)
    assert report["num_duplicate_ids"] == 1 and report["duplicate_ids"] == ["a"] and report["empty_levels"] == [2]
    files = levels_report.write_report(report, tmp_path / "out.json", plot=True, scores=scores, edges=edges)
    assert (tmp_path / "out.scores.png").stat().st_size > 0 and "plot" in files
    markdown = (tmp_path / "out.report.md").read_text()
    assert "* ids used by more than one record (all records kept): 1 (e.g. a)" in markdown
    assert "* empty levels (ties or too few distinct scores): [2]" in markdown


def test_open_image_refuses_values_that_are_not_images(tmp_path):
    with pytest.raises(ValueError, match=r"^`image` must be a file path, image bytes or a PIL image, got float"):
        _open_image(1.5, None)
    with pytest.raises(ValueError, match=r"^no image$"):  # an empty datasets.Image cell
        _open_image({"bytes": None, "path": None}, None)


def test_every_record_skipped_says_why(tiny_clip, tmp_path):  # noqa: F811
    path = write_pairs(tmp_path, [coloured(i) for i in range(3)] + ["missing.png"] * 2)
    with_record(path, 0, lambda rs, r: r.__setitem__("image", "gone.png"))
    with_record(path, 1, lambda rs, r: r["conversations"][1].__setitem__("value", " "))
    with_record(path, 2, lambda rs, r: r.__setitem__("image", 3))
    with pytest.raises(ValueError, match=r"^every one of the 5 records was skipped, nothing to bucket: image file not "
                                         r"found \(3\); caption missing or empty \(1\); `image` must be one file name "
                                         r"\(1\)\. Fix the records"):
        compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, tiny_clip, skip_bad=True))


def test_report_that_would_overwrite_the_input_is_refused(tiny_clip, tmp_path):  # noqa: F811
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    source = path.rename(tmp_path / "levels.report.json")
    before = source.read_text()
    with pytest.raises(ValueError, match=rf"^INPUT {source} would be overwritten by the file levels\.report\.json that "
                                         rf"OUTPUT {tmp_path / 'levels.json'} writes next to it"):
        compute_alignment_levels(source, tmp_path / "levels.json", **options(tmp_path, tiny_clip))
    assert source.read_text() == before and not (tmp_path / "levels.json").exists()


def test_cache_dir_that_is_output_or_inside_a_dataset_input_is_refused(tiny_clip, tmp_path):  # noqa: F811
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    with pytest.raises(ValueError, match=rf"^--cache-dir {tmp_path / 'out.json'} is OUTPUT itself"):
        compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, tiny_clip,
                                                                         cache_dir=tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()
    Dataset.from_dict({"image": [coloured(i) for i in range(4)], "caption": ["a"] * 4}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=rf"^--cache-dir {tmp_path / 'd' / 'cache'} is inside INPUT {tmp_path / 'd'}"):
        compute_alignment_levels(tmp_path / "d", tmp_path / "o.json", scorer=tiny_clip, num_levels=2, plot=False,
                                 progress=False, device="cpu", cache_dir=tmp_path / "d" / "cache")

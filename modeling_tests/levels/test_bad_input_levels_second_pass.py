"""Bad input, levels layer, second pass: captions of special tokens only or of the wrong type, a list-of-one image
column, a saved dataset scored before, null ids, a scorer folder whose weights were replaced under the same name,
and a negative tie tolerance found only after scoring.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from modeling_tests.levels.test_bad_input_levels import CAPTIONS, coloured, tiny_clip, write_pairs  # noqa: F401

from aligngpt_hf.cli import main
from aligngpt_hf.levels.compute import compute_alignment_levels


def options(tmp_path, clip, **extra):
    return {"image_folder": str(tmp_path / "images"), "scorer": clip, "num_levels": 2, "plot": False,
            "progress": False, "device": "cpu", **extra}


def image_paths(tmp_path, count=4):
    (tmp_path / "images").mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        coloured(i).save(tmp_path / "images" / f"{i}.png")
        paths.append(str(tmp_path / "images" / f"{i}.png"))
    return paths


def test_caption_of_special_tokens_only_is_a_bad_record(tiny_clip, tmp_path):  # noqa: F811
    # Before: scored like a real caption (the text encoder saw an empty sentence) and given a level.
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)],
                       captions=CAPTIONS[:3] + ["<|endoftext|><pad> <|startoftext|>"])
    with pytest.raises(ValueError, match=re.escape(
            "record 'pair-3' (row 3): the caption '<|endoftext|><pad> <|startoftext|>' holds only the scorer's "
            "special tokens, no words. Fix the record or pass --skip-bad")):
        compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, tiny_clip))
    result = compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, tiny_clip, skip_bad=True))
    assert result.report["num_skipped"] == 1 and [r["id"] for r in json.loads((tmp_path / "out.json").read_text())] \
        == ["pair-0", "pair-1", "pair-2"]


def test_caption_that_is_a_list_is_named_as_such(tiny_clip, tmp_path):  # noqa: F811
    # Before: "caption missing or empty", though the caption is there.
    dataset = Dataset.from_dict({"id": list("abcd"), "image": image_paths(tmp_path),
                                 "caption": [[caption] for caption in CAPTIONS[:4]]})
    with pytest.raises(ValueError, match=re.escape(
            "record 'a' (row 0): the caption must be a string, got list (['a red square'])")):
        compute_alignment_levels(dataset, tmp_path / "out.json", **options(tmp_path, tiny_clip, image_folder=None))


def test_image_column_of_one_image_lists_is_scored_and_two_are_refused(tiny_clip, tmp_path):  # noqa: F811
    # Before: every row was refused with "`image` must be a file path, ... got list ([<PIL.PngImagePlugin...".
    paths = image_paths(tmp_path)
    features = Features({"id": Value("string"), "image": List(Image()), "caption": Value("string")})
    single = Dataset.from_dict({"id": list("abcd"), "image": [[p] for p in paths], "caption": CAPTIONS[:4]},
                               features=features)
    plain = Dataset.from_dict({"id": list("abcd"), "image": paths, "caption": CAPTIONS[:4]},
                              features=Features({**features, "image": Image()}))
    run = dict(**options(tmp_path, tiny_clip, image_folder=None))
    listed = compute_alignment_levels(single, tmp_path / "listed.json", **run).dataset["alignment_score"]
    scores = compute_alignment_levels(plain, tmp_path / "plain.json", **run).dataset["alignment_score"]
    assert listed == pytest.approx(scores, abs=1e-6)
    double = Dataset.from_dict({"id": list("abcd"), "image": [[p, p] for p in paths], "caption": CAPTIONS[:4]},
                               features=features)
    with pytest.raises(ValueError, match=re.escape(
            "record 'a' (row 0): `image` lists 2 images; a pre-training pair has exactly one.")):
        compute_alignment_levels(double, tmp_path / "double.json", **run)


def test_dataset_scored_before_is_scored_again(tiny_clip, tmp_path, caplog):  # noqa: F811
    # Before: "The table can't have duplicated columns but columns ['alignment_score'] are duplicated."
    dataset = Dataset.from_dict({"id": list("abcd"), "image": image_paths(tmp_path), "caption": CAPTIONS[:4]})
    first = compute_alignment_levels(dataset, tmp_path / "first.json", **options(tmp_path, tiny_clip,
                                                                                 image_folder=None))
    again = Dataset.load_from_disk(first.files["dataset"])
    assert {"alignment_score", "alignment_level"} <= set(again.column_names)
    second = compute_alignment_levels(again, tmp_path / "second.json", **options(tmp_path, tiny_clip,
                                                                                  image_folder=None))
    assert second.dataset["alignment_score"] == pytest.approx(first.dataset["alignment_score"], abs=1e-6)
    assert "the input already has the columns alignment_score" in caplog.text


def test_null_id_is_written_as_null_not_the_word_none(tiny_clip, tmp_path):  # noqa: F811
    dataset = Dataset.from_dict({"id": ["a", None, "c", "d"], "image": image_paths(tmp_path),
                                 "caption": CAPTIONS[:4]})
    compute_alignment_levels(dataset, tmp_path / "out.json", **options(tmp_path, tiny_clip, image_folder=None))
    assert [r["id"] for r in json.loads((tmp_path / "out.json").read_text())] == ["a", None, "c", "d"]


def test_scorer_folder_with_new_weights_is_not_served_from_the_cache(tiny_clip, tmp_path):  # noqa: F811
    # Before: the cache key held only the folder's name, so the old weights' scores were reused silently.
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    scorer = tmp_path / "clip"
    for part in tiny_clip:
        part.save_pretrained(scorer)
    run = dict(**options(tmp_path, str(scorer)))
    old = compute_alignment_levels(path, tmp_path / "out.json", **run).dataset["alignment_score"]
    model = type(tiny_clip[0])(tiny_clip[0].config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    shutil.rmtree(scorer)
    model.save_pretrained(scorer)
    tiny_clip[1].save_pretrained(scorer)
    new = compute_alignment_levels(path, tmp_path / "out.json", **run).dataset["alignment_score"]
    fresh = compute_alignment_levels(path, tmp_path / "fresh.json", **run, cache_dir=tmp_path / "empty-cache")
    assert new != pytest.approx(old, abs=1e-6)
    assert new == pytest.approx(fresh.dataset["alignment_score"], abs=1e-6)


def test_negative_tie_tolerance_is_refused_before_the_scorer_is_loaded(tmp_path, capsys):
    # Before: the scorer was loaded and every pair scored, then `assign_levels` refused -1.
    path = write_pairs(tmp_path, [coloured(i) for i in range(2)])
    assert main(["levels", str(path), str(tmp_path / "out.json"), "--image-folder", str(tmp_path / "images"),
                 "--scorer", "nobody/not-loaded", "--no-plot", "--num-levels", "2", "--tie-tolerance", "-1"]) == 1
    assert capsys.readouterr().err.strip() == ("aligngpt-hf levels: error: tie_tolerance (--tie-tolerance) must be a "
                                               "finite number >= 0, got -1.0")


def test_key_given_twice_in_a_record_is_refused(tmp_path):
    from aligngpt_hf.levels.inputs import pairs_from_llava_json

    path = tmp_path / "pairs.json"
    path.write_text('[{"id": "p0", "image": "0.png", "image": "1.png", "conversations": []}]')
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: a JSON object gives the key `image` twice (the record with `id` 'p0'); JSON would keep only "
            "the last value")):
        pairs_from_llava_json(path)


def test_jsonl_input_is_read_like_the_json_list(tiny_clip, tmp_path):  # noqa: F811
    # Before: "not valid JSON (Extra data)" for the format `load_llava_json` reads.
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    records = json.loads(path.read_text())
    lines = tmp_path / "pairs.jsonl"
    lines.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    from_json = compute_alignment_levels(path, tmp_path / "a.json", **options(tmp_path, tiny_clip))
    from_lines = compute_alignment_levels(lines, tmp_path / "b.json", **options(tmp_path, tiny_clip))
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    assert from_lines.report["num_scored"] == from_json.report["num_scored"] == 4


def test_id_column_that_is_not_there_is_refused_not_replaced_by_row_numbers(tiny_clip, tmp_path):  # noqa: F811
    # Before: the records were silently named "row N" and the output ids were row numbers.
    dataset = Dataset.from_dict({"uid": list("abcd"), "image": image_paths(tmp_path), "caption": CAPTIONS[:4]})
    with pytest.raises(ValueError, match=re.escape(
            "--id-column 'uidd' is not a column of the input (columns: ['uid', 'image', 'caption']); name the column "
            "holding the record ids")):
        compute_alignment_levels(dataset, tmp_path / "out.json", **options(tmp_path, tiny_clip, image_folder=None,
                                                                           id_column="uidd"))
    assert not (tmp_path / "out.json").exists()


def test_embedded_image_bytes_without_a_path_are_reported(tiny_clip, tmp_path, caplog):  # noqa: F811
    # Before: OUTPUT silently held `image: null` for them (a LLaVA JSON that cannot be trained on).
    paths = image_paths(tmp_path)
    images = [{"bytes": open(path, "rb").read(), "path": None} for path in paths]
    dataset = Dataset.from_dict({"id": list("abcd"), "image": images, "caption": CAPTIONS[:4]},
                                features=Features({"id": Value("string"), "image": Image(), "caption": Value("string")}))
    result = compute_alignment_levels(dataset, tmp_path / "out.json", **options(tmp_path, tiny_clip, image_folder=None))
    assert [r["image"] for r in json.loads((tmp_path / "out.json").read_text())] == [None] * 4
    assert (f"4 of 4 image(s) are embedded bytes without a file path: their records in {tmp_path / 'out.json'} have "
            f"`image: null`. Train from the saved dataset {result.files['dataset']}") in caplog.text


def test_caption_of_an_assistant_turn_is_read_as_load_llava_json_reads_it(tiny_clip, tmp_path):  # noqa: F811
    # Before: records with "user"/"assistant" speakers (which training accepts) were all "caption missing or empty".
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    records = json.loads(path.read_text())
    for record in records:
        record["conversations"] = [{"from": "user", "value": "<image>"},
                                   {"from": "assistant", "value": record["conversations"][1]["value"]}]
    path.write_text(json.dumps(records))
    result = compute_alignment_levels(path, tmp_path / "out.json", **options(tmp_path, tiny_clip))
    assert result.report["num_scored"] == 4 and result.report["num_skipped"] == 0

"""Levels faults that used to be silent or unclear: an image replaced under the same name (stale cached score), a
rotated photo, a full disk while writing OUTPUT (half-written JSON), leftovers of a killed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from modeling_tests.levels.test_bad_input_levels import coloured, tiny_clip, write_pairs  # noqa: F401 (fixture)
from modeling_tests.models.test_processor_inputs import rotated_jpeg

from aligngpt_hf.levels.compute import _open_image, compute_alignment_levels

ROOT = Path(__file__).resolve().parents[2]


def scores(result) -> dict[str, float]:
    return {record["id"]: record["alignment_score"] for record in json.loads(result.output.read_text())}


def test_image_replaced_under_the_same_name_is_scored_again(tiny_clip, tmp_path):  # noqa: F811
    path = write_pairs(tmp_path, [coloured(i) for i in range(6)])
    options = dict(image_folder=str(tmp_path / "images"), scorer=tiny_clip, num_levels=2, plot=False, progress=False,
                   chunk_size=3, cache_dir=tmp_path / "cache")
    before = scores(compute_alignment_levels(path, tmp_path / "out.json", **options))
    coloured(99).save(tmp_path / "images" / "0.png")  # new content, same name
    stat = os.stat(tmp_path / "images" / "0.png")
    os.utime(tmp_path / "images" / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = scores(compute_alignment_levels(path, tmp_path / "out.json", **options))
    fresh = scores(compute_alignment_levels(path, tmp_path / "fresh.json", **{**options, "cache_dir": tmp_path / "c2"}))
    assert after == fresh and after["pair-0"] != before["pair-0"]
    assert {k: v for k, v in after.items() if k != "pair-0"} == {k: v for k, v in before.items() if k != "pair-0"}
    assert len(list((tmp_path / "cache").glob("scores-*-00000-of-00002.arrow"))) == 1  # the stale chunk is gone


def test_rotated_photo_is_scored_upright(tmp_path):
    rotated_jpeg(tmp_path / "photo.jpg")
    image, mode = _open_image("photo.jpg", str(tmp_path))
    assert mode == "RGB" and image.size == (40, 20) and image.getpixel((5, 10))[0] > 150


FULL_DISK = """
import json, resource, signal, sys, torch
sys.path.insert(0, {root!r})
from modeling_tests.levels.test_bad_input_levels import CAPTIONS, coloured, write_pairs
from aligngpt_hf.levels.compute import compute_alignment_levels
from aligngpt_hf.tiny import build_clip
from pathlib import Path
folder = Path({folder!r})
torch.manual_seed(0)
corpus = [" ".join(CAPTIONS[i:] + CAPTIONS[:i]) for i in range(len(CAPTIONS))]
clip = build_clip(corpus, hidden_size=32, num_layers=2, image_size=32, patch_size=8, max_length=16)
path = write_pairs(folder, [coloured(i) for i in range(12)])
options = dict(image_folder=str(folder / "images"), scorer=clip, plot=False, progress=False)
compute_alignment_levels(path, folder / "out.json", num_levels=2, **options)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # the disk is "full" after 1 kB per file
try:
    compute_alignment_levels(path, folder / "out.json", num_levels=3, **options)
except OSError as error:
    print("ERROR", error)
"""


def test_full_disk_while_writing_output_keeps_the_old_file_and_names_the_path(tmp_path):
    code = FULL_DISK.format(root=str(ROOT), folder=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert f"ERROR cannot write {tmp_path}/out.json: File too large; free space on that disk or write elsewhere" in \
        result.stdout, result.stdout + result.stderr[-2000:]
    records = json.loads((tmp_path / "out.json").read_text())  # the first run's complete file, not half of the second
    assert len(records) == 12 and {r["similarity"] for r in records} == {0, 1}
    assert not list(tmp_path.glob(".*aligngpt-tmp-*"))


def test_leftovers_of_a_killed_run_are_removed_on_rerun(tiny_clip, tmp_path):  # noqa: F811
    path = write_pairs(tmp_path, [coloured(i) for i in range(4)])
    (tmp_path / ".out.json.aligngpt-tmp-k1ll3d").write_text('[{"id": "pair-0", "simil')  # a write cut short
    compute_alignment_levels(path, tmp_path / "out.json", image_folder=str(tmp_path / "images"), scorer=tiny_clip,
                             num_levels=2, plot=False, progress=False)
    assert not list(tmp_path.glob(".out.json.aligngpt-tmp-*"))
    assert len(json.loads((tmp_path / "out.json").read_text())) == 4

"""`aligngpt-hf levels` split across 2 CPU processes: `accelerate launch` with the shipped ddp.yaml (and the CPU
override of docs/multi-gpu.md) gives the levels of one process, each chunk scored once by one process; a lost chunk
is rescored by its own shard alone (`--num-shards 2 --shard-index 1`) and the merge reuses everything else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.levels.compute import compute_alignment_levels
from aligngpt_hf.tiny import build_clip
from aligngpt_hf.training.cli import accelerate_config_path
from conftest import run_launcher

# the console script next to this interpreter (a virtual environment), else the one on PATH
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate") or "accelerate"
WORDS = ["red", "blue", "green", "yellow", "square", "circle", "triangle", "small", "large", "a", "photo", "of"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 230, 20)]


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def write_inputs(root: Path, count: int = 10) -> tuple[Path, Path]:
    """A saved tiny CLIP (the scorer, loaded by path in every process) and `count` LLaVA pre-training records."""
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    torch.manual_seed(0)
    model, processor = build_clip(corpus, hidden_size=32, num_layers=2, image_size=32, patch_size=8, max_length=16)
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    (root / "images").mkdir()
    records = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 60, size=(40, 48, 3), dtype=np.uint8)
        pixels[8:32, 10:38] = COLOURS[(i * 7) % 4]
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        caption = f"a {['small', 'large'][i % 2]} {WORDS[i % 4]} {['square', 'circle', 'triangle'][i % 3]}"
        records.append({"id": f"pair-{i:03d}", "image": f"{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nRender a short caption."}, {"from": "gpt", "value": caption}]})
    (root / "pairs.json").write_text(json.dumps(records))
    return root / "clip", root / "pairs.json"


def test_levels_under_accelerate_launch_equal_one_process_and_resume_per_shard(tmp_path):
    clip, pairs = write_inputs(tmp_path)
    options = ["--image-folder", str(tmp_path / "images"), "--scorer", str(clip), "--num-levels", "4",
               "--batch-size", "4", "--chunk-size", "3", "--no-plot"]
    single = compute_alignment_levels(pairs, tmp_path / "single" / "levels.json", image_folder=str(tmp_path / "images"),
                                      scorer=str(clip), num_levels=4, batch_size=4, chunk_size=3, plot=False,
                                      device="cpu", progress=False)
    expected = json.loads(single.output.read_text())

    output, cache = tmp_path / "multi" / "levels.json", tmp_path / "cache"
    command = [ACCELERATE, "launch", "--config_file", str(accelerate_config_path("ddp")), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", free_port(), "-m", "aligngpt_hf.cli", "levels",
               str(pairs), str(output), "--cache-dir", str(cache), *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = run_launcher(command, env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("10 pairs in 4 levels") == 1  # process 1 scored its chunks, process 0 merged
    chunks = sorted(cache.glob("scores-*.arrow"))
    assert len(chunks) == 4  # ceil(10 / 3) chunks, one file each: both processes keyed the cache alike
    _assert_same_levels(json.loads(output.read_text()), expected)

    lost = next(path for path in chunks if "-00001-of-" in path.name)  # chunk 1 belongs to shard 1 (chunks 1, 3)
    kept = {path: path.stat().st_mtime_ns for path in chunks if path != lost}
    lost.unlink()
    output.unlink()
    shard = ["levels", str(pairs), str(output), "--cache-dir", str(cache), "--device", "cpu", *options]
    assert cli_main([*shard, "--num-shards", "2", "--shard-index", "1"]) == 0
    assert lost.is_file() and not output.exists()
    assert cli_main(shard) == 0  # merge: every chunk cached
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # nothing else was rescored
    _assert_same_levels(json.loads(output.read_text()), expected)


def _assert_same_levels(records: list[dict], expected: list[dict]) -> None:
    assert [(r["id"], r["similarity"], r["alignment_level"]) for r in records] == [
        (r["id"], r["similarity"], r["alignment_level"]) for r in expected]
    np.testing.assert_allclose([r["alignment_score"] for r in records], [r["alignment_score"] for r in expected],
                               rtol=0, atol=1e-6)

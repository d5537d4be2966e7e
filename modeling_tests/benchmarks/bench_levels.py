"""Pairs/second of `aligngpt_hf.levels.compute.score_pairs` on this machine (a script, not a test).

Runs the real pipeline (JPEG files on disk -> threaded decode + preprocessing -> datasets.map -> both towers
-> cosine) with a small random CLIP, then the same run with the text tower replaced by a constant (the
vision tower alone: the upper bound, since every pair needs its image encoded), then the decode +
preprocessing stage alone at CLIP-L/336 resolution (what feeds a GPU). Nothing is downloaded.

    PYTHONPATH=src python modeling_tests/benchmarks/bench_levels.py [--pairs 256] [--out bench_levels.json]

Reported figures are medians of interleaved repeats: this 2-core VM's speed drifts by 2-3x between passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aligngpt_hf.levels.compute import _open_image, load_scorer, pairs_from_llava_json, score_pairs

WORDS = ("a photo of the small large red blue green dog cat man woman street car tree house on in with near "
         "sitting standing next to white black old new city beach").split()


def build_small_clip(image_size: int, patch: int, hidden: int, layers: int):
    """A random CLIP of the given size with a tokenizer trained on the caption words (`aligngpt_hf.tiny.build_clip`)."""
    from aligngpt_hf.tiny import build_clip

    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 12)) for _ in range(200)]
    torch.manual_seed(0)
    model, processor = build_clip(corpus, hidden_size=hidden, num_layers=layers, image_size=image_size,
                                  patch_size=patch, vocab_size=1000, max_length=77)
    return model.eval(), processor


def write_pairs(folder: Path, count: int) -> Path:
    """JPEGs of LLaVA-Pretrain-like sizes (longest side 300-500 px) and 8-20 word captions."""
    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(count):
        height, width = int(rng.integers(300, 500)), int(rng.integers(300, 500))
        base = rng.integers(0, 255, size=(height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
        image.save(folder / "images" / f"{i:05d}.jpg", quality=90)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(8, 21))))
        records.append({"id": str(i), "image": f"{i:05d}.jpg",
                        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]})
    path = folder / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def timed_score(pairs, scorer, folder: Path, batch_size: int, workers: int, tag: str) -> float:
    start = time.perf_counter()
    score_pairs(pairs, scorer, image_folder=str(folder / "images"), batch_size=batch_size, num_workers=workers,
                cache_dir=folder / f"cache-{tag}", progress=False)
    return len(pairs) / (time.perf_counter() - start)


def preprocess_rate(folder: Path, count: int, workers: int, image_size: int) -> float:
    """Decode + resize/crop/normalise only, with the same worker threads (what feeds the towers); best of 2."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})

    def work(i):
        image, _ = _open_image(f"{i:05d}.jpg", str(folder / "images"))
        return processor(images=[image], return_tensors="pt")["pixel_values"]

    rates = []
    for _ in range(2):
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(count)))
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_levels.json")
    args = parser.parse_args()
    model, processor = build_small_clip(args.image_size, args.patch, args.hidden, args.layers)
    scorer = load_scorer((model, processor))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, pairs = pairs_from_llava_json(write_pairs(folder, args.pairs))
        timed_score(pairs, scorer, folder, args.batch_size, args.workers, "warm")  # this VM speeds up after a pass
        width = model.config.projection_dim
        full_runs, vision_runs = [], []
        for repeat in range(args.repeats):  # interleaved, so drift in machine speed hits both alike
            full_runs.append(timed_score(pairs, scorer, folder, args.batch_size, args.workers, f"full{repeat}"))
            model.get_text_features = lambda input_ids, **_: torch.ones(input_ids.shape[0], width)
            vision_runs.append(timed_score(pairs, scorer, folder, args.batch_size, args.workers, f"vision{repeat}"))
            del model.get_text_features
        full, vision_only = float(np.median(full_runs)), float(np.median(vision_runs))
        prep_224 = preprocess_rate(folder, args.pairs, args.workers, args.image_size)
        prep_336 = preprocess_rate(folder, args.pairs, args.workers, 336)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                   f"{torch.get_num_threads()}, torch {torch.__version__}",
        "pairs": args.pairs, "batch_size": args.batch_size, "workers": args.workers,
        "clip": {"image_size": args.image_size, "patch": args.patch, "hidden": args.hidden, "layers": args.layers,
                 "parameters": sum(p.numel() for p in model.parameters())},
        "pairs_per_second_full_clip": round(full, 1),
        "runs_full_clip": [round(r, 1) for r in full_runs],
        "runs_vision_tower_alone": [round(r, 1) for r in vision_runs],
        "pairs_per_second_vision_tower_alone": round(vision_only, 1),
        "ratio_full_over_vision_alone": round(full / vision_only, 3),
        "images_per_second_decode_preprocess_224": round(prep_224, 1),
        "images_per_second_decode_preprocess_336": round(prep_336, 1),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

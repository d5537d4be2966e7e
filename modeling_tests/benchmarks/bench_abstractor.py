"""mPLUG-Owl's visual abstractor vs AlignGPT's MLP projector: parameter counts at 7B, step time on a tiny config.

1. Parameter counts: `hub_configs/aligngpt-mplug-owl-7b` vs `hub_configs/aligngpt-7b`, both built on the meta device
   (no memory, nothing downloaded); projector, vision tower, language model, total, image tokens per image.
2. Forward + backward step time of the same tiny model with either projector (MLP: layer -2, CLS dropped, 2-layer
   GELU; abstractor: last layer + CLS + post-LN, `--queries` queries x `--abstractor-layers` layers, width ratio of
   v1), everything trainable, one image per sample. Medians of `--repeats` interleaved runs of `--steps` steps each.
   Image tokens: (image_size / patch)^2 for the MLP, queries + 1 for the abstractor (64 vs 65 by default).

    python modeling_tests/benchmarks/bench_abstractor.py [--hidden 256 --layers 4 --image-size 64 --patch 8] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration  # noqa: E402
from aligngpt_hf.tiny import build_config, build_processor, build_tokenizer  # noqa: E402
from aligngpt_hf.training.mplug_owl import MPLUG_OWL_CONFIG  # noqa: E402

HUB_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(name: str) -> dict:
    """Parameter counts of a shipped hub config's model, built on the meta device."""
    config = AlignGPTConfig.from_pretrained(HUB_CONFIGS / name)
    with torch.device("meta"):
        model = AlignGPTForConditionalGeneration(config)
    base = model.model
    return {"config": name, "projector_type": config.projector_type, "image_tokens": config.image_seq_length,
            "projector": count(base.multi_modal_projector), "vision_tower": count(base.vision_tower),
            "language_model": count(base.language_model) + count(model.lm_head), "total": count(model)}


def tiny_variants(opts, tokenizer) -> dict:
    common = dict(hidden_size=opts.hidden, num_layers=opts.layers, image_size=opts.image_size, patch_size=opts.patch)
    abstractor = dict(MPLUG_OWL_CONFIG, abstractor_num_queries=opts.queries, abstractor_num_layers=opts.abstractor_layers,
                      abstractor_num_heads=max(opts.hidden // 64, 1),
                      abstractor_intermediate_size=opts.hidden * 2816 // 1024)
    return {"mlp": build_config(tokenizer, **common), "abstractor": build_config(tokenizer, **common, **abstractor)}


def make_step(config, tokenizer, opts):
    """A closure running one forward + backward + zero_grad of a fresh model on a fixed batch."""
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(config).to(opts.device).train()
    processor = build_processor(tokenizer, image_size=opts.image_size, patch_size=opts.patch,
                                image_seq_length=config.image_seq_length)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The shape is red. " * 4}]}]
    prompt = processor.apply_chat_template(messages)
    images = [[Image.new("RGB", (opts.image_size, opts.image_size), (40 * i % 255, 90, 160))] for i in range(opts.batch)]
    batch = processor(text=[prompt] * opts.batch, images=images, padding=True, return_tensors="pt").to(opts.device)

    def step():
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()

    return step, int(batch["input_ids"].shape[1])


def time_steps(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def step_time_ratio(opts) -> dict:
    tokenizer = build_tokenizer()
    steps, lengths = {}, {}
    for name, config in tiny_variants(opts, tokenizer).items():
        steps[name], lengths[name] = make_step(config, tokenizer, opts)
        steps[name]()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(opts.repeats):  # interleaved, so drifting machine load hits both alike
        for name, step in steps.items():
            times[name].append(time_steps(step, opts.steps))
    medians = {name: statistics.median(values) for name, values in times.items()}
    paired = [a / m for a, m in zip(times["abstractor"], times["mlp"])]
    return {"sequence_length": lengths, "median_step_s": medians, "all_step_s": times,
            "ratio_abstractor_over_mlp": medians["abstractor"] / medians["mlp"],
            "median_of_paired_ratios": statistics.median(paired)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--abstractor-layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this file")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    counts = [parameter_counts("aligngpt-7b"), parameter_counts("aligngpt-mplug-owl-7b")]
    for row in counts:
        print(f"{row['config']:24s} projector {row['projector_type']:11s} {row['projector']:>12,d} params, "
              f"{row['image_tokens']} image tokens; vision {row['vision_tower']:,d}; LLM {row['language_model']:,d}; "
              f"total {row['total']:,d}")
    print(f"abstractor / MLP projector parameters: {counts[1]['projector'] / counts[0]['projector']:.2f}x")
    timing = step_time_ratio(opts)
    print(f"tiny step time (hidden {opts.hidden}, {opts.layers} layers, {opts.image_size}px/{opts.patch}, batch "
          f"{opts.batch}; forward+backward, medians of {opts.repeats} x {opts.steps} steps): MLP "
          f"{timing['median_step_s']['mlp'] * 1e3:.1f} ms, abstractor {timing['median_step_s']['abstractor'] * 1e3:.1f}"
          f" ms, ratio {timing['ratio_abstractor_over_mlp']:.2f} (median of paired ratios "
          f"{timing['median_of_paired_ratios']:.2f}; sequence lengths {timing['sequence_length']}, {opts.device})")
    result = {"parameter_counts_7b": counts, "tiny_step_time": timing, "settings": vars(opts),
              "torch_threads": torch.get_num_threads()}
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

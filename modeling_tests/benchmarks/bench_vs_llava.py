"""AlignGPT vs transformers' LLaVA at identical dimensions and shared weights: train step and greedy decode.

    python modeling_tests/benchmarks/bench_vs_llava.py [--repeats 15] [--out results.json]

Three models share every weight LLaVA has: AlignGPT (adaptive gate, one ALIGN position per image sample), LLaVA, and
a control, AlignGPT with `alignment_mode="none"` on LLaVA's inputs, which runs LLaVA's computation through our code.
Small shared CPUs drift by tens of percent between seconds, so each repeat runs all three back to back in a rotated
order and the ratios are medians of the per-repeat ratios (paired), with their quartiles and the ratio of the fastest
runs beside them. The control's ratio shows how far the harness itself is from 1.00. Because wall-clock ratios on a
shared machine stay noisy, the matmul FLOPs of one train step and one `generate` call are counted too
(`torch.utils.flop_counter`; deterministic, attention kernels excluded). Prints everything and writes it as JSON. Not
a test: timings depend on the machine and are never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration

IMAGE_ID, ALIGN_ID, BOS = 31998, 31999, 1
DIMS = dict(vocab=32000, hidden=512, layers=4, heads=8, vision_hidden=256, vision_layers=4, image=224, patch=14,
            batch=8, text_tokens=128, new_tokens=32)


def build_models():
    vision = CLIPVisionConfig(hidden_size=DIMS["vision_hidden"], intermediate_size=4 * DIMS["vision_hidden"],
                              num_hidden_layers=DIMS["vision_layers"], num_attention_heads=4,
                              image_size=DIMS["image"], patch_size=DIMS["patch"])
    text = LlamaConfig(vocab_size=DIMS["vocab"], hidden_size=DIMS["hidden"], intermediate_size=1376,
                       num_hidden_layers=DIMS["layers"], num_attention_heads=DIMS["heads"],
                       num_key_value_heads=DIMS["heads"], bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    ours = AlignGPTForConditionalGeneration(AlignGPTConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID, alignment_token_id=ALIGN_ID))
    control = AlignGPTForConditionalGeneration(AlignGPTConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID, alignment_token_id=ALIGN_ID,
        alignment_mode="none"))
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_ID,
        image_seq_length=ours.config.image_seq_length, vision_feature_layer=-2))
    for model in (llava, control):
        missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
        assert not missing and all(key.startswith("model.alignment.") for key in unexpected)
    return ours, llava, control


def build_inputs(image_tokens: int, with_align: bool, padding_side: str = "right"):
    """Batch of image + text rows padded to a common length (text lengths 128, 126, ...)."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for b in range(DIMS["batch"]):
        text = torch.randint(3, 30000, (DIMS["text_tokens"] - 2 * b,), generator=generator).tolist()
        rows.append([BOS] + ([ALIGN_ID] if with_align else []) + text[:7] + [IMAGE_ID] * image_tokens + text[7:])
    length = max(map(len, rows))
    def pad(row, value, fill):
        padding = [fill] * (length - len(row))
        return padding + [value] * len(row) if padding_side == "left" else [value] * len(row) + padding

    input_ids = torch.tensor([pad(row, 0, 0) for row in rows]).masked_scatter(
        torch.tensor([pad(row, 1, 0) for row in rows]).bool(), torch.tensor([t for row in rows for t in row]))
    attention_mask = torch.tensor([pad(row, 1, 0) for row in rows])
    pixel_values = torch.randn(DIMS["batch"], 3, DIMS["image"], DIMS["image"], generator=generator)
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == IMAGE_ID) | (input_ids == ALIGN_ID), -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)


def paired_timings(functions: dict, repeats: int, warmup: int = 1) -> dict:
    """Seconds per function per repeat; every repeat runs all functions back to back, in a rotated order."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    names, times = list(functions), {name: [] for name in functions}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict, reference: str = "llava") -> dict:
    """Median and fastest seconds per model, and each model's paired ratios to the reference (median, quartiles)."""
    summary = {name: {"median_s": statistics.median(values), "min_s": min(values)} for name, values in times.items()}
    for name, values in times.items():
        paired = [value / base for value, base in zip(values, times[reference])]
        summary[name]["paired_ratio"] = statistics.median(paired)
        summary[name]["paired_ratio_quartiles"] = statistics.quantiles(paired, n=4)[::2] if len(paired) > 1 else []
        summary[name]["min_ratio"] = min(values) / min(times[reference])
    return summary


def matmul_flops(functions: dict, reference: str = "llava") -> dict:
    """FLOPs of one call per function (matmuls and convolutions, forward and backward) and the ratio to the reference."""
    counts = {}
    for name, function in functions.items():
        counter = FlopCounterMode(display=False)
        with counter:
            function()
        counts[name] = counter.get_total_flops()
    return {name: {"flops": count, "ratio": count / counts[reference]} for name, count in counts.items()}


def train_step(model, batch):
    def step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    return step


def decode(model, batch):
    prompt = {key: value for key, value in batch.items() if key != "labels"}
    return lambda: model.generate(**prompt, max_new_tokens=DIMS["new_tokens"], min_new_tokens=DIMS["new_tokens"],
                                  do_sample=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="bench_vs_llava.json")
    args = parser.parse_args(argv)
    ours, llava, control = build_models()
    tokens = ours.config.image_seq_length
    batches = {"aligngpt": build_inputs(tokens, with_align=True), "llava": build_inputs(tokens, with_align=False)}
    prompts = {"aligngpt": build_inputs(tokens, with_align=True, padding_side="left"),
               "llava": build_inputs(tokens, with_align=False, padding_side="left")}
    models = {"aligngpt": ours, "llava": llava, "control": control}
    inputs_of = {"aligngpt": "aligngpt", "llava": "llava", "control": "llava"}
    results = {"config": DIMS, "image_tokens": tokens, "repeats": args.repeats,
               "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    for model in models.values():
        model.train()
    steps = {name: train_step(model, batches[inputs_of[name]]) for name, model in models.items()}
    results["train_step_flops"] = matmul_flops(steps)
    train = paired_timings(steps, args.repeats)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        generations = {name: decode(model, prompts[inputs_of[name]]) for name, model in models.items()}
        results["decode_flops"] = matmul_flops(generations)
        generate = paired_timings(generations, args.repeats)
    results["train_step"] = summarise(train)
    results["decode"] = summarise(generate)
    new_tokens = DIMS["batch"] * DIMS["new_tokens"]
    for entry in results["decode"].values():  # speed, not time: LLaVA-relative tokens/s
        entry["tokens_per_s"] = new_tokens / entry["median_s"]
        entry["paired_speed_ratio"], entry["min_speed_ratio"] = 1 / entry.pop("paired_ratio"), 1 / entry.pop("min_ratio")
        entry["paired_speed_ratio_quartiles"] = [1 / ratio for ratio in entry.pop("paired_ratio_quartiles")][::-1]
    results["train_step_ratio"] = results["train_step"]["aligngpt"]["paired_ratio"]
    results["decode_speed_ratio"] = results["decode"]["aligngpt"]["paired_speed_ratio"]
    results["raw_seconds"] = {"train_step": train, "decode": generate}
    print(json.dumps({key: value for key, value in results.items() if key != "raw_seconds"}, indent=2))
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

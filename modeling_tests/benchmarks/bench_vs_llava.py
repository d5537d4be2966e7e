"""AlignGPT vs transformers' LLaVA at identical dimensions and shared weights: train step and greedy decode.

    python modeling_tests/benchmarks/bench_vs_llava.py [--repeats 7] [--out results.json]

Both models share every weight LLaVA has; AlignGPT adds the level table and gate (and one ALIGN position per
image sample). Prints medians and ratios (AlignGPT / LLaVA for step time, LLaVA-relative tokens/s for decoding)
and writes them as JSON. Not a test: timings depend on the machine and are never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
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
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_ID,
        image_seq_length=ours.config.image_seq_length, vision_feature_layer=-2))
    missing, unexpected = llava.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and all(key.startswith("model.alignment.") for key in unexpected)
    return ours, llava


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


def interleaved_medians(functions: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per function, alternating them each repeat so machine drift hits both alike."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench_vs_llava.json")
    args = parser.parse_args(argv)
    ours, llava = build_models()
    tokens = ours.config.image_seq_length
    our_batch, llava_batch = build_inputs(tokens, with_align=True), build_inputs(tokens, with_align=False)
    our_prompts = build_inputs(tokens, with_align=True, padding_side="left")
    llava_prompts = build_inputs(tokens, with_align=False, padding_side="left")
    results = {"config": DIMS, "image_tokens": tokens, "torch_threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine()}
    for model in (ours, llava):
        model.train()
    results["train_step_s"] = interleaved_medians(
        {"aligngpt": train_step(ours, our_batch), "llava": train_step(llava, llava_batch)}, args.repeats)
    for model in (ours, llava):
        model.eval()
    with torch.no_grad():
        decode_s = interleaved_medians(
            {"aligngpt": decode(ours, our_prompts), "llava": decode(llava, llava_prompts)}, args.repeats)
    new_tokens = DIMS["batch"] * DIMS["new_tokens"]
    results["decode_tokens_per_s"] = {name: new_tokens / seconds for name, seconds in decode_s.items()}
    results["train_step_ratio"] = results["train_step_s"]["aligngpt"] / results["train_step_s"]["llava"]
    results["decode_speed_ratio"] = (results["decode_tokens_per_s"]["aligngpt"]
                                     / results["decode_tokens_per_s"]["llava"])
    print(json.dumps(results, indent=2))
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

"""Greedy decode with a static cache: eager vs `torch.compile`d decoding steps, AlignGPT and LLaVA.

    python modeling_tests/benchmarks/bench_compile.py [--repeats 5] [--new-tokens 32] [--out results.json]

transformers compiles only the decoding steps (prefill stays eager) when the cache is static and a `compile_config`
allows the device; on CPU that needs `compile_config._compile_all_devices = True`. The first compiled call pays for
compilation and is reported on its own; the timed calls come after it. Decode tokens/s leave the prefill out: each
measurement is a `generate` of N new tokens minus one of 1 new token (same prompt), over N - 1 tokens. Each repeat
runs the four variants back to back (rotated), and the figures are medians. The compiled and eager token ids must be identical (checked here;
modeling_tests/models/test_native.py checks the same with dynamo's `eager` backend, fast enough for the suite).
Not a test: timings depend on the machine and are never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import CLIPVisionConfig, CompileConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration

IMAGE_ID, ALIGN_ID, BOS = 31998, 31999, 1
DIMS = dict(vocab=32000, hidden=256, layers=4, heads=8, vision_hidden=128, vision_layers=2, image=112, patch=14,
            batch=1, text_tokens=32)


def build_models():
    vision = CLIPVisionConfig(hidden_size=DIMS["vision_hidden"], intermediate_size=4 * DIMS["vision_hidden"],
                              num_hidden_layers=DIMS["vision_layers"], num_attention_heads=4,
                              image_size=DIMS["image"], patch_size=DIMS["patch"])
    text = LlamaConfig(vocab_size=DIMS["vocab"], hidden_size=DIMS["hidden"], intermediate_size=4 * DIMS["hidden"],
                       num_hidden_layers=DIMS["layers"], num_attention_heads=DIMS["heads"],
                       num_key_value_heads=DIMS["heads"], bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    ours = AlignGPTForConditionalGeneration(AlignGPTConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID, alignment_token_id=ALIGN_ID)).eval()
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_ID,
        image_seq_length=ours.config.image_seq_length, vision_feature_layer=-2)).eval()
    llava.load_state_dict(ours.state_dict(), strict=False)
    return ours, llava


def build_inputs(image_tokens: int, with_align: bool):
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, 31000, (DIMS["batch"], DIMS["text_tokens"]), generator=generator)
    head = torch.tensor([BOS] + [ALIGN_ID] * with_align + [IMAGE_ID] * image_tokens).expand(DIMS["batch"], -1)
    input_ids = torch.cat([head, text], dim=1)
    pixels = torch.randn(DIMS["batch"], 3, DIMS["image"], DIMS["image"], generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def generate(model, inputs, new_tokens, compiled):
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    kwargs = dict(compile_config=config) if compiled else dict(disable_compile=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             cache_implementation="static", **kwargs)
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    ours, llava = build_models()
    variants = {
        "aligngpt_eager": (ours, build_inputs(ours.config.image_seq_length, True), False),
        "aligngpt_compiled": (ours, build_inputs(ours.config.image_seq_length, True), True),
        "llava_eager": (llava, build_inputs(ours.config.image_seq_length, False), False),
        "llava_compiled": (llava, build_inputs(ours.config.image_seq_length, False), True),
    }
    first, outputs = {}, {}
    for name, (model, inputs, compiled) in variants.items():  # warm-up; the compiled ones compile here
        first[name], outputs[name] = generate(model, inputs, args.new_tokens, compiled)
        generate(model, inputs, 1, compiled)
    assert torch.equal(outputs["aligngpt_eager"], outputs["aligngpt_compiled"]), "compiled != eager (AlignGPT)"
    times = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            model, inputs, compiled = variants[name]
            full = generate(model, inputs, args.new_tokens, compiled)[0]
            times[name].append(full - generate(model, inputs, 1, compiled)[0])
    tokens = (args.new_tokens - 1) * DIMS["batch"]
    result = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "dims": DIMS, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "first_call_s": {name: round(value, 2) for name, value in first.items()},
        "decode_tokens_per_s": {name: round(tokens / statistics.median(values), 1) for name, values in times.items()},
        "compiled_equals_eager": True,
    }
    for model_name in ("aligngpt", "llava"):
        per_s = result["decode_tokens_per_s"]
        result[f"{model_name}_speedup"] = round(per_s[f"{model_name}_compiled"] / per_s[f"{model_name}_eager"], 2)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()

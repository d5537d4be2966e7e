"""Models, data and timing helpers of the GPU check suite (`gpu_checks.py`): one AlignGPT of LLaVA-1.5's shapes at
~240M parameters (Llama decoder, CLIP tower at 336 px / patch 14 = 576 image tokens, 2-layer GELU projector) and its
transformers-LLaVA twin with the same weights, or tiny versions of both for `--cpu-smoke`.
"""

from __future__ import annotations

import gc
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_CHAT_TEMPLATE
from aligngpt_hf.tiny import build_processor, build_tokenizer

WORDS = "the quick brown fox jumps over lazy dog one two three four five six seven eight nine red green blue".split()
COLOURS = [(220, 30, 30), (30, 180, 40), (30, 40, 220), (230, 220, 30)]


@dataclass(frozen=True)
class Sizes:
    """Model and run sizes; `GPU` is the suite's model, `SMOKE` the CPU rehearsal of the same code."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vision_hidden: int
    vision_layers: int
    image: int
    patch: int
    max_length: int  # stage-2 `max_length` and pack size
    batch: int  # padded samples per step
    packs: int  # packs per step
    samples: int  # rows of the synthetic LLaVA-665K-shaped set
    steps: int  # timed steps per training configuration
    warmup: int
    new_tokens: int  # greedy decode length
    decode_batch: int

    @property
    def image_tokens(self) -> int:
        return (self.image // self.patch) ** 2


GPU = Sizes(vocab=32064, hidden=1024, intermediate=2816, layers=12, heads=16, vision_hidden=512, vision_layers=6,
            image=336, patch=14, max_length=2048, batch=8, packs=3, samples=160, steps=8, warmup=2, new_tokens=64,
            decode_batch=4)
SMOKE = Sizes(vocab=512, hidden=64, intermediate=176, layers=2, heads=4, vision_hidden=32, vision_layers=2, image=32,
              patch=8, max_length=512, batch=4, packs=2, samples=24, steps=2, warmup=1, new_tokens=6, decode_batch=2)


def sizes_dict(sizes: Sizes) -> dict:
    return {**asdict(sizes), "image_tokens": sizes.image_tokens}


def model_configs(sizes: Sizes, tokenizer) -> tuple[AlignGPTConfig, LlavaConfig]:
    """AlignGPT's config and LLaVA's at equal dimensions (`<image>`/`<align>` ids from the tokenizer)."""
    vision = CLIPVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
                              num_hidden_layers=sizes.vision_layers, num_attention_heads=max(sizes.vision_hidden // 64, 2),
                              image_size=sizes.image, patch_size=sizes.patch)
    text = LlamaConfig(vocab_size=max(sizes.vocab, len(tokenizer)), hidden_size=sizes.hidden,
                       intermediate_size=sizes.intermediate, num_hidden_layers=sizes.layers,
                       num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads,
                       max_position_embeddings=2 * sizes.max_length, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ours = AlignGPTConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                          alignment_token_id=tokenizer.convert_tokens_to_ids("<align>"))
    llava = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_id,
                        image_seq_length=ours.image_seq_length, vision_feature_layer=-2,
                        vision_feature_select_strategy="default",
                        projector_hidden_act="gelu")
    return ours, llava


def build_aligngpt(sizes: Sizes, tokenizer, attn_implementation: str = "sdpa", seed: int = 0):
    config = model_configs(sizes, tokenizer)[0]
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AlignGPTForConditionalGeneration(config)
    model.config.aligngpt_stage = "pretrain"  # stage 2 may start from it
    return model


def build_llava_twin(model: AlignGPTForConditionalGeneration, tokenizer, sizes: Sizes):
    """LLaVA with every weight LLaVA has copied from `model` (all but the level table and the gate)."""
    llava = LlavaForConditionalGeneration(model_configs(sizes, tokenizer)[1])
    missing, unexpected = llava.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.startswith("model.alignment.") for key in unexpected), (missing, unexpected)
    return llava


def processors(sizes: Sizes, tokenizer):
    """(AlignGPT's processor, LLaVA's) with the same image processor, tokenizer and vicuna_v1 template."""
    ours = build_processor(tokenizer, image_size=sizes.image, patch_size=sizes.patch)
    llava = LlavaProcessor(image_processor=ours.image_processor, tokenizer=tokenizer, patch_size=sizes.patch,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                           chat_template=VICUNA_V1_CHAT_TEMPLATE)
    return ours, llava


def _lognormal(rng: random.Random, median: float, p95: float) -> float:
    return rng.lognormvariate(math.log(median), math.log(p95 / median) / 1.6449)


def llava_665k_like(sizes: Sizes, tokenizer, seed: int = 0) -> Dataset:
    """Rows in TRL's vision format shaped like LLaVA-665K, scaled to the image tokens: ~94 % one-image rows (text
    median 120, p95 800 tokens at 576 image tokens), ~6 % text-only (400 / 1500), each sample within `max_length`;
    every row also carries an alignment level, so stage 1 can train on the same rows."""
    rng = random.Random(seed)
    words = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1] or ["a"]
    scale = sizes.image_tokens / 576
    rows = []
    for index in range(sizes.samples):
        text_only = rng.random() < 0.06
        median, p95 = (400, 1500) if text_only else (120, 800)
        room = sizes.max_length - 24 - (0 if text_only else sizes.image_tokens + 1)
        length = max(4, min(round(_lognormal(rng, median * scale, p95 * scale)), room))
        text = [rng.choice(words) for _ in range(length)]
        image = Image.new("RGB", (sizes.image, sizes.image), COLOURS[index % len(COLOURS)])
        rows.append({"id": f"row-{index}", "images": [] if text_only else [image], "alignment_level": index % 8,
                     "messages": [{"role": "user", "content": " ".join(text[: length // 2])},
                                  {"role": "assistant", "content": " ".join(text[length // 2:])}]})
    return Dataset.from_list(rows)


def image_rows(dataset: Dataset) -> Dataset:
    """Stage 1 trains on image-caption pairs only."""
    return dataset.filter(lambda row: len(row["images"]) > 0)


def tokenizer_and_data(sizes: Sizes):
    tokenizer = build_tokenizer()
    return tokenizer, llava_665k_like(sizes, tokenizer)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str) -> float:
    """Seconds of one call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None


def reset_peak_memory(device: str) -> None:
    """Free what earlier runs left (their trainers hold cycles) and start a new peak from what is allocated now."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

"""Stage-2 samples/s with padding-free packing: (a) TRL's `SFTTrainer` on transformers' `LlavaForConditionalGeneration`
with its vision tower frozen (as LLaVA's stage 2 and our trainer do: the fair baseline), (a_tower) the same with the
tower trained (stock TRL's default), (b) `AlignGPTInstructTrainer` padded with the modality-grouped sampler,
(c) `AlignGPTInstructTrainer(packing=True)`.

Identical dimensions (CLIP vision tower + Llama LLM + 2-layer GELU projector, tokenizer, vicuna_v1 template with a
one-word system prompt, assistant-only loss), one synthetic dataset. The arms run interleaved in one process,
one optimizer step of each arm per tick (order rotated), each through its own epoch, so drifting machine load hits all
alike; samples/s = samples trained / seconds (collation, forward, backward and optimizer step included), by the wall
clock and by this process's CPU time (steadier on a shared machine: time spent descheduled does not count); the
ratios are reported overall and per block of steps (their median and spread). One torch thread per process unless
OMP_NUM_THREADS says otherwise (docs/packing.md measures with OMP_NUM_THREADS=1).

Lengths, scaled by s = image_seq_length / 576 (default 64 / 576 = 1/9, so CPU runs take minutes; the ratios between
text, image and cap are kept):
* the text-only share is LLaVA-665K's published one: 40,688 of its 665,298 rows have no image (6.1 %; the count of
  llava_v1_5_mix665k.json rows without an `image` key, reported in haotian-liu/LLaVA issue #657; the ShareGPT row
  of Table 7 of Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning", is the same 40K);
* the text lengths are an assumption, not a measurement (the data set is not available offline): log-normal,
  median 120 s and 95th percentile 800 s tokens for the conversation text of image rows (short-answer VQA turns
  merged per image up to long LLaVA-Instruct conversations), median 400 s and 95th percentile 1500 s for text-only
  (ShareGPT) rows. `--lengths FILE` replaces them with measured ones: one text-token count per line, a negative count
  for a text-only row (e.g. from `aligngpt_hf.training.data.sample_token_lengths` on the real JSON, image tokens
  and template subtracted);
* every sample (template, `<align>` and image tokens included) capped at 2048 s tokens (= `max_length`, pack size).
The hidden size keeps the real cap/hidden ratio (2048 / 4096 for a 7B LLM): hidden = cap / 0.5 rounded to heads x 64,
so linear layers dominate attention as they do at full size.

Peak memory: the largest resident-set growth during one of the arm's steps above the resident set before it (Linux
VmHWM reset per step, freed memory returned to the OS first: activations + gradients; weights and optimizer
state are resident in all arms).

    python modeling_tests/benchmarks/bench_packing.py [--samples 384 --rounds 4 --batch 8 --packs 4 --layers 2]
    python modeling_tests/benchmarks/bench_packing.py --paper   # full-scale padded shares, no model (seconds)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from aligngpt_hf import AlignGPTForConditionalGeneration, AlignGPTInstructConfig, AlignGPTInstructTrainer  # noqa: E402
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_CHAT_TEMPLATE  # noqa: E402
from aligngpt_hf.tiny import build_config, build_processor, build_tokenizer  # noqa: E402
from aligngpt_hf.training.data import sample_token_lengths  # noqa: E402

WORDS = "the quick brown fox jumps over lazy dog one two three four five six seven eight nine red green blue".split()
COLOURS = [(220, 30, 30), (30, 180, 40), (30, 40, 220), (230, 220, 30)]
TEXT_ONLY_SHARE = 40_688 / 665_298  # LLaVA-665K rows without an image (see the module docstring)
TEXT_LENGTHS = {False: (120, 800), True: (400, 1500)}  # text-only? -> (median, p95) text tokens: assumed, full scale


def lognormal(rng: random.Random, median: float, p95: float) -> float:
    return rng.lognormvariate(math.log(median), math.log(p95 / median) / 1.6449)


def single_token_words(tokenizer) -> list[str]:
    return [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1] or ["a"]


def text_lengths(rng: random.Random, num_samples: int, scale: float, measured: list[int] | None = None):
    """(text-only?, text tokens) per sample: drawn from `measured` (negative = text-only) when given, else from the
    published text-only share and the assumed log-normal lengths (see the module docstring)."""
    if measured:
        return [(length < 0, abs(length) * scale) for length in (rng.choice(measured) for _ in range(num_samples))]
    samples = []
    for _ in range(num_samples):
        text_only = rng.random() < TEXT_ONLY_SHARE
        median, p95 = TEXT_LENGTHS[text_only]
        samples.append((text_only, lognormal(rng, median * scale, p95 * scale)))
    return samples


def llava_665k_like(num_samples: int, scale: float, image_tokens: int, cap: int, tokenizer, image_size: int, seed=0,
                    measured: list[int] | None = None):
    """Rows in TRL's vision format with text lengths shaped like LLaVA-665K (see the module docstring)."""
    rng, words = random.Random(seed), single_token_words(tokenizer)
    rows = []
    for index, (text_only, drawn) in enumerate(text_lengths(rng, num_samples, scale, measured)):
        room = cap - 16 - (0 if text_only else image_tokens + 1)  # template and `<align>` take the rest
        length = max(4, min(round(drawn), room))
        text = [rng.choice(words) for _ in range(length)]
        question, answer = " ".join(text[: length // 2]), " ".join(text[length // 2:])
        image = Image.new("RGB", (image_size, image_size), COLOURS[index % len(COLOURS)])
        rows.append({"images": [] if text_only else [image], "messages": [
            {"role": "system", "content": "Chat."},
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


def full_scale_token_shares(num_samples: int = 20_000, per_device: int = 16, packs: int = 7, world: int = 8, seed=0):
    """On paper, at LLaVA-1.5's real sizes (576 image tokens, ~45 template tokens, cap 2048; 8 GPUs x 16 samples):
    the padded share of the token positions each layout computes. No model runs."""
    from aligngpt_hf.training.packing import PackLengthGroupedSampler, best_fit_decreasing
    from aligngpt_hf.training.sampler import modality_grouped_indices

    rng, lengths, signed = random.Random(seed), [], []
    for text_only, drawn in text_lengths(rng, num_samples, 1.0):
        image = 0 if text_only else 577
        length = min(45 + image + max(4, round(drawn)), 2048)
        lengths.append(length)
        signed.append(-length if text_only else length)

    def padded_share(batches):
        real = sum(lengths[i] for batch in batches for i in batch)
        return 1 - real / sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

    random_order = list(range(num_samples))
    rng.shuffle(random_order)
    grouped = modality_grouped_indices(signed, per_device, world, torch.Generator().manual_seed(seed))
    split = [lambda order: [order[i: i + per_device] for i in range(0, len(order), per_device)]][0]
    groups = [[i for i in range(num_samples) if signed[i] > 0], [i for i in range(num_samples) if signed[i] < 0]]
    bins = [[group[i] for i in pack] for group in groups
            for pack in best_fit_decreasing([lengths[i] for i in group], 2048)]  # as the trainer packs them
    pack_lengths = [sum(lengths[i] for i in pack) for pack in bins]
    signed_packs = [length if signed[pack[0]] > 0 else -length for pack, length in zip(bins, pack_lengths)]
    order = list(PackLengthGroupedSampler(signed_packs, packs, seed=seed))
    steps = [[pack_lengths[i] for i in order[j: j + packs]] for j in range(0, len(order), packs)]
    rows_share = 1 - sum(pack_lengths) / sum(len(step) * max(step) for step in steps)
    return {"samples": num_samples, "mean_sample_tokens": round(sum(lengths) / num_samples),
            "samples_per_pack": round(num_samples / len(bins), 2),
            "padded_share": {"a_random_batches": round(padded_share(split(random_order)), 3),
                             "b_modality_grouped": round(padded_share(split(grouped)), 3),
                             "c_packed_row_per_pack": round(rows_share, 3),
                             "c_packed_one_row_flash_varlen": 0.0}}


def common_args(opts, output_dir: str) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=opts.batch, learning_rate=1e-4, num_train_epochs=1,
                lr_scheduler_type="constant", warmup_steps=0, report_to="none", save_strategy="no",
                logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, assistant_only_loss=True, seed=0,
                use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available())


def build_arms(opts, tokenizer, dataset, output_dir: str) -> dict:
    processor = build_processor(tokenizer, image_size=opts.image_size, patch_size=opts.patch)
    config = build_config(tokenizer, hidden_size=opts.hidden, num_layers=opts.layers, image_size=opts.image_size,
                          patch_size=opts.patch, gate_hidden_size=256)
    config.text_config.num_attention_heads = config.text_config.num_key_value_heads = opts.hidden // 64
    config.text_config.head_dim = 64
    config.text_config.max_position_embeddings = 4 * opts.cap
    arms = {}
    llava_processor = LlavaProcessor(image_processor=processor.image_processor, tokenizer=tokenizer,
                                     patch_size=opts.patch, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=VICUNA_V1_CHAT_TEMPLATE)
    llava_config = LlavaConfig(vision_config=config.vision_config, text_config=config.text_config,
                               image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                               vision_feature_select_strategy="default", image_seq_length=config.image_seq_length,
                               projector_hidden_act="gelu")
    for name, tower_trained in (("a_trl_llava_padded", False), ("a_tower_trl_llava_padded_tower_trained", True)):
        torch.manual_seed(0)
        arms[name] = SFTTrainer(model=LlavaForConditionalGeneration(llava_config), processing_class=llava_processor,
                                train_dataset=dataset, args=SFTConfig(**common_args(opts, output_dir), max_length=None,
                                                                      activation_checkpointing=False))
        arms[name].model.model.vision_tower.requires_grad_(tower_trained)  # the optimizer is built later, by `Arm`
    for name, packing in (("b_aligngpt_padded_grouped", False), ("c_aligngpt_packed", True)):
        torch.manual_seed(0)
        model = AlignGPTForConditionalGeneration(config)
        model.config.aligngpt_stage = "pretrain"
        extra = dict(packing=True, per_device_train_batch_size=opts.packs) if packing else {}
        args = AlignGPTInstructConfig(**{**common_args(opts, output_dir), **extra}, max_length=opts.cap,
                                      group_by_modality_length=True, activation_checkpointing=False)
        arms[name] = AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    return arms


def _return_freed_memory_to_the_os() -> None:
    """glibc: large blocks as their own mappings (freed at once) and free heap trimmed, so the resident set follows
    the live tensors and one arm's freed memory does not hide the next arm's peak."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed (no dynamic growth)
    libc.malloc_trim(0)


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) * 1024


class Arm:
    """Drives one trainer step by step over its own epoch (its dataloader, sampler and collator)."""

    def __init__(self, trainer):
        self.trainer, self.model = trainer, trainer.model
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        self.pad_id = trainer.processing_class.tokenizer.pad_token_id
        self.batches = iter(trainer.get_train_dataloader())
        self.records = []  # per timed step: (wall seconds, CPU seconds of this process, samples)
        self.tokens = self.padding = self.peak_growth = 0

    def step(self, timed: bool = True) -> bool:
        _return_freed_memory_to_the_os()
        start, cpu_start, base = time.perf_counter(), time.process_time(), _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:  # reset the peak-RSS mark (Linux)
            refs.write("5")
        batch = next(self.batches, None)
        if batch is None:
            return False
        self.model.train()
        inputs = self.trainer._prepare_inputs(batch)
        items = (inputs["labels"][..., 1:] != -100).sum()
        self.trainer.training_step(self.model, inputs, num_items_in_batch=items)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        if timed:
            samples = (len(batch["cu_seq_lens_q"]) - 1) if "cu_seq_lens_q" in batch else len(batch["input_ids"])
            self.records.append((time.perf_counter() - start, time.process_time() - cpu_start, samples))
            self.tokens += batch["input_ids"].numel()
            self.padding += int((batch["input_ids"] == self.pad_id).sum())
            self.peak_growth = max(self.peak_growth, _rss("VmHWM") - base)
        return True

    def rate(self, block: int | None = None, blocks: int = 1, column: int = 0) -> float:
        """Samples per (wall or CPU) second over all timed steps, or over block `block` of `blocks` in step order."""
        records = self.records
        if block is not None:
            size = len(records) / blocks
            records = records[round(block * size): round((block + 1) * size)]
        return sum(r[2] for r in records) / max(sum(r[column] for r in records), 1e-9)


def short(arm: str) -> str:
    """`a_tower_trl_llava_...` -> `a_tower`, `c_aligngpt_packed` -> `c`."""
    return arm.split("_trl")[0].split("_aligngpt")[0]


def interleave(arms: dict) -> None:
    """One step of every arm per tick (order rotated each tick) until every epoch is done: all arms see the same
    machine load, second by second."""
    names, tick, active = list(arms), 0, set(arms)
    while active:
        for name in names[tick % len(names):] + names[: tick % len(names)]:
            if name in active and not arms[name].step():
                active.discard(name)
        tick += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="(a), (b): samples per step")
    parser.add_argument("--packs", type=int, default=4, help="(c): packs of <= cap tokens per step")
    parser.add_argument("--rounds", type=int, default=4, help="blocks of steps for the paired ratios' spread")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    parser.add_argument("--paper", action="store_true", help="only the full-scale padded shares (no model runs)")
    parser.add_argument("--lengths", help="measured text-token counts, one per line (negative: text-only row)")
    opts = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    measured = None
    if opts.lengths:
        with open(opts.lengths) as handle:
            measured = [int(line) for line in handle if line.strip()]
    if opts.paper:
        print(json.dumps(full_scale_token_shares(), indent=2))
        return
    image_tokens = (opts.image_size // opts.patch) ** 2
    scale = image_tokens / 576
    opts.cap = round(2048 * scale)
    opts.hidden = max(64, round(opts.cap / 0.5 / 64) * 64)
    tokenizer = build_tokenizer()
    dataset = llava_665k_like(opts.samples, scale, image_tokens, opts.cap, tokenizer, opts.image_size,
                              measured=measured)
    lengths = sample_token_lengths(dataset, build_processor(tokenizer, image_size=opts.image_size, patch_size=opts.patch))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as output_dir:
        arms = {name: Arm(trainer) for name, trainer in build_arms(opts, tokenizer, dataset, output_dir).items()}
        for arm in arms.values():
            for _ in range(opts.warmup):
                arm.step(timed=False)
        interleave(arms)
    per_arm = {name: {"samples_per_s_wall": round(arm.rate(), 2), "samples_per_cpu_s": round(arm.rate(column=1), 2),
                      "steps": len(arm.records), "samples": sum(r[2] for r in arm.records),
                      "padded_token_share": round(arm.padding / max(arm.tokens, 1), 3),
                      "tokens_per_step": round(arm.tokens / max(len(arm.records), 1)),
                      "peak_step_memory_mib": round(arm.peak_growth / 2**20, 1)} for name, arm in arms.items()}
    a, a_tower, b, c = list(arms)
    ratios, overall = {}, {}
    for clock, column in (("wall", 0), ("cpu", 1)):
        for top, bottom in ((c, a), (c, a_tower), (c, b), (b, a), (a, a_tower)):
            key = f"{short(top)}_over_{short(bottom)}_{clock}"
            ratios[key] = [arms[top].rate(k, opts.rounds, column) / arms[bottom].rate(k, opts.rounds, column)
                           for k in range(opts.rounds)]
            overall[key] = round(arms[top].rate(column=column) / arms[bottom].rate(column=column), 3)
    sorted_lengths = sorted(lengths)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"cpu, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "config": vars(opts),
        "dataset": {"samples": len(lengths), "text_only_share": round(sum(not r for r in dataset["images"]) / len(lengths), 3),
                    "sample_tokens_median": sorted_lengths[len(lengths) // 2],
                    "sample_tokens_p95": sorted_lengths[int(0.95 * len(lengths))], "sample_tokens_max": sorted_lengths[-1]},
        "arms": per_arm,
        "overall_ratios": overall,
        "block_ratio_median": {key: round(statistics.median(values), 3) for key, values in ratios.items()},
        "block_ratios": {key: [round(v, 3) for v in values] for key, values in ratios.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

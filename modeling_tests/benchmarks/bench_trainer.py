"""Training throughput: our stage-2 trainer on AlignGPT vs TRL's `SFTTrainer` on transformers' LLaVA.

Identical dimensions (CLIP vision tower + Llama LLM + 2-layer GELU projector), tokenizer, vicuna_v1 template,
assistant-only loss, data and batch size; AlignGPT adds its `<align>` token and gate. Reports samples/s measured
over steps after a warm-up, median of `--repeats` alternating runs, and the ratio (target >= 0.95).

    python modeling_tests/benchmarks/bench_trainer.py [--hidden 256 --layers 4 --image-size 64 --patch 8 --steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer  # noqa: E402
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_CHAT_TEMPLATE  # noqa: E402
from aligngpt_hf.tiny import build_config, build_processor, build_tokenizer  # noqa: E402
from aligngpt_hf.training.data import synthetic_dataset  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time of the steps after `warmup` (excludes start-up, first-step allocation and compilation)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def common_args(opts, output_dir: str) -> dict:
    return dict(output_dir=output_dir, max_steps=opts.warmup + opts.steps, per_device_train_batch_size=opts.batch,
                learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, report_to="none",
                save_strategy="no", logging_steps=10_000, activation_checkpointing=False, disable_tqdm=True,
                dataloader_num_workers=0, assistant_only_loss=True, max_length=None, seed=0,
                use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available())


def run_aligngpt(opts, tokenizer, dataset, output_dir) -> float:
    processor = build_processor(tokenizer, image_size=opts.image_size, patch_size=opts.patch)
    torch.manual_seed(0)
    from aligngpt_hf import AlignGPTForConditionalGeneration

    config = build_config(tokenizer, hidden_size=opts.hidden, num_layers=opts.layers, image_size=opts.image_size,
                          patch_size=opts.patch, gate_hidden_size=256)
    model = AlignGPTForConditionalGeneration(config)
    model.config.aligngpt_stage = "pretrain"
    timer = StepTimer(opts.warmup)
    args = AlignGPTInstructConfig(**common_args(opts, output_dir), group_by_modality_length=False)
    AlignGPTInstructTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                            callbacks=[timer]).train()
    return opts.steps * opts.batch / (timer.end - timer.start)


def run_llava(opts, tokenizer, dataset, output_dir) -> float:
    aligngpt_processor = build_processor(tokenizer, image_size=opts.image_size, patch_size=opts.patch)
    processor = LlavaProcessor(image_processor=aligngpt_processor.image_processor, tokenizer=tokenizer,
                               patch_size=opts.patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=VICUNA_V1_CHAT_TEMPLATE)
    reference = build_config(tokenizer, hidden_size=opts.hidden, num_layers=opts.layers, image_size=opts.image_size,
                             patch_size=opts.patch)
    config = LlavaConfig(vision_config=reference.vision_config, text_config=reference.text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=reference.image_seq_length,
                         projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    timer = StepTimer(opts.warmup)
    args = SFTConfig(**common_args(opts, output_dir))
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor, callbacks=[timer]).train()
    return opts.steps * opts.batch / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    tokenizer = build_tokenizer()
    samples = (opts.warmup + opts.steps) * opts.batch
    dataset = synthetic_dataset(samples, "instruct", image_size=opts.image_size).remove_columns(["alignment_level"])
    results = {"aligngpt": [], "llava": []}
    with tempfile.TemporaryDirectory() as output_dir:
        for _ in range(opts.repeats):  # alternate, so drifting machine load hits both alike
            results["aligngpt"].append(run_aligngpt(opts, tokenizer, dataset, output_dir))
            results["llava"].append(run_llava(opts, tokenizer, dataset, output_dir))
    aligngpt, llava = statistics.median(results["aligngpt"]), statistics.median(results["llava"])
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
        "config": vars(opts),
        "samples_per_s": {"aligngpt_instruct_trainer": round(aligngpt, 3), "trl_sft_llava": round(llava, 3)},
        "runs": {key: [round(value, 3) for value in values] for key, values in results.items()},
        "ratio": round(aligngpt / llava, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The measurements behind `gpu_checks.py`: training runs through the stage trainers and stock TRL, packed vs padded
losses, train step and decode against LLaVA, eager vs compiled decoding, the remote-code reload script."""

from __future__ import annotations

import os
import statistics
import textwrap
import time
from pathlib import Path

import gpu_models as gm
import torch
import torch.nn.functional as F
from transformers import CompileConfig, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from aligngpt_hf.training.dry_run import parameter_counts, training_shape
from aligngpt_hf.training.memory import GIB, estimate_memory

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["aligngpt_hf"] = None  # only the code files next to the weights remain
    import torch
    from transformers import AutoModelForImageTextToText

    folder, inputs, device, dtype, new_tokens = sys.argv[1:6]
    dtype = getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
    batch = {key: value.to(device) for key, value in torch.load(inputs).items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=int(new_tokens), do_sample=False)
    print(json.dumps(out.tolist()))
    """
)


def package_free_env() -> dict:
    """The environment of a child Python that must not find `aligngpt_hf` (the carried wheels stay on the path)."""
    kept = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if entry and not (Path(entry) / "aligngpt_hf").exists()]
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(kept)}


def _messages(row: dict, with_answer: bool) -> list[dict]:
    user = [{"type": "image"}] * len(row["images"]) + [{"type": "text", "text": row["messages"][0]["content"]}]
    messages = [{"role": "user", "content": user}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": row["messages"][1]["content"]}]})
    return messages


def prompt_batch(ctx, processor, align: bool = True, with_answer: bool = False, count: int | None = None):
    """A left-padded batch of image rows (prompts, or whole conversations with `with_answer`)."""
    rows = [row for row in ctx.dataset.select(range(min(64, len(ctx.dataset)))) if row["images"]]
    rows = rows[: count or ctx.sizes.decode_batch]
    texts = [processor.apply_chat_template(_messages(row, with_answer), add_generation_prompt=not with_answer)
             for row in rows]
    batch = processor(text=texts, images=[row["images"] for row in rows], padding=True, padding_side="left",
                      return_tensors="pt")
    return batch


def cast_pixels(batch, ctx):
    """The batch on the device, images in the model's dtype (as the remote-code script does)."""
    batch = batch.to(ctx.device)
    batch["pixel_values"] = batch["pixel_values"].to(ctx.dtype)
    return batch


def stage_collator(ctx, stage: str):
    from aligngpt_hf.training.data import PLAIN_CHAT_TEMPLATE, AlignGPTDataCollator

    if stage == "pretrain":
        return AlignGPTDataCollator(processor=ctx.processor, max_length=ctx.sizes.max_length, assistant_only_loss=True,
                                    chat_template=PLAIN_CHAT_TEMPLATE, level_column="alignment_level")
    return AlignGPTDataCollator(processor=ctx.processor, max_length=ctx.sizes.max_length, assistant_only_loss=True,
                                gate_text_mask=True)


def _one_pack(ctx, stage: str, inner) -> list[dict]:
    """The first rows (image rows for stage 1) that fit together in one pack of `max_length` tokens."""
    rows, used = [], 0
    for row in ctx.dataset:
        if stage == "pretrain" and not row["images"]:
            continue
        length = int(inner([row])["attention_mask"].sum())
        if used + length <= ctx.sizes.max_length:
            rows.append(row)
            used += length
    return rows


def _on_device(batch, device: str) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _mean_token_loss(model, batch) -> float:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    return float(losses / (labels != -100).sum())


def packed_vs_padded(ctx, stage: str, attention: str, tolerance: dict) -> dict:
    """Loss of the same samples padded (one row each) and packed (one row); relative difference per dtype."""
    from aligngpt_hf.training.packing import AlignGPTPackingCollator

    inner = stage_collator(ctx, stage)
    rows = _one_pack(ctx, stage, inner)
    padded, packed = inner(rows), AlignGPTPackingCollator(inner)(rows)
    padded, packed = _on_device(padded, ctx.device), _on_device(packed, ctx.device)
    model = gm.build_aligngpt(ctx.sizes, ctx.tokenizer, attention).to(ctx.device).eval()
    result = {"samples": len(rows), "packed_width": int(packed["input_ids"].shape[1])}
    autocast_dtypes = [torch.bfloat16, torch.float32] if ctx.device == "cuda" else [torch.float32]
    for dtype in autocast_dtypes:
        with torch.no_grad(), torch.autocast(ctx.device, dtype=dtype, enabled=dtype != torch.float32):
            loss_padded, loss_packed = _mean_token_loss(model, padded), _mean_token_loss(model, packed)
        name = str(dtype).removeprefix("torch.")
        relative = abs(loss_packed - loss_padded) / abs(loss_padded)
        result[name] = {"padded": round(loss_padded, 6), "packed": round(loss_packed, 6),
                        "relative_difference": float(f"{relative:.3g}"), "tolerance": tolerance[name],
                        "passed": relative <= tolerance[name]}
    result["passed"] = all(entry["passed"] for key, entry in result.items() if isinstance(entry, dict))
    return result


class CountingCollator:
    """Wraps a collator; records samples, real tokens, rows and row width of every batch, in order."""

    def __init__(self, inner, pad_id: int):
        self.inner, self.pad_id, self.batches = inner, pad_id, []

    def __call__(self, features):
        batch = self.inner(features)
        ids = batch["input_ids"]
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int((ids != self.pad_id).sum())
        samples = sum(len(f) if isinstance(f, list) else 1 for f in features)
        self.batches.append({"samples": samples, "tokens": tokens, "rows": ids.shape[0], "width": ids.shape[1]})
        return batch


class StepTimer(TrainerCallback):
    """Wall clock from the end of the warm-up steps to the end of the run (the device's work included), and peak
    memory over the timed steps."""

    def __init__(self, device: str, warmup: int):
        self.device, self.warmup, self.start, self.seconds = device, warmup, None, None

    def on_step_end(self, args, state, control, **kwargs):
        gm.synchronize(self.device)
        if state.global_step == self.warmup:
            gm.reset_peak_memory(self.device)
            self.start = time.perf_counter()
        elif self.start is not None:
            self.seconds = time.perf_counter() - self.start


def single_gpu_estimate(model, counts: dict, rows: int, width: int, mixed: bool) -> dict:
    """The dry run's estimate for this model, batch and row width on one GPU (its ddp terms without DDP's buckets)."""
    shape = training_shape(model, counts, rows, width, mixed, activation_checkpointing=False, num_gpus=1)
    terms = estimate_memory(shape)["ddp"]
    buckets = 4 * counts["trainable_params"] / GIB
    return {"total_gib": round(terms["total"] - buckets, 3), "activations_gib": terms["activations"]}


def _run_trainer(ctx, trainer, pad_id: int) -> dict:
    counter = CountingCollator(trainer.data_collator, pad_id)
    trainer.data_collator = counter
    timer = StepTimer(ctx.device, ctx.sizes.warmup)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # the report holds the losses
    trainer.train()
    timed = counter.batches[ctx.sizes.warmup: ctx.sizes.warmup + ctx.sizes.steps]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"steps": len(timed), "seconds": round(timer.seconds, 3),
            "samples_per_s": round(sum(b["samples"] for b in timed) / timer.seconds, 2),
            "tokens_per_s": round(sum(b["tokens"] for b in timed) / timer.seconds, 1),
            "padded_share": round(1 - sum(b["tokens"] for b in timed) / sum(b["rows"] * b["width"] for b in timed), 3),
            "max_rows": max(b["rows"] for b in timed), "max_width": max(b["width"] for b in timed),
            "losses": [round(loss, 4) for loss in losses], "finite_loss": all(map(lambda x: x == x, losses)),
            "peak_memory_gib": gm.peak_memory_gib(ctx.device)}


def train_run(ctx, stage: str, attention: str, packed: bool) -> dict:
    """Warm-up + timed steps of a stage trainer; tokens/s, samples/s, peak memory and the dry run's estimate."""
    from aligngpt_hf import (
        AlignGPTInstructConfig,
        AlignGPTInstructTrainer,
        AlignGPTPretrainConfig,
        AlignGPTPretrainTrainer,
    )

    sizes, cuda = ctx.sizes, ctx.device == "cuda"
    config_class, trainer_class = ((AlignGPTPretrainConfig, AlignGPTPretrainTrainer) if stage == "pretrain"
                                   else (AlignGPTInstructConfig, AlignGPTInstructTrainer))
    args = config_class(
        output_dir=str(ctx.workdir / "train"), max_steps=sizes.warmup + sizes.steps, packing=packed,
        per_device_train_batch_size=sizes.packs if packed else sizes.batch, max_length=sizes.max_length,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0, bf16=cuda, use_cpu=not cuda,
        activation_checkpointing=False)
    data = gm.image_rows(ctx.dataset) if stage == "pretrain" else ctx.dataset
    model = gm.build_aligngpt(sizes, ctx.tokenizer, attention)
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=ctx.processor)
    result = _run_trainer(ctx, trainer, ctx.tokenizer.pad_token_id)
    counts = parameter_counts(trainer.model)
    result["trainable_params"], result["total_params"] = counts["trainable_params"], counts["total_params"]
    result["dry_run_estimate"] = single_gpu_estimate(trainer.model, counts, result["max_rows"], result["max_width"],
                                                     mixed=cuda)
    del trainer, model
    gm.reset_peak_memory(ctx.device)
    return result


def trl_llava_run(ctx) -> dict:
    """Stock TRL on transformers' LLaVA (the same weights), padded, vision tower frozen, on the same rows."""
    from trl import SFTConfig, SFTTrainer

    sizes, cuda = ctx.sizes, ctx.device == "cuda"
    llava = gm.build_llava_twin(gm.build_aligngpt(sizes, ctx.tokenizer), ctx.tokenizer, sizes)
    llava.model.vision_tower.requires_grad_(False)
    args = SFTConfig(output_dir=str(ctx.workdir / "trl"), max_steps=sizes.warmup + sizes.steps,
                     per_device_train_batch_size=sizes.batch, max_length=None, learning_rate=1e-4,
                     lr_scheduler_type="constant", warmup_steps=0, report_to="none", save_strategy="no",
                     logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0, bf16=cuda,
                     use_cpu=not cuda, activation_checkpointing=False, assistant_only_loss=True)
    data = ctx.dataset.remove_columns(["id", "alignment_level"])
    trainer = SFTTrainer(model=llava, args=args, train_dataset=data, processing_class=ctx.llava_processor)
    result = _run_trainer(ctx, trainer, ctx.tokenizer.pad_token_id)
    del trainer, llava
    gm.reset_peak_memory(ctx.device)
    return result


def _median_seconds(function, ctx, repeats: int) -> float:
    function()
    return statistics.median(gm.timed(function, ctx.device) for _ in range(repeats))


def versus_llava(ctx) -> dict:
    """Train step (forward + backward) and greedy decode, AlignGPT vs LLaVA at equal dimensions, shared weights."""
    ours = gm.build_aligngpt(ctx.sizes, ctx.tokenizer)
    llava = gm.build_llava_twin(ours, ctx.tokenizer, ctx.sizes)
    result = {}
    for name, model, processor, align in (("aligngpt", ours, ctx.processor, True),
                                          ("llava", llava, ctx.llava_processor, False)):
        model.to(ctx.device, ctx.dtype)
        batch = cast_pixels(prompt_batch(ctx, processor, align, with_answer=True, count=ctx.sizes.batch), ctx)
        special = [ctx.tokenizer.convert_tokens_to_ids(token) for token in ("<image>", "<align>")]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        labels = labels.masked_fill(torch.isin(labels, torch.tensor(special, device=labels.device)), -100)

        def step(model=model, batch=batch, labels=labels):
            model.zero_grad(set_to_none=True)
            model(**batch, labels=labels).loss.backward()

        model.train()
        train_s = _median_seconds(step, ctx, ctx.sizes.steps)
        model.eval()
        prompts = cast_pixels(prompt_batch(ctx, processor, align), ctx)
        new = ctx.sizes.new_tokens
        with torch.no_grad():
            decode_s = _median_seconds(lambda m=model, p=prompts, n=new: m.generate(
                **p, max_new_tokens=n, min_new_tokens=n, do_sample=False), ctx, 3)
        result[name] = {"train_step_s": round(train_s, 4), "decode_tokens_per_s":
                        round(new * prompts["input_ids"].shape[0] / decode_s, 1)}
        model.to("cpu")
    result["train_step_ratio"] = round(result["aligngpt"]["train_step_s"] / result["llava"]["train_step_s"], 3)
    result["decode_speed_ratio"] = round(result["aligngpt"]["decode_tokens_per_s"]
                                         / result["llava"]["decode_tokens_per_s"], 3)
    result["passed"] = True
    return result


def decode_eager_vs_compiled(ctx) -> dict:
    """Greedy decode with a static cache, eager vs `torch.compile`d decoding steps (prefill stays eager)."""
    model = gm.build_aligngpt(ctx.sizes, ctx.tokenizer).to(ctx.device, ctx.dtype).eval()
    batch = cast_pixels(prompt_batch(ctx, ctx.processor), ctx)
    config = CompileConfig(backend="eager") if ctx.cpu_smoke else CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only by default

    def generate(compiled: bool, new_tokens: int):
        extra = dict(compile_config=config) if compiled else dict(disable_compile=True)
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  cache_implementation="static", **extra)

    new = ctx.sizes.new_tokens
    first_s = gm.timed(lambda: generate(True, new), ctx.device)
    tokens = {compiled: generate(compiled, new) for compiled in (False, True)}
    per_s = {}
    for compiled in (False, True):
        full = statistics.median(gm.timed(lambda c=compiled: generate(c, new), ctx.device) for _ in range(3))
        one = statistics.median(gm.timed(lambda c=compiled: generate(c, 1), ctx.device) for _ in range(3))
        per_s["compiled" if compiled else "eager"] = round((new - 1) * batch["input_ids"].shape[0] / (full - one), 1)
    same = torch.equal(tokens[False], tokens[True])
    prefix = int((tokens[False] == tokens[True]).all(0).long().cumprod(0).sum()) - batch["input_ids"].shape[1]
    return {"first_compiled_call_s": round(first_s, 2), "decode_tokens_per_s": per_s,
            "speedup": round(per_s["compiled"] / per_s["eager"], 2), "tokens_equal": same,
            "equal_new_tokens": prefix, "backend": config.backend, "passed": same}

"""The demo's stages: tiny CLIP, levels, tiny AlignGPT, stage 1 and stage 2 with the real trainers.

Each function is one step of `pipeline.run_demo` and of every arm of `compare.run_compare`. Arms differ only in the
model (`alignment_mode="none"` for plain LLaVA) and in the levels file stage 1 reads (shuffled for the control).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from aligngpt_hf.demo.task import IMAGE_SIZE, PATCH_SIZE, caption_pairs, corpus, draw, question_rows, text_only_chats
from aligngpt_hf.paths import atomic_path, atomic_write_text

ARMS = ("aligngpt", "llava", "shuffled")  # (a) levels + gate, (b) alignment_mode="none", (c) levels shuffled
ARM_TITLES = {"aligngpt": "AlignGPT", "llava": "plain LLaVA", "shuffled": "AlignGPT, shuffled levels"}


@dataclass(frozen=True)
class DemoSettings:
    clip_pairs: int = 1200
    clip_steps: int = 300
    pretrain_pairs: int = 1200
    wrong_share: float = 0.5
    num_levels: int = 4
    instruct_rows: int = 2400
    # text-only rows, mostly comparison chats (task.comparison_chats): short rows, cheap steps (batches are grouped
    # by modality), where the caption check's last step, word equality, is learned (docs/demo.md)
    text_only_rows: int = 1200
    heldout_per_kind: int = 40
    stage1_steps: int = 150
    stage2_steps: int = 1600
    batch_size: int = 16
    hidden_size: int = 96
    num_layers: int = 2
    stage2_lr: float = 2e-3
    # share of each question kind in stage 2: the caption check is the slowest to learn, position next; colour is
    # learned first whatever its share; small circles and squares look alike at 48 px, so shape gets more than colour
    kind_weights: tuple[tuple[str, float], ...] = (("colour", 0.8), ("shape", 1.5), ("position", 2.5),
                                                   ("count", 1.5), ("caption check", 3.0))

    def __post_init__(self):
        """Budgets are positive counts and the wrong-caption share lies strictly inside (0, 1): the levels rank right
        against wrong captions, and the Spearman correlation needs both."""
        for name, value in vars(self).items():
            if isinstance(value, int) and (isinstance(value, bool) or value < 1):
                raise ValueError(f"DemoSettings.{name} must be a positive integer, got {value!r}.")
        if not 0 < self.wrong_share < 1:
            raise ValueError(f"DemoSettings.wrong_share must be between 0 and 1 (exclusive), got {self.wrong_share!r}.")
        if not self.stage2_lr > 0:
            raise ValueError(f"DemoSettings.stage2_lr must be > 0, got {self.stage2_lr!r}.")


FULL = DemoSettings()
QUICK = DemoSettings(clip_pairs=600, clip_steps=300, pretrain_pairs=256, instruct_rows=1920, text_only_rows=480,
                     heldout_per_kind=12, stage1_steps=20, stage2_steps=750,
                     kind_weights=(("colour", 0.6), ("shape", 0.6), ("position", 2.5), ("count", 2.0),
                                   ("caption check", 3.0)))


# vicuna_v1 with a one-line system prompt: the default one is ~35 of a demo row's ~60 tokens (half the step time)
DEMO_SYSTEM = "A chat about pictures of shapes."


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def choose_threads(requested: int | None = None, cpus: int | None = None, load: float | None = None,
                   env: str | None = None) -> tuple[int, str]:
    """torch's thread count and why: `requested`, else OMP_NUM_THREADS, else the cores this process may use minus the
    machine's 1-minute load, rounded down, at least 1 and at most 4. The demo's matrices are tiny: on a busy machine
    a second thread spins waiting for a core (20x slower measured with neighbours on 2 cores), so a 2-core host always
    gets one thread."""
    if requested:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "") if env is None else env
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(4, int(cpus - load - 0.5))), f"{cpus} usable cores, load {load:.1f}"


class Progress:
    """One line per stage (and per logged training step): elapsed time and an ETA from the stages' expected costs
    (seconds on the 2-core reference machine) scaled by the speed measured so far. `rounds` repeats the stages
    (one round per `--compare` seed; `next_round` starts the next)."""

    def __init__(self, costs: dict[str, float], rounds: int = 1):
        self.costs, self.rounds, self.start = costs, rounds, time.perf_counter()
        self.done, self.current, self.prefix = 0.0, None, ""

    def next_round(self, prefix: str) -> None:
        if self.current is not None:
            self.done += self.costs[self.current]
        self.current, self.prefix = None, prefix

    def stage(self, name: str, detail: str = "") -> None:
        if self.current is not None:
            self.done += self.costs[self.current]
        self.current = name
        self.line(f"{name}{': ' + detail if detail else ''}", 0.0)

    def line(self, message: str, fraction: float) -> None:
        elapsed = time.perf_counter() - self.start
        done = self.done + fraction * self.costs.get(self.current, 0.0)
        total = sum(self.costs.values()) * self.rounds
        eta = f", ETA {max(0.0, elapsed / done * (total - done)):.0f} s" if done > 0 and elapsed > 1 else ""
        say(f"{self.prefix}[{elapsed:5.0f} s{eta}] {message}")


def stage_costs(settings: DemoSettings, arms: int = 1) -> dict[str, float]:
    """Expected seconds per stage on one core of the 2-core reference machine (measured, roughly linear)."""
    return {"CLIP": 0.05 * settings.clip_steps, "levels": 0.01 * settings.pretrain_pairs + 2,
            **{f"stage 1{suffix}": 0.06 * settings.stage1_steps for suffix in _suffixes(arms)},
            **{f"stage 2{suffix}": 0.12 * settings.stage2_steps for suffix in _suffixes(arms)},
            # the single run reloads the model in a fresh interpreter (~8 s); --compare evaluates in-process
            **{f"evaluation{suffix}": 0.02 * settings.heldout_per_kind * 5 + (8 if arms == 1 else 0)
               for suffix in _suffixes(arms)}}


def _suffixes(arms: int) -> list[str]:
    return [""] if arms == 1 else [f" ({arm})" for arm in ARMS[:arms]]


def write_llava_json(rows: list[dict], folder: Path, name: str, to_record) -> Path:
    """Draw each row's scene to `folder/images/` and write LLaVA-format records built by `to_record`. Every file is
    written whole (temp file, then rename); the images skip the leftover scan, since each run starts from an empty
    run folder."""
    images = folder / "images"
    records = []
    for index, row in enumerate(rows):
        file = f"{name}-{index:05d}.png"
        with atomic_path(images / file, sweep=False) as temp:
            draw(row["scene"]).save(temp, format="PNG")
        records.append({"id": f"{name}-{index}", "image": file, **to_record(row)})
    path = folder / f"{name}.json"
    atomic_write_text(path, json.dumps(records, indent=1))
    return path


def train_clip(settings: DemoSettings, rng: random.Random, seed: int, progress: Progress):
    """Contrastive training of a tiny CLIP on correct captions only."""
    import torch

    from aligngpt_hf.tiny import build_clip

    torch.manual_seed(seed)
    model, processor = build_clip(corpus(), hidden_size=64, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    pairs = caption_pairs(settings.clip_pairs, rng, wrong_share=0.0)
    encoded = processor(text=[pair["caption"] for pair in pairs], images=[draw(pair["scene"]) for pair in pairs],
                        padding=True, return_tensors="pt")  # preprocess once, index per step
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)  # 2e-3 stalls at ln(batch)
    model.train()
    for step in range(settings.clip_steps):
        batch = torch.tensor(random.Random(seed + step).sample(range(len(pairs)), 64))
        loss = model(**{key: value[batch] for key, value in encoded.items()}, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step == settings.clip_steps - 1:
            progress.line(f"CLIP step {step + 1}/{settings.clip_steps}: contrastive loss {loss.item():.3f}",
                          (step + 1) / settings.clip_steps)
    return model.eval(), processor


def spearman(first: list[float], second: list[float]) -> float:
    """Rank correlation (average ranks for ties), without SciPy."""
    import numpy as np

    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values))
        for value in np.unique(values):
            result[values == value] = result[values == value].mean()
        return result

    return float(np.corrcoef(ranks(first), ranks(second))[0, 1])


def score_levels(run: Path, settings: DemoSettings, rng: random.Random, clip, seed: int) -> tuple[Path, float, dict]:
    """Score the pre-training pairs with the tiny CLIP and bucket them (the real `levels` tool)."""
    from aligngpt_hf.levels.compute import compute_alignment_levels
    from aligngpt_hf.levels.scorer import Scorer

    pairs = caption_pairs(settings.pretrain_pairs, rng, settings.wrong_share)
    source = write_llava_json(pairs, run / "data", "pretrain", lambda row: {
        "num_wrong": row["num_wrong"],
        "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                          {"from": "gpt", "value": row["caption"]}],
    })
    output = run / "data" / "pretrain_levels.json"
    result = compute_alignment_levels(source, output, run / "data" / "images",
                                      scorer=Scorer(*clip, name=f"the demo's tiny CLIP (seed {seed})"),
                                      num_levels=settings.num_levels, progress=False,
                                      cache_dir=run / "cache" / "levels")
    records = json.loads(output.read_text())
    correlation = spearman([r["alignment_score"] for r in records], [-r["num_wrong"] for r in records])
    return output, correlation, result.files


def shuffled_levels(levels_json: Path, seed: int) -> Path:
    """The control arm's stage-1 data: the same records, their levels permuted (same level counts, no information)."""
    records = json.loads(levels_json.read_text())
    levels = [record["similarity"] for record in records]
    random.Random(seed + 7919).shuffle(levels)
    for record, level in zip(records, levels):
        record.update(similarity=level, alignment_level=level)
    path = levels_json.with_name(levels_json.stem + ".shuffled.json")
    atomic_write_text(path, json.dumps(records))
    return path


def build_aligngpt(clip, settings: DemoSettings, seed: int, alignment_mode: str = "adaptive"):
    """Tiny AlignGPT: the trained CLIP's vision tower + a random Llama with a tokenizer trained on chat text."""
    import torch

    from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
    from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
    from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_CHAT_TEMPLATE, VICUNA_V1_SYSTEM
    from aligngpt_hf.tiny import build_config, build_processor, build_tokenizer

    chat = [f"{DEMO_SYSTEM} USER: <image>\n{line} ASSISTANT: {line}</s>" for line in corpus()]
    tokenizer = build_tokenizer(chat, vocab_size=600)
    processor = build_processor(tokenizer, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                chat_template=VICUNA_V1_CHAT_TEMPLATE.replace(VICUNA_V1_SYSTEM, DEMO_SYSTEM),
                                add_alignment_token=alignment_mode != "none")
    torch.manual_seed(seed)
    text_config = build_config(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers).text_config
    config = AlignGPTConfig(
        vision_config=clip[0].config.vision_config, text_config=text_config, num_alignment_levels=settings.num_levels,
        gate_hidden_size=32, vision_feature_layer=-1, vision_feature_select_strategy="full",
        # keep the final CLS token: it is what the contrastive loss trained (last-layer patch tokens get no gradient)
        image_token_id=processor.image_token_id, alignment_token_id=processor.alignment_token_id,
        alignment_mode=alignment_mode,
    )
    processor.image_seq_length = config.image_seq_length  # 16 patches + the CLS token
    model = AlignGPTForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip[0].vision_model.state_dict())  # strict: every key
    return model, processor


def step_lines(stage: str, total: int, progress: Progress):
    """Trainer callback printing one short line per logging step instead of raw log dictionaries."""
    from transformers import TrainerCallback

    class StepLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                progress.line(f"{stage} step {state.global_step}/{total}: loss {float(logs['loss']):.3f}",
                              state.global_step / total)

    return StepLines()


def quiet(trainer, stage: str, total: int, progress: Progress):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(step_lines(stage, total, progress))
    return trainer


def training_args(config_class, run: Path, name: str, settings: DemoSettings, steps: int, lr: float, seed: int,
                  **extra):
    return config_class(
        output_dir=str(run / "checkpoints" / name), max_steps=steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=lr, warmup_steps=0.03, lr_scheduler_type="cosine", logging_steps=max(1, steps // 10),
        report_to="none", save_strategy="no", activation_checkpointing=False, use_cpu=True, bf16=False, seed=seed,
        dataloader_num_workers=0, disable_tqdm=True, max_length=512, **extra,
    )


def instruct_dataset(run: Path, settings: DemoSettings, rng: random.Random):
    """Stage-2 rows: image questions (written as LLaVA JSON) mixed with text-only chats."""
    from datasets import Dataset

    from aligngpt_hf.training.data import load_llava_json

    rows = question_rows(settings.instruct_rows, rng, dict(settings.kind_weights))
    source = write_llava_json(rows, run / "data", "instruct", lambda row: {"conversations": [
        {"from": "human", "value": f"<image>\n{row['question']}"}, {"from": "gpt", "value": row["response"]}]})
    loaded = load_llava_json(source, run / "data" / "images")
    text_rows = [{"id": f"text-{i}", "images": [], "alignment_level": None, "messages": [
        {"role": "user", "content": [{"type": "text", "text": q}]},
        {"role": "assistant", "content": [{"type": "text", "text": a}]}]}
        for i, (q, a) in enumerate(rng.choices(text_only_chats(), k=settings.text_only_rows))]
    mixed = loaded.to_list() + text_rows
    rng.shuffle(mixed)
    return Dataset.from_list(mixed).cast_column("images", loaded.features["images"])


def run_stages(run: Path, model, processor, levels_json: Path, instruct, settings: DemoSettings, seed: int,
               progress: Progress, name: str = "", out: Path | None = None):
    """Stage 1 on the levelled captions, then stage 2 on `instruct` from the stage-1 folder; saves to `out`
    (default `run/model`) and returns the stage-2 model and both loss histories."""
    from aligngpt_hf.training.data import load_llava_json
    from aligngpt_hf.training.stage_handoff import load_for_instruct
    from aligngpt_hf.training.trainers import (
        AlignGPTInstructConfig,
        AlignGPTInstructTrainer,
        AlignGPTPretrainConfig,
        AlignGPTPretrainTrainer,
    )

    suffix, out = (f" ({name})" if name else ""), out or run / "model"
    stage1_dir = out.with_name(out.name + "-stage1") if name else run / "stage1"
    has_table = model.config.uses_alignment_token
    progress.stage(f"stage 1{suffix}", f"{settings.stage1_steps} steps (projector{' + level table' * has_table})")
    stage1 = AlignGPTPretrainTrainer(
        model=model, processing_class=processor, train_dataset=load_llava_json(levels_json, run / "data" / "images"),
        args=training_args(AlignGPTPretrainConfig, run, f"stage1{name}", settings, settings.stage1_steps, 2e-3, seed,
                           train_level_table=has_table))
    quiet(stage1, f"stage 1{suffix}", settings.stage1_steps, progress).train()
    with atomic_path(stage1_dir, directory=True) as staging:  # the folder stage 2 and the report read: whole or none
        stage1.save_model(str(staging))
        processor.save_pretrained(staging)
    progress.stage(f"stage 2{suffix}", f"{settings.stage2_steps} steps (LLM + projector{' + gate' * has_table}), "
                   f"{len(instruct)} rows")
    stage2 = AlignGPTInstructTrainer(
        model=load_for_instruct(stage1_dir), processing_class=processor, train_dataset=instruct,
        args=training_args(AlignGPTInstructConfig, run, f"stage2{name}", settings, settings.stage2_steps,
                           settings.stage2_lr, seed))
    quiet(stage2, f"stage 2{suffix}", settings.stage2_steps, progress).train()
    with atomic_path(out, directory=True) as staging:
        stage2.save_model(str(staging))
        processor.save_pretrained(staging)
    return stage2.model, {"stage1": stage1.state.log_history, "stage2": stage2.state.log_history}

"""`aligngpt-hf demo`: the whole AlignGPT pipeline end to end, offline, on an embedded synthetic task.

1. train a tiny CLIP (contrastive loss) on clean image-caption pairs of coloured shapes;
2. score every pre-training pair with it and bucket the scores into alignment levels (`aligngpt_hf.levels.compute`),
   reporting the Spearman correlation of score and true caption correctness;
3. build a tiny AlignGPT whose vision tower is that CLIP's and whose LLM is a small random Llama;
4. stage 1 and stage 2 with the real trainers (`AlignGPTPretrainTrainer`, `AlignGPTInstructTrainer`);
5. save with remote code and reload in a fresh process through `AutoModelForImageTextToText`/`AutoProcessor`;
6. answer held-out questions with batched generation; exact-match accuracy per question kind next to chance.

Everything the run makes goes into `--out`: data, levels report and histogram, loss curves, accuracy table, gate
weights per question kind, the model, and `results.json`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aligngpt_hf.demo.task import (
    CHANCE,
    IMAGE_SIZE,
    PATCH_SIZE,
    QUESTION_KINDS,
    TEXT_ONLY,
    caption_pairs,
    corpus,
    draw,
    question_rows,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    clip_pairs: int = 1200
    clip_steps: int = 300
    pretrain_pairs: int = 1200
    wrong_share: float = 0.5
    num_levels: int = 4
    instruct_rows: int = 2400
    text_only_rows: int = 120
    heldout_per_kind: int = 40
    stage1_steps: int = 150
    stage2_steps: int = 800
    batch_size: int = 16
    hidden_size: int = 96
    stage2_lr: float = 2e-3


FULL = DemoSettings()
QUICK = DemoSettings(clip_pairs=600, clip_steps=250, pretrain_pairs=256, instruct_rows=960, text_only_rows=32,
                     heldout_per_kind=12, stage1_steps=20, stage2_steps=400)
KIND_WEIGHTS = {"colour": 1.0, "shape": 2.0, "position": 1.2, "count": 1.2, "yes/no": 2.0}


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def write_llava_json(rows: list[dict], folder: Path, name: str, to_record) -> Path:
    """Draw each row's scene to `folder/images/` and write LLaVA-format records built by `to_record`."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for index, row in enumerate(rows):
        file = f"{name}-{index:05d}.png"
        draw(row["scene"]).save(images / file)
        records.append({"id": f"{name}-{index}", "image": file, **to_record(row)})
    path = folder / f"{name}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def train_clip(settings: DemoSettings, rng: random.Random, seed: int):
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
        if step % 50 == 0 or step == settings.clip_steps - 1:
            say(f"CLIP step {step + 1}/{settings.clip_steps}: contrastive loss {loss.item():.3f}")
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


def score_levels(run: Path, settings: DemoSettings, rng: random.Random, clip) -> tuple[Path, float, dict]:
    """Score the pre-training pairs with the tiny CLIP and bucket them (the real `levels` tool)."""
    from aligngpt_hf.levels.compute import compute_alignment_levels

    pairs = caption_pairs(settings.pretrain_pairs, rng, settings.wrong_share)
    source = write_llava_json(pairs, run / "data", "pretrain", lambda row: {
        "num_wrong": row["num_wrong"],
        "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                          {"from": "gpt", "value": row["caption"]}],
    })
    result = compute_alignment_levels(source, run / "data" / "pretrain_levels.json", run / "data" / "images",
                                      scorer=clip, num_levels=settings.num_levels, progress=False,
                                      cache_dir=run / "cache" / "levels")
    records = json.loads((run / "data" / "pretrain_levels.json").read_text())
    correlation = spearman([r["alignment_score"] for r in records], [-r["num_wrong"] for r in records])
    say(f"levels: {settings.num_levels} quantile levels over {len(records)} pairs; Spearman(score, correctness) = "
        f"{correlation:.3f}")
    return run / "data" / "pretrain_levels.json", correlation, result.files


def build_aligngpt(clip, settings: DemoSettings, seed: int):
    """Tiny AlignGPT: the trained CLIP's vision tower + a random Llama with a tokenizer trained on chat text."""
    import torch

    from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
    from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
    from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_SYSTEM
    from aligngpt_hf.tiny import build_config, build_processor, build_tokenizer

    chat = [f"{VICUNA_V1_SYSTEM} USER: <image>\n{line} ASSISTANT: {line}</s>" for line in corpus()]
    tokenizer = build_tokenizer(chat, vocab_size=600)
    processor = build_processor(tokenizer, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    torch.manual_seed(seed)
    text_config = build_config(tokenizer, hidden_size=settings.hidden_size, num_layers=2).text_config
    config = AlignGPTConfig(
        vision_config=clip[0].config.vision_config, text_config=text_config, num_alignment_levels=settings.num_levels,
        gate_hidden_size=32, vision_feature_layer=-1, vision_feature_select_strategy="full",
        # keep the final CLS token: it is what the contrastive loss trained (last-layer patch tokens get no gradient)
        image_token_id=processor.image_token_id, alignment_token_id=processor.alignment_token_id,
    )
    processor.image_seq_length = config.image_seq_length  # 16 patches + the CLS token
    model = AlignGPTForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip[0].vision_model.state_dict())  # strict: every key
    return model, processor


def step_lines(stage: str, total: int):
    """Trainer callback printing one short line per logging step instead of raw log dictionaries."""
    from transformers import TrainerCallback

    class StepLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                say(f"{stage} step {state.global_step}/{total}: loss {float(logs['loss']):.3f}")

    return StepLines()


def quiet(trainer, stage: str, total: int):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(step_lines(stage, total))
    return trainer


def training_args(config_class, run: Path, name: str, settings: DemoSettings, steps: int, lr: float, seed: int):
    return config_class(
        output_dir=str(run / "checkpoints" / name), max_steps=steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=lr, warmup_steps=0.03, lr_scheduler_type="cosine", logging_steps=max(1, steps // 20),
        report_to="none", save_strategy="no", gradient_checkpointing=False, use_cpu=True, bf16=False, seed=seed,
        dataloader_num_workers=0, disable_tqdm=True, max_length=512,
    )


def run_stages(run: Path, model, processor, levels_json: Path, settings: DemoSettings, rng, seed: int):
    """Stage 1 on the levelled captions, then stage 2 on instructions (+ text-only chats) from the stage-1 folder."""
    from datasets import Dataset

    from aligngpt_hf.training.data import load_llava_json
    from aligngpt_hf.training.stage_handoff import load_for_instruct
    from aligngpt_hf.training.trainers import (
        AlignGPTInstructConfig,
        AlignGPTInstructTrainer,
        AlignGPTPretrainConfig,
        AlignGPTPretrainTrainer,
    )

    stage1 = AlignGPTPretrainTrainer(
        model=model, processing_class=processor, train_dataset=load_llava_json(levels_json, run / "data" / "images"),
        args=training_args(AlignGPTPretrainConfig, run, "stage1", settings, settings.stage1_steps, 2e-3, seed))
    say(f"stage 1: {settings.stage1_steps} steps (projector + level table)")
    quiet(stage1, "stage 1", settings.stage1_steps).train()
    stage1.save_model(str(run / "stage1"))
    processor.save_pretrained(run / "stage1")

    rows = question_rows(settings.instruct_rows, rng, KIND_WEIGHTS)
    source = write_llava_json(rows, run / "data", "instruct", lambda row: {"conversations": [
        {"from": "human", "value": f"<image>\n{row['question']}"}, {"from": "gpt", "value": row["answer"]}]})
    image_rows = load_llava_json(source, run / "data" / "images").to_list()
    text_rows = [{"id": f"text-{i}", "images": [], "alignment_level": None, "messages": [
        {"role": "user", "content": [{"type": "text", "text": q}]},
        {"role": "assistant", "content": [{"type": "text", "text": a}]}]}
        for i, (q, a) in enumerate(rng.choices(TEXT_ONLY, k=settings.text_only_rows))]
    mixed = image_rows + text_rows
    rng.shuffle(mixed)
    dataset = Dataset.from_list(mixed).cast_column("images", load_llava_json(source, run / "data" / "images")
                                                   .features["images"])
    stage2 = AlignGPTInstructTrainer(
        model=load_for_instruct(run / "stage1"), processing_class=processor, train_dataset=dataset,
        args=training_args(AlignGPTInstructConfig, run, "stage2", settings, settings.stage2_steps, settings.stage2_lr,
                           seed))
    say(f"stage 2: {settings.stage2_steps} steps (LLM + projector + gate), {len(image_rows)} image rows + "
        f"{len(text_rows)} text-only rows")
    quiet(stage2, "stage 2", settings.stage2_steps).train()
    stage2.save_model(str(run / "model"))
    processor.save_pretrained(run / "model")
    return {"stage1": stage1.state.log_history, "stage2": stage2.state.log_history}


EVALUATE_IN_FRESH_PROCESS = r'''
import json, sys
sys.modules["aligngpt_hf"] = None  # prove the saved folder works with transformers alone (remote code)
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_dir, questions_file, answers_file = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
questions = json.load(open(questions_file))
answers = []
for start in range(0, len(questions), 32):
    chunk = questions[start:start + 32]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
               {"type": "text", "text": q["question"]}]}], add_generation_prompt=True) for q in chunk]
    images = [Image.open(q["image"]).convert("RGB") for q in chunk]
    batch = processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        weights = model(**batch).alignment_weights
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    texts = processor.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for q, text, w in zip(chunk, texts, weights.tolist()):
        answers.append({**q, "prediction": text.strip(), "alignment_weights": w})
json.dump({"answers": answers, "model_class": type(model).__module__}, open(answers_file, "w"), indent=1)
'''


def evaluate(run: Path, settings: DemoSettings, rng: random.Random) -> dict:
    """Held-out questions on unseen images, answered by the reloaded model in a fresh interpreter."""
    rows = []
    for kind in QUESTION_KINDS:
        rows += question_rows(settings.heldout_per_kind, rng, {kind: 1.0})
    folder = run / "data" / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    questions = []
    for index, row in enumerate(rows):
        path = folder / f"heldout-{index:04d}.png"
        draw(row["scene"]).save(path)
        questions.append({"kind": row["kind"], "question": row["question"], "answer": row["answer"],
                          "image": str(path)})
    (folder / "questions.json").write_text(json.dumps(questions, indent=1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(run / "cache" / "hf_home")}
    say(f"reloading the saved model in a fresh process (remote code) for {len(questions)} held-out questions")
    subprocess.run([sys.executable, "-c", EVALUATE_IN_FRESH_PROCESS, str(run / "model"), str(folder / "questions.json"),
                    str(run / "answers.json")], check=True, env=env)
    return json.loads((run / "answers.json").read_text())


def summarise(answers: dict) -> tuple[dict, dict]:
    """Exact-match accuracy and mean gate weights per question kind."""
    accuracy, weights = {}, {}
    for kind in QUESTION_KINDS:
        rows = [row for row in answers["answers"] if row["kind"] == kind]
        accuracy[kind] = sum(row["prediction"].lower().rstrip(".") == row["answer"] for row in rows) / len(rows)
        columns = list(zip(*(row["alignment_weights"] for row in rows)))
        weights[kind] = [sum(column) / len(column) for column in columns]
    return accuracy, weights


def write_plots(run: Path, logs: dict, gate_weights: dict) -> list[str]:
    """Loss curves and the gate-weights-per-kind chart (PNG); skipped, with a message, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("plots skipped: install aligngpt-hf[plot] for matplotlib")
        return []
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, (stage, history) in zip(axes, logs.items()):
        points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
        axis.plot(*zip(*points), marker="o", markersize=3)
        axis.set(title=f"{stage} training loss", xlabel="step", ylabel="loss")
    figure.tight_layout()
    figure.savefig(run / "loss_curves.png", dpi=100)
    figure, axis = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(gate_weights)
    for offset, (kind, weights) in enumerate(gate_weights.items()):
        axis.bar([level + offset * width for level in range(len(weights))], weights, width, label=kind)
    levels = range(len(next(iter(gate_weights.values()))))
    axis.set_xticks([level + 0.4 - width / 2 for level in levels], [str(level) for level in levels])
    axis.set(title="mean gate weight per local alignment level, by question kind", xlabel="local level",
             ylabel="weight")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(run / "gate_weights.png", dpi=100)
    plt.close("all")
    return ["loss_curves.png", "gate_weights.png"]


def accuracy_table(accuracy: dict) -> str:
    lines = ["| question kind | accuracy | chance |", "| --- | --- | --- |"]
    lines += [f"| {kind} | {accuracy[kind]:.2f} | {CHANCE[kind]:.2f} |" for kind in QUESTION_KINDS]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0) -> dict:
    """Run the whole pipeline; returns (and writes to `out/results.json`) accuracy, chance, Spearman and seconds."""
    import torch
    from transformers import set_seed

    start = time.perf_counter()
    run, settings = Path(out), (QUICK if quick else FULL)
    run.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    rng = random.Random(seed)
    say(f"{'quick' if quick else 'full'} run into {run} (seed {seed})")
    clip = train_clip(settings, rng, seed)
    levels_json, correlation, level_files = score_levels(run, settings, rng, clip)
    model, processor = build_aligngpt(clip, settings, seed)
    logs = run_stages(run, model, processor, levels_json, settings, rng, seed)
    answers = evaluate(run, settings, rng)
    accuracy, gate_weights = summarise(answers)
    plots = write_plots(run, logs, gate_weights)
    results = {"accuracy": accuracy, "chance": {kind: CHANCE[kind] for kind in QUESTION_KINDS},
               "spearman": correlation, "seconds": time.perf_counter() - start,
               "settings": asdict(settings), "seed": seed, "gate_weights": gate_weights,
               "reloaded_from": answers["model_class"], "files": {**level_files, "plots": plots}}
    (run / "results.json").write_text(json.dumps(results, indent=2))
    (run / "accuracy.md").write_text(accuracy_table(accuracy))
    say("held-out exact-match accuracy (chance in brackets): " + ", ".join(
        f"{kind} {accuracy[kind]:.2f} ({CHANCE[kind]:.2f})" for kind in QUESTION_KINDS))
    say(f"Spearman {correlation:.3f}; {results['seconds']:.0f} s; results in {run / 'results.json'}")
    return results


def add_cli_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="sub-minute smoke version (smaller data and budgets)")
    parser.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def run_cli(args) -> int:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0

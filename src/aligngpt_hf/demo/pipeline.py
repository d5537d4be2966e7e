"""`aligngpt-hf demo`: the whole AlignGPT pipeline end to end, offline, on an embedded synthetic task.

1. train a tiny CLIP (contrastive loss) on clean image-caption pairs of coloured shapes;
2. score every pre-training pair with it (half of the captions are wrong) and bucket the scores into alignment levels
   (`aligngpt_hf.levels.compute`), reporting the Spearman correlation of score and true caption correctness;
3. build a tiny AlignGPT whose vision tower is that CLIP's and whose LLM is a small random Llama;
4. stage 1 and stage 2 with the real trainers (`AlignGPTPretrainTrainer`, `AlignGPTInstructTrainer`);
5. save with remote code and reload in a fresh process through `AutoModelForImageTextToText`/`AutoProcessor`;
6. answer balanced held-out questions with batched generation; exact-match accuracy per question kind next to chance
   (the best constant answer on that held-out set).

Everything the run makes goes into `--out`: data, levels report and histogram, loss curves, accuracy table, gate
weights per question kind, the model, and `results.json`. `--compare` trains AlignGPT, plain LLaVA and AlignGPT with
shuffled levels on the same data instead (`aligngpt_hf.demo.compare`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from aligngpt_hf.demo import evaluate as evaluate_module
from aligngpt_hf.demo.stages import (
    FULL,
    QUICK,
    DemoSettings,
    Progress,
    build_aligngpt,
    choose_threads,
    instruct_dataset,
    run_stages,
    say,
    score_levels,
    stage_costs,
    train_clip,
)
from aligngpt_hf.demo.task import QUESTION_KINDS, best_constant_accuracy, draw, heldout_rows, verdict

MARKER = ".aligngpt-demo"  # written into every run folder, so --overwrite only ever deletes a demo's own output


def prepare_folder(run: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an earlier one: a non-empty folder needs `--overwrite` (and must be a demo's)."""
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise SystemExit(f"aligngpt-hf demo: {run} already exists and is not empty (an earlier run?); pass "
                             "--overwrite to replace it, or choose another --out")
        if not (run / MARKER).is_file():
            raise SystemExit(f"aligngpt-hf demo: {run} is not empty and was not made by the demo (no {MARKER} file); "
                             "refusing to delete it even with --overwrite: choose another --out")
        say(f"--overwrite: removing the earlier run in {run}")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / MARKER).write_text("made by `aligngpt-hf demo`; --overwrite may delete this folder\n")


def write_heldout(run: Path, settings: DemoSettings, rng: random.Random) -> Path:
    """Balanced held-out questions on unseen images (`data/heldout/questions.json`)."""
    folder = run / "data" / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    questions = []
    for index, row in enumerate(heldout_rows(settings.heldout_per_kind, rng)):
        path = folder / f"heldout-{index:04d}.png"
        draw(row["scene"]).save(path)
        questions.append({"kind": row["kind"], "question": row["question"], "answer": row["answer"],
                          "image": str(path)})
    (folder / "questions.json").write_text(json.dumps(questions, indent=1))
    return folder / "questions.json"


def evaluate_saved(run: Path, questions: Path, threads: int) -> dict:
    """Answer the held-out questions with the saved model, reloaded in a fresh interpreter through remote code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(run / "cache" / "hf_home"),
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    subprocess.run([sys.executable, evaluate_module.__file__, str(run / "model"), str(questions),
                    str(run / "answers.json")], check=True, env=env)
    return json.loads((run / "answers.json").read_text())


def summarise(answers: list[dict]) -> dict:
    """Per question kind: exact-match accuracy, chance (best constant answer), and the gate weights' mean and
    standard deviation over that kind's questions (None for a model without a gate)."""
    import numpy as np

    summary = {"accuracy": {}, "chance": {}, "gate_weights": {}, "gate_weights_std": {}}
    for kind in QUESTION_KINDS:
        rows = [row for row in answers if row["kind"] == kind]
        summary["accuracy"][kind] = sum(verdict(row["prediction"], kind) == row["answer"] for row in rows) / len(rows)
        summary["chance"][kind] = best_constant_accuracy([row["answer"] for row in rows])
        weights = [row["alignment_weights"] for row in rows if row["alignment_weights"] is not None]
        summary["gate_weights"][kind] = np.mean(weights, axis=0).tolist() if weights else None
        summary["gate_weights_std"][kind] = np.std(weights, axis=0).tolist() if weights else None
    return summary


def write_plots(run: Path, logs: dict, summary: dict) -> list[str]:
    """Loss curves and the gate weights per kind with their spread (PNG); skipped, with a message, without
    matplotlib."""
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
    means, spreads = summary["gate_weights"], summary["gate_weights_std"]
    figure, axis = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(means)
    for offset, kind in enumerate(means):
        axis.bar([level + offset * width for level in range(len(means[kind]))], means[kind], width,
                 yerr=spreads[kind], capsize=2, label=kind)
    levels = range(len(next(iter(means.values()))))
    axis.set_xticks([level + 0.4 - width / 2 for level in levels], [f"local level {level}" for level in levels])
    axis.axhline(1 / len(levels), color="grey", linestyle=":", linewidth=1)
    axis.set(title="gate weight per local level, by question kind (bar: mean, whisker: std over questions;\n"
                   "dotted: uniform). Bars apart by more than their whiskers: the gate treats those kinds differently", ylabel="weight")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(run / "gate_weights.png", dpi=100)
    plt.close("all")
    return ["loss_curves.png", "gate_weights.png"]


def accuracy_table(summary: dict) -> str:
    lines = ["| question kind | accuracy | chance (best constant answer) |", "| --- | --- | --- |"]
    lines += [f"| {kind} | {summary['accuracy'][kind]:.2f} | {summary['chance'][kind]:.2f} |"
              for kind in QUESTION_KINDS]
    return "\n".join(lines) + "\n"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the fresh evaluation process)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def settings_for(quick: bool, wrong_share: float | None = None, **budgets: int | None) -> DemoSettings:
    """QUICK or FULL with the given fields replaced (None keeps the preset's value)."""
    changes = {name: value for name, value in {"wrong_share": wrong_share, **budgets}.items() if value is not None}
    return replace(QUICK if quick else FULL, **changes)


def setup(seed: int, threads: int | None) -> int:
    """Seed everything and pick torch's thread count (`choose_threads`); returns the count."""
    import torch
    from transformers import set_seed

    set_seed(seed)
    count, why = choose_threads(threads)
    torch.set_num_threads(count)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    say(f"torch threads: {count} ({why}); set --threads or OMP_NUM_THREADS to override")
    return count


def _quiet_libraries() -> None:
    """The demo prints its own progress lines; the libraries' progress bars would bury them."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, overwrite: bool = False,
             threads: int | None = None, wrong_share: float | None = None,
             settings: DemoSettings | None = None) -> dict:
    """Run the whole pipeline; returns (and writes to `out/results.json`) accuracy, chance, Spearman and seconds.
    `settings` replaces the quick/full budgets."""
    start, cpu_start, load = time.perf_counter(), cpu_seconds(), _loadavg()
    run, settings = Path(out), settings or settings_for(quick, wrong_share)
    prepare_folder(run, overwrite)
    threads = setup(seed, threads)
    rng = random.Random(seed)
    progress = Progress(stage_costs(settings))
    say(f"{'quick' if quick else 'full'} run into {run} (seed {seed}; {settings.wrong_share:.0%} of the "
        f"pre-training captions wrong)")
    progress.stage("CLIP", f"{settings.clip_steps} contrastive steps on {settings.clip_pairs} clean pairs")
    clip = train_clip(settings, rng, seed, progress)
    progress.stage("levels", f"scoring {settings.pretrain_pairs} pre-training pairs with the tiny CLIP")
    levels_json, correlation, level_files = score_levels(run, settings, rng, clip, seed)
    progress.line(f"levels: {settings.num_levels} quantile levels; Spearman(score, caption correctness) = "
                  f"{correlation:.3f}", 1.0)
    model, processor = build_aligngpt(clip, settings, seed)
    _, logs = run_stages(run, model, processor, levels_json, instruct_dataset(run, settings, rng), settings, seed,
                         progress)
    questions = write_heldout(run, settings, rng)
    progress.stage("evaluation", "reloading the saved model in a fresh process (remote code) for held-out questions")
    answers = evaluate_saved(run, questions, threads)
    summary = summarise(answers["answers"])
    plots = write_plots(run, logs, summary)
    results = {**summary, "spearman": correlation, "seconds": time.perf_counter() - start,
               "cpu_seconds": cpu_seconds() - cpu_start, "loadavg_at_start": load, "loadavg_at_end": _loadavg(),
               "threads": threads, "settings": asdict(settings), "seed": seed,
               "reloaded_from": answers["model_class"], "files": {**level_files, "plots": plots}}
    (run / "results.json").write_text(json.dumps(results, indent=2))
    (run / "accuracy.md").write_text(accuracy_table(summary))
    print_summary(results, run)
    return results


def _loadavg() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def print_summary(results: dict, run: Path) -> None:
    say("held-out exact-match accuracy per question kind:")
    print(accuracy_table(results), end="", flush=True)
    say(f"Spearman(CLIP score, caption correctness) {results['spearman']:.3f}; {results['seconds']:.0f} s wall, "
        f"{results['cpu_seconds']:.0f} s CPU, {results['threads']} thread(s); results in {run / 'results.json'}")


def run_cli(args) -> int:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    settings = settings_for(args.quick, args.wrong_share, stage1_steps=args.stage1_steps,
                            stage2_steps=args.stage2_steps)
    if args.compare:
        from aligngpt_hf.demo.compare import run_compare

        run_compare(args.out or "runs/demo-compare", quick=args.quick, seeds=range(args.seed, args.seed + args.seeds),
                    overwrite=args.overwrite, threads=args.threads, settings=settings)
    else:
        run_demo(args.out or "runs/demo", quick=args.quick, seed=args.seed, overwrite=args.overwrite,
                 threads=args.threads, settings=settings)
    return 0

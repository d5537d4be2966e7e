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
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from aligngpt_hf.demo import evaluate as evaluate_module
from aligngpt_hf.demo.runs import (
    cpu_seconds,
    loadavg,
    prepare_folder,
    settings_for,
    setup,
    summarise,
    write_heldout,
    write_results,
)
from aligngpt_hf.demo.stages import (
    DemoSettings,
    Progress,
    build_aligngpt,
    instruct_dataset,
    run_stages,
    say,
    score_levels,
    stage_costs,
    train_clip,
)
from aligngpt_hf.demo.task import QUESTION_KINDS
from aligngpt_hf.paths import atomic_path
from aligngpt_hf_cli.options import demo_option_problem


def evaluate_saved(run: Path, questions: Path, threads: int) -> dict:
    """Answer the held-out questions with the saved model, reloaded in a fresh interpreter through remote code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(run / "cache" / "hf_home"),
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    subprocess.run([sys.executable, evaluate_module.__file__, str(run / "model"), str(questions),
                    str(run / "answers.json")], check=True, env=env)
    return json.loads((run / "answers.json").read_text())


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
    with atomic_path(run / "loss_curves.png") as temp:
        figure.savefig(temp, dpi=100, format="png")
    with atomic_path(run / "gate_weights.png") as temp:
        gate_figure(plt, summary).savefig(temp, dpi=100, format="png")
    plt.close("all")
    return ["loss_curves.png", "gate_weights.png"]


def gate_figure(plt, summary: dict):
    """Mean gate weight per local level for each question kind, whiskers = std over the kind's questions. Only the
    N-1 local levels are drawn: the gate weighs those, and the global level N-1 is always added at weight 1."""
    means, spreads = summary["gate_weights"], summary["gate_weights_std"]
    figure, axis = plt.subplots(figsize=(8, 4.4), layout="constrained")
    width = 0.8 / len(means)
    for offset, kind in enumerate(means):
        axis.bar([level + offset * width for level in range(len(means[kind]))], means[kind], width,
                 yerr=spreads[kind], capsize=2, label=kind)
    levels = range(len(next(iter(means.values()))))
    axis.set_xticks([level + 0.4 - width / 2 for level in levels], [f"local level {level}" for level in levels])
    axis.axhline(1 / len(levels), color="grey", linestyle=":", linewidth=1)
    axis.set_title("Gate weight per local level, by question kind\n"
                   "bar: mean, whisker: std over the questions, dotted: uniform; bars apart by more than their\n"
                   f"whiskers: the gate treats those kinds differently. Global level {len(levels)} is not drawn: it "
                   "is always added at weight 1", fontsize=9)
    axis.set(ylabel="weight")
    axis.legend(fontsize=8)
    return figure


def accuracy_table(summary: dict) -> str:
    lines = ["| question kind | accuracy | chance (best constant answer) |", "| --- | --- | --- |"]
    lines += [f"| {kind} | {summary['accuracy'][kind]:.2f} | {summary['chance'][kind]:.2f} |"
              for kind in QUESTION_KINDS]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, overwrite: bool = False,
             threads: int | None = None, wrong_share: float | None = None,
             settings: DemoSettings | None = None) -> dict:
    """Run the whole pipeline; returns (and writes to `out/results.json`) accuracy, chance, Spearman and seconds.
    `settings` replaces the quick/full budgets."""
    start, cpu_start, load = time.perf_counter(), cpu_seconds(), loadavg()
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
               "cpu_seconds": cpu_seconds() - cpu_start, "loadavg_at_start": load, "loadavg_at_end": loadavg(),
               "threads": threads, "settings": asdict(settings), "seed": seed,
               "reloaded_from": answers["model_class"], "files": {**relative_to(run, level_files), "plots": plots}}
    write_results(run, results, "accuracy.md",
                  f"Held-out exact-match accuracy of `aligngpt-hf demo{' --quick' if quick else ''} --seed {seed}`; "
                  f"Spearman(CLIP score, caption correctness) = {correlation:.3f}.\n\n{accuracy_table(summary)}")
    print_summary(results, run)
    return results


def relative_to(run: Path, files: dict[str, str]) -> dict[str, str]:
    """Paths inside the run folder, relative to it (results.json stays valid when the folder moves)."""
    return {name: os.path.relpath(path, run) for name, path in files.items()}


def print_summary(results: dict, run: Path) -> None:
    say("held-out exact-match accuracy per question kind:")
    print(accuracy_table(results), end="", flush=True)
    say(f"Spearman(CLIP score, caption correctness) {results['spearman']:.3f}; {results['seconds']:.0f} s wall, "
        f"{results['cpu_seconds']:.0f} s CPU, {results['threads']} thread(s); results in {run / 'results.json'}")


def run_cli(args) -> int:
    problem = demo_option_problem(args)  # the console script checks this before importing; `-m aligngpt_hf.cli` here
    if problem:
        raise SystemExit(problem)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    settings = settings_for(args.quick, args.wrong_share, stage1_steps=args.stage1_steps,
                            stage2_steps=args.stage2_steps)
    if args.compare:
        from aligngpt_hf.demo.compare import run_compare

        seeds = 3 if args.seeds is None else args.seeds
        run_compare(args.out or "runs/demo-compare", quick=args.quick, seeds=range(args.seed, args.seed + seeds),
                    overwrite=args.overwrite, threads=args.threads, settings=settings)
    else:
        run_demo(args.out or "runs/demo", quick=args.quick, seed=args.seed, overwrite=args.overwrite,
                 threads=args.threads, settings=settings)
    return 0

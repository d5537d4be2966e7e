"""`aligngpt-hf demo --compare`: does knowing how well each pre-training caption matches its image help?

Per seed, one tiny CLIP, one set of levels, one stage-2 dataset and one held-out set are shared by three arms with the
same initial weights and budgets:
(a) `aligngpt`: levels in stage 1, gate in stage 2; (b) `llava`: plain LLaVA (`alignment_mode="none"`, the same
trainers, no level table); (c) `shuffled`: AlignGPT trained on levels permuted across pairs (no information, same
level counts). (a) > (c) would show the levels' information helps; (a) > (b) that AlignGPT beats LLaVA here.
Writes `results.json` (per seed, per arm, per kind, plus mean and spread), `compare.md` and `compare.png`.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from aligngpt_hf.demo.evaluate import answer_questions
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
    ARM_TITLES,
    ARMS,
    Progress,
    build_aligngpt,
    instruct_dataset,
    run_stages,
    say,
    score_levels,
    shuffled_levels,
    stage_costs,
    train_clip,
)
from aligngpt_hf.demo.task import QUESTION_KINDS
from aligngpt_hf.paths import atomic_path

MODES = {"aligngpt": "adaptive", "llava": "none", "shuffled": "adaptive"}


def run_seed(run: Path, settings, seed: int, progress: Progress) -> dict:
    """All three arms on one seed's data; returns {arm: summary} plus the seed's Spearman."""
    run.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    progress.stage("CLIP", f"{settings.clip_steps} contrastive steps")
    clip = train_clip(settings, rng, seed, progress)
    progress.stage("levels", f"scoring {settings.pretrain_pairs} pairs")
    levels_json, correlation, _ = score_levels(run, settings, rng, clip, seed)
    stage1_data = {"aligngpt": levels_json, "llava": levels_json, "shuffled": shuffled_levels(levels_json, seed)}
    instruct = instruct_dataset(run, settings, rng)
    questions = json.loads(write_heldout(run, settings, rng).read_text())
    arms = {}
    for arm in ARMS:
        model, processor = build_aligngpt(clip, settings, seed, alignment_mode=MODES[arm])  # same init per arm
        model, _ = run_stages(run, model, processor, stage1_data[arm], instruct, settings, seed, progress, name=arm,
                              out=run / "arms" / arm)
        progress.stage(f"evaluation ({arm})", f"{len(questions)} held-out questions")
        arms[arm] = summarise(answer_questions(model, processor, questions))
        progress.line(f"{ARM_TITLES[arm]}: " + ", ".join(f"{kind} {arms[arm]['accuracy'][kind]:.2f}"
                                                         for kind in QUESTION_KINDS), 1.0)
    return {"spearman": correlation, "arms": arms}


def aggregate(per_seed: dict) -> dict:
    """Mean, population standard deviation and min..max over seeds, per arm and kind (`mean` over kinds too)."""
    table = {}
    for arm in ARMS:
        table[arm] = {}
        for kind in (*QUESTION_KINDS, "mean"):
            values = [_value(result["arms"][arm], kind) for result in per_seed.values()]
            table[arm][kind] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
                                "min": min(values), "max": max(values)}
    return table


def _value(summary: dict, kind: str) -> float:
    accuracy = summary["accuracy"]
    return statistics.fmean(accuracy.values()) if kind == "mean" else accuracy[kind]


def gaps(per_seed: dict) -> dict:
    """Per kind (and the mean over kinds): (a) - (b) and (a) - (c) per seed, and on how many seeds (a) is ahead."""
    result = {}
    for other in ("llava", "shuffled"):
        result[f"aligngpt - {other}"] = {}
        for kind in (*QUESTION_KINDS, "mean"):
            deltas = [_value(r["arms"]["aligngpt"], kind) - _value(r["arms"][other], kind) for r in per_seed.values()]
            result[f"aligngpt - {other}"][kind] = {"per_seed": deltas, "mean": statistics.fmean(deltas),
                                                   "seeds_ahead": sum(delta > 0 for delta in deltas),
                                                   "seeds_behind": sum(delta < 0 for delta in deltas)}
    return result


def compare_table(table: dict, chance: dict, seeds: list[int]) -> str:
    header = "| arm | " + " | ".join(QUESTION_KINDS) + " | mean |"
    lines = [f"Held-out exact match, mean ± std over seeds {seeds} (min..max in results.json).", "", header,
             "| --- |" + " --- |" * (len(QUESTION_KINDS) + 1)]
    for arm in ARMS:
        cells = [f"{table[arm][kind]['mean']:.2f} ± {table[arm][kind]['std']:.2f}" for kind in (*QUESTION_KINDS, "mean")]
        lines.append(f"| ({'abc'[ARMS.index(arm)]}) {ARM_TITLES[arm]} | " + " | ".join(cells) + " |")
    lines.append("| chance (best constant answer) | " + " | ".join(f"{chance[kind]:.2f}" for kind in QUESTION_KINDS)
                 + " | |")
    return "\n".join(lines) + "\n"


def gap_lines(gap: dict) -> str:
    lines = []
    for name, per_kind in gap.items():
        mean = per_kind["mean"]
        lines.append(f"* {name} (mean over kinds): {mean['mean']:+.3f}; ahead on {mean['seeds_ahead']} seed(s), behind "
                     f"on {mean['seeds_behind']} (per seed: {', '.join(f'{d:+.3f}' for d in mean['per_seed'])})")
    return "\n".join(lines) + "\n"


def write_plot(run: Path, table: dict, chance: dict) -> list[str]:
    """Grouped bars: one group per kind, one bar per arm, whiskers = min..max over seeds, ticks = chance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("plot skipped: install aligngpt-hf[plot] for matplotlib")
        return []
    figure, axis = plt.subplots(figsize=(10.5, 3.8))
    width = 0.8 / len(ARMS)
    for offset, arm in enumerate(ARMS):
        means = [table[arm][kind]["mean"] for kind in QUESTION_KINDS]
        low = [table[arm][kind]["mean"] - table[arm][kind]["min"] for kind in QUESTION_KINDS]
        high = [table[arm][kind]["max"] - table[arm][kind]["mean"] for kind in QUESTION_KINDS]
        axis.bar([i + offset * width for i in range(len(QUESTION_KINDS))], means, width, yerr=[low, high], capsize=2,
                 label=ARM_TITLES[arm])
    for i, kind in enumerate(QUESTION_KINDS):
        axis.hlines(chance[kind], i - width / 2, i + 0.8 - width / 2, colors="black", linestyles=":", linewidth=1)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(QUESTION_KINDS))], QUESTION_KINDS)
    axis.set(ylim=(0, 1.05), ylabel="held-out exact match",
             title="mean over seeds (whiskers: min..max; dotted: chance)")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    with atomic_path(run / "compare.png") as temp:
        figure.savefig(temp, dpi=100, format="png")
    plt.close(figure)
    return ["compare.png"]


def run_compare(out: str | Path = "runs/demo-compare", quick: bool = False, seeds=(0, 1, 2), overwrite: bool = False,
                threads: int | None = None, wrong_share: float | None = None, settings=None) -> dict:
    """Three arms x `seeds` on shared data; writes and returns the comparison. `settings` (a `DemoSettings`)
    replaces the quick/full budgets."""
    start, cpu_start, load = time.perf_counter(), cpu_seconds(), loadavg()
    run, seeds = Path(out), list(seeds)
    if not seeds:
        raise ValueError("run_compare needs at least one seed (--seeds N with N >= 1).")
    settings = settings or settings_for(quick, wrong_share)
    prepare_folder(run, overwrite)
    threads = setup(seeds[0], threads)
    say(f"compare into {run}: {len(ARMS)} arms x seeds {seeds}, {'quick' if quick else 'full'} budgets, "
        f"{settings.wrong_share:.0%} of the pre-training captions wrong")
    per_seed, progress = {}, Progress(stage_costs(settings, arms=len(ARMS)), rounds=len(seeds))
    for index, seed in enumerate(seeds):
        setup(seed, threads)
        progress.next_round(f"seed {seed} ({index + 1}/{len(seeds)}) ")
        per_seed[seed] = run_seed(run / f"seed-{seed}", settings, seed, progress)
    table, gap = aggregate(per_seed), gaps(per_seed)
    chance = next(iter(per_seed.values()))["arms"]["aligngpt"]["chance"]
    results = {"table": table, "gaps": gap, "chance": chance, "per_seed": per_seed, "seeds": seeds,
               "settings": asdict(settings), "threads": threads,
               "seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu_start,
               "loadavg_at_start": load, "loadavg_at_end": loadavg(), "plots": write_plot(run, table, chance)}
    markdown = compare_table(table, chance, seeds) + "\n" + gap_lines(gap)
    write_results(run, results, "compare.md", markdown)
    say("comparison (held-out exact match):")
    print(markdown, end="", flush=True)
    say(f"{results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU; results in {run / 'results.json'}")
    return results

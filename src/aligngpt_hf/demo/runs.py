"""What one demo run and `--compare` share: the run folder, seeding and threads, the held-out questions, the
per-kind summary and the clocks."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
from dataclasses import replace
from pathlib import Path

from aligngpt_hf.demo.stages import FULL, QUICK, DemoSettings, choose_threads, say
from aligngpt_hf.demo.task import QUESTION_KINDS, best_constant_accuracy, draw, heldout_rows, verdict
from aligngpt_hf.paths import atomic_path, atomic_write_text
from aligngpt_hf_cli.options import demo_folder_problem

MARKER = ".aligngpt-demo"  # written into every run folder, so --overwrite only ever deletes a demo's own output


def prepare_folder(run: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an earlier one: a non-empty folder needs `--overwrite` (and must be a demo's)."""
    problem = demo_folder_problem(run, overwrite, MARKER)  # the command line checks the same before importing
    if problem:
        raise SystemExit(problem)
    if run.exists() and any(run.iterdir()):
        say(f"--overwrite: removing the earlier run in {run}")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / MARKER, "made by `aligngpt-hf demo`; --overwrite may delete this folder\n")


def write_heldout(run: Path, settings: DemoSettings, rng: random.Random) -> Path:
    """Balanced held-out questions on unseen images (`data/heldout/questions.json`); the folder is built aside and
    renamed into place whole."""
    folder = run / "data" / "heldout"
    questions = []
    with atomic_path(folder, directory=True) as staging:
        for index, row in enumerate(heldout_rows(settings.heldout_per_kind, rng)):
            name = f"heldout-{index:04d}.png"
            draw(row["scene"]).save(staging / name)
            questions.append({"kind": row["kind"], "question": row["question"], "answer": row["answer"],
                              "image": str(folder / name)})
        (staging / "questions.json").write_text(json.dumps(questions, indent=1))
    return folder / "questions.json"


def write_results(run: Path, results: dict, markdown_name: str, markdown: str) -> None:
    """`results.json` and the markdown table beside it, each whole or not at all (a killed run keeps the old ones)."""
    atomic_write_text(run / "results.json", json.dumps(results, indent=2))
    atomic_write_text(run / markdown_name, markdown)


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

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in 0..{2**32 - 1}, got {seed!r}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer (or None: chosen from the free cores), got {threads!r}.")
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


def loadavg() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []

"""`aligngpt-hf demo --quick`: every artefact is produced and held-out answers beat chance."""

from __future__ import annotations

import json

from aligngpt_hf.cli import main
from aligngpt_hf.demo.task import CHANCE, QUESTION_KINDS


def test_quick_demo_produces_artifacts_and_beats_chance(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "0"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("loss_curves.png", "gate_weights.png", "accuracy.md", "answers.json",
                 "data/pretrain_levels.json", "data/pretrain_levels.scores.png", "data/pretrain_levels.report.md",
                 "model/config.json", "model/modeling_aligngpt.py", "model/model.safetensors",
                 "model/processor_config.json"):
        assert (tmp_path / name).is_file(), name
    assert set(results["accuracy"]) == set(QUESTION_KINDS) and results["chance"] == CHANCE
    assert results["reloaded_from"].startswith("transformers_modules.")  # remote code, not this package
    assert results["spearman"] > 0.3
    answers = json.loads((tmp_path / "answers.json").read_text())["answers"]
    # a model that always gives the same answer cannot pass: the margin is over the best constant answer
    margin = sum(results["accuracy"].values()) - sum(best_constant_accuracy(answers, kind) for kind in QUESTION_KINDS)
    assert margin > 0.3, results["accuracy"]
    assert results["accuracy"]["colour"] > CHANCE["colour"] + 0.15


def best_constant_accuracy(answers: list[dict], kind: str) -> float:
    truths = [row["answer"] for row in answers if row["kind"] == kind]
    return max(truths.count(value) for value in set(truths)) / len(truths)

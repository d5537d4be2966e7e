"""`aligngpt-hf demo`: the quick run's artefacts and accuracy above chance, `--compare` with its three arms, the
balanced held-out task, thread choice and the refusal to overwrite an earlier run.

One quick demo run (~56 s of CPU) is shared by the tests that read its folder; the comparison runs one seed with tiny
budgets (~16 s); the file takes ~75 s of CPU in all."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from aligngpt_hf.cli import main
from aligngpt_hf.demo.compare import run_compare
from aligngpt_hf.demo.pipeline import gate_figure
from aligngpt_hf.demo.runs import summarise
from aligngpt_hf.demo.stages import DemoSettings, choose_threads
from aligngpt_hf.demo.task import (
    ANSWERS,
    ATTRIBUTES,
    CHECK,
    QUESTION_KINDS,
    comparison_chats,
    heldout_rows,
    question_rows,
    text_only_chats,
    verdict,
)
from conftest import REPO_ROOT

TINY_COMPARE = dict(clip_pairs=200, clip_steps=60, pretrain_pairs=64, instruct_rows=160, text_only_rows=8,
                    heldout_per_kind=4, stage1_steps=4, stage2_steps=30, batch_size=8)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(folder), "--seed", "0", "--threads", "1"]) == 0
    return folder


def test_quick_demo_writes_every_artefact(quick_run):
    for name in ("loss_curves.png", "gate_weights.png", "accuracy.md", "answers.json", ".aligngpt-demo",
                 "data/pretrain_levels.json", "data/pretrain_levels.scores.png", "data/pretrain_levels.report.md",
                 "model/config.json", "model/modeling_aligngpt.py", "model/model.safetensors",
                 "model/processor_config.json"):
        assert (quick_run / name).is_file(), name
    results = json.loads((quick_run / "results.json").read_text())
    for key in ("accuracy", "chance", "spearman", "seconds", "cpu_seconds", "gate_weights", "gate_weights_std"):
        assert key in results, key
    assert results["reloaded_from"].startswith("transformers_modules.")  # remote code, not this package
    assert results["spearman"] > 0.3
    assert results["threads"] == 1
    files = [*[path for name, path in results["files"].items() if name != "plots"], *results["files"]["plots"]]
    assert len(files) >= 5
    for path in files:  # relative to the run folder, wherever the run was started from
        assert not Path(path).is_absolute() and (quick_run / path).is_file(), path
    header = (quick_run / "accuracy.md").read_text().splitlines()[0]
    assert header == ("Held-out exact-match accuracy of `aligngpt-hf demo --quick --seed 0`; Spearman(CLIP score, "
                      f"caption correctness) = {results['spearman']:.3f}.")


def test_quick_demo_beats_chance_on_every_kind(quick_run):
    """Chance and accuracy recomputed from the answers; every kind, the caption check included, beats chance."""
    results = json.loads((quick_run / "results.json").read_text())
    answers = json.loads((quick_run / "answers.json").read_text())["answers"]
    for kind in QUESTION_KINDS:
        rows = [row for row in answers if row["kind"] == kind]
        truths = Counter(row["answer"] for row in rows)
        chance = max(truths.values()) / len(rows)  # the best constant answer, counted independently here
        graded = [row["prediction"].strip().lower().rstrip(".") for row in rows]
        if kind == CHECK:  # "red blue no": the verdict is graded
            graded = [text.split(" ")[-1] for text in graded]
        correct = sum(text == row["answer"] for text, row in zip(graded, rows)) / len(rows)
        assert results["chance"][kind] == pytest.approx(chance)
        assert results["accuracy"][kind] == pytest.approx(correct)
        assert correct > chance, (kind, correct, chance)
    assert results["chance"][CHECK] == 0.5  # balanced: always "yes" (or "no") scores exactly one half


def test_rerun_into_the_same_folder_refuses_without_overwrite(quick_run):
    with pytest.raises(SystemExit, match="already exists and is not empty .*pass --overwrite"):
        main(["demo", "--quick", "--out", str(quick_run)])


def test_demo_refuses_an_existing_folder_before_importing_the_library(tmp_path):
    """The refusal is a usage error: it comes from the command line's front end, before torch is imported (~25 s)."""
    (tmp_path / "earlier.txt").write_text("an earlier run")
    code = ("import sys\nfrom aligngpt_hf_cli import main\ntry:\n    main(['demo', '--quick', '--out', sys.argv[1]])\n"
            "except SystemExit as error:\n    print(error)\nprint('torch imported:', 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    lines = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                           env=env).stdout.splitlines()
    assert lines == [f"aligngpt-hf demo: {tmp_path} already exists and is not empty (an earlier run?); pass "
                     "--overwrite to replace it, or choose another --out", "torch imported: False"]


def test_gate_plot_keeps_every_text_inside_the_figure():
    """The headline plot's title (and why the global level is not drawn) fits the saved image."""
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib draws the demo's plots (`.[plot]`/`.[test]`)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {kind: [0.3, 0.4, 0.3] for kind in QUESTION_KINDS}
    figure = gate_figure(plt, {"gate_weights": kinds, "gate_weights_std": kinds})
    figure.canvas.draw()
    renderer, box = figure.canvas.get_renderer(), figure.bbox
    texts = [text for text in figure.findobj(matplotlib.text.Text) if text.get_text() and text.get_visible()]
    assert any("Global level 3 is not drawn" in text.get_text() for text in texts)
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, \
            text.get_text()
    plt.close(figure)


def test_overwrite_refuses_a_folder_the_demo_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"was not made by the demo \(no .aligngpt-demo file\)"):
        main(["demo", "--quick", "--out", str(tmp_path), "--overwrite"])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_compare_quick_writes_all_three_arms(tmp_path):
    run_compare(tmp_path, quick=True, seeds=[0], threads=1, settings=DemoSettings(**TINY_COMPARE))
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["table"]) == {"aligngpt", "llava", "shuffled"}
    table = (tmp_path / "compare.md").read_text()
    for title in ("(a) AlignGPT |", "(b) plain LLaVA |", "(c) AlignGPT, shuffled levels |", "chance"):
        assert title in table, title
    assert (tmp_path / "compare.png").is_file()
    per_seed = results["per_seed"]["0"]["arms"]
    assert per_seed["llava"]["gate_weights"]["colour"] is None  # no gate in plain LLaVA
    assert len(per_seed["aligngpt"]["gate_weights"]["colour"]) == 3  # N - 1 local levels
    levels = json.loads((tmp_path / "seed-0/data/pretrain_levels.json").read_text())
    shuffled = json.loads((tmp_path / "seed-0/data/pretrain_levels.shuffled.json").read_text())
    assert sorted(r["similarity"] for r in levels) == sorted(r["similarity"] for r in shuffled)
    assert [r["similarity"] for r in levels] != [r["similarity"] for r in shuffled]
    for arm in ("aligngpt", "llava", "shuffled"):
        mean = sum(per_seed[arm]["accuracy"].values()) / len(QUESTION_KINDS)
        assert results["table"][arm]["mean"]["mean"] == pytest.approx(mean)


def test_heldout_is_balanced_and_caption_checks_do_not_leak():
    rows = heldout_rows(12, random.Random(3))
    for kind in QUESTION_KINDS:
        counts = Counter(row["answer"] for row in rows if row["kind"] == kind)
        assert set(counts) == set(ANSWERS[kind]) and len(set(counts.values())) == 1, (kind, counts)
    training = question_rows(4000, random.Random(4), {CHECK: 1.0})
    by_question = Counter((row["question"], row["answer"]) for row in training)
    for question in {row["question"] for row in training}:
        yes, no = by_question[(question, "yes")], by_question[(question, "no")]
        assert 0.3 < yes / (yes + no) < 0.7, (question, yes, no)  # the named value does not give the answer away


def test_caption_check_response_is_the_named_value_the_picture_value_then_the_verdict():
    """Adjacent words, the verdict right after the second: the named one is copied from the prompt, the picture's
    one read from the image."""
    for row in question_rows(200, random.Random(5), {CHECK: 1.0}):
        named = row["question"].removeprefix("Does the caption match the picture: ").removesuffix("?")
        attribute, value = ("colour", named.split()[0]) if named.endswith(" shapes") else ("shape", named[:-1])
        truth = getattr(row["scene"], attribute)
        assert row["response"] == f"{value} {truth} {'yes' if truth == value else 'no'}"
        assert row["answer"] == row["response"].split()[-1]
        assert verdict(row["response"].capitalize() + ".", CHECK) == row["answer"]


def test_comparison_chats_are_text_only_balanced_and_cover_every_pair():
    chats = comparison_chats()
    verdicts = Counter(answer.split()[-1] for _, answer in chats)
    assert verdicts["yes"] == verdicts["no"]
    pairs = {tuple(answer.split()[:2]) for _, answer in chats}
    expected = {(a, b) for name in ("colour", "shape") for a in ATTRIBUTES[name] for b in ATTRIBUTES[name]}
    assert pairs == expected
    for question, answer in chats:  # the prompt names the first word only, as a caption check does
        first, second, said = answer.split()
        assert question == f"Is it {first}?" and said == ("yes" if first == second else "no")
    assert all("picture" not in question and "<image>" not in question for question, _ in chats)
    assert set(text_only_chats()) >= set(chats)


def test_summary_counts_chance_as_the_best_constant_answer():
    answers = [{"kind": kind, "answer": answer, "prediction": prediction, "alignment_weights": None}
               for kind in QUESTION_KINDS for answer, prediction in (("yes", "Yes."), ("yes", "no"), ("no", "no"))]
    summary = summarise(answers)
    assert summary["chance"] == {kind: pytest.approx(2 / 3) for kind in QUESTION_KINDS}
    assert summary["accuracy"] == {kind: pytest.approx(2 / 3) for kind in QUESTION_KINDS}


@pytest.mark.parametrize(("env", "cpus", "load", "expected"), [
    ("", 2, 0.0, 1), ("", 2, 1.0, 1), ("", 16, 0.2, 4), ("", 8, 5.0, 2), ("", 4, 9.0, 1), ("3", 2, 5.0, 3)])
def test_threads_follow_free_cores(env, cpus, load, expected):
    assert choose_threads(cpus=cpus, load=load, env=env)[0] == expected
    assert choose_threads(2, cpus=cpus, load=load, env=env) == (2, "--threads")

"""lmms-eval plugin on a tiny local task: written to files by the test, loaded with `dataset_path: json`, no hub access.

Runs only where lmms-eval is installed (`pip install -e ".[eval]"`, or the light install in docs/evaluation.md, section "lmms-eval").
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval not installed: pip install -e '.[eval]' or the light set in docs/evaluation.md (section lmms-eval)",
)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from aligngpt_hf.tiny import build_model, build_processor, build_tokenizer  # noqa: E402

COLOURS = {"red": (200, 30, 30), "green": (30, 160, 40), "blue": (20, 40, 220), "yellow": (220, 210, 30)}
SUFFIX = "Answer the question using a single word or phrase."
TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return kwargs.get("pre_prompt", "") + doc["question"] + kwargs.get("post_prompt", "")


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""
GENERATE_YAML = """
task: aligngpt_tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  until: ["\\n\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\n{suffix}"
"""
CHOICE_YAML = """
task: aligngpt_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A saved tiny model and two local tasks (open answer, multiple choice) over four coloured images."""
    root = tmp_path_factory.mktemp("lmms")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(tokenizer).eval()
    model.save_pretrained(root / "tiny-aligngpt")
    build_processor(tokenizer).save_pretrained(root / "tiny-aligngpt")
    tasks = root / "tasks"
    tasks.mkdir()
    rows = []
    for index, (name, rgb) in enumerate(COLOURS.items()):
        path = root / f"{name}.png"
        Image.new("RGB", (24 + 6 * index, 40 - 4 * index), rgb).save(path)
        question = "What colour is the shape?" + " Look closely." * index
        rows.append({"question_id": index, "image": str(path), "question": question, "answer": name, "label": index})
    (tasks / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "utils.py").write_text(TASK_UTILS)
    data = tasks / "data.jsonl"
    (tasks / "aligngpt_tiny_vqa.yaml").write_text(GENERATE_YAML.format(data=data, suffix=SUFFIX))
    (tasks / "aligngpt_tiny_choice.yaml").write_text(CHOICE_YAML.format(data=data, choices=json.dumps(list(COLOURS))))
    return {"model": root / "tiny-aligngpt", "tasks": tasks, "root": root}


@pytest.fixture(autouse=True)
def _offline_datasets_cache(tiny_task, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tiny_task["root"] / "hf_datasets"))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tiny_task["root"] / "hf_datasets"))


def _evaluate(tiny_task, task: str, force_simple: bool = False, **model_args):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from aligngpt_hf.evaluation.lmms_eval_plugin import register

    register()
    args = ",".join(f"{key}={value}" for key, value in {"pretrained": tiny_task["model"], **model_args}.items())
    return simple_evaluate(
        model="aligngpt",
        model_args=args,
        tasks=[task],
        device="cpu",
        force_simple=force_simple,
        task_manager=TaskManager(
            "WARNING", include_path=str(tiny_task["tasks"]), include_defaults=False, model_name="aligngpt"
        ),
        log_samples=True,
        verbosity="WARNING",
    )


def _responses(results, task: str) -> list:
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_generate_until_local_task_scores_and_batches_like_batch_size_1(tiny_task):
    single = _evaluate(tiny_task, "aligngpt_tiny_vqa", batch_size=1)
    batched = _evaluate(tiny_task, "aligngpt_tiny_vqa", batch_size=3)
    score = single["results"]["aligngpt_tiny_vqa"]["exact_match,none"]
    assert 0.0 <= score <= 1.0
    assert _responses(single, "aligngpt_tiny_vqa") == _responses(batched, "aligngpt_tiny_vqa")
    sample = single["samples"]["aligngpt_tiny_vqa"][0]
    assert SUFFIX in json.dumps(sample["arguments"]) or SUFFIX in json.dumps(sample)


def test_simple_generation_matches_chat_generation_and_direct_generate(tiny_task):
    """`--force_simple` (doc_to_text) and chat (doc_to_messages) build the same vicuna_v1 prompt, hence answers."""
    chat = _evaluate(tiny_task, "aligngpt_tiny_vqa", batch_size=2)
    simple = _evaluate(tiny_task, "aligngpt_tiny_vqa", force_simple=True, batch_size=2)
    assert _responses(chat, "aligngpt_tiny_vqa") == _responses(simple, "aligngpt_tiny_vqa")

    from aligngpt_hf.evaluation.answer import build_prompt, generate_answers, load_for_answering

    model, processor = load_for_answering(str(tiny_task["model"]), dtype="float32", device="cpu")
    row = json.loads((tiny_task["tasks"] / "data.jsonl").read_text().splitlines()[2])
    with Image.open(row["image"]) as image:
        prompt = build_prompt(processor, row["question"] + "\n" + SUFFIX)
        direct = generate_answers(model, processor, [prompt], [image.convert("RGB")], max_new_tokens=5)[0]
    assert _responses(chat, "aligngpt_tiny_vqa")[2][0][0] == direct.split("\n\n")[0].strip()


def test_loglikelihood_multiple_choice_matches_manual_scoring_and_batching(tiny_task):
    single = _evaluate(tiny_task, "aligngpt_tiny_choice", force_simple=True, batch_size=1)
    batched = _evaluate(tiny_task, "aligngpt_tiny_choice", force_simple=True, batch_size=4)
    assert 0.0 <= single["results"]["aligngpt_tiny_choice"]["acc,none"] <= 1.0
    one, many = _responses(single, "aligngpt_tiny_choice"), _responses(batched, "aligngpt_tiny_choice")
    flat_one = [ll for doc in one for (ll, _greedy) in (r[0] for r in doc)]
    flat_many = [ll for doc in many for (ll, _greedy) in (r[0] for r in doc)]
    assert torch.allclose(torch.tensor(flat_one), torch.tensor(flat_many), atol=1e-4)

    # manual: log p(" red" | prompt) from the model's logits, gate on the prompt, image/ALIGN never scored
    from aligngpt_hf.evaluation.answer import build_prompt, load_for_answering

    model, processor = load_for_answering(str(tiny_task["model"]), dtype="float32", device="cpu")
    row = json.loads((tiny_task["tasks"] / "data.jsonl").read_text().splitlines()[0])
    prompt = build_prompt(processor, row["question"])
    with Image.open(row["image"]) as image:
        rgb = image.convert("RGB")
    full = processor(text=[prompt + " red"], images=[rgb], return_tensors="pt")
    n_prompt = processor(text=[prompt], images=[rgb], return_tensors="pt")["input_ids"].shape[1]
    gate = torch.ones_like(full["input_ids"])
    gate[:, n_prompt:] = 0
    with torch.no_grad():
        logits = model(**full, gate_text_mask=gate).logits[0].log_softmax(-1)
    targets = full["input_ids"][0, n_prompt:]
    expected = logits[n_prompt - 1 : -1].gather(-1, targets.unsqueeze(-1)).sum().item()
    assert one[0][0][0][0] == pytest.approx(expected, abs=1e-4)


def test_fixed_level_and_mode_model_args(tiny_task):
    adaptive = _evaluate(tiny_task, "aligngpt_tiny_choice", force_simple=True)
    fixed = _evaluate(tiny_task, "aligngpt_tiny_choice", force_simple=True, alignment_level=7)
    global_mode = _evaluate(tiny_task, "aligngpt_tiny_choice", force_simple=True, alignment_mode="global")
    lls = [
        [r[0][0] for doc in _responses(result, "aligngpt_tiny_choice") for r in doc]
        for result in (adaptive, fixed, global_mode)
    ]
    assert lls[0] != lls[1]
    # global mode = row N-1 alone = fixed level N-1
    assert torch.allclose(torch.tensor(lls[1]), torch.tensor(lls[2]), atol=1e-4)


# The real `lmms-eval` entry function. Only change: lmms-eval's ~3,000 built-in task YAMLs are not indexed (pure-Python
# YAML parsing costs ~20 s per process on a 2-core CI machine); `--include_path` tasks are found as usual.
CLI_MAIN = textwrap.dedent(
    """
    import functools, sys
    from lmms_eval import tasks
    tasks.TaskManager.__init__ = functools.partialmethod(tasks.TaskManager.__init__, include_defaults=False)
    from lmms_eval.__main__ import cli_evaluate
    sys.exit(cli_evaluate())
    """
)


def _run_cli(tiny_task, args: list[str], env_extra: dict | None = None, prelude: str = "") -> dict:
    """Run the real `lmms-eval` CLI in a fresh process and return the aggregated results JSON it wrote."""
    out = tiny_task["root"] / f"out-{len(list(tiny_task['root'].glob('out-*')))}"
    code = prelude + CLI_MAIN
    command = [sys.executable, "-c", code, *args, "--include_path", str(tiny_task["tasks"]), "--device", "cpu"]
    command += ["--output_path", str(out), "--verbosity", "WARNING"]
    env = dict(os.environ, **(env_extra or {}))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result_files = sorted(out.rglob("*results*.json"))
    assert result_files, f"no results written under {out}: {done.stdout[-2000:]}"
    return json.loads(result_files[-1].read_text())


def test_cli_finds_plugin_through_the_entry_point_group(tiny_task):
    """A dist-info that declares `lmms_eval.models: aligngpt` is all lmms-eval needs: no fork, no explicit call."""
    site = tiny_task["root"] / "entry_point_site"
    dist_info = site / "aligngpt_hf_entry_point_probe-0.0.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: aligngpt-hf-entry-point-probe\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[lmms_eval.models]\naligngpt = aligngpt_hf.evaluation.lmms_eval_plugin:model_manifests\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    model_args = f"pretrained={tiny_task['model']}"
    results = _run_cli(
        tiny_task,
        ["--model", "aligngpt", "--model_args", model_args, "--tasks", "aligngpt_tiny_vqa", "--batch_size", "2"],
        {"PYTHONPATH": pythonpath},
    )
    assert "exact_match,none" in results["results"]["aligngpt_tiny_vqa"]


def test_entry_point_declared_in_package_metadata():
    try:
        declared = importlib.metadata.entry_points(group="lmms_eval.models")
    except TypeError:  # pragma: no cover - Python < 3.10 API
        declared = importlib.metadata.entry_points().get("lmms_eval.models", [])
    ours = [ep for ep in declared if ep.value.startswith("aligngpt_hf.")]
    if not ours:
        pytest.skip("aligngpt-hf is installed without its `lmms_eval.models` entry point (pyproject not updated?)")
    assert {ep.name for ep in ours} == {"aligngpt"}
    assert ours[0].value == "aligngpt_hf.evaluation.lmms_eval_plugin:model_manifests"


def test_zero_code_huggingface_wrapper_loads_remote_code(tiny_task):
    """`--model huggingface --model_args pretrained=DIR,trust_remote_code=True` with nothing of ours imported.

    lmms-eval's generic wrapper loads unknown model types with `AutoModel`; every saved `auto_map` sends AutoModel to
    the generation class (docs/native.md, "Auto classes"), so a staged push folder works, as a bare save does.
    """
    hub = pytest.importorskip("aligngpt_hf.hub.push", reason="aligngpt_hf.hub.push (publishing) not in this build")
    staged = tiny_task["root"] / "tiny-aligngpt-hub"
    if not staged.exists():
        shutil.copytree(tiny_task["model"], staged)
        hub.complete_auto_maps(staged)
    prelude = textwrap.dedent(
        """
        import sys
        sys.modules["aligngpt_hf"] = None  # only the remote-code files next to the weights may be used
        """
    )
    model_args = f"pretrained={staged},trust_remote_code=True,device_map=cpu"
    results = _run_cli(
        tiny_task,
        ["--model", "huggingface", "--model_args", model_args, "--tasks", "aligngpt_tiny_vqa"],
        prelude=prelude,
    )
    assert "exact_match,none" in results["results"]["aligngpt_tiny_vqa"]

"""Bad input, evaluation layer, second pass: question ids equal as text, a pretty-printed JSON array, image URLs,
an answer budget larger than the model's positions, `--alignment-mode none` (no alignment token) and a mode whose
weights the checkpoint lacks, demo runs written into the installed package.

Each test names the case and asserts the exception (or the one-line CLI error) with the words that name the file,
record, option and fix.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from aligngpt_hf import cli
from aligngpt_hf.evaluation import answer as answer_module
from aligngpt_hf.evaluation.answer import answer_questions, read_questions


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tokenizer, processor):
    """A saved tiny model, one saved with alignment_mode='none', two images and a two-question file."""
    from aligngpt_hf.tiny import build_model, build_processor

    root = tmp_path_factory.mktemp("second")
    torch.manual_seed(0)
    model = build_model(tokenizer).eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    build_model(tokenizer, alignment_mode="none").save_pretrained(root / "plain")
    build_processor(tokenizer, add_alignment_token=False).save_pretrained(root / "plain")
    (root / "images").mkdir()
    for index in range(2):
        Image.new("RGB", (24, 32), (40 + 100 * index, 20, 20)).save(root / "images" / f"{index}.png")
    lines = [json.dumps({"question_id": i, "image": f"{i}.png", "text": f"Colour {i}?"}) for i in range(2)]
    (root / "q.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "model": model}


def answer_argv(bench, answers, *extra, model="model"):
    root = bench["root"]
    return [str(arg) for arg in ("answer", root / model, "--questions", root / "q.jsonl", "--image-folder",
                                 root / "images", "--answers", answers, "--no-progress", "--max-new-tokens", "2",
                                 *extra)]


def write(tmp_path, text: str, name: str = "q.jsonl"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_question_ids_equal_as_text_are_duplicates(tmp_path):
    path = write(tmp_path, '{"question_id": 1, "text": "a"}\n{"question_id": "1", "text": "b"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:2: question_id '1' is also on line 1 \(as 1\); ids must be "
                                         r"unique, also as text"):
        read_questions(path)


def test_question_file_that_is_a_pretty_printed_json_array(tmp_path):
    records = [{"question_id": i, "text": "a"} for i in range(2)]
    with pytest.raises(ValueError, match=r"q\.json:1: not valid JSON \(Expecting value\)\. The file looks like one "
                                         r"JSON array over several lines; --questions takes JSONL"):
        read_questions(write(tmp_path, json.dumps(records, indent=2), "q.json"))


def test_image_url_is_named_as_a_url_not_a_missing_file(bench, processor, tmp_path):
    questions = [{"question_id": 3, "image": "https://example.com/cat.png", "text": "C?"}]
    with pytest.raises(ValueError, match=r"^question_id 3: `image` 'https://example\.com/cat\.png' is a URL; answer "
                                         r"reads images from --image-folder only"):
        answer_questions(bench["model"], processor, questions, bench["root"] / "images", tmp_path / "a.jsonl",
                         progress=False)
    assert not (tmp_path / "a.jsonl").exists()


def test_answer_budget_beyond_the_models_positions_is_refused_before_the_model_loads(bench, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setattr(answer_module, "load_for_answering", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = answer_argv(bench, tmp_path / "a.jsonl")
    argv[argv.index("--max-new-tokens") + 1] = "100000000"  # generated until the positions ran out, for hours
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == (
        "aligngpt-hf answer: error: --max-new-tokens 100000000 does not fit in the model's 512 positions "
        "(text_config.max_position_embeddings), which the prompt and the answer share; give at most 511 (the original "
        "scripts use 128, or 1024 for long answers).\n")
    with pytest.raises(ValueError, match=r"^max_new_tokens 512 does not fit in the model's 512 positions"):
        answer_questions(bench["model"], None, [], bench["root"], tmp_path / "a.jsonl", max_new_tokens=512)


def test_alignment_mode_none_answers_without_an_alignment_token(bench, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    assert cli.main(answer_argv(bench, out, "--alignment-mode", "none")) == 0, capsys.readouterr().err
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [0, 1]


def test_alignment_mode_whose_weights_the_checkpoint_lacks_is_refused(bench, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    assert cli.main(answer_argv(bench, out, "--alignment-mode", "adaptive", model="plain")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert err.startswith(f"aligngpt-hf answer: error: {bench['root'] / 'plain'}: 5 weight(s) the model needs are not "
                          "in the checkpoint (model.alignment.fc1.bias, ")
    assert err.endswith("it was saved without what --alignment-mode adaptive uses (the level table or the "
                                 "gate); use the mode it was trained with.")
    assert not out.exists()


@pytest.mark.parametrize("out, message", [
    ("{package}/runs/demo", "--out {package}/runs/demo lies inside {code}, where the aligngpt_hf code is installed; a "
                            "run writes data, checkpoints and plots: choose a folder outside it (default: runs/demo)"),
    ("", "--out is empty; give the run folder, or leave --out out for the default"),
])
@pytest.mark.parametrize("entry", ["console script", "python -m aligngpt_hf.cli"])
def test_demo_out_inside_the_installed_code_or_empty_is_refused(tmp_path, monkeypatch, out, message, entry):
    import aligngpt_hf_cli
    from aligngpt_hf_cli.options import library_folder

    package = library_folder()
    monkeypatch.chdir(tmp_path)  # "" used to mean the default runs/demo here
    with pytest.raises(SystemExit) as exit_info:
        (aligngpt_hf_cli.main if entry == "console script" else cli.main)(["demo", "--quick", "--out",
                                                                            out.format(package=package)])
    assert str(exit_info.value) == "aligngpt-hf demo: error: " + message.format(package=package,
                                                                                 code=package.resolve().parent)
    assert not (package / "runs").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["answer", "inspect"])
@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "nope", "KeyError: unknown name 'nope'"),
    ("eos_token_id", "2", "StrictDataclassFieldValidationError: Validation error for field 'eos_token_id'"),
])
def test_config_value_the_model_cannot_be_built_from_is_one_line(bench, tmp_path, capsys, command, field, value,
                                                                 message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(bench["root"] / "model", model)
    config = json.loads((model / "config.json").read_text())
    config["text_config"][field] = value  # a KeyError or a validation traceback before
    (model / "config.json").write_text(json.dumps(config))
    root = bench["root"]
    argv = (answer_argv(bench, tmp_path / "a.jsonl") if command == "answer" else
            ["inspect", str(model), "--image", str(root / "images" / "0.png"), "--prompt", "Colour?", "--out",
             str(tmp_path / "plot.png")])
    argv[1] = str(model)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"aligngpt-hf {command}: error: {model / 'config.json'}: a value the model cannot be built "
                          f"from ({message}")


@pytest.mark.parametrize("command", ["answer", "inspect"])
@pytest.mark.parametrize("device, message", [
    ("meta", "--device 'meta' holds shapes only, no weights, so nothing can be computed there; use cpu or cuda."),
    ("xla", "--device 'xla': this torch build or machine has no xla backend; use cpu or cuda."),
])
def test_device_this_machine_cannot_compute_on_is_refused_before_the_model_loads(bench, tmp_path, capsys, monkeypatch,
                                                                              command, device, message):
    from aligngpt_hf.evaluation import inspect_alignment

    monkeypatch.setattr(answer_module, "load_for_answering", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(inspect_alignment, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    root = bench["root"]
    argv = (answer_argv(bench, tmp_path / "a.jsonl") if command == "answer" else
            ["inspect", str(root / "model"), "--image", str(root / "images" / "0.png"), "--prompt", "Colour?", "--out",
             str(tmp_path / "plot.png")])
    assert cli.main([*argv, "--device", device]) == 1  # a RuntimeError traceback after the model load before
    assert capsys.readouterr().err == f"aligngpt-hf {command}: error: {message}\n"


def test_inspect_prompt_holding_a_placeholder_is_refused_before_the_model_loads(bench, tmp_path, capsys, monkeypatch):
    from aligngpt_hf.evaluation import inspect_alignment

    monkeypatch.setattr(inspect_alignment, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    root = bench["root"]
    argv = ["inspect", str(root / "model"), "--image", str(root / "images" / "0.png"), "--prompt", "Colour?",
            "--prompt", "<align> and <image>?", "--out", str(tmp_path / "plot.png")]
    assert cli.main(argv) == 1  # refused only after the model had loaded before
    assert capsys.readouterr().err == (
        "aligngpt-hf inspect: error: --prompt number 2 ('<align> and <image>?'): the text contains <image> and "
        "<align>; the prompt gets one image placeholder and the alignment token from the processor. Remove them from "
        "the text.\n")


def test_empty_chunk_still_writes_its_answers_file(bench, tmp_path, capsys):
    out = tmp_path / "chunk4.jsonl"  # 2 questions in 5 chunks: chunk 4 holds none
    assert cli.main(answer_argv(bench, out, "--num-chunks", "5", "--chunk-idx", "4")) == 0
    assert out.is_file() and out.read_text() == ""  # `cat chunk*.jsonl` of a multi-GPU run found no file before


def test_overwrite_with_nothing_to_answer_empties_the_old_answers(bench, processor, tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": 7, "text": "stale", "model_id": "tiny"}\n')
    (tmp_path / "images").mkdir()
    report = answer_questions(bench["model"], processor, [{"question_id": 1, "image": "gone.png", "text": "C?"}],
                              tmp_path / "images", out, overwrite=True, skip_missing_images=True, progress=False)
    assert report.missing_images == [1] and report.answered == 0
    assert out.read_text() == ""  # the stale answer was kept before


PLUGIN = "aligngpt_hf.evaluation.lmms_eval_plugin"


@pytest.fixture
def plugin(monkeypatch):
    """The plugin imported against a minimal stand-in of the lmms-eval API it imports (its own checks only)."""
    import sys
    import types

    names = ("lmms_eval", "lmms_eval.api", "lmms_eval.api.instance", "lmms_eval.api.model")
    stubs = {name: types.ModuleType(name) for name in names}
    stubs["lmms_eval.api.instance"].GenerationResult = type("GenerationResult", (), {})
    stubs["lmms_eval.api.instance"].unwrap_generation_output = lambda output: output
    stubs["lmms_eval.api.model"].lmms = type("lmms", (), {})
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    yield __import__(PLUGIN, fromlist=["AlignGPT"])
    sys.modules.pop(PLUGIN, None)


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"until": 5}, r"aligngpt: the task's generation_kwargs `until` is 5; it must be a string or a list of strings"),
    ({"until": ["a", None]}, r"aligngpt: the task's generation_kwargs `until` is \['a', None\]; it must be a string"),
    ({"max_new_tokens": 1.5}, r"aligngpt: the task's generation_kwargs \{'max_new_tokens': 1\.5\} hold a value that "
                              r"is not a number \(1\.5 is not a whole number\)"),
])
def test_plugin_generation_kwargs_of_the_wrong_shape(plugin, gen_kwargs, message):
    with pytest.raises(ValueError, match="^" + message):  # a TypeError deep in the stop-string cut, or 1.5 -> 1
        plugin._decoding(gen_kwargs, 128)


def test_plugin_generation_kwargs_it_does_not_use_are_named_once(plugin, caplog):
    with caplog.at_level("WARNING", logger=PLUGIN):
        for _ in range(3):
            plugin._decoding({"repetition_penalty": 1.2, "do_sample": False, "max_new_tokens": 8}, 128)
    assert caplog.text.count("aligngpt: the task's generation_kwargs ['repetition_penalty'] are not used (AlignGPT "
                             "decodes with temperature, top_p, num_beams, max_new_tokens and until).") == 1


def test_plugin_alignment_mode_that_does_not_exist(plugin, bench):
    with pytest.raises(ValueError, match=r"^alignment_mode 'bogus' is not one of adaptive, global, local, mean, none"):
        plugin.AlignGPT(str(bench["root"] / "model"), device="cpu", alignment_mode="bogus")  # loaded before


def test_plugin_alignment_mode_none_builds_prompts_without_the_alignment_token(plugin, bench):
    model = plugin.AlignGPT(str(bench["root"] / "model"), device="cpu", alignment_mode="none")
    assert model.processor.add_alignment_token is False
    assert model._generate([model._prompt("Colour?", 1)], [[Image.new("RGB", (8, 8))]], {"max_new_tokens": 2})


def inspect_or_answer_argv(bench, command, model, tmp_path):
    root = bench["root"]
    if command == "answer":
        argv = answer_argv(bench, tmp_path / "a.jsonl")
        argv[1] = str(model)
        return argv
    return ["inspect", str(model), "--image", str(root / "images" / "0.png"), "--prompt", "Colour?", "--out",
            str(tmp_path / "plot.png")]


@pytest.mark.parametrize("command", ["answer", "inspect"])
@pytest.mark.parametrize("kind", ["llava", "original"])
def test_model_that_is_not_an_aligngpt_names_the_command_that_makes_one(bench, tmp_path, capsys, command, kind):
    from conftest import ORIGINAL_FIXTURES

    if kind == "llava":  # an AttributeError traceback (answer) or a message about a missing <align> before
        model = tmp_path / "llava"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
        expected = (f"MODEL {model} holds a 'llava' model, not AlignGPT (model_type 'aligngpt'); make an AlignGPT of "
                    "it first: `aligngpt-hf from-llava SOURCE OUTPUT`.")
    else:  # "Unrecognized processing class" before
        model = ORIGINAL_FIXTURES / "original_checkpoint"
        expected = (f"MODEL {model} is an original-layout checkpoint (config.json has `mm_vision_tower`); convert it "
                    "first: `aligngpt-hf convert SOURCE OUTPUT`, then use OUTPUT.")
    assert cli.main(inspect_or_answer_argv(bench, command, model, tmp_path)) == 1
    assert capsys.readouterr().err == f"aligngpt-hf {command}: error: {expected}\n"


@pytest.mark.parametrize("command", ["answer", "inspect"])
def test_broken_tokenizer_file_is_named_with_the_model_folder(bench, tmp_path, capsys, command):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(bench["root"] / "model", model)
    (model / "tokenizer.json").write_text("{x")  # a bare JSON error naming no file before
    assert cli.main(inspect_or_answer_argv(bench, command, model, tmp_path)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"aligngpt-hf {command}: error: {model}: a model or processor file (tokenizer.json, processor_config.json, "
        "...) is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
        "download it again or save the model and processor again.")


@pytest.mark.parametrize("command", ["answer", "inspect"])
def test_nan_weights_are_refused_not_answered(bench, tmp_path, capsys, command):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(bench["root"] / "model", model)
    state = load_file(model / "model.safetensors")
    state["lm_head.weight"][0, 0] = float("nan")  # answered silently (garbage) before
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(inspect_or_answer_argv(bench, command, model, tmp_path)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"aligngpt-hf {command}: error: {model}: 1 weight(s) hold NaN or infinite values (lm_head.weight); the run "
        "diverged or the file is damaged: use an earlier checkpoint.")
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "plot.png").exists()

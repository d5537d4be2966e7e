"""Bad input found by probing `aligngpt-hf answer`, `aligngpt-hf inspect`, the lmms-eval plugin and `aligngpt-hf demo`.

Each test names the case and asserts the exception (or the one-line CLI error) with the words that name the file,
record, option and fix. Where the point is "refused before the model loads", loading the model fails the test.
"""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
from PIL import Image

import aligngpt_hf_cli
from aligngpt_hf import cli
from aligngpt_hf.evaluation import answer as answer_module
from aligngpt_hf.evaluation import inspect_alignment
from aligngpt_hf.evaluation.answer import answer_questions, read_questions

PLUGIN = "aligngpt_hf.evaluation.lmms_eval_plugin"


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tokenizer, processor):
    """A saved tiny model, two images and a two-question file."""
    from aligngpt_hf.tiny import build_model

    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    model = build_model(tokenizer).eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "images").mkdir()
    for index in range(2):
        Image.new("RGB", (24, 32), (40 + 100 * index, 20, 20)).save(root / "images" / f"{index}.png")
    lines = [json.dumps({"question_id": i, "image": f"{i}.png", "text": f"Colour {i}?"}) for i in range(2)]
    (root / "q.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "model": model}


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the refusals below must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(answer_module, "load_for_answering", refuse)
    monkeypatch.setattr(inspect_alignment, "load_model_and_processor", refuse)


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err.strip()


def answer_argv(bench, answers, *extra):
    root = bench["root"]
    return ["answer", root / "model", "--questions", root / "q.jsonl", "--image-folder", root / "images",
            "--answers", answers, "--no-progress", "--max-new-tokens", "2", *extra]


def write(tmp_path, text: str | bytes, name: str = "q.jsonl"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ------------------------------------------------------------------------------------------------ question records


def test_question_file_with_a_byte_order_mark_is_read(tmp_path):
    path = write(tmp_path, b'\xef\xbb\xbf{"question_id": 1, "text": "Hi?"}\n')
    assert read_questions(path) == [{"question_id": 1, "text": "Hi?"}]


@pytest.mark.parametrize("qid, shown", [("NaN", "NaN"), ("1.5", "1.5"), ("null", "null"), ("[1]", r"\[1\]"),
                                        ('{"a": 1}', r'\{"a": 1\}'), ("true", "true"), ('""', '""')])
def test_question_id_that_cannot_key_the_answers(tmp_path, qid, shown):
    path = write(tmp_path, f'{{"question_id": 0, "text": "a"}}\n{{"question_id": {qid}, "text": "b"}}\n')
    with pytest.raises(ValueError, match=rf"q\.jsonl:2: `question_id` is {shown}; expected a non-empty string or an "
                                         r"integer \(answers and --resume are keyed by it\)\.$"):
        read_questions(path)


def test_question_file_that_is_one_json_array(tmp_path):
    path = write(tmp_path, '[{"question_id": 1, "text": "Hi?"}]\n', "questions.json")
    with pytest.raises(ValueError, match=r"questions\.json:1: expected a question object, got the list .* The file is "
                                         r"one JSON array; --questions takes JSONL, one question object per line"):
        read_questions(path)


@pytest.mark.parametrize("field, value, fix", [
    ("text", '"  "', "give the question"),
    ("image", '""', r"leave `image` out \(or null\) for a text-only question"),
])
def test_empty_text_or_image(tmp_path, field, value, fix):
    record = {"question_id": 3, "text": "Hi?", "image": "a.png"}
    line = json.dumps(record).replace(json.dumps(record[field]), value, 1)
    with pytest.raises(ValueError, match=rf"q\.jsonl:1: `{field}` is empty; {fix}\.$"):
        read_questions(write(tmp_path, line + "\n"))


def test_null_image_is_a_text_only_question_and_is_counted(bench, processor, tmp_path):
    questions = [{"question_id": "t", "image": None, "text": "Hi?"}, {"question_id": 0, "image": "0.png", "text": "C?"}]
    report = answer_questions(bench["model"], processor, questions, bench["root"] / "images", tmp_path / "a.jsonl",
                              progress=False, max_new_tokens=2)
    assert (report.answered, report.text_only) == (2, 1)
    assert report.notes() == ["1 question(s) without `image` answered text-only (no image, no alignment token)"]


@pytest.mark.parametrize("token", ["<image>", "<align>"])
def test_question_text_holding_a_placeholder_is_refused_before_any_answer(bench, processor, tmp_path, token):
    questions = [{"question_id": 0, "image": "0.png", "text": "C?"}, {"question_id": "q9", "text": f"{token} hi"}]
    out = tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match=rf"^question_id 'q9': the text contains {token}; the prompt gets one image "
                                         r"placeholder and the alignment token from the processor\. Remove them"):
        answer_questions(bench["model"], processor, questions, bench["root"] / "images", out, progress=False)
    assert not out.exists()


def test_question_text_holding_a_placeholder_is_refused_before_the_model_loads(bench, tmp_path, capsys,
                                                                             no_model_load):
    questions = write(tmp_path, '{"question_id": 0, "image": "0.png", "text": "<image>\\nWhat colour?"}\n')
    argv = answer_argv(bench, tmp_path / "a.jsonl")
    argv[argv.index("--questions") + 1] = questions
    code, err = run_cli(argv, capsys)
    assert code == 1 and err == ("aligngpt-hf answer: error: question_id 0: the text contains <image>; the prompt gets "
                                 "one image placeholder and the alignment token from the processor. Remove them from "
                                 "the text.")


def test_image_that_is_a_folder_is_named_as_a_folder(bench, processor, tmp_path):
    (bench["root"] / "images" / "sub").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match=r"^question_id 5: image '.*sub' is a folder, not an image file "):
        answer_questions(bench["model"], processor, [{"question_id": 5, "image": "sub", "text": "C?"}],
                         bench["root"] / "images", tmp_path / "a.jsonl", progress=False)


def test_unreadable_first_image_leaves_no_empty_answers_file(bench, processor, tmp_path):
    (tmp_path / "bad.png").write_text("not a png")
    out = tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match=r"^question_id 1: .*bad\.png is not a readable image"):
        answer_questions(bench["model"], processor, [{"question_id": 1, "image": "bad.png", "text": "C?"}], tmp_path,
                         out, progress=False)
    assert not out.exists()


def test_overwrite_run_failing_before_its_first_answer_keeps_the_old_answers(bench, processor, tmp_path):
    (tmp_path / "bad.png").write_text("not a png")
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": 7, "text": "old", "model_id": "tiny"}\n')
    with pytest.raises(ValueError, match=r"^question_id 1: .*bad\.png is not a readable image"):
        answer_questions(bench["model"], processor, [{"question_id": 1, "image": "bad.png", "text": "C?"}], tmp_path,
                         out, overwrite=True, progress=False)
    assert out.read_text() == '{"question_id": 7, "text": "old", "model_id": "tiny"}\n'


def test_alignment_level_outside_the_table_is_refused_before_the_answers_file(bench, processor, tmp_path):
    out = tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match=r"^--alignment-level must be an integer in 0\.\.7 \(this model has 8 levels, "
                                         r"7 = strongest\), got 8\.$"):
        answer_questions(bench["model"], processor, [{"question_id": 1, "text": "C?"}], tmp_path, out,
                         alignment_level=8, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ answer CLI


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], r"temperature must be a finite number >= 0 \(0 = greedy\), got -1\.0\."),
    (["--temperature", "nan"], r"temperature must be a finite number >= 0 \(0 = greedy\), got nan\."),
    (["--temperature", "inf"], r"temperature must be a finite number >= 0 \(0 = greedy\), got inf\."),
    (["--temperature", "0.5", "--top-p", "2"], r"top_p must be in \(0, 1\], got 2\.0\."),
    (["--top-p", "0.5"], r"top_p=0\.5 applies to sampling only, but temperature is 0 \(greedy decoding\); set "
                         r"temperature > 0 to sample, or drop top_p\."),
    (["--num-beams", "0"], r"--num-beams must be a positive integer, got 0\."),
    (["--max-new-tokens", "-3"], r"--max-new-tokens must be a positive integer, got -3\."),
    (["--num-chunks", "0"], r"--num-chunks must be a positive integer, got 0\."),
    (["--alignment-level", "-1"], r"--alignment-level must be >= 0 \(a row of the level table\), got -1\."),
    (["--alignment-level", "3", "--alignment-mode", "global"],
     r"--alignment-level 3 puts table row 3 into every image's alignment token, which replaces what --alignment-mode "
     r"global would compute; pass one of them\."),
    (["--model-id", " "], r"--model-id is empty; give the name to write as each answer.s model_id, or leave it out "
                          r"\(default: the model folder.s name\)\."),
    (["--device", "tpu9"], r"--device 'tpu9' is not a torch device; use cpu, cuda, cuda:1, mps, \.\.\."),
])
def test_answer_options_refused_before_the_model_loads(bench, tmp_path, capsys, no_model_load, extra, message):
    code, err = run_cli(answer_argv(bench, tmp_path / "a.jsonl", *extra), capsys)
    assert code == 1 and re.fullmatch(r"aligngpt-hf answer: error: " + message, err), err
    assert not (tmp_path / "a.jsonl").exists()


def test_pad_aspect_ratio_on_an_image_processor_that_cannot_pad(bench, tokenizer, tmp_path, capsys, no_model_load):
    """`pad` would be silently ignored by an image processor without LLaVA's pad-to-square (here: CLIP's)."""
    import shutil

    from transformers import CLIPImageProcessorPil

    from aligngpt_hf import AlignGPTProcessor

    folder = tmp_path / "clip-preprocessing"
    shutil.copytree(bench["root"] / "model", folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    AlignGPTProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16).save_pretrained(folder)
    argv = answer_argv(bench, tmp_path / "a.jsonl", "--image-aspect-ratio", "pad")
    argv[1] = folder
    code, err = run_cli(argv, capsys)
    assert code == 1 and err == ("aligngpt-hf answer: error: --image-aspect-ratio pad needs an image processor that pads "
                                 "to a square (LlavaImageProcessor), but this model's is a CLIPImageProcessorPil, which "
                                 "would ignore it; use --image-aspect-ratio square or leave the option out.")


def test_answer_dtype_outside_the_choices_is_a_usage_error(bench, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in answer_argv(bench, tmp_path / "a.jsonl", "--dtype", "bogus")])
    assert exit_info.value.code == 2
    assert "argument --dtype: invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_answers_file_that_is_the_questions_file(bench, tmp_path, capsys, no_model_load, resume):
    questions = tmp_path / "q.jsonl"
    questions.write_text((bench["root"] / "q.jsonl").read_text())
    argv = answer_argv(bench, questions, *resume)
    argv[argv.index("--questions") + 1] = questions
    code, err = run_cli(argv, capsys)
    assert code == 1 and err == (f"aligngpt-hf answer: error: --answers {questions} is the same file as --questions; "
                                 "writing it would overwrite that input. Choose another file.")
    assert questions.read_text() == (bench["root"] / "q.jsonl").read_text()


def test_existing_answers_file_needs_resume_or_overwrite(bench, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": 7, "text": "earlier"}\n')
    code, err = run_cli(answer_argv(bench, out), capsys)
    assert code == 1 and err == (f"aligngpt-hf answer: error: the answers file {out} already exists; pass --resume "
                                 "to keep its answers and answer only the rest, or --overwrite to replace it "
                                 "(library: resume=True / overwrite=True).")
    assert out.read_text() == '{"question_id": 7, "text": "earlier"}\n'
    assert run_cli(answer_argv(bench, out, "--overwrite"), capsys)[0] == 0
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [0, 1]


def test_resume_refuses_answers_of_another_model_id(bench, tmp_path, capsys, no_model_load):
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": 0, "text": "x", "model_id": "llava-v1.5-7b"}\n')
    code, err = run_cli(answer_argv(bench, out, "--resume"), capsys)
    assert code == 1 and err == (f"aligngpt-hf answer: error: {out}:1: holds answers of model_id 'llava-v1.5-7b', but "
                                 "this run writes model_id 'model'; --resume would mix two models in one file. Use "
                                 "another --answers file, or the same --model-id as the earlier run.")


def test_resume_counts_answers_to_other_questions(bench, processor, tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": 99, "text": "x", "model_id": "m"}\n')
    report = answer_questions(bench["model"], processor, [{"question_id": 1, "text": "C?"}], tmp_path, out,
                              model_id="m", resume=True, progress=False, max_new_tokens=2)
    assert (report.answered, report.other_answers) == (1, 1)
    assert "also holds 1 answer(s) to question_ids not among these questions" in report.notes()[-1]


@pytest.mark.parametrize("option, value, expected", [
    ("--answers", "{tmp}", "--answers {tmp} is a folder; give a file name inside it."),
    ("--image-folder", "{tmp}/nope", "--image-folder {tmp}/nope does not exist; give the folder the questions' `image` "
                                     "paths are relative to."),
    ("--image-folder", "{root}/q.jsonl", "--image-folder {root}/q.jsonl is a file; give the folder the questions' "
                                         "`image` paths are relative to."),
    ("--questions", "{tmp}", "--questions {tmp} is a folder; give the file."),
    ("MODEL", "{root}/q.jsonl", "MODEL {root}/q.jsonl is a file; give the model folder (the one holding config.json) "
                                "or a Hub repo id."),
    ("MODEL", "{tmp}/empty", "MODEL folder {tmp}/empty has no config.json; give a saved or converted AlignGPT folder"),
])
def test_answer_paths_refused_before_the_model_loads(bench, tmp_path, capsys, no_model_load, option, value, expected):
    (tmp_path / "empty").mkdir()
    argv = answer_argv(bench, tmp_path / "a.jsonl")
    fill = {"tmp": tmp_path, "root": bench["root"]}
    argv[1 if option == "MODEL" else argv.index(option) + 1] = value.format(**fill)
    code, err = run_cli(argv, capsys)
    assert code == 1 and err.startswith(f"aligngpt-hf answer: error: {expected.format(**fill)}"), err


# ------------------------------------------------------------------------------------------------ inspect


def inspect_argv(bench, tmp_path, *extra, out=None, image=None):
    root = bench["root"]
    return ["inspect", root / "model", "--image", image or root / "images" / "0.png", "--prompt", "What colour?",
            "--out", out or tmp_path / "plot.png", *extra]


@pytest.mark.parametrize("case, expected", [
    ("out not png", "--out {tmp}/plot.jpg must end in .png: the plot is written as a PNG."),
    ("out is the image", "--out {tmp}/in.png is the same file as --image; writing it would overwrite that input. "
                         "Choose another file."),
    ("json is out", "--json and --out are both {tmp}/plot.png; give them different files."),
    ("json folder", "--json {tmp} is a folder; give a file name inside it."),
    ("out folder", "--out {tmp} is a folder; give a file name inside it."),
    ("empty prompt", "--prompt number 2 is empty; give the instruction text."),
    ("revision of a folder", "--revision main selects a Hub revision, but MODEL {root}/model is a local folder; drop "
                             "--revision or give the Hub repo id."),
    ("image folder", "--image {tmp} is a folder; give the file."),
    ("image missing", "--image {tmp}/nope.png does not exist; check the path."),
    ("device", "--device 'tpu' is not a torch device; use cpu, cuda, cuda:1, mps, ..."),
])
def test_inspect_options_refused_before_the_model_loads(bench, tmp_path, capsys, no_model_load, case, expected):
    pytest.importorskip("matplotlib")
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    argv = {
        "out not png": inspect_argv(bench, tmp_path, out=tmp_path / "plot.jpg"),
        "out is the image": inspect_argv(bench, tmp_path, out=tmp_path / "in.png", image=tmp_path / "in.png"),
        "json is out": inspect_argv(bench, tmp_path, "--json", tmp_path / "plot.png"),
        "json folder": inspect_argv(bench, tmp_path, "--json", tmp_path),
        "out folder": inspect_argv(bench, tmp_path, out=tmp_path),
        "empty prompt": inspect_argv(bench, tmp_path, "--prompt", " "),
        "revision of a folder": inspect_argv(bench, tmp_path, "--revision", "main"),
        "image folder": inspect_argv(bench, tmp_path, image=tmp_path),
        "image missing": inspect_argv(bench, tmp_path, image=tmp_path / "nope.png"),
        "device": inspect_argv(bench, tmp_path, "--device", "tpu"),
    }[case]
    code, err = run_cli(argv, capsys)
    assert code == 1 and err == "aligngpt-hf inspect: error: " + expected.format(tmp=tmp_path, root=bench["root"])
    assert [path.name for path in tmp_path.iterdir()] == ["in.png"]  # nothing written, the image untouched


def test_inspect_model_without_a_gate_is_refused_before_it_loads(bench, tmp_path, capsys, no_model_load):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "plain-llava"
    folder.mkdir()
    config = json.loads((bench["root"] / "model" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "alignment_mode": "none"}))
    argv = inspect_argv(bench, tmp_path)
    argv[1] = folder
    code, err = run_cli(argv, capsys)
    assert code == 1 and err == (f"aligngpt-hf inspect: error: MODEL {folder} has alignment_mode='none', which has no "
                                 "gate, so there are no alignment weights to show; inspect a model trained with "
                                 "alignment_mode 'adaptive' (or 'local').")


def test_inspect_image_url_is_left_to_the_loader(bench, tmp_path, capsys, no_model_load):
    """A URL is not a missing file: the loader fetches it, and names it when it cannot (here: nothing listens)."""
    pytest.importorskip("matplotlib")
    code, err = run_cli(inspect_argv(bench, tmp_path, image="http://127.0.0.1:9/photo.png"), capsys)
    assert code == 1 and err.startswith("aligngpt-hf inspect: error: image: could not load the image URL "
                                        "http://127.0.0.1:9/photo.png ("), err


@pytest.mark.parametrize("prompt, message", [
    ("<align> what colour?", r"prompt 1 \('<align> what colour\?'\): the text contains <align>; the prompt gets one "
                             r"image placeholder"),
    ("", r"prompt 1 \(''\) is empty or not a string; give the instruction text\."),
])
def test_inspect_library_prompt_that_is_empty_or_holds_a_placeholder(bench, processor, images, prompt, message):
    with pytest.raises(ValueError, match="^" + message):
        inspect_alignment.alignment_weights_for_prompts(bench["model"], processor, images[0], ["ok", prompt])


@pytest.mark.parametrize("function", ["format_weights_table", "plot_alignment_weights"])
def test_inspect_weights_and_prompts_of_different_counts(tmp_path, function):
    """Three prompts and two rows of weights: zip would drop a prompt and pair the rest silently."""
    args = (torch.full((2, 7), 1 / 7), ["a", "b", "c"]) + ((tmp_path / "p.png",) if function.startswith("plot") else ())
    with pytest.raises(ValueError, match=r"^weights of shape \(2, 7\) for 3 prompt\(s\); expected one row per prompt"):
        getattr(inspect_alignment, function)(*args)
    assert not (tmp_path / "p.png").exists()


def test_inspect_batch_size_zero(bench, processor, images):
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer, got 0\.$"):
        inspect_alignment.alignment_weights_for_prompts(bench["model"], processor, images[0], ["Hi?"], batch_size=0)


# ------------------------------------------------------------------------------------------------ lmms-eval plugin


def test_plugin_without_lmms_eval_names_the_extra(monkeypatch):
    for name in ["lmms_eval", *[name for name in sys.modules if name.startswith("lmms_eval.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed, also where it is
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    with pytest.raises(ImportError, match=r"^The lmms-eval plugin needs lmms-eval: .*pip install -e '\.\[eval\]'"):
        __import__(PLUGIN)
    sys.modules.pop(PLUGIN, None)


@pytest.fixture
def plugin(monkeypatch):
    """The plugin imported against a minimal stand-in of the lmms-eval API it imports (its own checks only)."""
    names = ("lmms_eval", "lmms_eval.api", "lmms_eval.api.instance", "lmms_eval.api.model")
    stubs = {name: types.ModuleType(name) for name in names}

    class GenerationResult:
        def __init__(self, text=None):
            self.text = text

    stubs["lmms_eval.api.instance"].GenerationResult = GenerationResult
    stubs["lmms_eval.api.instance"].unwrap_generation_output = lambda output: output
    stubs["lmms_eval.api.model"].lmms = type("lmms", (), {})
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    yield __import__(PLUGIN, fromlist=["AlignGPT"])
    sys.modules.pop(PLUGIN, None)


@pytest.mark.parametrize("model_args, message", [
    ({"batch_size": "0"}, r"aligngpt model_args: batch_size must be a positive integer, got '0'\."),
    ({"batch_size": "auto"}, r"aligngpt model_args: batch_size must be a positive integer, got 'auto'\."),
    ({"max_new_tokens": "abc"}, r"aligngpt model_args: max_new_tokens must be a positive integer, got 'abc'\."),
    ({"alignment_level": "high"}, r"aligngpt model_args: alignment_level='high' must be an integer >= 0"),
    ({"alignment_level": "3", "alignment_mode": "mean"},
     r"aligngpt model_args: alignment_level=3 replaces what alignment_mode=mean computes for every image; pass one"),
    ({"alignment_level": "8"}, r"alignment_level must be an integer in 0\.\.7 \(this model has 8 levels"),
    ({"image_aspect_ratio": "stretch"}, r"aligngpt model_args: image_aspect_ratio='stretch'; use pad or square\."),
    ({"trust_remote_code": "ture"}, r"aligngpt model_args: trust_remote_code='ture' is not a switch; use true or"),
    ({"device": "tpu"}, r"aligngpt model_args: device 'tpu' is not a torch device"),
    ({"dtype": "bogus"}, r"dtype must be one of auto, float32, bfloat16, float16, got 'bogus'\."),
])
def test_plugin_model_args_refused(plugin, bench, model_args, message):
    with pytest.raises(ValueError, match="^" + message):
        plugin.AlignGPT(str(bench["root"] / "model"), **{"device": "cpu", **model_args})


def test_plugin_batch_size_left_unset_is_one(plugin, bench):
    """lmms-eval may hand over `batch_size=None` when none was asked for: that is the paper's batch size 1."""
    assert plugin.AlignGPT(str(bench["root"] / "model"), device="cpu", batch_size=None).batch_size == 1


def test_plugin_cuda_asked_without_cuda_says_it_runs_on_the_cpu(plugin, bench, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger=PLUGIN):
        model = plugin.AlignGPT(str(bench["root"] / "model"), device="cuda")
    assert model.model.device.type == "cpu"
    assert "aligngpt model_args: device=cuda, but CUDA is not available here; running on the CPU" in caplog.text


def test_plugin_pretrained_folder_that_does_not_exist(plugin, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^the model folder {re.escape(str(tmp_path))}/nope does not exist"):
        plugin.AlignGPT(str(tmp_path / "nope"), device="cpu")


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"temperature": "hot"}, r"aligngpt: the task's generation_kwargs \{'temperature': 'hot'\} hold a value that is "
                             r"not a number"),
    ({"temperature": -0.5}, r"temperature must be a finite number >= 0 \(0 = greedy\), got -0\.5\."),
    ({"num_beams": 0}, r"num_beams must be a positive integer, got 0\."),
    ({"temperature": 0.7, "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5\."),
])
def test_plugin_generation_kwargs_refused(plugin, gen_kwargs, message):
    with pytest.raises(ValueError, match="^" + message):
        plugin._decoding(gen_kwargs, 128)


def test_plugin_visual_that_is_none(plugin):
    with pytest.raises(ValueError, match=r"^visual 1 is None; a task's doc_to_visual should return \[\] for a document "
                                         r"without an image, not \[None\]\.$"):
        plugin._as_images([Image.new("RGB", (4, 4)), None])


def test_plugin_greedy_task_may_carry_top_p(plugin):
    """lmms-eval tasks write `top_p` beside `temperature: 0`; greedy decoding ignores it, as documented."""
    assert plugin._decoding({"temperature": 0, "top_p": 1.0, "max_new_tokens": None, "until": "\n"}, 16) == (
        {"max_new_tokens": 16, "num_beams": 1, "do_sample": False}, ["\n"])


# ------------------------------------------------------------------------------------------------ demo options


@pytest.mark.parametrize("extra, message", [
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--stage1-steps", "0"], "--stage1-steps must be >= 1, got 0"),
    (["--stage2-steps", "-1"], "--stage2-steps must be >= 1, got -1"),
    (["--compare", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--seeds", "2"], "--seeds applies to --compare only; add --compare or drop --seeds"),
    (["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    (["--wrong-share", "1.5"], "--wrong-share must be between 0 and 1 (exclusive: the levels rank right against "
                               "wrong captions), got 1.5"),
    (["--wrong-share", "nan"], "--wrong-share must be between 0 and 1 (exclusive: the levels rank right against "
                               "wrong captions), got nan"),
    (["--out", "{file}"], "--out {file} is a file; give a folder for the run (it is created if missing)"),
    (["--out", "{file}/run"], "--out {file}/run is inside {file}, which is a file; give a folder for the run (it is "
                              "created if missing)"),
])
@pytest.mark.parametrize("entry", ["console script", "python -m aligngpt_hf.cli"])
def test_demo_options_refused_before_any_work(tmp_path, monkeypatch, extra, message, entry):
    (tmp_path / "a-file").write_text("x")
    extra = [arg.format(file=tmp_path / "a-file") for arg in extra]
    argv = ["demo", "--quick", "--out", str(tmp_path / "run"), *extra]

    def started(*args, **kwargs):
        raise AssertionError("the demo started")

    if "--out" not in extra:  # an --out that is a file is refused by the run's first step, before any work
        monkeypatch.setattr("aligngpt_hf.demo.pipeline.run_demo", started)
        monkeypatch.setattr("aligngpt_hf.demo.compare.run_compare", started)
    with pytest.raises(SystemExit) as exit_info:
        (aligngpt_hf_cli.main if entry == "console script" else cli.main)(argv)
    assert str(exit_info.value) == "aligngpt-hf demo: error: " + message.format(file=tmp_path / "a-file")
    assert not (tmp_path / "run").exists()


def test_demo_settings_and_compare_refuse_impossible_budgets(tmp_path):
    from aligngpt_hf.demo.compare import run_compare
    from aligngpt_hf.demo.runs import settings_for

    with pytest.raises(ValueError, match=r"^DemoSettings\.wrong_share must be between 0 and 1 \(exclusive\), got 1\.0"):
        settings_for(True, 1.0)
    with pytest.raises(ValueError, match=r"^DemoSettings\.stage1_steps must be a positive integer, got 0\.$"):
        settings_for(True, stage1_steps=0)
    with pytest.raises(ValueError, match=r"^run_compare needs at least one seed"):
        run_compare(tmp_path / "run", quick=True, seeds=[])
    assert not (tmp_path / "run").exists()

"""Publishing: the staged repository content, a mocked HfApi push, a stand-in Hub round trip with the lmms-eval call
sequence in a fresh interpreter without aligngpt_hf, and the model card's usage snippets run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file

from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.hub.push import push_to_hub
from conftest import package_free_env, user_message

REPO_ID = "user/tiny-aligngpt"
HERE = Path(__file__).resolve().parent
GENERATION_CLASS = "modeling_aligngpt.AlignGPTForConditionalGeneration"
# The same images and questions are rebuilt in the subprocesses below.
IMAGE_SPECS = [((40, 24), (200, 30, 30)), ((20, 36), (30, 160, 40))]
QUESTIONS = ["What colour is the shape?", "How many?"]


def _images():
    return [Image.new("RGB", size, colour) for size, colour in IMAGE_SPECS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, processor):
    """A 'trained' folder as a trainer leaves it: model, processor and a trainer file that must not be published."""
    from aligngpt_hf.tiny import build_model

    torch.manual_seed(11)
    model = build_model(processor.tokenizer).eval()
    folder = tmp_path_factory.mktemp("runs") / "stage2"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "trainer_state.json").write_text("{}")
    return model, folder


@pytest.fixture(scope="module")
def expected_files(trained):
    """What a plain save wrote (remote-code helpers included), re-sharded at 100KB, plus the card and the shim."""
    _, folder = trained
    saved = {path.name for path in folder.iterdir()} - {"model.safetensors", "trainer_state.json"}
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    return sorted([*saved, *shards, "model.safetensors.index.json", "README.md", "tokenization_aligngpt.py"])


@pytest.fixture(scope="module")
def published(trained, tmp_path_factory):
    _, folder = trained
    out = tmp_path_factory.mktemp("publish") / "tiny-aligngpt"
    return push_to_hub(folder, REPO_ID, dry_run=True, output_dir=out, max_shard_size="100KB")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_dry_run_folder_has_the_full_loading_contract(published, trained, expected_files):
    model, _ = trained
    folder = published.folder
    assert published.dry_run and published.files == expected_files == sorted(os.listdir(folder))
    auto_map = _read_json(folder / "config.json")["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_aligngpt.AlignGPTConfig",
        "AutoModel": GENERATION_CLASS,  # lmms-eval's generic wrapper always loads AutoModel for custom types
        "AutoModelForImageTextToText": GENERATION_CLASS,
        "AutoModelForCausalLM": GENERATION_CLASS,
        "AutoProcessor": "processing_aligngpt.AlignGPTProcessor",
    }
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    assert tokenizer_config["auto_map"] == {
        "AutoProcessor": "processing_aligngpt.AlignGPTProcessor",
        "AutoTokenizer": [None, "tokenization_aligngpt.AlignGPTTokenizerFast"],
    }
    assert "is_local" not in tokenizer_config and tokenizer_config["tokenizer_class"] == "TokenizersBackend"
    assert _read_json(folder / "processor_config.json")["auto_map"]["AutoProcessor"].endswith("AlignGPTProcessor")
    assert "ASSISTANT:" in (folder / "chat_template.jinja").read_text()
    generation = _read_json(folder / "generation_config.json")
    config = model.config
    assert generation["eos_token_id"] == config.text_config.eos_token_id
    assert generation["pad_token_id"] == config.text_config.pad_token_id
    assert generation["suppress_tokens"] == sorted([config.image_token_id, config.alignment_token_id])
    index = _read_json(folder / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == {name for name in expected_files if name.startswith("model-")}


def test_model_card_metadata_and_sections(published):
    card = ModelCard((published.folder / "README.md").read_text())
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == ["lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336"]
    assert data["datasets"] == ["liuhaotian/LLaVA-Pretrain", "liuhaotian/LLaVA-Instruct-150K"]
    assert data["license"] == "llama2" and "arxiv:2405.14129" in data["tags"]
    text = card.text
    for heading in ("## Usage", "## How the alignment levels and the gate work", "### Modes", "## Licence notes",
                    "## Known limitations", "## Results reported in the paper"):
        assert heading in text, heading
    assert "CC BY-NC 4.0" in text and "Llama 2" in text and "Vicuna" in text
    assert "| Alignment levels N | 8 (row 7 = global) |" in text
    assert text.count(f'"{REPO_ID}"') == 2  # both python snippets load by repo id


def test_card_options_override_defaults(trained, tmp_path):
    _, folder = trained
    result = push_to_hub(
        folder, "org/other", dry_run=True, output_dir=tmp_path / "o", base_models=["me/base-llm"],
        datasets=["me/data"], license="apache-2.0", auto_model="base",
    )
    data = ModelCard((result.folder / "README.md").read_text()).data.to_dict()
    assert (data["base_model"], data["datasets"], data["license"]) == (["me/base-llm"], ["me/data"], "apache-2.0")
    assert _read_json(result.folder / "config.json")["auto_map"]["AutoModel"] == "modeling_aligngpt.AlignGPTModel"
    assert "model.safetensors" in result.files  # default shard size: one file


def _refuse_network(*args, **kwargs):
    raise AssertionError("a dry run must not call the Hub")


def test_cli_dry_run_default_location_rerun_and_foreign_folder(trained, expected_files, capsys):
    _, folder = trained
    with mock.patch.object(HfApi, "create_repo", _refuse_network), \
            mock.patch.object(HfApi, "create_commit", _refuse_network):
        assert cli_main(["push", str(folder), "someone/my-model", "--dry-run"]) == 0
        assert cli_main(["push", str(folder), "someone/my-model", "--dry-run"]) == 0  # re-run replaces its own files
    target = folder.parent / "my-model-publish"
    output = capsys.readouterr().out
    assert f"Dry run: publish-ready folder written to {target}" in output
    unsharded = [name for name in expected_files if not name.startswith(("model-", "model.safetensors"))]
    assert sorted(os.listdir(target)) == sorted([*unsharded, "model.safetensors"])
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        push_to_hub(folder, "someone/my-model", dry_run=True)


def test_folder_without_processor_is_refused(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"no processor \(processor_config.json\)"):
        push_to_hub(tmp_path / "bare", REPO_ID, dry_run=True)


def test_push_with_mocked_hfapi_records_files_and_commit(trained, expected_files):
    _, folder = trained
    calls = {}
    stale = ["model-00001-of-00009.safetensors", "model-00003-of-00003.safetensors", "README.md", "notes.md"]

    def record(name, result=None):
        def method(self, *args, **kwargs):
            calls[name] = (args, kwargs)
            return result
        return method

    commit = mock.Mock(commit_url="https://hub.test/user/tiny-aligngpt/commit/abc")
    with mock.patch.object(HfApi, "repo_info", record("repo_info", mock.Mock(private=True))), \
            mock.patch.object(HfApi, "create_repo", record("create_repo")), \
            mock.patch.object(HfApi, "create_branch", record("create_branch")), \
            mock.patch.object(HfApi, "list_repo_files", record("list_repo_files", stale)), \
            mock.patch.object(HfApi, "create_commit", record("create_commit", commit)):
        result = push_to_hub(folder, REPO_ID, private=True, revision="dev", max_shard_size="100KB",
                             commit_message="hub: tiny")
    assert result.commit_url == commit.commit_url and result.files == expected_files
    assert calls["repo_info"] == ((REPO_ID,), {"repo_type": "model"})  # --private: an existing repo must be private
    assert calls["create_repo"] == ((REPO_ID,), {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["create_branch"] == ((REPO_ID,), {"branch": "dev", "exist_ok": True, "repo_type": "model"})
    args, kwargs = calls["create_commit"]
    assert args == (REPO_ID,) and kwargs["revision"] == "dev" and kwargs["commit_message"] == "hub: tiny"
    operations = kwargs["operations"]
    added = [op.path_in_repo for op in operations if type(op).__name__ == "CommitOperationAdd"]
    deleted = [op.path_in_repo for op in operations if type(op).__name__ == "CommitOperationDelete"]
    assert added == expected_files and deleted == ["model-00001-of-00009.safetensors"]
    assert not result.folder.exists()  # staged in a temporary folder


# ---------------------------------------------------------------- stand-in Hub round trip (fresh interpreters)

PULL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["aligngpt_hf"] = None  # only the files in the repository remain
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer, pipeline)

    pretrained, out_file, specs, questions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    images = [Image.new("RGB", tuple(size), tuple(colour)) for size, colour in specs]
    # --- lmms-eval `--model huggingface` (lmms_eval/models/chat/huggingface.py), literally ---
    config = AutoConfig.from_pretrained(pretrained, trust_remote_code=True)
    if config.model_type in AutoModelForCausalLM._model_mapping.keys():
        model_cls = AutoModelForCausalLM
    elif config.model_type in AutoModelForImageTextToText._model_mapping.keys():
        model_cls = AutoModelForImageTextToText
    else:
        model_cls = AutoModel
    assert model_cls is AutoModel, model_cls
    model = model_cls.from_pretrained(pretrained, trust_remote_code=True, torch_dtype="bfloat16",
                                      device_map="cpu").eval()
    processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=True)
    batched_messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                        for q in questions]
    texts = [processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
             for msg in batched_messages]
    kwargs = {"images": images, "videos": [], "audios": []}
    inputs = processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
    inputs = inputs.to("cpu")
    cont = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          do_sample=False, temperature=None, top_p=None, num_beams=1, max_new_tokens=6, use_cache=True)
    generated_ids_trimmed = [out_ids[len(in_ids):] for in_ids, out_ids in zip(inputs.input_ids, cont)]
    answers = processor.batch_decode(generated_ids_trimmed, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
    outputs = {"input_ids": inputs["input_ids"], "lmms_generated": cont}
    report = {"answers": answers, "model_class": type(model).__name__, "tokenizer_class": type(tokenizer).__name__,
              "texts": texts, "processor_class": type(processor).__name__}
    # --- every auto class in float32: logits, gate weights and greedy generation ---
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    for name, auto_class in (("auto", AutoModel), ("itt", AutoModelForImageTextToText), ("clm", AutoModelForCausalLM)):
        loaded = auto_class.from_pretrained(pretrained, trust_remote_code=True).eval()
        assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
        with torch.no_grad():
            result = loaded(**batch)
        outputs[name + "_logits"], outputs[name + "_weights"] = result.logits, result.alignment_weights
        outputs[name + "_generated"] = loaded.generate(**batch, max_new_tokens=6, do_sample=False)
    # --- pipeline with chat-format input ---
    pipe = pipeline("image-text-to-text", model=pretrained, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                         {"type": "text", "text": questions[0]}]}]
    report["pipeline"] = pipe(text=chat, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    save_file({k: v.contiguous() for k, v in outputs.items()}, out_file)
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """The stdlib stand-in Hub on a free 127.0.0.1 port; stops itself after 180 s and is killed at module end."""
    root = tmp_path_factory.mktemp("fakehub")
    port_file, log = root / "port", open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, str(HERE / "fake_hub_server.py"), str(root / "store"), str(port_file), "180"],
        stdout=log, stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake hub did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text()}", root
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _hub_env(endpoint: str, hf_home: Path) -> dict:
    env = package_free_env(hf_home, HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_fake",
                           HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("HF_HUB_OFFLINE", None)
    return env


def _expected_lmms_outputs(model, processor):
    texts = [processor.apply_chat_template(user_message(q), tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    batch = processor(text=texts, images=_images(), videos=[], audios=[], padding=True, padding_side="left",
                      return_tensors="pt")
    with torch.no_grad():
        result = model(**batch)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    return texts, batch, result, generated


def test_push_to_stand_in_hub_then_load_everything_without_the_package(
    fake_hub, trained, expected_files, processor, tmp_path
):
    model, folder = trained
    endpoint, root = fake_hub
    push = subprocess.run(
        [sys.executable, "-m", "aligngpt_hf.cli", "push", str(folder), REPO_ID, "--max-shard-size", "100KB"],
        capture_output=True, text=True, env=_hub_env(endpoint, tmp_path / "push_home"), timeout=240, cwd=tmp_path,
    )
    assert push.returncode == 0, push.stderr[-3000:]
    assert f"Pushed {REPO_ID}" in push.stdout
    assert sorted(os.listdir(root / "store" / REPO_ID.replace("/", "__"))) == expected_files

    out_file = tmp_path / "pulled.safetensors"
    pull_home = tmp_path / "pull_home"
    pull = subprocess.run(
        [sys.executable, "-c", PULL_SCRIPT, REPO_ID, str(out_file), json.dumps(IMAGE_SPECS), json.dumps(QUESTIONS)],
        capture_output=True, text=True, env=_hub_env(endpoint, pull_home), timeout=240, cwd=tmp_path,
    )
    assert pull.returncode == 0, pull.stderr[-4000:]
    report = json.loads(pull.stdout.split("REPORT ", 1)[1])
    assert (pull_home / "hub").is_dir()  # everything came through the (stand-in) Hub into the empty cache
    remote = load_file(out_file)

    texts, batch, expected, generated = _expected_lmms_outputs(model, processor)
    assert report["texts"] == texts and torch.equal(remote["input_ids"], batch["input_ids"])
    assert report["model_class"] == "AlignGPTForConditionalGeneration"
    assert (report["tokenizer_class"], report["processor_class"]) == ("AlignGPTTokenizerFast", "AlignGPTProcessor")
    for name in ("auto", "itt", "clm"):
        assert torch.equal(remote[name + "_logits"], expected.logits), name
        assert torch.equal(remote[name + "_weights"], expected.alignment_weights), name
        assert torch.equal(remote[name + "_generated"], generated), name
    # the literal lmms-eval run: bfloat16 weights, explicit eos/pad; prompt + new tokens come back
    bf16 = type(model).from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokenizer = processor.tokenizer
    lmms = bf16.generate(**batch, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         do_sample=False, max_new_tokens=6, use_cache=True)
    assert torch.equal(remote["lmms_generated"], lmms)
    assert torch.equal(lmms[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    new_tokens = lmms[:, batch["input_ids"].shape[1]:]
    assert report["answers"] == processor.batch_decode(new_tokens, skip_special_tokens=True,
                                                       clean_up_tokenization_spaces=False)
    single = processor(text=[texts[0]], images=_images()[:1], return_tensors="pt")
    piped = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1]:]
    assert report["pipeline"] == processor.decode(piped, skip_special_tokens=True)


# ---------------------------------------------------------------- the card's snippets, as a user pastes them

def test_model_card_snippets_run_against_the_local_folder(published, tmp_path):
    readme = (published.folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 2
    script = 'import sys\nsys.modules["aligngpt_hf"] = None\n' + "\n".join(
        f"exec({block.replace(repr(REPO_ID), repr(str(published.folder)))!r}, {{}})\nprint('BLOCK_OK')"
        for block in (b.replace(f'"{REPO_ID}"', repr(REPO_ID)) for b in blocks)
    )
    env = package_free_env(tmp_path / "hf_home")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("BLOCK_OK") == 2
    assert "tensor([[" in result.stdout  # the gate weights were printed

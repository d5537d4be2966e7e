"""Bad input, conversion layer (found by probing): OUTPUT that is SOURCE or lies inside it, index files that point
outside the checkpoint or are broken, config.json of the wrong shape, integer weights, a tokenizer folder without a
tokenizer, a repo id or shard size the run would only reject at the end.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from aligngpt_hf import convert_checkpoint
from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.conversion.from_llava import convert_llava
from aligngpt_hf.conversion.mapping import ConversionError
from aligngpt_hf.tiny import build_llava
from conftest import ORIGINAL_FIXTURES

ORIGINAL = ORIGINAL_FIXTURES / "original_checkpoint"


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "original"
    shutil.copytree(ORIGINAL, folder)
    return folder


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava") / "tiny-llava"
    torch.manual_seed(0)
    model, processor = build_llava()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def shard(source, weight_map_of=None):
    """Split the source's weights into two .bin shards with an index; `weight_map_of(map)` edits the index."""
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    (source / "pytorch_model.bin").unlink()
    keys = list(state)
    names = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"pytorch_model-{number:05d}-of-00002.bin"
        torch.save({key: state[key] for key in part}, source / name)
        names.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": names}
    index = weight_map_of(index) if weight_map_of else index
    (source / "pytorch_model.bin.index.json").write_text(index if isinstance(index, str) else json.dumps(index))


@pytest.mark.parametrize("where", ["same", "inside"])
def test_convert_output_that_is_or_lies_inside_source_is_refused_and_source_kept(source, where):
    output = source if where == "same" else source / "converted"
    expected = "is SOURCE itself" if where == "same" else f"is inside SOURCE {source}"
    with pytest.raises(ValueError, match=rf"^OUTPUT {output} {expected}"):
        convert_checkpoint(source, output, overwrite=True, progress=False)
    assert (source / "pytorch_model.bin").is_file() and not (source / "converted").exists()


def test_convert_output_holding_source_is_refused(source):
    with pytest.raises(ValueError, match=rf"^OUTPUT {source.parent} holds SOURCE {source}: replacing it would delete"):
        convert_checkpoint(source, source.parent, overwrite=True, progress=False)
    assert (source / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("name", ["../outside.bin", "ABSOLUTE"])
def test_index_naming_a_shard_outside_the_folder_is_refused(source, tmp_path, name):
    def escape(index):
        second = "pytorch_model-00002-of-00002.bin"
        shutil.move(source / second, tmp_path / "outside.bin")
        target = str(tmp_path / "outside.bin") if name == "ABSOLUTE" else name
        index["weight_map"] = {k: (target if v == second else v) for k, v in index["weight_map"].items()}
        return index

    shard(source, escape)
    target = str(tmp_path / "outside.bin") if name == "ABSOLUTE" else name
    with pytest.raises(ConversionError, match=rf"pytorch_model\.bin\.index\.json: `weight_map` names shard\(s\) "
                                              rf"'{target}' that are not plain file names in the checkpoint folder"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


@pytest.mark.parametrize("index, message", [
    ("{not json", r"index\.json:1:2: not valid JSON \(Expecting property name"),
    ({"metadata": {}}, r"index\.json has no `weight_map` object"),
    ({"weight_map": ["a.bin"]}, r"index\.json has no `weight_map` object"),
])
def test_broken_index_file_is_named(source, tmp_path, index, message):
    shard(source, lambda _: index)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(source, tmp_path / "out", progress=False)


@pytest.mark.parametrize("text, message", [
    ("{x", r"config\.json:1:2: not valid JSON \(Expecting property name .*\); restore the config file"),
    ("[1]", r"config\.json holds a JSON list, not the config object it should be"),
    ("DROP vocab_size", r"config\.json: `vocab_size` is missing; an original AlignGPT config has it as a positive "
                        r"integer"),
    ("SET vocab_size abc", r"config\.json: `vocab_size` is 'abc'"),
    ("DROP mm_vision_select_layer", r"config\.json: `mm_vision_select_layer` is missing; .* as an integer"),
])
def test_broken_original_config_is_named_with_its_field(source, tmp_path, capsys, text, message):
    config = json.loads((source / "config.json").read_text())
    if text.startswith("DROP "):
        del config[text.split()[1]]
        text = json.dumps(config)
    elif text.startswith("SET "):
        config[text.split()[1]] = text.split()[2]
        text = json.dumps(config)
    (source / "config.json").write_text(text)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert cli_main(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith(f"aligngpt-hf convert: error: {source / 'config.json'}")


def test_integer_weights_are_refused_by_name(source, tmp_path):
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.int64)
    torch.save(state, source / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"Non-floating or quantized tensor\(s\) in the checkpoint where weights are "
                                              r"expected:\n  model\.embed_tokens\.weight \(int64\)"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_folder_without_tokenizer_files_is_named(source, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match=rf"^--tokenizer {tmp_path / 'tok'}: .* has no tokenizer files "
                                              r"\(tokenizer\.json or tokenizer\.model; it holds config\.json\)"):
        convert_checkpoint(source, tmp_path / "out", tokenizer=tmp_path / "tok", progress=False)


@pytest.mark.parametrize("repo_id", ["not a repo id", "a/b/c", "owner/name..", "owner/" + "x" * 200])
def test_push_repo_id_is_checked_before_converting(source, tmp_path, repo_id):
    with pytest.raises(ValueError, match=rf"^--push-to-hub '{repo_id}' is not a Hub repo id \("):
        convert_checkpoint(source, tmp_path / "out", push_to_hub=repo_id, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["0", "0GB", 0])
def test_zero_shard_size_is_refused_before_converting(source, tmp_path, size):
    with pytest.raises(ConversionError, match=rf"^The shard size {size!r} is not positive"):
        convert_checkpoint(source, tmp_path / "out", max_shard_size=size, progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ from-llava


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_from_llava_output_that_overlaps_source_is_refused_and_source_kept(llava, tmp_path, where):
    source = tmp_path / "src"
    shutil.copytree(llava, source)
    output = {"same": source, "inside": source / "sub", "holds": tmp_path}[where]
    expected = {"same": "is SOURCE itself", "inside": "is inside SOURCE", "holds": "holds SOURCE"}[where]
    with pytest.raises(ValueError, match=rf"^OUTPUT {output} {expected}"):
        convert_llava(source, output, overwrite=True)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in llava.iterdir())


@pytest.mark.parametrize("text, message", [
    ("{x", r"config\.json:1:2: not valid JSON"),
    ("[]", r"config\.json holds a JSON list, not the config object"),
])
def test_from_llava_broken_config_is_named(llava, tmp_path, capsys, text, message):
    source = tmp_path / "src"
    shutil.copytree(llava, source)
    (source / "config.json").write_text(text)
    assert cli_main(["from-llava", str(source), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"aligngpt-hf from-llava: error: {source / 'config.json'}") and "Traceback" not in err


def test_from_llava_truncated_weights_are_named(llava, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(llava, source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert cli_main(["from-llava", str(source), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"aligngpt-hf from-llava: error: {source}: weight file(s) "
                                              "model.safetensors are truncated or corrupt (")
    assert not (tmp_path / "out").exists()


def test_from_llava_output_whose_parent_is_a_file(llava, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"OUTPUT's parent folder {tmp_path / 'file'} is inside "
                                                 rf"{tmp_path / 'file'}, which is a file"):
        convert_llava(llava, tmp_path / "file" / "out")


def test_private_push_onto_an_existing_public_repo_uploads_nothing(source, tmp_path):
    from unittest import mock

    from huggingface_hub import HfApi

    with mock.patch.object(HfApi, "repo_info", return_value=mock.Mock(private=False)), \
            mock.patch.object(HfApi, "create_repo") as create, mock.patch.object(HfApi, "upload_folder") as upload:
        with pytest.raises(ValueError, match=r"^--private was given, but user/public already exists and is public"):
            convert_checkpoint(source, tmp_path / "out", push_to_hub="user/public", private=True, progress=False)
    assert not create.called and not upload.called


def test_vision_tower_that_is_not_a_tower_is_named(source, tmp_path, llava):
    with pytest.raises(ConversionError, match=rf"^The vision tower folder {llava} holds a 'llava' model, not a CLIP or "
                                              r"SigLIP vision tower"):
        convert_checkpoint(source, tmp_path / "out", vision_tower=llava, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=rf"^The vision tower folder {tmp_path / 'empty'} has no config\.json"):
        convert_checkpoint(source, tmp_path / "out", vision_tower=tmp_path / "empty", progress=False)


def test_tower_named_relative_is_not_read_from_the_working_directory(source, tmp_path, monkeypatch):
    shutil.move(source / "vision_tower", tmp_path / "vision_tower")  # same name, outside SOURCE, in the cwd
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match=rf"`mm_vision_tower` = 'vision_tower', which is neither a folder inside "
                                              rf"{source} nor an absolute path"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_with_more_tokens_than_the_checkpoint_names_the_fix(source, tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")  # the package's tiny tokenizer: 320 tokens, <image>/<align> added
    with pytest.raises(ConversionError, match=r"^The tokenizer has \d+ tokens but the checkpoint only 300 rows: it is "
                                              r"not the tokenizer these weights were trained with .* Pass the base "
                                              r"LLM's own tokenizer with --tokenizer"):
        convert_checkpoint(source, tmp_path / "out", tokenizer=tmp_path / "tok", progress=False)


def test_from_llava_out_of_memory_names_the_option(llava, tmp_path, monkeypatch, capsys):
    from aligngpt_hf import AlignGPTForConditionalGeneration

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(AlignGPTForConditionalGeneration, "from_llava", out_of_memory)
    assert cli_main(["from-llava", str(llava), str(tmp_path / "out"), "--num-alignment-levels", "100000000"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("aligngpt-hf from-llava: error: Building the AlignGPT "
                                                               "model ran out of memory ([enforce fail")


@pytest.mark.parametrize("option", ["source", "vision_tower", "tokenizer"])
def test_hub_id_that_cannot_be_fetched_names_the_option_and_the_id(source, tmp_path, monkeypatch, option):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    what = {"source": "checkpoint", "vision_tower": "vision tower", "tokenizer": "tokenizer"}[option]
    kwargs = {} if option == "source" else {option: "nobody/not-cached"}
    with pytest.raises(ConversionError, match=rf"^Cannot get the {what} 'nobody/not-cached' from the Hub \(.+\)\. Pass "
                                              r"a local folder instead"):
        convert_checkpoint("nobody/not-cached" if option == "source" else source, tmp_path / "out", progress=False,
                           **kwargs)


def _llava_with(llava, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "src"
    shutil.copytree(llava, source)
    state = load_file(source / "model.safetensors")
    edit(state)
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    return source


PROJECTOR_BIAS = "multi_modal_projector.linear_1.bias"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop(next(k for k in s if k.endswith(PROJECTOR_BIAS))),
     r"1 weight\(s\) missing \(would be random\): model\.multi_modal_projector\.linear_1\.bias\."),
    (lambda s: s.__setitem__("junk.weight", torch.zeros(2)), r"1 weight\(s\) not in the model \(would be dropped\): "
                                                              r"junk\.weight\."),
    (lambda s: s.__setitem__(next(k for k in s if k.endswith(PROJECTOR_BIAS)), torch.zeros(3, 3)),
     r"1 weight\(s\) of the wrong shape: model\.multi_modal_projector\.linear_1\.bias \[3, 3\] vs \[\d+\]\."),
])
def test_from_llava_weights_that_do_not_fill_the_model_are_refused(llava, tmp_path, edit, message):
    source = _llava_with(llava, tmp_path, edit)
    with pytest.raises(ConversionError, match=rf"^{source}: the LLaVA weights do not match its config\.json: "
                                              rf"{message} Re-download"):
        convert_llava(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_for_a_stage1_projector_is_refused_not_ignored(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(ConversionError, match=r"^--tokenizer applies to a full checkpoint, but .*pretrain_projector "
                                              r"holds a stage-1 projector"):
        convert_checkpoint(ORIGINAL_FIXTURES / "pretrain_projector", tmp_path / "out", tokenizer=tmp_path / "tok",
                           vision_tower=ORIGINAL / "vision_tower", progress=False)
    assert not (tmp_path / "out").exists()


def test_transformers_llava_given_to_convert_names_from_llava(llava, tmp_path):
    with pytest.raises(ConversionError, match=r"config\.json: it is a transformers LLaVA \(model_type 'llava'\); make "
                                              r"an AlignGPT of it with `aligngpt-hf from-llava SOURCE OUTPUT`"):
        convert_checkpoint(llava, tmp_path / "out", progress=False)


@pytest.mark.parametrize("remove, missing", [
    (("tokenizer.json", "tokenizer_config.json"), r"no tokenizer \(tokenizer\.json or tokenizer\.model\)"),
    (("processor_config.json", "preprocessor_config.json"), r"no image processor settings \(preprocessor_config\.json "
                                                            r"or processor_config\.json\)"),
])
def test_from_llava_processor_parts_missing_are_named(llava, tmp_path, remove, missing):
    source = tmp_path / "src"
    shutil.copytree(llava, source)
    for name in remove:
        (source / name).unlink(missing_ok=True)
    with pytest.raises(ConversionError, match=rf"^{source} has no usable LlavaProcessor: {missing}; save the "
                                              r"checkpoint's processor"):
        convert_llava(source, tmp_path / "out")


def test_from_llava_damaged_tokenizer_file_is_named(llava, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(llava, source)
    (source / "tokenizer.json").write_text("{}")
    with pytest.raises(ConversionError, match=rf"^{source} has no usable LlavaProcessor \(KeyError: 'added_tokens'\)"):
        convert_llava(source, tmp_path / "out")

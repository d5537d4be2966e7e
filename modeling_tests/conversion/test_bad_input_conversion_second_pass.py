"""Bad input, conversion layer, second pass: index files that disagree with their shards, quantized or unreadable
dtypes, weight files left unread, a `mm_vision_tower` leading out of SOURCE, a SigLIP tower for a CLIP checkpoint,
empty SOURCE/OUTPUT names.

Each test is named after the case and asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from aligngpt_hf import convert_checkpoint
from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.conversion.mapping import ConversionError
from conftest import ORIGINAL_FIXTURES

ORIGINAL = ORIGINAL_FIXTURES / "original_checkpoint"
SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "original"
    shutil.copytree(ORIGINAL, folder)
    return folder


def state_of(folder):
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


def shard_with_index(source, edit):
    """Two .bin shards and an index whose `weight_map` is passed through `edit` first."""
    state = state_of(source)
    (source / "pytorch_model.bin").unlink()
    keys = list(state)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    for name, part in zip(SHARDS, halves):
        torch.save({key: state[key] for key in part}, source / name)
    weight_map = {key: name for name, part in zip(SHARDS, halves) for key in part}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": edit(weight_map, keys)}))


@pytest.mark.parametrize("edit, problem", [
    (lambda wm, keys: {k: v for k, v in wm.items() if k != "model.embed_tokens.weight"},
     rf"model\.embed_tokens\.weight: in {SHARDS[0]}, not listed"),
    (lambda wm, keys: {**wm, "model.embed_tokens.weight": SHARDS[1]},
     rf"model\.embed_tokens\.weight: listed in {SHARDS[1]}, found in {SHARDS[0]}"),
    (lambda wm, keys: {**wm, "model.layers.7.mlp.up_proj.weight": SHARDS[0]},
     rf"model\.layers\.7\.mlp\.up_proj\.weight: listed in {SHARDS[0]}, in no shard"),
], ids=["key-not-listed", "key-in-another-shard", "listed-key-in-no-shard"])
def test_index_that_disagrees_with_its_shards_is_refused(source, tmp_path, edit, problem):
    shard_with_index(source, edit)
    with pytest.raises(ConversionError, match=rf"pytorch_model\.bin\.index\.json does not match its shards \(1 key\(s\)\):"
                                              rf"\n  {problem}\nThe index and the shards come from different saves"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype, fmt", [(torch.float8_e4m3fn, "safetensors"), (torch.int8, "safetensors"),
                                        (torch.float8_e5m2, "bin")])
def test_quantized_or_integer_weights_are_refused_by_name(source, tmp_path, dtype, fmt):
    state = state_of(source)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(dtype)
    if fmt == "safetensors":  # the KeyError of an unmapped safetensors dtype name was a traceback
        (source / "pytorch_model.bin").unlink()
        save_file({k: v.contiguous() for k, v in state.items()}, str(source / "model.safetensors"))
    else:  # float8 is floating point: it was cast up silently, its scales missing
        torch.save(state, source / "pytorch_model.bin")
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ConversionError, match=rf"^Non-floating or quantized tensor\(s\) in the checkpoint where weights "
                                              rf"are expected:\n  model\.layers\.0\.mlp\.up_proj\.weight \({name}\)"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_weight_files_left_unread_are_reported(source, tmp_path, capsys):
    zeros = {k: torch.zeros_like(v).contiguous() for k, v in state_of(source).items()}
    save_file(zeros, str(source / "model.safetensors"))  # read before pytorch_model.bin, as transformers does
    (source / "optimizer.pt").write_bytes(b"trainer state")
    assert cli_main(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 0
    assert ("Not read from SOURCE: optimizer.pt, pytorch_model.bin (the weights came from model.safetensors)."
            in capsys.readouterr().out)


def without_embedded_tower(source, tower_name):
    """The tower moved next to SOURCE (its weights out of the checkpoint) and named relative to SOURCE."""
    state = state_of(source)
    torch.save({k: v for k, v in state.items() if not k.startswith("vision_tower.")}, source / "pytorch_model.bin")
    shutil.move(source / "vision_tower", source.parent / "sibling_tower")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "mm_vision_tower": tower_name}))
    return source.parent / "sibling_tower"


def test_tower_path_leading_out_of_source_is_not_read(source, tmp_path):
    tower = without_embedded_tower(source, "../sibling_tower")
    with pytest.raises(ConversionError, match=rf"^config\.json names `mm_vision_tower` = '\.\./sibling_tower', a "
                                              rf"relative path that leads out of {source}; only folders inside SOURCE "
                                              r"are read\. Pass the tower with `--vision-tower`"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    convert_checkpoint(source, tmp_path / "out", vision_tower=tower, progress=False)  # named explicitly: read
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_tower_path_naming_source_itself_is_named_as_no_tower(source, tmp_path):
    without_embedded_tower(source, ".")
    with pytest.raises(ConversionError, match=rf"^The vision tower folder {source} has no readable CLIP or SigLIP "
                                              r"config \(This is an original-format AlignGPT config"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_siglip_tower_for_a_clip_checkpoint_names_the_option(source, tmp_path):
    tower = json.loads((source / "vision_tower" / "config.json").read_text())
    sizes = {k: tower[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "image_size", "patch_size")}
    SiglipVisionModel(SiglipVisionConfig(**sizes)).save_pretrained(tmp_path / "siglip")
    with pytest.raises(ConversionError, match=rf"^--vision-tower {tmp_path / 'siglip'} is a 'siglip_vision_model' "
                                              r"model, but this original AlignGPT checkpoint was trained with a CLIP "
                                              r"vision tower"):
        convert_checkpoint(source, tmp_path / "out", vision_tower=tmp_path / "siglip", progress=False)
    shutil.rmtree(source / "vision_tower")
    shutil.copytree(tmp_path / "siglip", source / "vision_tower")  # the same tower inside SOURCE
    with pytest.raises(ConversionError, match=r"^`mm_vision_tower` 'vision_tower' is a 'siglip_vision_model' model"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


@pytest.mark.parametrize("command, argv, message", [
    ("convert", [str(ORIGINAL), ""], "OUTPUT is an empty string; give the folder to write the converted checkpoint "
                                     "into."),
    ("convert", ["", "OUT"], "The checkpoint is an empty string; give a folder or a Hub repo id."),
    ("from-llava", [str(ORIGINAL), ""], "OUTPUT is an empty string; give the folder to write the AlignGPT model "
                                        "into."),
    ("from-llava", ["", "OUT"], "The LLaVA checkpoint is an empty string; give a folder or a Hub repo id."),
])
def test_empty_source_or_output_is_named_not_the_working_directory(tmp_path, capsys, monkeypatch, command, argv,
                                                                   message):
    monkeypatch.chdir(tmp_path)  # "" used to mean the working directory ("OUTPUT  holds SOURCE", ". has no config")
    assert cli_main([command, *argv]) == 1
    assert capsys.readouterr().err == f"aligngpt-hf {command}: error: {message}\n"


@pytest.mark.parametrize("file, text, message", [
    ("generation_config.json", "{not json", r"generation_config\.json:1:2: not valid JSON \(Expecting property name "
                                            r"enclosed in double quotes\); restore the generation config file"),
    ("generation_config.json", "[1, 2]", r"generation_config\.json holds a JSON list, not the generation config "
                                         r"object"),
    ("generation_config.json", '{"eos_token_id": "two"}', r"generation_config\.json: `eos_token_id` is 'two'; it must "
                                                          r"be a token id \(an integer\) or a list of them"),
    ("vision_tower/preprocessor_config.json", "{x", r"vision_tower/preprocessor_config\.json:1:2: not valid JSON"),
    ("vision_tower/preprocessor_config.json", "[1]", r"vision_tower/preprocessor_config\.json holds a JSON list"),
    ("vision_tower/preprocessor_config.json", '{"image_mean": "x"}',
     r"vision_tower/preprocessor_config\.json: its settings \(image_mean='x'\) cannot preprocess an image "
     r"\(ValueError: mean must have 3 elements"),
    ("tokenizer.json", "{garbage", r"SOURCE's tokenizer: the tokenizer files in .*original cannot be loaded "
                                   r"\(JSONDecodeError: .*\); restore them, or pass the base LLM's tokenizer"),
])
def test_broken_side_file_of_source_is_named(source, tmp_path, file, text, message):
    (source / file).write_text(text)  # read as is before: a bare JSON error without the file, or a traceback
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "nope", r"KeyError: unknown name 'nope'"),
    ("rope_scaling", {"type": "bogus", "factor": 2.0}, r"KeyError: unknown name 'bogus'"),
    ("eos_token_id", "2", r"StrictDataclassFieldValidationError: Validation error for field 'eos_token_id'"),
])
def test_config_value_the_model_cannot_be_built_from_is_named(source, tmp_path, field, value, message):
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ConversionError, match=rf"^{source / 'config.json'}: a value the model cannot be built from "
                                              rf"\({message}"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_tokenizer_that_already_has_image_names_the_fix(source, tmp_path):
    from aligngpt_hf.tiny import build_llava

    build_llava()[1].tokenizer.save_pretrained(tmp_path / "tok")  # LLaVA's: `<image>` at id 4, 300 tokens
    with pytest.raises(ConversionError, match=r"^`<image>`/`<align>` got ids \[4, 300\] inside the original vocabulary "
                                              r"\(< 300\): the tokenizer already has them, .* Pass the base LLM's own "
                                              r"tokenizer with --tokenizer"):
        convert_checkpoint(source, tmp_path / "out", tokenizer=tmp_path / "tok", progress=False)


@pytest.mark.parametrize("marker, message", [
    ('{"stage": "pretrain", "weights": "../secret.safetensors"}', r": `weights` is '\.\./secret\.safetensors', not the "
                                                                  r"name of a file in"),
    ('{"stage": "pretrain"}', r": `weights` is None, not the name of a file in"),
    ("[]", r" holds a JSON list, not the stage marker object"),
    ("{bad", r":1:2: not valid JSON"),
])
def test_stage1_marker_that_points_outside_or_is_broken(tmp_path, marker, message):
    from aligngpt_hf.conversion.convert import load_stage1_artefact

    artefact = tmp_path / "stage1"
    convert_checkpoint(ORIGINAL_FIXTURES / "pretrain_projector", artefact, vision_tower=ORIGINAL / "vision_tower",
                       progress=False)
    shutil.copyfile(artefact / "stage1.safetensors", tmp_path / "secret.safetensors")
    (artefact / "aligngpt_stage.json").write_text(marker)  # read the file outside, or KeyError/AttributeError
    with pytest.raises(ConversionError, match=rf"^{artefact / 'aligngpt_stage.json'}{message}"):
        load_stage1_artefact(artefact)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from aligngpt_hf.tiny import build_llava

    folder = tmp_path_factory.mktemp("llava") / "tiny-llava"
    torch.manual_seed(0)
    model, processor = build_llava()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"].update(hidden_act="nope"), r"KeyError: unknown name 'nope'"),
    (lambda c: c["text_config"].update(eos_token_id="2"),
     r"StrictDataclassFieldValidationError: Validation error for field 'eos_token_id'"),
    (lambda c: c.update(vision_feature_select_strategy="weird"),
     r"StrictDataclassFieldValidationError: Validation error for field 'vision_feature_select_strategy'"),
])
def test_from_llava_config_value_the_model_cannot_be_built_from_is_named(llava, tmp_path, capsys, edit, message):
    source = tmp_path / "llava"
    shutil.copytree(llava, source)
    config = json.loads((source / "config.json").read_text())
    edit(config)
    (source / "config.json").write_text(json.dumps(config))
    assert cli_main(["from-llava", str(source), str(tmp_path / "out")]) == 1  # was a traceback
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"aligngpt-hf from-llava: error: {source / 'config.json'}: a value the model cannot be built "
                          "from (")
    assert re.search(message, err) and err.endswith("restore the checkpoint's own config.json.")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [("{x", r":1:2: not valid JSON"),
                                           ("[]", r" holds a JSON list, not the generation config object")])
def test_from_llava_broken_generation_config_is_named_not_dropped(llava, tmp_path, text, message):
    from aligngpt_hf.conversion.from_llava import convert_llava

    source = tmp_path / "llava"
    shutil.copytree(llava, source)
    (source / "generation_config.json").write_text(text)  # transformers dropped it with a warning, or a bare TypeError
    with pytest.raises(ConversionError, match=rf"^{source / 'generation_config.json'}{message}"):
        convert_llava(source, tmp_path / "out")


def test_from_llava_reports_weight_files_it_does_not_read(llava, tmp_path, capsys):
    source = tmp_path / "llava"
    shutil.copytree(llava, source)
    (source / "pytorch_model.bin").write_bytes(b"older weights")
    (source / "optimizer.pt").write_bytes(b"trainer state")
    assert cli_main(["from-llava", str(source), str(tmp_path / "out")]) == 0
    assert ("Not read from SOURCE: optimizer.pt, pytorch_model.bin (the weights came from model.safetensors)."
            in capsys.readouterr().out)


@pytest.mark.parametrize("vocab", [1000, 299])
def test_config_vocabulary_that_differs_from_the_word_tables_is_refused(source, tmp_path, vocab):
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))  # silently mean rows / overlap
    with pytest.raises(ConversionError, match=rf"^{source / 'config.json'}: `vocab_size` is {vocab}, but "
                                              r"model\.embed_tokens\.weight has 300 rows and lm_head\.weight has 300 "
                                              r"rows; the config and the weights come from different models"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_nan_weights_are_refused_at_conversion(source, tmp_path):
    state = state_of(source)
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(state, source / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"^NaN or infinite values in 1 converted weight\(s\):\n  "
                                              r"model\.layers\.0\.mlp\.up_proj\.weight -> "
                                              r"model\.language_model\.layers\.0\.mlp\.up_proj\.weight\n"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_from_llava_nan_weights_are_refused(llava, tmp_path):
    from safetensors.torch import load_file

    from aligngpt_hf.conversion.from_llava import convert_llava

    source = tmp_path / "llava"
    shutil.copytree(llava, source)
    state = load_file(source / "model.safetensors")
    key = next(k for k in sorted(state) if k.endswith("mlp.up_proj.weight"))
    state[key][0, 0] = float("inf")
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=rf"^{source}: 1 LLaVA weight\(s\) hold NaN or infinite values "
                                              rf"\(model\.language_model\.layers\.\d\.mlp\.up_proj\.weight\)"):
        convert_llava(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""`aligngpt-hf from-llava` / `AlignGPTForConditionalGeneration.from_llava`: a transformers LLaVA checkpoint becomes an
AlignGPT folder. Tiny saved LLaVA folders stand in for llava-hf's (same layout: LlavaConfig with CLIP + Llama,
LlavaProcessor with its own tokenizer and chat template)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from aligngpt_hf import AlignGPTForConditionalGeneration, AlignGPTProcessor
from aligngpt_hf.cli import main
from aligngpt_hf.conversion.from_llava import convert_llava
from aligngpt_hf.conversion.mapping import ConversionError
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_CHAT_TEMPLATE
from aligngpt_hf.tiny import build_llava
from aligngpt_hf.training.cli import parse_recipe
from aligngpt_hf.training.trainers import freeze_for_pretrain
from conftest import ORIGINAL_FIXTURES, package_free_env, user_message

IMAGES = [Image.new("RGB", (40, 24), (200, 30, 30)), Image.new("RGB", (20, 36), (30, 160, 40))]


def save_llava(folder, seed=0, layer=-2, strategy="default", **build_kwargs):
    """A seeded tiny LLaVA saved as llava-hf saves theirs; returns (model, processor)."""
    torch.manual_seed(seed)
    model, processor = build_llava(**build_kwargs)
    model.config.vision_feature_layer, model.config.vision_feature_select_strategy = layer, strategy
    processor.vision_feature_select_strategy = strategy
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.eval(), processor


def llava_inputs(processor, images=IMAGES, question="What colour is the shape?"):
    """LLaVA's own inputs: its chat template and processor, no `<align>`."""
    text = processor.apply_chat_template(user_message(question, num_images=len(images)), add_generation_prompt=True)
    return processor(text=[text], images=images, return_tensors="pt")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava") / "tiny-llava"
    model, processor = save_llava(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def converted(llava, tmp_path_factory):
    folder = tmp_path_factory.mktemp("aligngpt") / "tiny-aligngpt"
    torch.manual_seed(1)
    assert main(["from-llava", str(llava[0]), str(folder)]) == 0
    return folder


@pytest.mark.parametrize("layer, strategy", [(-2, "default"), (-1, "full")])
def test_alignment_mode_none_reproduces_llava_logits(tmp_path, layer, strategy):
    """LLaVA's feature layer and select strategy are carried over; on LLaVA's own inputs the logits agree."""
    llava_model, processor = save_llava(tmp_path / "llava", layer=layer, strategy=strategy)
    model = AlignGPTForConditionalGeneration.from_llava(tmp_path / "llava", alignment_mode="none")
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (layer, strategy)
    assert model.config.image_seq_length == (16 if strategy == "default" else 17)
    vocab = llava_model.config.text_config.vocab_size
    for images in (IMAGES[:1], IMAGES):  # one image, and two in one prompt
        batch = llava_inputs(processor, images)
        with torch.no_grad():
            expected, got = llava_model(**batch).logits, model(**batch).logits
        assert got.shape[-1] == model.config.text_config.vocab_size > vocab
        difference = (got[..., :vocab] - expected).abs().max().item()
        print(f"from-llava parity ({layer}, {strategy}, {len(images)} image(s)): max |logits diff| = {difference:.3g}")
        assert difference <= 1e-5


def test_weights_are_llava_bit_for_bit_and_the_vocabulary_grows(llava):
    folder, llava_model, _ = llava
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration.from_llava(folder, alignment_token_id=300)
    ours, theirs = model.state_dict(), llava_model.state_dict()
    assert set(theirs) < set(ours) and {k for k in ours if k not in theirs} == {
        "model.alignment.level_embeddings", "model.alignment.fc1.weight", "model.alignment.fc1.bias",
        "model.alignment.fc2.weight", "model.alignment.fc2.bias"}
    assert model.config.text_config.vocab_size == 320  # 301 rows needed, padded to a multiple of 64
    for key, tensor in theirs.items():
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours[key][:300], tensor)  # LLaVA's rows untouched
            assert torch.equal(ours[key][300:], tensor.mean(0).expand(20, -1))  # new rows: LLaVA's mean row
        else:
            assert torch.equal(ours[key], tensor), key
    assert model.generation_config.suppress_tokens == [llava_model.config.image_token_id, 300]


def test_level_table_and_gate_are_freshly_initialised(llava):
    """Not copied, not zero: random like a newly built AlignGPT's, different for another seed."""
    torch.manual_seed(0)
    first = AlignGPTForConditionalGeneration.from_llava(llava[0]).model.alignment
    torch.manual_seed(1)
    second = AlignGPTForConditionalGeneration.from_llava(llava[0]).model.alignment
    reference = AlignGPTForConditionalGeneration(
        AlignGPTForConditionalGeneration.from_llava(llava[0]).config).model.alignment  # a newly built model's init
    for name, tensor in first.state_dict().items():
        other, fresh = second.state_dict()[name], reference.state_dict()[name]
        assert tensor.shape == fresh.shape and torch.isfinite(tensor).all() and not torch.equal(tensor, other)
        if tensor.numel() > 1 and fresh.std() > 0:
            assert 0.5 < (tensor.std() / fresh.std()).item() < 2, name


def test_align_id_inside_llava_hf_padded_rows_keeps_the_vocabulary(tmp_path, capsys):
    """llava-hf pads its vocabulary (32064 rows for 32002 tokens): `<align>` takes a padded row, nothing grows."""
    llava_model, _ = save_llava(tmp_path / "llava", vocab_multiple=64)
    assert llava_model.config.text_config.vocab_size == 320
    assert main(["from-llava", str(tmp_path / "llava"), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "`<align>` = id 300, vocabulary 320 -> 320 rows" in printed and "pretrain_from_llava_7b" in printed
    model = AlignGPTForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.config.alignment_token_id == 300 and model.config.text_config.vocab_size == 320
    assert torch.equal(model.lm_head.weight, llava_model.lm_head.weight)
    assert torch.equal(model.get_input_embeddings().weight, llava_model.get_input_embeddings().weight)


def test_tied_embeddings_and_pad_id_follow_the_source(tmp_path):
    torch.manual_seed(0)
    config = build_llava()[0].config
    config.text_config.tie_word_embeddings = config.tie_word_embeddings = True
    config.text_config.pad_token_id, config.pad_token_id = None, 3  # older LLaVA configs keep the pad id at the top
    llava_model = LlavaForConditionalGeneration(config)
    assert llava_model.lm_head.weight.data_ptr() == llava_model.get_input_embeddings().weight.data_ptr()
    model = AlignGPTForConditionalGeneration.from_llava(llava_model)
    assert model.config.tie_word_embeddings and model.config.text_config.pad_token_id == 3
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_output_folder_has_processor_template_remote_code_and_auto_map(llava, converted):
    _, llava_model, llava_processor = llava
    files = {path.name for path in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_aligngpt.py",
            "modeling_aligngpt.py", "processing_aligngpt.py", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "llava_aligngpt.py"} <= files  # from_llava works next to the weights too
    assert not any(name.startswith(".") or name.endswith((".bin", ".pkl")) for name in files)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "aligngpt" and config["auto_map"]["AutoProcessor"].startswith("processing_aligngpt")
    assert (config["image_token_id"], config["alignment_token_id"]) == (llava_model.config.image_token_id, 300)
    processor = AutoProcessor.from_pretrained(converted)
    assert isinstance(processor, AlignGPTProcessor) and processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    assert processor.image_seq_length == 16 and processor.alignment_token_id == 300
    text = "USER: What colour is the shape? ASSISTANT: The shape is red."
    assert processor.tokenizer(text)["input_ids"] == llava_processor.tokenizer(text)["input_ids"]
    ours = processor(text=["<image>x"], images=IMAGES[:1], return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, llava_processor(text=["<image>x"], images=IMAGES[:1], return_tensors="pt")["pixel_values"])


def test_adaptive_forward_and_generate_on_its_own_processors_inputs(converted):
    model = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    prompt = processor.apply_chat_template(user_message("What colour is the shape?"), add_generation_prompt=True)
    batch = processor(text=[prompt], images=IMAGES[:1], return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [processor.tokenizer.bos_token_id, 300]  # BOS, <align>
    with torch.no_grad():
        out = model(**batch)
    assert model.config.alignment_mode == "adaptive" and out.alignment_weights.shape == (1, 7)
    torch.testing.assert_close(out.alignment_weights.sum(-1), torch.ones(1))
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3
    assert not set(generated[0, batch["input_ids"].shape[1]:].tolist()) & {model.config.image_token_id, 300}


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["aligngpt_hf"] = None  # only the files next to the weights remain
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, inputs_file, outputs_file = sys.argv[1:4]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    batch = load_file(inputs_file)
    with torch.no_grad():
        logits = model(**batch).logits
    save_file({"logits": logits, "generated": model.generate(**batch, max_new_tokens=3, do_sample=False)},
              outputs_file)
    print("REMOTE_OK", type(processor).__name__)
    """
)


def test_reload_through_remote_code_without_aligngpt_hf(converted, tmp_path):
    processor = AutoProcessor.from_pretrained(converted)
    prompt = processor.apply_chat_template(user_message("What colour?"), add_generation_prompt=True)
    batch = processor(text=[prompt], images=IMAGES[:1], return_tensors="pt")
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "inputs.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(converted), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "outputs.safetensors")],
        capture_output=True, text=True, env=package_free_env(tmp_path / "hf_home"), cwd=tmp_path, timeout=300,
    )
    assert "REMOTE_OK AlignGPTProcessor" in result.stdout, result.stderr[-3000:]
    remote = load_file(tmp_path / "outputs.safetensors")
    model = AlignGPTForConditionalGeneration.from_pretrained(converted).eval()
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(**batch).logits)
    assert torch.equal(remote["generated"], model.generate(**batch, max_new_tokens=3, do_sample=False))


def test_warm_up_trains_only_the_level_table_then_stage_2_runs(converted, tmp_path):
    """The tiny recipes end to end: warm-up (projector frozen), then stage 2 from its output."""
    warm, instruct = tmp_path / "warm", tmp_path / "instruct"
    common = ["--disable_tqdm", "true", "--max_steps", "2"]
    with pytest.raises(ValueError, match="never trained by stage 1"):  # the fresh level table needs the warm-up
        main(["instruct", "instruct_from_llava_tiny", "--model_name_or_path", str(converted),
              "--output_dir", str(instruct), *common, "--debug"])
    assert main(["pretrain", "pretrain_from_llava_tiny", "--model_name_or_path", str(converted),
                 "--output_dir", str(warm), *common]) == 0
    start, after = (AlignGPTForConditionalGeneration.from_pretrained(f).state_dict() for f in (converted, warm))
    changed = {key for key in start if not torch.equal(start[key], after[key])}
    assert changed == {"model.alignment.level_embeddings"}
    assert main(["instruct", "instruct_from_llava_tiny", "--model_name_or_path", str(warm),
                 "--output_dir", str(instruct), *common]) == 0
    final = AlignGPTForConditionalGeneration.from_pretrained(instruct)
    assert final.config.aligngpt_stage == "instruct"
    assert torch.equal(final.model.alignment.level_embeddings, after["model.alignment.level_embeddings"])
    assert not torch.equal(final.model.alignment.fc1.weight, after["model.alignment.fc1.weight"])


def test_7b_recipes_chain_from_llava_to_stage_2():
    gpu_only = ["--bf16", "false", "--tf32", "false", "--use_cpu", "true"]
    warm_script, warm = parse_recipe("pretrain", "pretrain_from_llava_7b", gpu_only)
    script, args = parse_recipe("instruct", "instruct_from_llava_7b", gpu_only)
    assert warm.train_projector is False and warm.train_level_table and not warm.train_vision_tower
    assert warm_script.model_name_or_path == "checkpoints/aligngpt-7b-from-llava" and warm.max_steps > 0
    assert script.model_name_or_path == warm.output_dir and args.learning_rate == 2e-5
    chain = [warm_script.model_name_or_path, warm.output_dir, args.output_dir]  # no stage writes over its input
    assert len(set(chain)) == 3, chain
    assert parse_recipe("pretrain", "pretrain_from_llava_tiny")[1].train_projector is False


def cli_error(capsys, *argv) -> str:
    """The one stderr line of a refused `aligngpt-hf from-llava` (no traceback)."""
    capsys.readouterr()  # drop what the test's own saving printed
    assert main(["from-llava", *map(str, argv)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aligngpt-hf from-llava: error: "), lines
    return lines[0]


def test_sources_that_are_not_transformers_llava_are_named(capsys, tmp_path, converted):
    assert "original-layout AlignGPT checkpoint" in cli_error(
        capsys, ORIGINAL_FIXTURES / "original_checkpoint", tmp_path / "a")
    assert "use `aligngpt-hf convert SOURCE OUTPUT`" in cli_error(
        capsys, ORIGINAL_FIXTURES / "original_checkpoint", tmp_path / "a")
    assert "already an AlignGPT model" in cli_error(capsys, converted, tmp_path / "b")
    with pytest.raises(ValueError, match="holds a 'aligngpt' model; from_llava takes a transformers LLaVA"):
        AlignGPTForConditionalGeneration.from_llava(converted)
    torch.manual_seed(0)
    llava_model, _ = build_llava()
    llava_model.model.language_model.save_pretrained(tmp_path / "llama")  # a bare language model
    assert "holds a 'llama' model" in cli_error(capsys, tmp_path / "llama", tmp_path / "c")
    assert f"the LLaVA checkpoint folder {tmp_path / 'missing'} does not exist" in cli_error(
        capsys, tmp_path / "missing", tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_missing_processor_and_non_empty_output_are_refused(capsys, llava, tmp_path):
    folder, llava_model, _ = llava
    llava_model.save_pretrained(tmp_path / "weights-only")
    assert "has no usable LlavaProcessor" in cli_error(capsys, tmp_path / "weights-only", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert "exists and is not empty; pass --overwrite" in cli_error(capsys, folder, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert main(["from-llava", str(folder), str(tmp_path / "busy"), "--overwrite"]) == 0
    assert not (tmp_path / "busy" / "notes.txt").exists() and (tmp_path / "busy" / "model.safetensors").is_file()


def test_processor_and_model_that_disagree_on_image_tokens_are_refused(capsys, tmp_path):
    save_llava(tmp_path / "llava")
    settings = json.loads((tmp_path / "llava" / "processor_config.json").read_text())
    (tmp_path / "llava" / "processor_config.json").write_text(json.dumps(dict(settings, patch_size=4)))
    error = cli_error(capsys, tmp_path / "llava", tmp_path / "out")
    assert "expands an image into 64 tokens, its model config into 16" in error and "patch_size" in error
    assert not (tmp_path / "out").exists()


def test_tokenizer_that_already_has_align_is_refused_unless_reused(capsys, tmp_path):
    torch.manual_seed(0)
    llava_model, processor = build_llava()
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<align>"]})
    llava_model.resize_token_embeddings(len(processor.tokenizer))
    llava_model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    error = cli_error(capsys, tmp_path / "llava", tmp_path / "out")
    assert "already has <align> (id 300)" in error and "--reuse-alignment-token" in error
    assert main(["from-llava", str(tmp_path / "llava"), str(tmp_path / "out"), "--reuse-alignment-token"]) == 0
    model = AlignGPTForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.config.alignment_token_id == 300 and model.config.text_config.vocab_size == 301
    assert torch.equal(model.lm_head.weight, llava_model.lm_head.weight)


def test_warm_up_that_would_train_nothing_is_refused(make_model):
    with pytest.raises(ValueError, match="are all False: stage 1 would train nothing"):
        freeze_for_pretrain(make_model(), train_vision_tower=False, train_level_table=False, train_projector=False)


def test_multi_layer_llava_is_refused_with_the_reason():
    torch.manual_seed(0)
    llava_model, _ = build_llava()
    config = llava_model.config
    config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match=r"concatenates the vision layers \[-2, -1\]"):
        AlignGPTForConditionalGeneration.from_llava(LlavaForConditionalGeneration(config))
    with pytest.raises(ValueError, match="vision_feature_layer follow the LLaVA checkpoint"):
        AlignGPTForConditionalGeneration.from_llava(llava_model, vision_feature_layer=-1)
    with pytest.raises(TypeError, match="takes a LlavaForConditionalGeneration or its folder"):
        AlignGPTForConditionalGeneration.from_llava(LlavaProcessor)
    with pytest.raises(ConversionError, match="is not a saved transformers LLaVA"):
        convert_llava(ORIGINAL_FIXTURES, "unused")


def test_overwrite_that_fails_midway_keeps_the_old_output_whole(llava, tmp_path, monkeypatch):
    """The new folder is built beside OUTPUT and swapped in only when complete: a save that fails (disk full, a
    kill) leaves the old OUTPUT as it was and no temporary folder behind."""
    from aligngpt_hf.models.processing_aligngpt import AlignGPTProcessor

    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AlignGPTProcessor, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        main(["from-llava", str(llava[0]), str(output), "--overwrite", "--debug"])
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in output.iterdir()] == ["notes.txt"] and (output / "notes.txt").read_text() == "keep me"

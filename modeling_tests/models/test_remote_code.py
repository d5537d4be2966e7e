"""save_pretrained / Auto classes / remote code in a fresh interpreter without aligngpt_hf / pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    pipeline,
)

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration, AlignGPTProcessor
from conftest import package_free_env, user_message

EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_aligngpt.AlignGPTConfig",
    "AutoModel": "modeling_aligngpt.AlignGPTForConditionalGeneration",  # as registered in-library
    "AutoModelForImageTextToText": "modeling_aligngpt.AlignGPTForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_aligngpt.AlignGPTForConditionalGeneration",
    "AutoProcessor": "processing_aligngpt.AlignGPTProcessor",
}


@pytest.fixture
def saved(tmp_path, make_model, processor, images):
    model = make_model(seed=7)
    folder = tmp_path / "tiny-aligngpt"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    prompts = [processor.apply_chat_template(user_message(q), add_generation_prompt=True) for q in ("Hi?", "Colour?")]
    batch = processor(text=prompts, images=images[:2], padding=True, padding_side="left", return_tensors="pt")
    return model, folder, batch


def test_save_writes_remote_code_trio_and_full_auto_map(saved):
    _, folder, _ = saved
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_aligngpt.py",
            "modeling_aligngpt.py", "processing_aligngpt.py", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == EXPECTED_AUTO_MAP and config["model_type"] == "aligngpt"
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_aligngpt.AlignGPTProcessor"}
    assert processor_config["image_seq_length"] == 16
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == sorted([config["image_token_id"], config["alignment_token_id"]])


def test_in_library_auto_classes_round_trip(saved):
    model, folder, batch = saved
    assert isinstance(AutoConfig.from_pretrained(folder), AlignGPTConfig)
    assert isinstance(AutoProcessor.from_pretrained(folder), AlignGPTProcessor)
    assert type(AutoModel.from_pretrained(folder)) is AlignGPTForConditionalGeneration
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        loaded = auto_class.from_pretrained(folder).eval()
        assert isinstance(loaded, AlignGPTForConditionalGeneration)
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert torch.equal(loaded.generate(**batch, max_new_tokens=4, do_sample=False),
                       model.generate(**batch, max_new_tokens=4, do_sample=False))


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["aligngpt_hf"] = None  # make the package unimportable: only the files next to the weights remain
    try:
        import aligngpt_hf  # noqa: F401
        raise SystemExit("aligngpt_hf should not be importable here")
    except ImportError:
        pass
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, pipeline)

    folder, inputs_file, outputs_file = sys.argv[1:4]
    batch = load_file(inputs_file)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules."), type(config).__module__
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "AlignGPTProcessor"
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "AlignGPTForConditionalGeneration" and hasattr(base, "generate")
    outputs = {}
    for name, auto_class in (("itt", AutoModelForImageTextToText), ("clm", AutoModelForCausalLM)):
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            outputs[name + "_logits"] = model(**batch).logits
        outputs[name + "_generated"] = model.generate(**batch, max_new_tokens=4, do_sample=False)
    images = [Image.new("RGB", (40, 24), (200, 30, 30))]
    again = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
        add_generation_prompt=True)], images=images, return_tensors="pt")
    outputs["processed_ids"] = again["input_ids"]
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Hi?"}]}]
    result = pipe(text=chat, max_new_tokens=3, return_full_text=False)
    assert isinstance(result[0]["generated_text"], str), result
    save_file(outputs, outputs_file)
    print("REMOTE_OK")
    """
)


def test_remote_code_load_without_aligngpt_hf(saved, tmp_path, processor):
    model, folder, batch = saved
    inputs_file, outputs_file = tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"
    save_file({k: v.contiguous() for k, v in batch.items()}, inputs_file)
    env = package_free_env(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(inputs_file), str(outputs_file)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]
    remote = load_file(outputs_file)
    with torch.no_grad():
        expected = model(**batch).logits
    expected_generation = model.generate(**batch, max_new_tokens=4, do_sample=False)
    for name in ("itt", "clm"):
        assert torch.equal(remote[name + "_logits"], expected)
        assert torch.equal(remote[name + "_generated"], expected_generation)
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    local = processor(text=[processor.apply_chat_template(user_message("Hi?"), add_generation_prompt=True)],
                      images=[image], return_tensors="pt")
    assert torch.equal(remote["processed_ids"], local["input_ids"])


def test_pipeline_in_library_matches_generate(saved, processor):
    model, folder, _ = saved
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    pipe = pipeline("image-text-to-text", model=str(folder))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}]
    text = pipe(text=chat, max_new_tokens=4, return_full_text=False)[0]["generated_text"]
    inputs = processor(text=[processor.apply_chat_template(user_message("Hi?"), add_generation_prompt=True)],
                       images=[image], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert text == processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_original_format_checkpoint_is_refused_with_convert_hint(tmp_path):
    from conftest import ORIGINAL_FIXTURES

    source = ORIGINAL_FIXTURES / "original_checkpoint"
    with pytest.raises(ValueError, match=r"original-format AlignGPT config .*`aligngpt-hf convert SOURCE OUTPUT`"):
        AutoModelForImageTextToText.from_pretrained(source)
    with pytest.raises(ValueError, match=r"`aligngpt-hf convert SOURCE OUTPUT`"):
        AutoConfig.from_pretrained(source)

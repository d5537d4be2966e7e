"""Bad input to the public model, config and processor API, found by probing from outside: each is refused with a
message naming the field (or sample) and the fix, or read the way the user meant (premultiplied alpha, 2-D arrays)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration
from aligngpt_hf.tiny import build_config
from conftest import user_message

VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def prompt(processor, text="Hi?", num_images=1):
    return processor.apply_chat_template(user_message(text, num_images), add_generation_prompt=True)


@pytest.fixture
def inputs(processor, images):
    return processor(text=[prompt(processor)], images=[images[0]], return_tensors="pt")


# ------------------------------------------------------------------------------------------------ config


def test_config_unknown_projector_activation(tokenizer):
    with pytest.raises(ValueError, match=r"`projector_hidden_act`.*'nope'"):
        build_config(tokenizer, projector_hidden_act="nope")


@pytest.mark.parametrize("name", ["vision_feature_post_layernorm", "multimodal_projector_bias", "tie_word_embeddings"])
def test_config_switch_given_as_a_string(tokenizer, name):
    with pytest.raises(ValueError, match=rf"`{name}` must be True or False, got 'false'"):
        build_config(tokenizer, **{name: "false"})


@pytest.mark.parametrize("name, value", [("abstractor_attention_dropout", 2.0), ("abstractor_attention_dropout", -0.5),
                                         ("abstractor_layer_norm_eps", -1.0)])
def test_config_abstractor_rates_out_of_range(tokenizer, name, value):
    with pytest.raises(ValueError, match=rf"`{name}`"):
        build_config(tokenizer, projector_type="abstractor", **{name: value})


@pytest.mark.parametrize("name", ["vision_config", "text_config"])
def test_config_sub_config_given_as_a_string(name):
    with pytest.raises(TypeError, match=rf"`{name}` must be a dict or a PreTrainedConfig"):
        AlignGPTConfig(**{name: "clip"})


def test_config_text_config_that_is_a_vision_tower():
    with pytest.raises(ValueError, match=r"`text_config`.*clip_vision_model"):
        AlignGPTConfig(vision_config=VISION, text_config={"model_type": "clip_vision_model"})


@pytest.mark.parametrize("change", [{"image_size": -32}, {"patch_size": 0}])
def test_config_vision_sizes_that_are_not_positive(change):
    with pytest.raises(ValueError, match=rf"`vision_config.{next(iter(change))}`"):
        AlignGPTConfig(vision_config={**VISION, **change})


def test_config_misspelt_field_is_named():
    with pytest.warns(UserWarning, match=r"`alignment_modes`.*`alignment_mode`"):
        AlignGPTConfig(vision_config=VISION, alignment_modes="global")


# ------------------------------------------------------------------------------------------------ model inputs


@pytest.mark.parametrize("shape", ["1-D", "3-D", "empty sequence"])
def test_model_input_ids_of_the_wrong_rank_or_length(make_model, inputs, shape):
    ids = inputs["input_ids"]
    ids = {"1-D": ids[0], "3-D": ids[None], "empty sequence": ids[:, :0]}[shape]
    with pytest.raises(ValueError, match=r"`input_ids` has shape .*; expected \(batch, sequence\)"):
        make_model()(input_ids=ids)


@pytest.mark.parametrize("shape", [(1, 5, 7), (5, 32)])
def test_model_inputs_embeds_of_the_wrong_shape(make_model, shape):
    with pytest.raises(ValueError, match=r"`inputs_embeds` has shape .*hidden size 32"):
        make_model()(inputs_embeds=torch.randn(*shape))


def test_model_float_labels(make_model, inputs):
    with pytest.raises(TypeError, match=r"`labels` must hold integer token ids"):
        make_model()(**inputs, labels=inputs["input_ids"].float())


@pytest.mark.parametrize("bad", [10**6, -5])
def test_model_labels_outside_the_vocabulary(make_model, inputs, bad):
    with pytest.raises(ValueError, match=rf"`labels` hold .*{bad}.*-100"):
        make_model()(**inputs, labels=torch.full_like(inputs["input_ids"], bad))


def test_model_alignment_levels_given_as_a_string(make_model, inputs):
    with pytest.raises(TypeError, match=r"`alignment_levels`"):
        make_model()(**inputs, alignment_levels="3")


# ------------------------------------------------------------------------------------------------ processor


def test_processor_align_token_inside_the_question(processor, images):
    text = prompt(processor, "What is <align> this?")
    with pytest.raises(ValueError, match=r"Sample 0.*`<align>`"):
        processor(text=[text], images=[images[0]])


@pytest.mark.parametrize("call", ["chat", "text"])
def test_processor_empty_conversation_or_text_list(processor, call):
    with pytest.raises(ValueError, match=r"empty"):
        processor.apply_chat_template([]) if call == "chat" else processor(text=[], return_tensors="pt")


def test_chat_image_in_an_assistant_message(processor):
    conversation = [{"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "Look."}]}]
    with pytest.raises(ValueError, match=r"message 1.*assistant.*image"):
        processor.apply_chat_template(conversation)


def test_processor_image_path_that_is_a_folder(processor, tmp_path):
    with pytest.raises(IsADirectoryError, match=r"images\[0\]: .* is a folder"):
        processor(text=[prompt(processor)], images=[str(tmp_path)])


def test_processor_premultiplied_alpha_image(processor):
    image = Image.new("La", (20, 10))
    assert processor(text=[prompt(processor)], images=[image], return_tensors="pt")["pixel_values"].shape[0] == 1


def test_processor_grayscale_numpy_array(processor):
    batch = processor(text=[prompt(processor)], images=[np.zeros((20, 10), np.uint8)], return_tensors="pt")
    assert batch["pixel_values"].shape[0] == 1


def test_processor_negative_max_length(processor, images):
    with pytest.raises(ValueError, match=r"max_length"):
        processor(text=[prompt(processor)], images=[images[0]], truncation=True, max_length=-5)


@pytest.mark.parametrize("value", [0, -1, "16", 16.0, True])
def test_processor_image_seq_length_that_is_not_a_positive_integer(tokenizer, processor, value):
    from aligngpt_hf import AlignGPTProcessor

    with pytest.raises(ValueError, match=r"`image_seq_length` must be a positive integer"):
        AlignGPTProcessor(image_processor=processor.image_processor, tokenizer=tokenizer, image_seq_length=value)


@pytest.mark.parametrize("template", ["vicuna_v1", "vicuna_v9"])
def test_processor_chat_template_given_as_a_format_name(tokenizer, processor, template):
    from aligngpt_hf import AlignGPTProcessor

    conversation = [{"role": "user", "content": "Hi?"}]
    try:
        custom = AlignGPTProcessor(image_processor=processor.image_processor, tokenizer=tokenizer,
                                   chat_template=template)
    except ValueError as error:
        assert "chat_template" in str(error)
        return
    assert custom.apply_chat_template(conversation) == processor.apply_chat_template(conversation)


# ------------------------------------------------------------------------------------------------ loading


def test_from_pretrained_with_truncated_weights(tokenizer, tmp_path):
    torch.manual_seed(0)
    AlignGPTForConditionalGeneration(build_config(tokenizer)).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AlignGPTForConditionalGeneration.from_pretrained(tmp_path)


def test_reference_configs_used_above_are_valid():
    """The valid base the cases above change one field of (so each case fails for its own field)."""
    config = AlignGPTConfig(vision_config=CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"}),
                            text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4),
                            image_token_id=62, alignment_token_id=63)
    assert config.image_seq_length == 16


# ------------------------------------------------------------------------------------------------ more model inputs


@pytest.mark.parametrize("dtype", [torch.uint8, torch.long])
def test_model_integer_pixel_values_are_refused(make_model, inputs, dtype):
    with pytest.raises(TypeError, match=rf"`pixel_values` are {dtype}; the vision tower takes normalised float"):
        make_model()(**{**inputs, "pixel_values": (inputs["pixel_values"] * 50).to(dtype)})


def test_model_five_dimensional_pixel_values_name_the_flat_batch(make_model, inputs):
    with pytest.raises(ValueError, match=r"shape \(1, 1, 3, 32, 32\); expected \(num_images, channels, height, width\)"
                                         r"\. Give all images as one flat batch"):
        make_model()(**{**inputs, "pixel_values": inputs["pixel_values"][None]})


@pytest.mark.parametrize("name", ["position_ids", "gate_text_mask"])
def test_model_per_token_inputs_of_the_wrong_length(make_model, inputs, name):
    length = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"`{name}` has shape \(1, 3\) but the input has \(1, {length}\)"):
        make_model()(**inputs, **{name: torch.ones(1, 3, dtype=torch.long)})


def test_model_labels_given_as_a_list(make_model, inputs):
    with pytest.raises(TypeError, match=r"`labels` must be a tensor of token ids, got list"):
        make_model()(**inputs, labels=inputs["input_ids"].tolist())


def test_processor_array_with_nan_pixels_is_named(processor):
    with pytest.raises(ValueError, match=r"images\[0\] holds NaN or infinite pixel values"):
        processor(text=[prompt(processor)], images=[np.full((20, 10, 3), np.nan)])


def test_from_llava_refuses_a_checkpoint_with_a_missing_tensor(tmp_path):
    """transformers would fill the missing tensor randomly; the LLaVA would not be itself, so nothing is returned."""
    from safetensors.torch import load_file, save_file

    from aligngpt_hf.tiny import build_llava

    torch.manual_seed(0)
    build_llava()[0].save_pretrained(tmp_path / "llava")
    state = load_file(tmp_path / "llava" / "model.safetensors")
    state.pop(next(key for key in state if key.endswith("multi_modal_projector.linear_1.bias")))
    save_file(state, tmp_path / "llava" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"llava does not hold a whole LLaVA: missing \[.*multi_modal_projector\.linear_1"
                                         r"\.bias.*Re-download or re-save"):
        AlignGPTForConditionalGeneration.from_llava(tmp_path / "llava")

"""Bad input, models layer: bad input to the processor, config and model fails loudly, naming the input and the fix.

Each test is named after the case; each asserts the exception type and the key words of its message.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from aligngpt_hf.models.image_processing_utils_aligngpt import load_image, to_rgb
from aligngpt_hf.paths import resolve_image_path
from aligngpt_hf.tiny import build_config, build_processor
from conftest import user_message


def prompt(processor, text="Hi?", num_images=1):
    return processor.apply_chat_template(user_message(text, num_images), add_generation_prompt=True)


def batch_for(processor, images, count=2):
    return processor(text=[prompt(processor)] * count, images=[[image] for image in images[:count]],
                     return_tensors="pt")


# ------------------------------------------------------------------------------------------------ images


def test_16_bit_image_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16))
    assert image.mode == "I;16"
    assert np.array(to_rgb(image))[0, 0].tolist() == [30000 // 257] * 3  # 116, not 255


def test_rgba_is_composited_on_white_everywhere(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.save(tmp_path / "a.png")
    assert np.array(to_rgb(image))[0, 0].tolist() == [255, 255, 255]
    assert np.array(load_image(str(tmp_path / "a.png")))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert np.array(to_rgb(half))[0, 0].tolist() == [127, 127, 127]


def test_processor_rgba_matches_rgb_on_white(processor):
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    got = processor(text=[prompt(processor)], images=[rgba], return_tensors="pt")["pixel_values"]
    want = processor(text=[prompt(processor)], images=[white], return_tensors="pt")["pixel_values"]
    assert torch.equal(got, want)


def test_zero_by_zero_image_in_images(processor):
    with pytest.raises(ValueError, match=r"^images\[0\] is empty \(0x0 pixels\); give an image with pixels\.$"):
        processor(text=[prompt(processor)], images=[Image.new("RGB", (0, 0))], return_tensors="pt")


def test_non_image_object_in_images(processor):
    with pytest.raises(TypeError, match=r"^images\[0\]\[0\] is a dict, not an image: pass a PIL image, a path"):
        processor(text=[prompt(processor)], images=[[{"not": "an image"}]], return_tensors="pt")
    with pytest.raises(TypeError, match=r"^images\[1\] is a int, not an image"):
        processor(text=[prompt(processor)] * 2, images=[Image.new("RGB", (8, 8)), 7], return_tensors="pt")


def test_unreadable_image_file_names_the_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"^record 7: .*x\.png is not a readable image \(UnidentifiedImageError"):
        load_image(str(tmp_path / "x.png"), where="record 7")


def test_image_path_outside_the_folder_is_refused(tmp_path):
    for value in ("../outside.png", "../../x", str(tmp_path.parent / "abs.png")):
        with pytest.raises(ValueError, match=r"^record 'r1': image path .* outside the image folder .*"
                                             r"allow_outside_image_folder=True` \(CLI: --allow-outside-image-folder\)"):
            resolve_image_path(value, tmp_path, where="record 'r1'")
    assert resolve_image_path("../outside.png", tmp_path, allow_outside=True) == str(tmp_path.parent / "outside.png")
    assert resolve_image_path("sub/../a.png", tmp_path) == str(tmp_path / "a.png")


# ------------------------------------------------------------------------------------------------ chat template


def test_chat_template_unknown_content_type(processor):
    messages = [{"role": "user", "content": [{"type": "input_image"}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(ValueError, match=r"^message 0, content part 0 has type 'input_image'; accepted types: "
                                         r"\['image', 'text'\]"):
        processor.apply_chat_template(messages, add_generation_prompt=True)


def test_chat_template_content_given_as_a_dict(processor):
    messages = [{"role": "user", "content": {"type": "text", "text": "Hi"}}]
    with pytest.raises(TypeError, match=r"^message 0 has content of type dict; give a string or a list of parts"):
        processor.apply_chat_template(messages, add_generation_prompt=True)


def test_chat_template_unknown_role(processor):
    messages = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]
    with pytest.raises(ValueError, match=r"^message 1 has role 'bot'; AlignGPT's chat template knows only "
                                         r"\['system', 'user', 'assistant'\]\.$"):
        processor.apply_chat_template(messages)


def test_chat_template_system_message_after_the_first(processor):
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]
    with pytest.raises(ValueError, match=r"^message 1 is a `system` message; only the first message may be one\.$"):
        processor.apply_chat_template(messages)


def test_chat_template_batch_names_the_conversation(processor):
    good = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match=r"^conversation 1, message 0 has role 'human'"):
        processor.apply_chat_template([good, [{"role": "human", "content": "Hi"}]])


# ------------------------------------------------------------------------------------------------ truncation


@pytest.mark.parametrize("side", ["left", "right"])
def test_processor_truncation_through_image_or_align_is_refused(processor, images, side):
    text = prompt(processor, "Describe this picture in a few words please.")
    processor.tokenizer.truncation_side = side
    try:
        needed = processor(text=[text], images=[images[0]], return_tensors="pt")["input_ids"].shape[1]
        with pytest.raises(ValueError, match=rf"^Sample 0 needs {needed} tokens \(its image tokens and `<align>` "
                                             rf"included\) but truncating it to max_length=12 \({side} side\) would cut "
                                             r"its image placeholders or BOS/`<align>`\. Raise `max_length`"):
            processor(text=[text], images=[images[0]], truncation=True, max_length=12, return_tensors="pt")
    finally:
        processor.tokenizer.truncation_side = "right"


def test_processor_left_truncation_cutting_bos_and_align(processor, images):
    text = prompt(processor)
    needed = processor(text=[text], images=[images[0]], return_tensors="pt")["input_ids"].shape[1]
    processor.tokenizer.truncation_side = "left"
    try:
        with pytest.raises(ValueError, match=rf"^Sample 0 needs {needed} tokens .* max_length={needed - 2} \(left "
                                             r"side\) would cut its image placeholders or BOS/`<align>`"):
            processor(text=[text], images=[images[0]], truncation=True, max_length=needed - 2, return_tensors="pt")
    finally:
        processor.tokenizer.truncation_side = "right"


def test_processor_truncation_that_keeps_image_and_align_is_allowed(processor, images):
    text = prompt(processor)
    full = processor(text=[text], images=[images[0]], return_tensors="pt")["input_ids"]
    cut = processor(text=[text], images=[images[0]], truncation=True, max_length=full.shape[1] - 1,
                    return_tensors="pt")["input_ids"]
    assert torch.equal(cut[0], full[0, :-1])


# ------------------------------------------------------------------------------------------------ config


def test_config_image_token_id_equal_to_eos_is_refused_when_the_model_is_built(tokenizer):
    from aligngpt_hf import AlignGPTForConditionalGeneration

    config = build_config(tokenizer)
    config.image_token_id = config.text_config.eos_token_id
    with pytest.raises(ValueError, match=rf"^`image_token_id={config.image_token_id}` is also the text model's "
                                         r"`eos_token_id`; `<image>`/`<align>` need their own tokens"):
        AlignGPTForConditionalGeneration(config)


def test_config_image_token_id_beyond_the_vocabulary_is_refused_when_the_model_is_built(tokenizer):
    from aligngpt_hf import AlignGPTForConditionalGeneration

    config = build_config(tokenizer)
    vocab = config.text_config.vocab_size
    config.alignment_token_id = vocab + 5
    with pytest.raises(ValueError, match=rf"^`alignment_token_id={vocab + 5}` is outside the language model's "
                                         rf"vocabulary \(0\.\.{vocab - 1}\)\. Add the token"):
        AlignGPTForConditionalGeneration(config)


def test_config_vision_feature_layer_out_of_range(tokenizer):
    with pytest.raises(ValueError, match=r"^`vision_feature_layer=-9` is outside the vision tower's 3 hidden states "
                                         r"\(embeddings \+ 2 layers\): use a value in -3\.\.2"):
        build_config(tokenizer, vision_feature_layer=-9)


@pytest.mark.parametrize("name", ["gate_hidden_size", "abstractor_num_queries"])
def test_config_non_positive_size(tokenizer, name):
    with pytest.raises(ValueError, match=rf"^`{name}` must be a positive integer, got -4\.$"):
        build_config(tokenizer, **{name: -4})


# ------------------------------------------------------------------------------------------------ model forward


def test_model_attention_mask_batch_size_mismatch(make_model, processor, images):
    batch = batch_for(processor, images)
    batch["attention_mask"] = batch["attention_mask"][:1]
    with pytest.raises(ValueError, match=r"^`attention_mask` has shape \(1, \d+\) but the input ids have \(2, \d+\)"):
        make_model()(**batch)


def test_model_pixel_values_without_batch_dimension(make_model, processor, images):
    batch = batch_for(processor, images, count=1)
    batch["pixel_values"] = batch["pixel_values"][0]
    with pytest.raises(ValueError, match=r"^`pixel_values` has shape \(3, 32, 32\); expected \(num_images, channels, "
                                         r"height, width\)\. Add the batch dimension"):
        make_model()(**batch)


@pytest.mark.parametrize("with_image", [True, False])
def test_model_token_id_beyond_the_vocabulary(make_model, processor, images, with_image):
    model = make_model()
    vocab = model.get_input_embeddings().num_embeddings
    batch = batch_for(processor, images) if with_image else processor(text=["Hello there", "Hi"], padding=True,
                                                                      return_tensors="pt")
    batch["input_ids"][1, 2] = vocab + 3
    with pytest.raises(ValueError, match=rf"^Samples \[1\] hold token id\(s\) \[{vocab + 3}\], outside the embedding "
                                         rf"table \(0\.\.{vocab - 1}\)\. Tokenize with the model's own processor"):
        model(**batch)


def test_model_float_alignment_levels_are_refused(make_model, processor, images):
    with pytest.raises(TypeError, match=r"^`alignment_levels` must be integers \(level 0\.\.N-1\), got torch\.float32 "
                                        r"values \[2\.7"):
        make_model()(**batch_for(processor, images), alignment_levels=[2.7, 3.9])


def test_model_loss_on_an_all_ignored_batch(make_model, processor, images):
    batch = batch_for(processor, images)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 0] = batch["input_ids"][:, 0]  # the first position is never predicted: still nothing to learn
    with pytest.raises(ValueError, match=r"^Every label of this batch is -100 \(after the one-token shift\): nothing "
                                         r"would be learned and the loss would be NaN"):
        make_model()(**batch, labels=labels)


def test_all_ignored_micro_batch_under_gradient_accumulation_is_a_zero_loss(make_model, processor, images):
    """With `num_items_in_batch` the loss is a sum over the accumulated batch's tokens: such a micro-batch adds 0."""
    batch = batch_for(processor, images)
    labels = torch.full_like(batch["input_ids"], -100)
    loss = make_model()(**batch, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    assert loss.item() == 0.0


def test_saved_folder_carries_the_image_loader(make_model, processor, tmp_path):
    make_model().save_pretrained(tmp_path)
    assert (tmp_path / "image_processing_utils_aligngpt.py").is_file()
    assert (tmp_path / "processing_aligngpt.py").is_file()


def test_processor_text_that_is_not_a_string(processor, images):
    with pytest.raises(TypeError, match=r"^`text` must be a string or a list of strings, got int '5'; render "
                                        r"conversations with `processor\.apply_chat_template"):
        processor(text=5, images=[images[0]], return_tensors="pt")


def test_model_float_input_ids(make_model, processor, images):
    batch = batch_for(processor, images)
    batch["input_ids"] = batch["input_ids"].float()
    with pytest.raises(TypeError, match=r"^`input_ids` must hold integer token ids, got torch\.float32"):
        make_model()(**batch)


def test_model_empty_batch(make_model):
    with pytest.raises(ValueError, match=r"^The input holds no samples \(shape \(0, 5\)\); give at least one\.$"):
        make_model()(input_ids=torch.zeros(0, 5, dtype=torch.long))


@pytest.mark.parametrize("shape", [(2, 2, 32, 32), (2, 3, 48, 48)])
def test_model_pixel_values_with_the_wrong_channels_or_size(make_model, processor, images, shape):
    batch = batch_for(processor, images)
    batch["pixel_values"] = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"^`pixel_values` has shape {re.escape(str(shape))}; the vision tower takes 3 "
                                         r"channels at 32x32 pixels\. Build inputs with the model's own processor"):
        make_model()(**batch)


def test_model_labels_shaped_unlike_the_input(make_model, processor, images):
    batch = batch_for(processor, images)
    with pytest.raises(ValueError, match=r"^`labels` has shape \(2, 3\) but the input has \(2, \d+\) \(batch, "
                                         r"sequence\); give one label per input token"):
        make_model()(**batch, labels=torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ mode and pixels


def test_alignment_levels_refused_by_mode_none(make_model, tokenizer, images):
    """`alignment_mode='none'` has no level table: levels given to it were silently ignored."""
    processor = build_processor(tokenizer, add_alignment_token=False)
    batch = batch_for(processor, images)
    model = make_model(alignment_mode="none")
    with pytest.raises(ValueError, match=r"^`alignment_levels` was given, but this model has `alignment_mode='none'`: "
                                         r"it has no level table and no `<align>` token, so levels cannot be applied\. "
                                         r"Drop `alignment_levels`"):
        model(**batch, alignment_levels=torch.tensor([1, 2]))
    model(**batch)  # without levels it runs


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_name_the_image_at_inference(make_model, processor, images, bad):
    batch = batch_for(processor, images)
    batch["pixel_values"][1, 0, 3, 4] = bad
    model = make_model()
    message = (r"^Image\(s\) \[1\] of the batch \(index among its images, in order\) give NaN or inf features: their "
               r"`pixel_values` hold NaN or inf values \(build them with the model's processor")
    with pytest.raises(ValueError, match=message):
        model(**batch)
    with pytest.raises(ValueError, match=message):
        model.generate(**batch, max_new_tokens=2)


def test_non_finite_pixels_stop_a_training_batch_before_the_loss(make_model, processor, images):
    batch = batch_for(processor, images, count=2)
    batch["pixel_values"][0] = float("nan")
    model = make_model().train()
    with pytest.raises(ValueError, match=r"^Image\(s\) \[0\] of the batch"):
        model(**batch, labels=batch["input_ids"])
    with pytest.raises(ValueError, match=r"^Image\(s\) \[0\] of the batch"):
        model.model(**batch)  # TRL's fused head trains through the base model

"""The native contract: what a user does with transformers' LLaVA works the same way with AlignGPT.

One behavioural test per item (loss kwargs under gradient accumulation, image input forms, tuples, assisted decoding,
inputs_embeds, compiled static-cache decoding, get_image_features, processor offsets, one Auto mapping). transformers'
own common tests run from modeling_tests/models/test_transformers_common.py when their source is available.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CompileConfig,
    Trainer,
    TrainingArguments,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from aligngpt_hf import AlignGPTForConditionalGeneration
from aligngpt_hf.models.configuration_aligngpt import REMOTE_AUTO_MAP
from conftest import user_message

QUESTIONS = ("Hi?", "What colour is the thing in the picture?", "Colour?", "Is it red or blue, tell me please?")


def _prompts(processor, count):
    return [processor.apply_chat_template(user_message(QUESTIONS[i % len(QUESTIONS)]), add_generation_prompt=True)
            for i in range(count)]


@pytest.fixture
def batch(processor, images):
    return processor(text=_prompts(processor, 2), images=images[:2], padding=True, padding_side="left",
                     return_tensors="pt")


# ---- 1. loss kwargs: plain transformers.Trainer with gradient accumulation -------------------------------------


def _rows(processor, images, kinds):
    """Unpadded training rows of different lengths: image rows (`<align>` + image tokens) and text-only rows."""
    rows = []
    for index, kind in enumerate(kinds):
        answer = " It is red." * (1 + index % 3)
        if kind == "image":
            text = _prompts(processor, index + 1)[index] + answer
            encoded = processor(text=[text], images=[images[index % len(images)]], return_tensors="pt")
        else:
            text = processor.apply_chat_template([{"role": "user", "content": QUESTIONS[index % 4]}],
                                                 add_generation_prompt=True) + answer
            encoded = processor(text=[text], return_tensors="pt")
        ids = encoded["input_ids"][0]
        labels = ids.clone()
        labels[: len(ids) // 2] = -100  # the prompt half: a different number of supervised tokens per row
        row = {"input_ids": ids, "labels": labels}
        if kind == "image":
            row["pixel_values"] = encoded["pixel_values"]
        rows.append(row)
    return rows


def _collate(rows, pad_id):
    length = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.stack([torch.cat([r["input_ids"], r["input_ids"].new_full((length - len(r["input_ids"]),),
                                                                                      pad_id)]) for r in rows]),
        "labels": torch.stack([torch.cat([r["labels"], r["labels"].new_full((length - len(r["labels"]),), -100)])
                               for r in rows]),
        "attention_mask": torch.stack([torch.arange(length) < len(r["input_ids"]) for r in rows]).long(),
    }
    pixels = [r["pixel_values"] for r in rows if "pixel_values" in r]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def _train_one_step(make_model, rows, pad_id, batch_size, accumulation, tmp_path):
    model = make_model(seed=3).train()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd", max_grad_norm=1e9,
        logging_steps=1, report_to="none", use_cpu=True, remove_unused_columns=False, save_strategy="no",
        dataloader_drop_last=False, seed=0, data_seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda r: _collate(r, pad_id))
    trainer.train()
    return trainer.state.log_history[0]["loss"], {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("kinds", [["image"] * 8, ["text"] * 8, ["image", "text"] * 4], ids=["image", "text", "mix"])
def test_trainer_gradient_accumulation_equals_full_batch(make_model, processor, images, tmp_path, kinds):
    """Batch 8 x GA 1 and batch 2 x GA 4 on the same rows: same logged loss, same weights after one SGD step."""
    rows = _rows(processor, images, kinds)
    pad_id = processor.tokenizer.pad_token_id
    full_loss, full_weights = _train_one_step(make_model, rows, pad_id, 8, 1, tmp_path)
    accumulated_loss, accumulated_weights = _train_one_step(make_model, rows, pad_id, 2, 4, tmp_path)
    assert accumulated_loss == pytest.approx(full_loss, rel=1e-5)
    initial = make_model(seed=3).state_dict()
    for name, weight in full_weights.items():
        torch.testing.assert_close(accumulated_weights[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    assert sum(not torch.equal(weight, initial[name]) for name, weight in full_weights.items()) > 10  # a real step


def test_loss_kwargs_reach_the_loss_function(make_model, batch):
    """`shift_labels` (pre-shifted labels, as context-parallel training passes them) and `num_items_in_batch`."""
    model = make_model()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    half = shifted.clone()
    half[:, : half.shape[1] // 2] = -100  # a target the labels do not give: only the loss function can apply it
    with torch.no_grad():
        out = model(**batch, labels=labels)
        pre_shifted = model(**batch, labels=labels, shift_labels=half).loss
        summed = model(**batch, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), half.flatten(), ignore_index=-100)
    torch.testing.assert_close(pre_shifted, expected)
    torch.testing.assert_close(summed, out.loss * (shifted != -100).sum())  # a sum over tokens, divided by 1


# ---- 2. image input forms ------------------------------------------------------------------------------------


def test_processor_accepts_every_image_form_llava_does(processor, images, tmp_path):
    path = tmp_path / "red.png"
    images[0].save(path)
    prompt = _prompts(processor, 1)[0]
    reference = processor(text=[prompt], images=[images[0]], return_tensors="pt")
    for text, given in ((prompt, images[0]), (prompt, [images[0]]), ([prompt], [[images[0]]]), (prompt, str(path)),
                        ([prompt], [str(path)])):
        out = processor(text=text, images=given, return_tensors="pt")
        assert torch.equal(out["input_ids"], reference["input_ids"]), type(given)
        assert torch.equal(out["pixel_values"], reference["pixel_values"]), type(given)


# ---- 3. return_dict=False ------------------------------------------------------------------------------------


def test_return_dict_false_gives_the_output_tuple(make_model, batch):
    model = make_model()
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        base_tuple = model.model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    assert torch.equal(as_tuple[0], as_dict.logits)  # loss is None: logits first, as in LLaVA
    assert list(as_dict.keys())[:2] == ["logits", "cache" if "cache" in as_dict else "past_key_values"]
    torch.testing.assert_close(as_tuple[-1], as_dict.alignment_weights, equal_nan=True)  # the last field
    assert torch.equal(base_tuple[0], model.model(**batch).last_hidden_state)


# ---- 4. assisted and prompt-lookup decoding ------------------------------------------------------------------


def test_assisted_and_prompt_lookup_decoding_equal_greedy(make_model, batch):
    model, draft = make_model(seed=0), make_model(seed=1)
    one = {key: value[1:] for key, value in batch.items()}  # transformers' assisted decoding takes batch size 1
    greedy = model.generate(**one, max_new_tokens=8, do_sample=False)
    assisted = model.generate(**one, max_new_tokens=8, do_sample=False, assistant_model=draft)
    lookup = model.generate(**one, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy) and torch.equal(lookup, greedy)


def test_assisted_decoding_with_a_text_only_draft_equals_greedy(make_model, batch):
    """A draft of the same tokenizer that takes no images (the language model alone): transformers pre-encodes the
    images (`mm_encoder_outputs`), so no `pixel_values` reach the draft."""
    model = make_model(seed=0)
    draft = AutoModelForCausalLM.from_config(model.config.text_config)
    one = {key: value[1:] for key, value in batch.items()}
    greedy = model.generate(**one, max_new_tokens=8, do_sample=False)
    assisted = model.generate(**one, max_new_tokens=8, do_sample=False, assistant_model=draft)
    assert torch.equal(assisted, greedy)


def test_beam_search_runs_the_vision_tower_once_per_image(make_model, batch):
    """`generate` encodes the images once (`get_image_features`) and expands the features over the beams."""
    model = make_model(seed=2)
    images_seen = []
    model.model.vision_tower.register_forward_pre_hook(lambda module, args: images_seen.append(args[0].shape[0]))
    beams = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
    assert images_seen == [2]  # one pass, over the batch's two images, not one per beam or per step
    features = model.get_image_features(batch["pixel_values"])
    images_seen.clear()
    text = {key: value for key, value in batch.items() if key != "pixel_values"}
    again = model.generate(**text, mm_encoder_outputs={"image": features}, max_new_tokens=5, num_beams=3,
                           do_sample=False)
    assert images_seen == [] and torch.equal(again, beams)


def test_mm_encoder_outputs_equal_pixel_values(make_model, batch):
    model = make_model()
    with torch.no_grad():
        from_pixels = model(**batch)
        features = model.get_image_features(batch["pixel_values"])
        pre_encoded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            mm_encoder_outputs={"image": features})
    torch.testing.assert_close(pre_encoded.logits, from_pixels.logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"^Pass `pixel_values` or `mm_encoder_outputs`, not both"):
        model(**batch, mm_encoder_outputs={"image": features})


def test_processor_reports_image_tokens_as_llava_does(processor):
    """`_get_num_multimodal_tokens` is what serving engines ask a LLaVA processor for."""
    data = processor._get_num_multimodal_tokens(image_sizes=[(48, 64), (300, 20)])
    assert data.num_image_tokens == [16, 16] and data.num_image_patches == [1, 1]
    from transformers import LlavaProcessor

    assert isinstance(processor, LlavaProcessor)


def test_classes_are_llava_subclasses(make_model):
    from transformers import LlavaForConditionalGeneration, LlavaModel

    model = make_model()
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(model.model, LlavaModel)


def test_placeholders_without_pixels_still_refused_outside_generation(make_model, batch):
    with pytest.raises(ValueError, match=r"contain `<image>` tokens but no `pixel_values` were given"):
        make_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


# ---- 5. inputs_embeds with pixel_values ----------------------------------------------------------------------


def test_inputs_embeds_with_pixels_equal_the_input_ids_path(make_model, batch):
    model = make_model()
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        by_ids = model(**batch)
        by_embeds = model(inputs_embeds=embeds, pixel_values=batch["pixel_values"],
                          attention_mask=batch["attention_mask"])
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, atol=0, rtol=0)
    torch.testing.assert_close(by_embeds.alignment_weights, by_ids.alignment_weights, equal_nan=True)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    from_embeds = model.generate(inputs_embeds=embeds, pixel_values=batch["pixel_values"],
                                 attention_mask=batch["attention_mask"], max_new_tokens=6, do_sample=False)
    assert torch.equal(from_embeds, generated[:, batch["input_ids"].shape[1]:])


def test_inputs_embeds_finds_placeholders_after_prepended_vectors(make_model, batch):
    """What prompt tuning does: learned vectors in front; the placeholders are still found by value."""
    model = make_model()
    embeds = model.get_input_embeddings()(batch["input_ids"])
    virtual = torch.randn(2, 3, embeds.shape[-1])
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        out = model(inputs_embeds=torch.cat([virtual, embeds], 1), pixel_values=batch["pixel_values"],
                    attention_mask=mask)
        reference = model(**batch)
    assert out.image_hidden_states.shape == reference.image_hidden_states.shape
    assert not torch.isnan(out.alignment_weights).any()


# ---- 6. static cache + torch.compile -------------------------------------------------------------------------


def test_compiled_static_cache_decoding_equals_eager_greedy(make_model, batch):
    """Decoding steps compiled with fullgraph=True (dynamo's `eager` backend: the full trace, no code generation, so
    the test stays fast; modeling_tests/benchmarks/bench_compile.py runs inductor and times it)."""
    model = make_model()
    assert AlignGPTForConditionalGeneration._can_compile_fullgraph
    eager = model.generate(**batch, max_new_tokens=6, do_sample=False)
    config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    compiled = model.generate(**batch, max_new_tokens=6, do_sample=False, cache_implementation="static",
                              compile_config=config)
    assert hasattr(model, "_compiled_call")  # the compiled path really ran
    assert torch.equal(compiled, eager)


# ---- 7. get_image_features -----------------------------------------------------------------------------------


def test_get_image_features_returns_llava_style_output(make_model, batch):
    model = make_model()
    config = model.config
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"])
        as_tuple = model.get_image_features(batch["pixel_values"], return_dict=False)
        with_hidden = model.get_image_features(batch["pixel_values"], output_hidden_states=True)
        forward = model(**batch)
    assert isinstance(features, BaseModelOutputWithPooling) and isinstance(as_tuple, tuple)
    assert len(features.pooler_output) == 2 and features.pooler_output[0].shape == (16, config.text_config.hidden_size)
    torch.testing.assert_close(torch.stack(features.pooler_output), forward.image_hidden_states)
    assert features.last_hidden_state.shape == (2, 17, config.vision_config.hidden_size)
    assert len(with_hidden.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert all(state is not None for state in with_hidden.hidden_states)
    assert isinstance(forward.image_outputs, BaseModelOutputWithPooling)
    full = model.get_image_features(batch["pixel_values"], vision_feature_select_strategy="full")
    assert full.pooler_output[0].shape[0] == 17


# ---- 8. processor signature and replacement offsets ----------------------------------------------------------


def test_replacement_offsets_name_exact_spans(processor, images):
    """Image entries index their expansion in the final text; the `<align>` insertion is a zero-width entry of its own
    type ("alignment"), first in the sample's list, so modality consumers that filter on "image" are unaffected."""
    prompt = _prompts(processor, 1)[0]
    out = processor(text=[prompt], images=[images[0]], return_text_replacement_offsets=True)
    expanded, _ = processor.get_text_with_replacements([prompt], ["<image>" * 16])
    entries = out["text_replacement_offsets"][0]
    assert [entry["type"] for entry in entries] == ["alignment", "image"]
    alignment, image = entries
    assert alignment["span"][0] == alignment["span"][1] and alignment["text"] == ""
    for entry in entries:
        start, end = entry["new_span"]
        assert expanded[0][start:end] == entry["replacement"]
    assert image["replacement"] == "<image>" * 16


def test_videos_and_audio_are_refused_in_every_form(processor, images):
    for name in ("videos", "audio"):
        with pytest.raises(ValueError, match=rf"^AlignGPT takes images and text only; got non-empty `{name}`\.$"):
            processor(text="hi", **{name: torch.zeros(2, 3, 8, 8)})


# ---- 9. one Auto mapping -------------------------------------------------------------------------------------


def test_auto_classes_agree_with_saved_auto_map(make_model, tmp_path):
    folder = tmp_path / "m"
    make_model().save_pretrained(folder)
    assert REMOTE_AUTO_MAP["AutoModel"] == "modeling_aligngpt.AlignGPTForConditionalGeneration"
    for auto_class in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
        assert type(auto_class.from_pretrained(folder)) is AlignGPTForConditionalGeneration
        assert type(auto_class.from_pretrained(folder, trust_remote_code=True)) is AlignGPTForConditionalGeneration


def test_lmms_eval_generic_wrapper_gets_a_generation_model_when_installed(make_model, processor, tmp_path):
    """lmms-eval's `--model huggingface` loads custom types with AutoModel; with aligngpt_hf imported (its entry point
    does so) the in-library registration decides, and it must give a model with `generate`."""
    wrapper = pytest.importorskip("lmms_eval.models.chat.huggingface", reason="lmms-eval not installed").Huggingface
    folder = tmp_path / "m"
    make_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    lm = wrapper(pretrained=str(folder), trust_remote_code=True, device="cpu", device_map="cpu")
    assert type(lm.model) is AlignGPTForConditionalGeneration

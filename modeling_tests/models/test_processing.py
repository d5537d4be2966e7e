"""AlignGPTProcessor: template, token counts, ALIGN placement, pad-to-square pixels, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aligngpt_hf import AlignGPTProcessor
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_SYSTEM
from conftest import user_message

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_chat_template_renders_the_original_vicuna_v1_prompt(processor):
    conversation = user_message("What is it?") + [
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And its colour?"},
    ]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == (
        "<s>" + VICUNA_V1_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And its colour? ASSISTANT:"
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(system, add_generation_prompt=True) == "<s>Be brief. USER: Hi ASSISTANT:"


def test_image_expansion_and_align_right_after_bos(processor, images):
    prompts = [processor.apply_chat_template(user_message("Q?", num_images=n), add_generation_prompt=True)
               for n in (1, 2, 0)]
    batch = processor(text=prompts, images=[[images[0]], images[1:], []], padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    assert (ids == processor.image_token_id).sum(-1).tolist() == [16, 32, 0]
    assert (ids == processor.alignment_token_id).sum(-1).tolist() == [1, 1, 0]
    bos = processor.tokenizer.bos_token_id
    assert ids[:2, 0].tolist() == [bos, bos] and ids[:2, 1].tolist() == [processor.alignment_token_id] * 2
    assert ids[2, 0].item() == bos and (ids[:, 0] == bos).all()
    assert (ids == bos).sum().item() == 3  # BOS written once by the template, not again by the tokenizer
    assert batch["pixel_values"].shape == (3, 3, 32, 32)


def test_no_bos_tokenizer_puts_align_first(processor, images):
    processor.tokenizer.bos_token = None
    try:
        batch = processor(text=["<image>\nhi"], images=[images[0]], add_special_tokens=False)
    finally:
        processor.tokenizer.bos_token = "<s>"
    assert batch["input_ids"][0][0] == processor.alignment_token_id


def test_padding_side_and_text_only_inputs(processor):
    left = processor(text=["<s>a", "<s>a longer text"], padding=True, padding_side="left", return_tensors="pt")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert "pixel_values" not in left
    right = processor(text=["<s>a", "<s>a longer text"], padding=True, padding_side="right", return_tensors="pt")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0


def test_empty_videos_and_audios_are_accepted_non_empty_refused(processor, images):
    batch = processor(text=["<s><image>hi"], images=[images[0]], videos=[], audios=[], return_tensors="pt")
    assert batch["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match=r"^AlignGPT takes images and text only; got non-empty `videos`\.$"):
        processor(text=["hi"], videos=[np.zeros((2, 8, 8, 3))])


def test_pad_to_square_matches_hand_computation(processor):
    image = Image.new("RGB", (40, 20), (250, 10, 10))
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    side, fill = 40, tuple(int(255 * m) for m in CLIP_MEAN)
    assert fill == (122, 116, 104)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - 40) // 2, (side - 20) // 2))
    resized = np.asarray(canvas.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = torch.from_numpy(((resized - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)).float()
    torch.testing.assert_close(pixels, expected, atol=1e-4, rtol=1e-4)
    assert pixels[:, 0, 16].tolist() == pytest.approx([(f / 255 - m) / s for f, m, s in zip(fill, CLIP_MEAN, CLIP_STD)],
                                                      abs=1e-5)  # top band = mean colour


def test_square_mode_resizes_and_crops_without_padding(tokenizer):
    from aligngpt_hf.tiny import build_processor

    square = build_processor(tokenizer, aspect_ratio="square")
    image = Image.new("RGB", (64, 32), (250, 10, 10))
    pixels = square.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    expected_red = (250 / 255 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert pixels[0].min().item() == pytest.approx(expected_red, abs=1e-4)  # no mean-colour band


def test_placeholder_count_errors_name_the_sample(processor, images):
    with pytest.raises(ValueError, match=r"^Sample 1 has 2 `<image>` placeholder\(s\) but 1 image\(s\)\."):
        processor(text=["<image>a", "<image><image>b"], images=[[images[0]], [images[1]]])
    with pytest.raises(ValueError, match=r"^Got 1 image\(s\) for 2 `<image>` placeholder\(s\) \(per sample: \[1, 1\]\)"):
        processor(text=["<image>a", "<image>b"], images=[images[0]])
    with pytest.raises(ValueError, match=r"Found 1 <image> tokens in the text but no images were passed"):
        processor(text=["<image>a"])


def test_tokenizer_without_alignment_token_is_refused(processor):
    from aligngpt_hf.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    vocab_without = {k for k in plain.get_vocab() if k != "<align>"}
    assert "<image>" in vocab_without
    with pytest.raises(ValueError, match=r"^The tokenizer has no `<moved>` token\. Add it first"):
        AlignGPTProcessor(image_processor=processor.image_processor, tokenizer=plain, alignment_token="<moved>")


def test_truncation_that_cuts_image_tokens_raises(images):
    from aligngpt_hf.tiny import build_processor

    processor = build_processor()  # fresh: a failed truncating call leaves the backend tokenizer truncating
    with pytest.raises(ValueError, match=r"^Sample 0 needs 22 tokens \(its image tokens and `<align>` included\) but "
                                         r"truncating it to max_length=8 \(right side\) would cut"):
        processor(text=["<s><image>hello"], images=[images[0]], truncation=True, max_length=8)


def test_processor_round_trip_keeps_settings(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AlignGPTProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == 16 and loaded.chat_template == processor.chat_template
    assert loaded.image_processor.do_pad is True
    assert (tmp_path / "processing_aligngpt.py").is_file()
    text = processor.apply_chat_template(user_message("Hi?"), add_generation_prompt=True)
    image = Image.new("RGB", (30, 20), (1, 2, 3))
    a, b = processor(text=[text], images=[image]), loaded(text=[text], images=[image])
    assert a["input_ids"] == b["input_ids"] and np.allclose(a["pixel_values"], b["pixel_values"])


def _conversations(turns: int) -> list[list[dict]]:
    chats = []
    for num_images in (1, 0, 2):
        chat = user_message("What is it?", num_images=num_images)
        for turn in range(turns):
            chat += [{"role": "assistant", "content": [{"type": "text", "text": f"A cat, answer {turn}."}]},
                     {"role": "user", "content": [{"type": "text", "text": "And then?"}]}]
        chats.append(chat[:-1])
    return chats


@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("add_alignment_token", [True, False])
def test_assistant_masks_cover_exactly_the_answers(processor, images, padding, add_alignment_token):
    """The assistant mask (transformers' rule over the recorded replacements, `<image>` expansion and the inserted
    `<align>`) marks each answer and its EOS, nothing else: multi-turn, 0-2 images, `<align>` inserted or not."""
    import copy
    import itertools

    ours = copy.copy(processor)
    ours.add_alignment_token = add_alignment_token
    for turns in (1, 3):
        kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors=None,
                      processor_kwargs={"padding": padding})
        chats = [[{**m, "content": [dict(part, image=images[0]) if part["type"] == "image" else part
                                    for part in m["content"]]} for m in chat] for chat in _conversations(turns)]
        got = ours.apply_chat_template(chats, **kwargs)
        assert [len(mask) for mask in got["assistant_masks"]] == [len(ids) for ids in got["input_ids"]]
        for ids, mask in zip(got["input_ids"], got["assistant_masks"]):
            runs = [[token for token, _ in run] for on, run in itertools.groupby(zip(ids, mask), key=lambda x: x[1])
                    if on]
            assert [ours.tokenizer.decode(run).strip() for run in runs] == [
                f"A cat, answer {turn}.{ours.tokenizer.eos_token}" for turn in range(turns)]

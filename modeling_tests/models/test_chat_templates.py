"""Chat formats per language-model family: text-only renderings equal the published templates, `<image>` and the
`{% generation %}` spans follow one rule, construction takes the tokenizer's format, `<align>` without BOS, stop tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.utils.chat_template_utils import render_jinja_template

from aligngpt_hf import AlignGPTForConditionalGeneration, AlignGPTProcessor
from aligngpt_hf.models.chat_templates_aligngpt import (
    FORMATS,
    chat_template,
    stop_token_ids,
    template_family,
    template_for_tokenizer,
)
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_CHAT_TEMPLATE
from aligngpt_hf.training.model_setup import with_stop_tokens
from family_builders import FAMILY_TOKENS, OFFICIAL_TEMPLATES, tiny_family_parts

QUESTION, ANSWER = "What colour is the shape? ", " The shape is red. "
CONVERSATIONS = {  # text-only shapes: a prompt, a follow-up prompt, a finished training row, a system prompt
    "prompt": ([{"role": "user", "content": QUESTION}], True),
    "follow-up": ([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER},
                   {"role": "user", "content": "And its size?"}], True),
    "finished": ([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}], False),
    "system": ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": ANSWER}], False),
}
PUBLISHED = {"llama3": "llama3", "qwen2": "chatml", "gemma": "gemma", "mistral": "mistral", "phi3": "phi3"}


def render(template: str, messages: list[dict], add_generation_prompt: bool, bos_token, eos_token):
    rendered, spans = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                                            eos_token=eos_token, return_assistant_tokens_mask=True)
    return rendered[0], spans[0]


@pytest.mark.parametrize("shape", sorted(CONVERSATIONS))
@pytest.mark.parametrize("published", sorted(PUBLISHED))
def test_text_only_rendering_equals_the_published_template(published, shape):
    official = OFFICIAL_TEMPLATES[published]
    ours = template_for_tokenizer(SimpleNamespace(chat_template=official["template"]))
    assert template_family(ours) == PUBLISHED[published]
    messages, prompt = CONVERSATIONS[shape]
    if shape == "system" and published in ("gemma", "mistral"):
        pytest.skip("their published templates refuse a system message (ours folds it, see the next test)")
    tokens = (official["bos_token"], official["eos_token"])
    assert render(ours, messages, prompt, *tokens)[0] == render(official["template"], messages, prompt, *tokens)[0]


def test_qwen_default_system_comes_from_the_tokenizers_template_and_system_folds_where_the_format_has_no_turn():
    qwen2 = template_for_tokenizer(SimpleNamespace(chat_template=OFFICIAL_TEMPLATES["qwen2"]["template"]))
    assert qwen2 == chat_template("chatml", "You are a helpful assistant.")
    qwen3_like = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}..."
    assert template_for_tokenizer(SimpleNamespace(chat_template=qwen3_like)) == chat_template("chatml")
    qwen25 = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # its template, tools branch cut
    qwen25_like = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
                   "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\n" + qwen25 + "<|im_end|>\\n' }}{%- endif %}")
    assert template_for_tokenizer(SimpleNamespace(chat_template=qwen25_like)) == chat_template("chatml", qwen25)
    messages = CONVERSATIONS["system"][0][:2]
    assert render(chat_template("gemma"), messages, True, "<bos>", "<eos>")[0] == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat colour is the shape?<end_of_turn>\n<start_of_turn>model\n")
    assert render(chat_template("mistral"), messages, True, "<s>", "</s>")[0] == (
        "<s>[INST] Answer briefly.\n\nWhat colour is the shape?  [/INST]")


VICUNA_CASES = [
    ([{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]},
      {"role": "assistant", "content": "A cat."}, {"role": "user", "content": [{"type": "text", "text": "And?"}]}]),
    ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
      {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "No."}]}]),
    ([{"role": "user", "content": "Hi"}]),
]


@pytest.mark.parametrize("case", range(len(VICUNA_CASES)))
@pytest.mark.parametrize("prompt", [True, False])
def test_vicuna_v1_renders_byte_identically_to_the_template_before_the_families(case, prompt):
    before = OFFICIAL_TEMPLATES["vicuna_v1_before"]["template"]
    assert render(VICUNA_V1_CHAT_TEMPLATE, VICUNA_CASES[case], prompt, "<s>", "</s>") == render(
        before, VICUNA_CASES[case], prompt, "<s>", "</s>")


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_images_come_first_and_generation_spans_hold_the_answer_and_its_turn_end(family):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare."}, {"type": "image"}, {"type": "image"}]},
                {"role": "assistant", "content": "Both red."}, {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]
    text, spans = render(chat_template(family), messages, False, "<B>", "<E>")
    assert "<image>\n<image>\nCompare." in text and text.count("<image>") == 2
    end = FORMATS[family][2][1].replace("eos", "<E>")
    assert [text[start:stop] for start, stop in spans] == ["Both red." + end, "Yes." + end]
    assert "<align>" not in chat_template(family)


def test_construction_takes_the_tokenizers_format_and_refuses_an_unknown_one_without_generation_marks():
    processor, _ = tiny_family_parts("qwen2")
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    assert processor.chat_template == chat_template("chatml", "You are a helpful assistant.")
    explicit = AlignGPTProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template="{{ x }}")
    assert explicit.chat_template == "{{ x }}"  # an explicit template always wins
    own = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        assert AlignGPTProcessor(image_processor, tokenizer).chat_template == VICUNA_V1_CHAT_TEMPLATE
        marked = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
        tokenizer.chat_template = marked
        assert AlignGPTProcessor(image_processor, tokenizer).chat_template == marked
        phi4_like = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] }}{% endfor %}"
        assert template_family(phi4_like) is None  # ChatML's marker, another format
        tokenizer.chat_template = OFFICIAL_TEMPLATES["llama2"]["template"]
        with pytest.raises(ValueError, match=r"^The tokenizer's chat template is in no format AlignGPTProcessor knows "
                                             r"and has no `\{% generation %\}` block, .* Pass AlignGPTProcessor "
                                             r"`chat_template=chat_template\(family\)` from chat_templates_aligngpt "
                                             r"\(vicuna_v1, llama3, chatml, gemma, mistral, phi3\)"):
            AlignGPTProcessor(image_processor, tokenizer)
    finally:
        tokenizer.chat_template = own


def test_a_format_whose_turn_end_the_tokenizer_lacks_is_refused():
    """A Llama-3 template on a ChatML tokenizer would write `<|eot_id|>` as plain pieces: no id ends the answers and
    generation would run past them. Refused at construction, naming the token and the fixes."""
    processor, _ = tiny_family_parts("qwen2")
    with pytest.raises(ValueError, match=r"^The chat template is in the llama3 format, which ends each turn with "
                                         r"<\|eot_id\|>, but the tokenizer has no such token\. Use the language model's "
                                         r"own tokenizer, add it"):
        AlignGPTProcessor(processor.image_processor, processor.tokenizer, chat_template=chat_template("llama3"))
    vicuna = AlignGPTProcessor(processor.image_processor, processor.tokenizer, chat_template=VICUNA_V1_CHAT_TEMPLATE)
    assert vicuna.chat_template == VICUNA_V1_CHAT_TEMPLATE  # ends on EOS, which every tokenizer has


@pytest.mark.parametrize("family", sorted(FAMILY_TOKENS))
def test_align_follows_bos_or_leads_and_assistant_masks_cover_exactly_the_answers(family, images):
    processor, _ = tiny_family_parts(family)
    tokenizer = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": "The shape is red."},
                {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "There are two circles."}]
    out = processor.apply_chat_template(messages, images=[images[0]], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True,
                                        processor_kwargs={"add_special_tokens": False})  # as the collator
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    writes_bos, _, (_, end), *_ = FORMATS[template_family(processor.chat_template)]
    first = [tokenizer.bos_token_id] if writes_bos else []  # Qwen and Phi-3: no BOS, `<align>` leads
    assert ids[: len(first) + 1] == first + [processor.alignment_token_id]
    assert ids.count(processor.alignment_token_id) == 1 and ids.count(processor.image_token_id) == 4
    end = tokenizer.eos_token if end == "eos" else end
    supervised = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    lead = " " if family == "phi" else ""  # vicuna_v1's "ASSISTANT: " space is part of the answer's first token
    assert supervised == f"{lead}The shape is red.{end}{lead}There are two circles.{end}"


def test_stop_tokens_are_eos_and_the_turn_end_and_generation_stops_on_the_turn_end():
    expected = {"llama": ["<|end_of_text|>", "<|eot_id|>"], "qwen2": ["<|endoftext|>", "<|im_end|>"],
                "mistral": ["</s>"], "gemma": ["<eos>", "<end_of_turn>"], "phi3": ["<|endoftext|>", "<|end|>"],
                "phi": ["<|endoftext|>"]}
    for family, tokens in expected.items():
        tokenizer = tiny_family_parts(family)[0].tokenizer
        ids = stop_token_ids(tokenizer, tiny_family_parts(family)[0].chat_template)
        assert tokenizer.convert_ids_to_tokens(ids) == tokens, family
    processor, config = tiny_family_parts("qwen2")
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(config).eval()
    prompt = processor.tokenizer(processor.apply_chat_template([{"role": "user", "content": "How many?"}],
                                                               add_generation_prompt=True), return_tensors="pt")
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    force_end = dict(max_new_tokens=5, do_sample=False, sequence_bias={(im_end,): 100.0})
    before = model.generate(**prompt, **force_end)[0, prompt["input_ids"].shape[1]:].tolist()
    assert before == [im_end] * 5  # EOS alone (<|endoftext|>) does not stop it
    model, _ = with_stop_tokens(model, processor)
    assert model.generation_config.eos_token_id == [processor.tokenizer.eos_token_id, im_end]
    assert model.generate(**prompt, **force_end)[0, prompt["input_ids"].shape[1]:].tolist() == [im_end]



def test_answers_end_at_the_turn_end_also_for_a_model_saved_with_eos_only():
    from aligngpt_hf.evaluation.answer import generate_answers

    processor, config = tiny_family_parts("qwen2")
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    model = AlignGPTForConditionalGeneration(config).eval()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id  # `<|endoftext|>` only
    word = tokenizer(" red", add_special_tokens=False)["input_ids"][-1]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = processor.apply_chat_template([{"role": "user", "content": "Colour?"}], add_generation_prompt=True)
    # a word, then the turn end right after it: without the turn end as a stop token the pair repeats
    bias = dict(max_new_tokens=6, do_sample=False, sequence_bias={(word,): 100.0, (word, im_end): 200.0})
    assert generate_answers(model, processor, [prompt], [None], **bias) == [tokenizer.decode([word]).strip()]
    assert generate_answers(model, processor, [prompt], [None], eos_token_id=tokenizer.eos_token_id, **bias) == [
        tokenizer.decode([word, im_end] * 3, skip_special_tokens=True).strip()]

def test_stage1_from_parts_takes_the_family_format_or_the_recipes_and_stops_at_the_turn_end(tmp_path):
    from transformers import AutoModelForCausalLM, SiglipImageProcessor, SiglipVisionModel

    from aligngpt_hf.training.cli import parse_recipe
    from aligngpt_hf.training.configs import AlignGPTScriptArguments
    from aligngpt_hf.training.model_setup import build_from_components, build_stage_model

    processor, config = tiny_family_parts("qwen2")
    AutoModelForCausalLM.from_config(config.text_config).save_pretrained(tmp_path / "llm")
    processor.tokenizer.save_pretrained(tmp_path / "llm")
    SiglipVisionModel(config.vision_config).save_pretrained(tmp_path / "tower")
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tmp_path / "tower")
    parts = dict(language_model=str(tmp_path / "llm"), vision_tower=str(tmp_path / "tower"),
                 vision_feature_select_strategy="full", gate_hidden_size=16)
    model, built = build_from_components(**parts)
    assert built.chat_template == chat_template("chatml", "You are a helpful assistant.")
    im_end = built.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [built.tokenizer.eos_token_id, im_end]
    _, vicuna = build_from_components(**parts, chat_format="vicuna_v1")
    assert vicuna.chat_template == VICUNA_V1_CHAT_TEMPLATE
    script = AlignGPTScriptArguments(language_model=parts["language_model"], vision_tower=parts["vision_tower"],
                                     vision_feature_select_strategy="full", chat_format="alpaca")
    with pytest.raises(ValueError, match=r"^`chat_format` is 'alpaca'; use one of vicuna_v1, llama3, chatml, gemma, "
                                         r"mistral, phi3, or leave it unset"):
        build_stage_model("pretrain", script, SimpleNamespace(seed=0))
    tiny = AlignGPTScriptArguments(model_name_or_path="tiny", chat_format="chatml")  # its processor would win
    with pytest.raises(ValueError, match=r"^`chat_format` picks the format of a processor built from parts \(stage 1 "
                                         r"from `language_model` \+ `vision_tower`, .*\); 'tiny' brings its own"):
        build_stage_model("pretrain", tiny, SimpleNamespace(seed=0))
    for recipe, expected in (("gemma_7b", "vicuna_v1"), ("mistral_7b", "vicuna_v1"), ("phi2", "vicuna_v1"),
                             ("llama3_8b_siglip", None)):  # as AlignGPT's follow-up trained them
        overrides = ["--bf16", "false", "--tf32", "false", "--use_cpu", "true"]
        assert parse_recipe("pretrain", f"pretrain_{recipe}", overrides)[0].chat_format == expected

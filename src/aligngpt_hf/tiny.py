"""Tiny, offline AlignGPT building blocks: a locally trained tokenizer, processor, config and model.

Used by the tests, the benchmarks and the demo; nothing here downloads anything. The layout is the real one (CLIP
vision tower, Llama LLM, `<image>`/`<align>` special tokens), only the sizes are small.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaImageProcessorPil,
    PreTrainedTokenizerFast,
)

from aligngpt_hf.models.configuration_aligngpt import AlignGPTConfig
from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
from aligngpt_hf.models.processing_aligngpt import VICUNA_V1_SYSTEM, AlignGPTProcessor

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<align>"]
DEFAULT_CORPUS = [
    VICUNA_V1_SYSTEM + " USER: <image>\nWhat colour is the shape? ASSISTANT: The shape is red.</s>",
    "USER: What shape is it? ASSISTANT: It is a blue square.</s>USER: How many? ASSISTANT: There are two circles.",
    "A green triangle on the left. A yellow circle on the right. A red square in the middle of the picture.",
    "Is the caption correct? Yes. No. Answer the question using a single word or phrase.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 one two three four",
]


def _train_bpe(corpus: Iterable[str], vocab_size: int, special_tokens: list[str], template: str):
    """Byte-level BPE trained on `corpus`; `template` (e.g. "<s> $A") says which specials tokenization adds."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    added = [(token, tokenizer.token_to_id(token)) for token in special_tokens if token in template]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=added)
    return tokenizer


def build_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, adding BOS like LLaMA, with `<image>`/`<align>` as special tokens.

    Train it on text rendered the way the chat template renders it, or answers split badly.
    """
    tokenizer = _train_bpe(corpus, vocab_size, SPECIAL_TOKENS, "<s> $A")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=2048,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    aspect_ratio: str = "pad",
    **kwargs,
) -> AlignGPTProcessor:
    """AlignGPTProcessor with a CLIP-style PIL image processor (`pad` = AlignGPT's expand-to-square)."""
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_pad=aspect_ratio == "pad",
    )
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    kwargs.setdefault("image_seq_length", (image_size // patch_size) ** 2)
    return AlignGPTProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 32,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    **overrides,
) -> AlignGPTConfig:
    """A tiny AlignGPT config whose vocabulary and special ids match `tokenizer`."""
    vision = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    overrides.setdefault("gate_hidden_size", 16)
    return AlignGPTConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        alignment_token_id=tokenizer.convert_tokens_to_ids("<align>"),
        **overrides,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, **config_kwargs) -> AlignGPTForConditionalGeneration:
    """A randomly initialised tiny model (seed with `torch.manual_seed` first for reproducibility)."""
    return AlignGPTForConditionalGeneration(build_config(tokenizer, **config_kwargs))


def build_clip(corpus: Iterable[str], hidden_size: int = 32, num_layers: int = 2, image_size: int = 32,
               patch_size: int = 8, vocab_size: int = 300, max_length: int = 32) -> tuple[CLIPModel, CLIPProcessor]:
    """A random tiny CLIP with a tokenizer trained on `corpus`.

    The tokenizer appends `<|endoftext|>` with an id other than 2: with `eos_token_id == 2` transformers' CLIP pools
    the text at argmax(input_ids) (a legacy rule), which would make the scores meaningless.
    """
    special = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    backend = _train_bpe(corpus, vocab_size, special, "<|startoftext|> $A <|endoftext|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>",
                                        model_max_length=max_length)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                           intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=4),
        projection_dim=hidden_size,
    )
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


# llava-hf's 1.5 format ("USER: <image>\n... ASSISTANT: ..."), so a tiny LLaVA folder carries its own template as theirs do.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- else -%}{{ ' ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


def build_llava(hidden_size: int = 32, num_layers: int = 2, image_size: int = 32, patch_size: int = 8,
                vocab_multiple: int | None = None, corpus: Iterable[str] = DEFAULT_CORPUS):
    """A random tiny transformers LLaVA `(LlavaForConditionalGeneration, LlavaProcessor)` in llava-hf's layout (CLIP +
    Llama, `<image>` in the tokenizer, no `<align>`): the starting point of `aligngpt-hf from-llava`, offline.

    `vocab_multiple=64` pads the vocabulary as llava-hf's checkpoints do (then `<align>` fits in a padded row).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    backend = _train_bpe(corpus, 300, [t for t in SPECIAL_TOKENS if t != "<align>"], "<s> $A")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                        model_max_length=2048)
    vocab = len(tokenizer) if vocab_multiple is None else -(-len(tokenizer) // vocab_multiple) * vocab_multiple
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch_size) ** 2)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return LlavaForConditionalGeneration(config), processor

"""Tiny language-model and vision-tower configs of each backbone family, from transformers' own config classes.

Shared by the LoRA-preset and the family-conversion tests: hidden 32, 2 layers, 4 heads (2 key/value heads), head
dim 8, random weights, no downloads.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers import (
    CLIPVisionConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

from aligngpt_hf import AlignGPTConfig

HIDDEN, LAYERS = 32, 2
TEXT_CLASSES = {
    "llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma": GemmaConfig,
    "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "phi": PhiConfig, "phi3": Phi3Config,
}
NO_HEAD_DIM = ("phi", "phi3")  # their head dim is hidden / heads


def tiny_text_config(family: str, vocab_size: int = 300, **overrides):
    """A 2-layer language model of `family` (a `text_config.model_type`), BOS 1 / EOS 2 / pad 0."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family not in NO_HEAD_DIM:
        kwargs["head_dim"] = 8
    return TEXT_CLASSES[family](**{**kwargs, **overrides})


def tiny_vision_config(kind: str = "clip", image_size: int = 28, patch_size: int = 14):
    """CLIP (a CLS token + patches) or SigLIP (patches only) at 28 px with 14 px patches: 4 patches."""
    vision_class = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return vision_class(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=2, image_size=image_size, patch_size=patch_size)


# Vision geometries (image size, patch size): SigLIP-so400m-384/14's 27 x 27 grid scaled down to 3 x 3; a
# fixed-resolution SigLIP2 (patch 16, model_type "siglip") at 32 px: 2 x 2.
VISION_GEOMETRY = {"clip": ("clip", 28, 14), "siglip": ("siglip", 28, 14), "siglip-so400m": ("siglip", 42, 14),
                   "siglip2": ("siglip", 32, 16)}
# The backbone matrix: language model (family + what its released checkpoints set) and vision tower per cell.
BACKBONES = {
    "qwen2+siglip": ("qwen2", {}, "siglip"),
    "qwen2.5+siglip": ("qwen2", {"tie_word_embeddings": True}, "siglip"),  # the small Qwen2.5 tie their head
    "qwen3+siglip": ("qwen3", {}, "siglip"),
    "llama3+siglip-so400m": ("llama", {"rope_theta": 5e5, "vocab_size": 520}, "siglip-so400m"),
    "llama3+siglip2": ("llama", {"rope_theta": 5e5, "vocab_size": 520}, "siglip2"),
    "mistral+clip": ("mistral", {"sliding_window": 3}, "clip"),
    "gemma+siglip": ("gemma", {}, "siglip"),  # tied, scaled embeddings
    "gemma2+siglip": ("gemma2", {"sliding_window": 3}, "siglip"),  # + attention and final-logit soft-capping
    "gemma3+siglip": ("gemma3_text", {"sliding_window": 3}, "siglip"),
    "phi2+siglip": ("phi", {}, "siglip"),  # partial rotary, LM head with a bias
    "phi3+clip": ("phi3", {}, "clip"),
}


def backbone_config(name: str, **overrides) -> AlignGPTConfig:
    """The tiny AlignGPT of one `BACKBONES` cell; `<image>`/`<align>` are the last two ids of the vocabulary."""
    family, text_overrides, vision = BACKBONES[name]
    kind, image_size, patch_size = VISION_GEOMETRY[vision]
    text = tiny_text_config(family, **text_overrides)
    overrides.setdefault("gate_hidden_size", 16)
    overrides.setdefault("vision_feature_select_strategy", "default" if kind == "clip" else "full")
    return AlignGPTConfig(vision_config=tiny_vision_config(kind, image_size, patch_size), text_config=text,
                          image_token_id=text.vocab_size - 2, alignment_token_id=text.vocab_size - 1, **overrides)


def tiny_family_config(family: str, vision: str = "clip", vocab_size: int = 300, **overrides) -> AlignGPTConfig:
    """A tiny AlignGPT on `family` + `vision`; `<image>`/`<align>` are the last two ids of the vocabulary."""
    overrides.setdefault("gate_hidden_size", 16)
    overrides.setdefault("vision_feature_select_strategy", "default" if vision == "clip" else "full")
    return AlignGPTConfig(vision_config=tiny_vision_config(vision), text_config=tiny_text_config(family, vocab_size),
                          image_token_id=vocab_size - 2, alignment_token_id=vocab_size - 1, **overrides)


# Tokenizers and processors of each family: a byte-level BPE trained locally on text in the family's chat format,
# with the family's special tokens and its published chat template (fixtures/official_chat_templates.json).
OFFICIAL_TEMPLATES = json.loads((Path(__file__).parent / "fixtures" / "official_chat_templates.json").read_text())
FAMILY_TOKENS = {  # family: (BOS, EOS, pad, unk, the format's special tokens, published template)
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", None,
              ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "llama3"),
    **dict.fromkeys(("qwen2", "qwen3"), (None, "<|endoftext|>", "<|endoftext|>", None, ["<|im_start|>", "<|im_end|>"],
                                         "qwen2")),
    "mistral": ("<s>", "</s>", "<unk>", "<unk>", [], "mistral"),
    **dict.fromkeys(("gemma", "gemma2", "gemma3_text"),
                    ("<bos>", "<eos>", "<pad>", "<unk>", ["<start_of_turn>", "<end_of_turn>"], "gemma")),
    "phi3": (None, "<|endoftext|>", "<|endoftext|>", "<unk>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
             "phi3"),
    "phi": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None, [], None),  # phi-1.5/phi-2: no chat template
}
# The training cells pair each family with the tower of its backbone-matrix cell (LLaMA-3: SigLIP2 geometry).
FAMILY_VISION = {"llama": "siglip2", **dict.fromkeys(("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi"),
                                                     "siglip")}  # mistral, phi3: CLIP
CORPUS_TURNS = [("What colour is the shape?", "The shape is red."), ("How many?", "There are two circles."),
                ("Render a clear and concise summary of the photo.", "A blue square."),
                ("What shape is it?", "It is a green square. A yellow circle.")]


def tiny_family_tokenizer(family: str):
    """A tokenizer of `family` with `<image>`/`<align>` and the family's published chat template (none for phi)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.utils.chat_template_utils import render_jinja_template

    from aligngpt_hf.models.chat_templates_aligngpt import chat_template
    from aligngpt_hf.tiny import _train_bpe

    bos, eos, pad, unk, specials, template = FAMILY_TOKENS[family]
    tokens = list(dict.fromkeys(t for t in (pad, unk or "<unk>", bos, eos, *specials, "<image>", "<align>") if t))
    ours = chat_template({"llama3": "llama3", "qwen2": "chatml"}.get(template, template or "vicuna_v1"))
    corpus = [render_jinja_template(conversations=[[{"role": "user", "content": q}, {"role": "assistant", "content": a}]],
                                    chat_template=ours, bos_token=bos or "", eos_token=eos)[0][0] for q, a in CORPUS_TURNS]
    adds_bos = bos is not None and family != "phi"  # as the published tokenizers do
    backend = _train_bpe(corpus * 4, 400, tokens, f"{bos} $A" if adds_bos else "$A")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   chat_template=OFFICIAL_TEMPLATES[template]["template"] if template else None,
                                   extra_special_tokens={"image_token": "<image>"}, model_max_length=2048)


@functools.cache
def tiny_family_parts(family: str):
    """(processor, config) of a tiny AlignGPT on `family`: its tokenizer's ids, the tower of its backbone-matrix cell
    (4 tokens per image). Built once per family and shared: do not modify what it returns."""
    from transformers import LlavaImageProcessorPil

    from aligngpt_hf import AlignGPTProcessor

    tokenizer = tiny_family_tokenizer(family)
    kind, image_size, patch_size = VISION_GEOMETRY[FAMILY_VISION.get(family, "clip")]
    text = tiny_text_config(family, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = AlignGPTConfig(vision_config=tiny_vision_config(kind, image_size, patch_size), text_config=text,
                            gate_hidden_size=16, vision_feature_select_strategy="default" if kind == "clip" else "full",
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            alignment_token_id=tokenizer.convert_tokens_to_ids("<align>"))
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": image_size},
                                             crop_size={"height": image_size, "width": image_size}, do_pad=True)
    processor = AlignGPTProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_length=config.image_seq_length)
    return processor, config

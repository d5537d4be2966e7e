# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints of AlignGPT's follow-up code base (AlignGPT_family) -> this package's layout.

That code base trains the same model on other language models, each in its own class whose config is the language
model's config plus the `mm_*` fields: `model_type` `aligngpt` (LLaMA, also LLaMA-3), `aligngpt_mistral`,
`aligngpt_phi`, `aligngpt_gemma`, `aligngpt_qwen2`. Its state dict has the original layout (`model.*`, `lm_head.weight`,
`mm_projector.*`, `align_indicators.indicator_embs` [n_indicators, H], `gated_weight_layer.mlp.{0,2}.*`,
`vision_tower.vision_tower.vision_model.*`) with these differences, all handled here:

* `n_indicators` (4, 5, 6, 8, 10) sets the table rows and the gate outputs (n_indicators - 1);
* Phi names its final norm `model.final_layernorm` (with a bias) and its LM head has no bias there (transformers'
  Phi head has one: it is written as zeros, the same logits);
* Gemma ties the LM head to the input embeddings: a saved `lm_head.weight` must equal them and is then dropped;
  its projector output, level table and gate input are rescaled for today's Gemma embeddings (`GEMMA_RESCALE`);
* a SigLIP tower (so400m-patch14-384) gives all its 27 x 27 = 729 tokens (no CLS to drop; `mm_vision_select_feature`
  is not consulted), so the gate reads 729 dot products;
* S2 multi-scale towers (`use_s2`) concatenate the features of several scales: refused, this package has no S2 path.

No family weights are published; docs/conversion.md lists what was inferred from the code and how it was checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, SiglipVisionConfig

from aligngpt_hf.conversion.mapping import (
    ALIGN_RULES,
    EMBEDDED_VISION_DROPPED,
    EMBEDDED_VISION_RULES,
    ConversionError,
    Rule,
    check_filled,
    map_keys,
    plan_and_write,
    projector_rules,
)
from aligngpt_hf.conversion.steps import (
    VOCAB_MULTIPLE,
    ConversionResult,
    check_vocab_rows,
    config_fields_checked,
    convert_pretrain,
    expected_shapes,
    read_weights,
    resolve_vision,
    tower_candidates,
    vision_folder_source,
    write_side_files,
)
from aligngpt_hf.models.configuration_aligngpt import VISION_PREFIX_TOKENS, AlignGPTConfig

# model_type of the family's config -> transformers' config class of its language model.
FAMILY_MODEL_TYPES = {"aligngpt": "llama", "aligngpt_mistral": "mistral", "aligngpt_phi": "phi",
                      "aligngpt_gemma": "gemma", "aligngpt_qwen2": "qwen2"}
LLAMA3_VOCAB = 128256
# Written by transformers 4.x configs; today's config classes still read them into `rope_parameters`.
LEGACY_TEXT_FIELDS = ("rope_theta", "rope_scaling", "partial_rotary_factor")
NOT_TEXT_FIELDS = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype",
                   "dtype", "vocab_size")
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# Towers the family's configs name by a path on the training machine; their configs, for embedded weights.
KNOWN_FAMILY_TOWERS = {"siglip-so400m-patch14-384": SIGLIP_SO400M_384}
TIED_REASON = "LM head tied to model.embed_tokens.weight (checked equal)"
# transformers 4.40's GemmaModel multiplied its whole input (image features, `<align>` vector) by sqrt(hidden) and the
# gate averaged unscaled word rows; today's Gemma scales only the word rows (its embedding module). These powers of the
# hidden size keep the family's logits: projector output and table x sqrt(H), the gate's first layer / H.
GEMMA_RESCALE = ((r"mm_projector\.(?:2\.)?(?:weight|bias)$", 0.5), (r"align_indicators\.indicator_embs$", 0.5),
                 (r"gated_weight_layer\.mlp\.0\.weight$", -1.0))

FAMILY_LLM_RULES = (
    Rule(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", None, "rotary buffer, recomputed from the config"),
    Rule(r"model\.(embed_tokens\.weight|norm\.weight|final_layernorm\.(?:weight|bias)|layers\.\d+\.[\w.]+)",
         r"model.language_model.\1"),
)


def is_family_config(orig: dict) -> bool:
    """True for a family checkpoint's config.json. A LLaMA-class (`aligngpt`) one counts only with a SigLIP tower, S2
    or LLaMA-3's vocabulary: Vicuna + CLIP with another N is the original model, which the original path converts with
    its vicuna_v1 processor (N comes from the table's rows there too)."""
    model_type = str(orig.get("model_type", ""))
    if model_type.startswith("aligngpt_") and model_type not in FAMILY_MODEL_TYPES:
        raise ConversionError(
            f"Unknown AlignGPT model_type {model_type!r} in config.json; the converter knows "
            f"{', '.join(sorted(FAMILY_MODEL_TYPES))}. Check that SOURCE is an AlignGPT checkpoint."
        )
    if model_type not in FAMILY_MODEL_TYPES:
        return False
    return (model_type != "aligngpt" or bool(orig.get("use_s2")) or int(orig.get("vocab_size", 0)) == LLAMA3_VOCAB
            or "siglip" in str(orig.get("mm_vision_tower", "")).lower())


def family_rules(projector_type: str, vision_in_source: bool, tied: bool) -> tuple[Rule, ...]:
    """Rules for a family stage-2 checkpoint; with tied embeddings a saved LM head is dropped (after the check)."""
    head = Rule(r"lm_head\.weight", None, TIED_REASON) if tied else Rule(r"lm_head\.weight", "lm_head.weight")
    vision = EMBEDDED_VISION_RULES if vision_in_source else EMBEDDED_VISION_DROPPED
    return FAMILY_LLM_RULES + (head,) + projector_rules(projector_type) + ALIGN_RULES + vision


def text_config_from(orig: dict, vocab_size: int):
    """The language model's config (its own transformers class) from the fields of the family's config.json."""
    text_class = CONFIG_MAPPING[FAMILY_MODEL_TYPES[orig["model_type"]]]
    known = set(text_class().to_dict()) | set(LEGACY_TEXT_FIELDS)
    fields = {key: value for key, value in orig.items() if key in known and key not in NOT_TEXT_FIELDS}
    if text_class.model_type == "gemma":  # transformers 4.40 ran Gemma's MLP with `hidden_activation`, tanh GELU if unset
        fields["hidden_act"] = orig.get("hidden_activation") or "gelu_pytorch_tanh"
    return text_class(vocab_size=vocab_size, **fields)


def refuse_s2(orig: dict, path: Path) -> None:
    """S2 features (several scales concatenated) cannot be reproduced: refuse before anything is read or written."""
    if orig.get("use_s2"):
        scales = [scale for scale in str(orig.get("s2_scales", "")).split(",") if scale.strip()]
        raise ConversionError(
            f"{path}: this checkpoint uses S2 multi-scale vision features (`use_s2: true`, `s2_scales: "
            f"{orig.get('s2_scales')!r}`: {len(scales)} scales concatenated into `mm_hidden_size: "
            f"{orig.get('mm_hidden_size')}` channels). This package has no S2 vision path yet, so its image features "
            "cannot be reproduced; convert a checkpoint trained without `--use_s2`."
        )


def check_tower_width(orig: dict, vision_config, path: Path) -> None:
    """The projector reads `mm_hidden_size` channels: the tower must give exactly that many."""
    width, channels = int(orig["mm_hidden_size"]), vision_config.hidden_size
    if width != channels:
        raise ConversionError(
            f"{path}: `mm_hidden_size` is {width}, but the vision tower gives {channels} channels. Pass the tower it "
            "was trained with (`--vision-tower`); a multiple of the tower width means S2 features, which this package "
            "cannot reproduce yet."
        )


def build_family_config(orig: dict, vision_config, shapes, dtype, kind: str) -> AlignGPTConfig:
    """AlignGPTConfig of a family checkpoint: its LLM class, N from the table, `<image>` = V and `<align>` = V + 1."""
    vocab = int(orig["vocab_size"])
    padded = -(-(vocab + 2) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    levels = shapes["align_indicators.indicator_embs"][0]
    if orig.get("n_indicators") is not None and int(orig["n_indicators"]) != levels:
        raise ConversionError(
            f"config.json says `n_indicators: {orig['n_indicators']}`, but `align_indicators.indicator_embs` has "
            f"{levels} rows; the config and the weights come from different runs."
        )
    if orig.get("mm_use_im_start_end") or orig.get("mm_use_im_patch_token"):
        raise ConversionError("`mm_use_im_start_end`/`mm_use_im_patch_token` checkpoints are not AlignGPT releases.")
    if VISION_PREFIX_TOKENS.get(vision_config.model_type) == 0:
        strategy = "full"  # SigLIP: every token, whatever `mm_vision_select_feature` says
    elif orig.get("mm_vision_select_feature", "patch") in ("patch", "cls_patch"):
        strategy = {"patch": "default", "cls_patch": "full"}[orig.get("mm_vision_select_feature", "patch")]
    else:
        raise ConversionError(f"Unsupported `mm_vision_select_feature` {orig['mm_vision_select_feature']!r}; "
                              "expected 'patch' or 'cls_patch'.")
    config = AlignGPTConfig(
        vision_config=vision_config, text_config=text_config_from(orig, padded), num_alignment_levels=int(levels),
        gate_hidden_size=int(shapes.get("gated_weight_layer.mlp.0.weight", (256,))[0]),
        projector_type=orig.get("mm_projector_type", "linear"), vision_feature_layer=orig["mm_vision_select_layer"],
        vision_feature_select_strategy=strategy, image_token_id=vocab, alignment_token_id=vocab + 1,
    )
    llm_key = "model.embed_tokens.weight" if kind == "full" else "align_indicators.indicator_embs"
    config.dtype = dtype or shapes.dtype_of(llm_key)
    config.original_vocab_size = vocab
    config.aligngpt_stage = "instruct" if kind == "full" else "pretrain"
    return config


def resolve_family_vision(orig: dict, source_dir: Path, override, need_weights: bool):
    """(vision config, folder for the tower weights or None, image processor settings); SigLIP preprocessing is
    resize to a square + mean/std 0.5 (the family set crop size = size)."""
    name = str(orig.get("mm_vision_tower") or "")
    local = any(p.is_dir() for p in tower_candidates(name, source_dir))
    known = KNOWN_FAMILY_TOWERS.get(Path(name).name)
    if override is None and known is not None and not local and not need_weights:
        vision_config, folder = SiglipVisionConfig(**known), None
        settings = {}
    else:
        vision_config, folder, settings = resolve_vision(orig, source_dir, override, need_weights)
    if VISION_PREFIX_TOKENS.get(vision_config.model_type) == 0:
        size = {"height": vision_config.image_size, "width": vision_config.image_size}
        settings = {"size": size, "crop_size": dict(size), "resample": 3, "image_mean": [0.5] * 3,
                    "image_std": [0.5] * 3}
    return vision_config, folder, settings


def convert_family(source_dir: Path, output: Path, orig: dict, source, vision_tower=None, tokenizer=None, *,
                   kind=None, dtype=None, max_shard_size="5GB", progress=True):
    """`convert_checkpoint` for a family checkpoint (called by it once config.json says so), into the staging
    folder `output`; `dtype` is the torch dtype to cast to (None keeps the checkpoint's). Pushing happens in
    `convert_checkpoint`."""
    refuse_s2(orig, source_dir / "config.json")
    if tokenizer is not None:
        raise ConversionError(
            f"{source_dir} is an AlignGPT_family checkpoint ({orig['model_type']}): it was trained in that code base's "
            "own conversation formats (a LLaVA variant of LLaMA-3's headers; vicuna_v1 with a literal `</s>` for Gemma, "
            "Mistral and Phi), which AlignGPTProcessor's chat formats do not reproduce, so no processor is written. "
            "Convert without `--tokenizer`; weights, config and image settings are converted."
        )
    files, shapes, detected, need_vision_weights = read_weights(source_dir, source, kind, vision_tower)
    check_vocab_rows(shapes, orig, source_dir / "config.json")
    vision_config, vision_dir, settings = resolve_family_vision(orig, source_dir, vision_tower, need_vision_weights)
    check_tower_width(orig, vision_config, source_dir / "config.json")
    with config_fields_checked(source_dir / "config.json"):
        config = build_family_config(orig, vision_config, shapes, dtype, detected)
        expected = expected_shapes(config)
    if config.text_config.model_type == "gemma":
        files = GemmaRescaled(files, config.text_config.hidden_size)
    if detected == "pretrain":
        result = convert_pretrain(files, shapes, config, expected, output, orig, vision_tower, source)
    else:
        result = _convert_full(files, shapes, config, expected, vision_dir, output, max_shard_size, progress)
    result.files += write_side_files(output, config, orig, source_dir, None, settings, detected)
    result.notes.append(
        f"AlignGPT_family checkpoint ({orig['model_type']}): OUTPUT has no processor, because that code base's "
        "conversation formats are not AlignGPTProcessor's. Build one with the language model's tokenizer, `<image>` = "
        f"id {config.image_token_id}, `<align>` = id {config.alignment_token_id} and the chat format to prompt in."
    )
    return result


class GemmaRescaled:
    """The source files, with the `GEMMA_RESCALE` tensors multiplied (in float32) as they are read."""

    def __init__(self, files, hidden_size: int):
        self._files, self._hidden_size = files, hidden_size

    def __getattr__(self, name):
        return getattr(self._files, name)

    def get(self, key: str) -> torch.Tensor:
        tensor = self._files.get(key)
        power = next((power for pattern, power in GEMMA_RESCALE if re.search(pattern, key)), None)
        return tensor if power is None else tensor.float() * float(self._hidden_size) ** power


class ZeroTensors:
    """Zeros under `WeightFiles`' interface: transformers' Phi head has a bias, the family's has none (a zero bias)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self._shapes = shapes

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def get(self, key: str) -> torch.Tensor:
        return torch.zeros(self._shapes[key])

    def close(self) -> None:
        pass


def _convert_full(files, shapes, config, expected, vision_dir, output, max_shard_size, progress):
    """Map every key (LLM + projector + alignment from SOURCE; tower from SOURCE or `vision_dir`), then stream."""
    tied = bool(config.tie_word_embeddings)
    if tied:
        expected = {key: shape for key, shape in expected.items() if key != "lm_head.weight"}
    mapping, dropped = map_keys(shapes, family_rules(config.projector_type, vision_dir is None, tied), expected)
    if tied and "lm_head.weight" in shapes and not torch.equal(files.get("lm_head.weight"),
                                                               files.get("model.embed_tokens.weight")):
        raise ConversionError(
            "The language model ties its LM head to the input embeddings (`tie_word_embeddings: true`), but "
            "`lm_head.weight` differs from `model.embed_tokens.weight` in the checkpoint: set `tie_word_embeddings: "
            "false` in SOURCE's config.json if the head was trained untied."
        )
    sources = [(files, mapping)]
    if vision_dir is not None:
        vision_source, vision_dropped = vision_folder_source(vision_dir, expected)
        sources.append(vision_source)
        dropped.update(vision_dropped)
    if "lm_head.bias" in expected and "lm_head.bias" not in shapes:  # the family's Phi head has no bias
        sources.append((ZeroTensors({"lm_head.bias": expected["lm_head.bias"]}), {"lm_head.bias": "lm_head.bias"}))
    check_filled({target for _, m in sources for target in m}, expected,
                 "Was the checkpoint saved completely (all shards in the index)? For the vision tower pass "
                 "`--vision-tower` with the tower it was trained with (its folder or Hub id).")
    written = plan_and_write(sources, expected, config, output, max_shard_size, progress)
    return ConversionResult(output=output, kind="full", files=written, dropped=dropped)


__all__ = ["FAMILY_MODEL_TYPES", "build_family_config", "convert_family", "family_rules", "is_family_config"]

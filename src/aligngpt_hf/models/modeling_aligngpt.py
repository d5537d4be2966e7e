# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""AlignGPT: transformers' LLaVA plus one alignment token whose vector comes from a learned table of alignment levels.

The classes subclass LLaVA's and override what AlignGPT changes: the `<align>` merge, the projector kinds, packed rows.
The alignment logic lives in `AlignGPTModel.forward`, because TRL's SFTTrainer trains through the base model.
"""

import math
from pathlib import Path
from shutil import copyfile

import torch
from torch import nn
from transformers import AutoModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .abstractor_aligngpt import AlignGPTVisualAbstractor
from .alignment_aligngpt import AlignGPTAlignment
from .configuration_aligngpt import PROCESSOR_AUTO_MAP, REMOTE_AUTO_MAP, AlignGPTConfig
from .llava_aligngpt import aligngpt_from_llava
from .outputs_aligngpt import AlignGPTCausalLMOutputWithPast, AlignGPTModelOutputWithPast
from .packing_aligngpt import packed_call, placeholder_counts, positions_from_mask
from .placeholders_aligngpt import (
    check_input_shapes,
    check_labels,
    check_no_placeholders,
    check_placeholders,
    placeholder_ids_from_embeddings,
    safe_token_ids,
    table_size,
)

LM_HEAD_BIAS = ("phi",)  # language models whose own ForCausalLM head has a bias (Phi-1/1.5/2)


class AlignGPTMultiModalProjector(LlavaMultiModalProjector):
    """LLaVA's `mlp2x_gelu` projector, or its first Linear alone (`linear`); inputs follow the projector's dtype."""

    def __init__(self, config: AlignGPTConfig):
        super().__init__(config)
        if config.projector_type == "linear":  # keys: multi_modal_projector.linear_1.* only
            del self.act, self.linear_2

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        image_features = image_features.to(self.linear_1.weight.dtype)
        return super().forward(image_features) if hasattr(self, "linear_2") else self.linear_1(image_features)


class AlignGPTPreTrainedModel(LlavaPreTrainedModel):
    config_class = AlignGPTConfig
    config: AlignGPTConfig

    def _init_weights(self, module):
        """Level table: Xavier-uniform (as the original). Projector and gate: PyTorch's nn.Linear default."""
        super()._init_weights(module)
        if isinstance(module, AlignGPTAlignment):
            init.xavier_uniform_(module.level_embeddings)
        elif isinstance(module, AlignGPTVisualAbstractor):  # never zeros: identical queries would never separate
            init.trunc_normal_(module.query_tokens, std=0.02)
            init.trunc_normal_(module.end_of_image, std=0.02)
        elif isinstance(module, nn.Linear) and id(module) in self._linears_with_torch_init():
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False, as for transformers' own models (our `_init_weights` keeps loaded tensors): with True, transformers
        skips modules that own no parameter (CLIP's attention/MLP), and the tower's missing weights get std 0.02."""
        return False

    def _linears_with_torch_init(self) -> set[int]:
        base = getattr(self, self.base_model_prefix, self)
        owners = [base.multi_modal_projector, *([base.alignment] if hasattr(base, "alignment") else [])]
        return {id(m) for owner in owners for m in owner.modules() if isinstance(m, nn.Linear)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader; a weights file cut short (an interrupted download or copy) is named, with the fix."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":  # safetensors' own class, named without importing it here
                raise
            folder = Path(str(pretrained_model_name_or_path))
            files = ", ".join(sorted(path.name for path in folder.glob("*.safetensors"))) or "the weights"
            raise OSError(f"{folder}: a weights file ({files}) is cut short or corrupt ({error}); download it again or "
                          "save the model again.") from None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also write the full `auto_map` and the processor's remote-code file next to the weights."""
        processing_file = Path(__file__).with_name("processing_aligngpt.py")
        auto_map = dict(REMOTE_AUTO_MAP, **(PROCESSOR_AUTO_MAP if processing_file.is_file() else {}))
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        super().save_pretrained(save_directory, *args, **kwargs)
        if processing_file.is_file():
            for path in [str(processing_file), *get_relative_import_files(str(processing_file))]:
                copyfile(path, Path(save_directory) / Path(path).name)


class AlignGPTModel(AlignGPTPreTrainedModel, LlavaModel):
    """LLaVA's vision tower + projector + language model, and the level table/gate (`alignment`)."""

    _auto_class = "AutoModel"

    def __init__(self, config: AlignGPTConfig):
        LlavaPreTrainedModel.__init__(self, config)  # LLaVA's modules, built here in AlignGPT's order and kinds
        config.check_token_ids()
        self.vision_tower = AutoModel.from_config(config.vision_config)
        projector = AlignGPTVisualAbstractor if config.projector_type == "abstractor" else AlignGPTMultiModalProjector
        self.multi_modal_projector = projector(config)
        if config.uses_alignment_token:
            self.alignment = AlignGPTAlignment(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, vision_feature_layer: int | None = None,
                           vision_feature_select_strategy: str | None = None, **kwargs: Unpack[TransformersKwargs]):
        """LLaVA's, pixels cast to the tower's dtype; `vision_feature_post_layernorm` (mPLUG-Owl) norms every token."""
        pixel_values = pixel_values.to(self.vision_tower.get_input_embeddings().weight.dtype)
        if not self.config.vision_feature_post_layernorm:
            return super().get_image_features(pixel_values, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy, **kwargs)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        outputs = self.vision_tower(pixel_values, return_dict=True, **{**kwargs, "output_hidden_states": True})
        features = outputs.hidden_states[layer]
        if (vision_feature_select_strategy or self.config.vision_feature_select_strategy) == "default":
            features = features[:, 1:]
        outputs.pooler_output = list(self.multi_modal_projector(self.vision_tower.post_layernorm(features)))
        return outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        alignment_levels: torch.LongTensor | None = None,
        gate_text_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        mm_encoder_outputs: dict | None = None,
        pixels_withheld: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AlignGPTModelOutputWithPast:
        r"""
        alignment_levels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Level (0..N-1, N-1 strongest) per sample: image rows take the table row E[level] instead of the gate
            (stage-1 pre-training and the "fixed level" inference mode). Ignored for rows without an image; refused
            with `alignment_mode="none"`, which has no table.
        gate_text_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Restricts the text tokens the gate averages (1 = may count). Trainers pass `labels == -100` so the
            gate sees the prompt only; BOS, `<align>`, `<image>` and padding never count.
        mm_encoder_outputs (`dict`, *optional*): `{"image": get_image_features(...)}`, as `generate` pre-encodes.
        pixels_withheld (`bool`, defaults to `False`): set by `generate` where it withholds the images (decoding steps,
            assistant/draft passes): placeholder ids are then embedded as plain tokens, as LLaVA does.

        `inputs_embeds` may come with `pixel_values`: the `<image>`/`<align>` slots are found by comparing each vector
        with the embedded placeholder ids (as LLaVA does), so prompt-tuning adapters can prepend their own vectors.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if pixel_values is not None and mm_encoder_outputs:
            raise ValueError("Pass `pixel_values` or `mm_encoder_outputs`, not both: they are the same images.")
        check_input_shapes(input_ids, inputs_embeds, attention_mask, pixel_values, alignment_levels, self.config,
                           position_ids, gate_text_mask)
        segments, use_cache = packed_call(self.language_model.config, attention_mask, position_ids, use_cache, kwargs)
        if input_ids is not None:  # words first, then images, as LLaVA: one module order for every batch
            word_embeds = self.get_input_embeddings()(safe_token_ids(input_ids, table_size(self)))
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None and pixel_values.shape[0] > 0:
            vision_kwargs = {key: kwargs[key] for key in ("output_attentions", "output_hidden_states") if key in kwargs}
            image_outputs = self.get_image_features(pixel_values, vision_feature_layer, vision_feature_select_strategy,
                                                    return_dict=True, **vision_kwargs)
        image_features = None if image_outputs is None else torch.stack(list(image_outputs.pooler_output))
        if input_ids is None and image_features is not None:  # inputs_embeds with pixels: placeholders found by value
            placeholders = (self.config.image_token_id, self.config.alignment_token_id)
            input_ids = placeholder_ids_from_embeddings(inputs_embeds, self.get_input_embeddings().weight, placeholders)
            word_embeds = inputs_embeds
        alignment_weights = None
        if input_ids is not None and pixels_withheld and image_features is None:
            inputs_embeds = word_embeds
        elif input_ids is not None:
            inputs_embeds, alignment_weights = self._merge_multimodal(
                input_ids, word_embeds, image_features, attention_mask, alignment_levels, gate_text_mask, segments)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1])
        outputs = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=use_cache, **kwargs)
        return AlignGPTModelOutputWithPast(**outputs, image_outputs=image_outputs, image_hidden_states=image_features,
                                           alignment_weights=alignment_weights)

    def _merge_multimodal(self, input_ids, word_embeds, image_features, attention_mask, alignment_levels, gate_mask,
                          segments=None):
        """Image features into `<image>` slots (as LLaVA), alignment vectors into `<align>` slots; the checks share one
        device-to-host copy (as LLaVA's). With `segments` (packed rows) counts, levels and gate run per sample."""
        image_id, align_id, vocab_size = self.config.image_token_id, self.config.alignment_token_id, table_size(self)
        if image_features is None:
            if input_ids.shape[1] > 1:  # not on decoding steps: generate suppresses both ids, and a sync stalls a GPU
                check_no_placeholders(input_ids == image_id, input_ids == align_id, input_ids, vocab_size)
            return word_embeds, None
        image_mask, align_mask = input_ids == image_id, input_ids == align_id
        image_features = image_features.to(word_embeds.device, word_embeds.dtype)
        levels = None if alignment_levels is None else torch.as_tensor(alignment_levels, device=input_ids.device).long()
        levels = None if levels is None else levels.reshape(-1)
        image_tokens_per_row, align_per_row = placeholder_counts(image_mask, align_mask, segments)
        check_placeholders(image_tokens_per_row, align_per_row, image_features, self.config.uses_alignment_token,
                           levels, self.config.num_alignment_levels, input_ids, vocab_size)
        images_per_row = image_tokens_per_row // image_features.shape[1]
        inputs_embeds = word_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
        if not self.config.uses_alignment_token:
            return inputs_embeds, None
        vectors, weights = self.alignment(word_embeds, image_features, images_per_row,
                                          (image_mask, align_mask, attention_mask, gate_mask), levels, segments)
        inputs_embeds = inputs_embeds.masked_scatter(align_mask.unsqueeze(-1), vectors.to(inputs_embeds.dtype))
        return inputs_embeds, weights


class AlignGPTForConditionalGeneration(AlignGPTPreTrainedModel, LlavaForConditionalGeneration):
    """AlignGPT with its LM head: training loss, logits, and `generate` with a KV cache.

    Example:

    ```python
    >>> import torch
    >>> from transformers import CLIPVisionConfig, LlamaConfig
    >>> from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration

    >>> vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    ...                           image_size=32, patch_size=8)
    >>> text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                    num_attention_heads=4, num_key_value_heads=2)
    >>> model = AlignGPTForConditionalGeneration(
    ...     AlignGPTConfig(vision_config=vision, text_config=text, image_token_id=126, alignment_token_id=127))
    >>> input_ids = torch.tensor([[1, 127] + [126] * 16 + [5, 6, 7]])   # BOS, <align>, 16 x <image>, text
    >>> out = model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32))
    >>> out.logits.shape, out.alignment_weights.shape
    (torch.Size([1, 21, 128]), torch.Size([1, 7]))
    ```
    """

    _auto_class = "AutoModelForImageTextToText"

    def __init__(self, config: AlignGPTConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = AlignGPTModel(config)
        head_bias = config.text_config.model_type in LM_HEAD_BIAS
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=head_bias)
        self.post_init()
        self.generation_config.suppress_tokens = sorted({config.image_token_id, config.alignment_token_id})

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        alignment_levels: torch.LongTensor | None = None,
        gate_text_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AlignGPTCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids to predict (-100 = ignored). With `gate_text_scope="prompt"` the gate averages only positions
            whose label is -100, so training sees the same text as inference.
        See [`AlignGPTModel.forward`] for the other inputs. Loss keyword arguments (`num_items_in_batch`, ...) reach
        `self.loss_function` as in LLaVA (gradient accumulation normalises by the whole accumulated batch).
        """
        if labels is not None:
            check_labels(labels, (input_ids if input_ids is not None else inputs_embeds).shape[:2],
                         self.config.text_config.vocab_size, all_ignored_ok=kwargs.get("num_items_in_batch") is not None)
            if gate_text_mask is None and self.config.gate_text_scope == "prompt":
                gate_text_mask = labels == -100
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, alignment_levels=alignment_levels,
                             gate_text_mask=gate_text_mask, mm_encoder_outputs=mm_encoder_outputs, return_dict=True,
                             vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        cap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma2/Gemma3: as the family's ForCausalLM does after its head (TRL's fused head too)
            logits = torch.tanh(logits / cap) * cap
        loss = None if labels is None else self.loss_function(logits, labels, self.config.text_config.vocab_size, **kwargs)
        others = {key: value for key, value in outputs.items() if key != "last_hidden_state"}  # cache: its own name
        return AlignGPTCausalLMOutputWithPast(loss=loss, logits=logits, **others)

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, attention_mask=None,
                                      is_first_iteration=False, **kwargs):
        """transformers' inputs, plus: `pixels_withheld` where it withholds the images (decoding steps, assistant
        drafts), and the gate's text mask from the 2-D padding mask before a static cache turns that mask 4-D."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds,
                                                             attention_mask=attention_mask,
                                                             is_first_iteration=is_first_iteration, **kwargs)
        if model_inputs.get("pixel_values") is None and not model_inputs.get("mm_encoder_outputs"):
            model_inputs.pop("gate_text_mask", None)  # no gate runs; a growing mask would retrace a compiled step
            if not is_first_iteration:
                model_inputs["pixels_withheld"] = True
        elif model_inputs.get("gate_text_mask") is None and attention_mask is not None and attention_mask.dim() == 2:
            tokens = model_inputs["inputs_embeds"] if model_inputs.get("input_ids") is None else model_inputs["input_ids"]
            model_inputs["gate_text_mask"] = attention_mask[:, -tokens.shape[1]:]
        return model_inputs

    def _validate_model_kwargs(self, model_kwargs: dict):
        """generate's keyword check, minus the KV cache, which `**kwargs` carries under the installed version's name
        (`past_key_values` in 5.23, `cache` from 5.24). Needed: assisted decoding passes the cache to generate."""
        super()._validate_model_kwargs({key: val for key, val in model_kwargs.items() if not isinstance(val, Cache)})

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Freeze the gate's text to the prompt, so decoding without a cache reproduces the cached ALIGN vector."""
        num_new_tokens = kwargs.get("num_new_tokens", args[1] if len(args) > 1 else 1)
        gate_mask = model_kwargs.get("gate_text_mask")
        gate_mask = model_kwargs.get("attention_mask") if gate_mask is None else gate_mask
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if gate_mask is not None:
            model_kwargs["gate_text_mask"] = torch.cat([gate_mask, gate_mask.new_zeros(len(gate_mask), num_new_tokens)], -1)
        return model_kwargs

    @classmethod
    def from_llava(cls, model_or_path, alignment_token_id: int | None = None, **config_kwargs):
        """AlignGPT from a transformers LLaVA (model, folder or Hub id): its weights bit for bit, a fresh level table and
        gate, a vocabulary row for `<align>` (`alignment_token_id`, default: a new row). `config_kwargs` set alignment
        fields; `alignment_mode="none"` gives LLaVA's logits. With the processor: `aligngpt-hf from-llava`."""
        return aligngpt_from_llava(cls, model_or_path, alignment_token_id, **config_kwargs)


__all__ = ["AlignGPTForConditionalGeneration", "AlignGPTModel", "AlignGPTPreTrainedModel"]

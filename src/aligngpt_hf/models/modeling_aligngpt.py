# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""AlignGPT: LLaVA-1.5 plus one alignment token whose vector comes from a learned table of alignment levels.

Remote-code file: it imports only torch/transformers and its neighbours in this folder (`from .x import ...`).
All alignment logic lives in `AlignGPTModel.forward`, because TRL's SFTTrainer trains through the base model
(`model.model(...)`) with its own fused LM head and never calls the top-level forward.
"""

import inspect
import math
from pathlib import Path
from shutil import copyfile

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import can_return_tuple

from .abstractor_aligngpt import AlignGPTVisualAbstractor
from .alignment_aligngpt import AlignGPTAlignment, gate_text_mask, image_text_dots
from .configuration_aligngpt import AlignGPTConfig
from .outputs_aligngpt import CACHE_FIELD, AlignGPTCausalLMOutputWithPast, AlignGPTModelOutputWithPast
from .packing_aligngpt import packed_call, packed_image_text_dots, placeholder_counts
from .placeholders_aligngpt import (
    check_labels,
    check_model_inputs,
    check_no_placeholders,
    check_placeholders,
    safe_token_ids,
)

# Auto classes written into `auto_map` on save, so every loader finds its entry with trust_remote_code.
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_aligngpt.AlignGPTConfig",
    "AutoModel": "modeling_aligngpt.AlignGPTForConditionalGeneration",  # see docs/native.md, "Auto classes"
    "AutoModelForImageTextToText": "modeling_aligngpt.AlignGPTForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_aligngpt.AlignGPTForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_aligngpt.AlignGPTProcessor"}


class AlignGPTMultiModalProjector(nn.Module):
    """Vision features -> LLM width: `linear` or `mlp2x_gelu` (Linear, GELU, Linear), as in LLaVA-1.5."""

    def __init__(self, config: AlignGPTConfig):
        super().__init__()
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(vision_width, text_width, bias=bias)
        if config.projector_type == "mlp2x_gelu":
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(text_width, text_width, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(image_features)
        if hasattr(self, "linear_2"):
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states


class AlignGPTPreTrainedModel(PreTrainedModel):
    config_class = AlignGPTConfig
    config: AlignGPTConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # a decoding step traces with fullgraph=True (modeling_tests/models/test_native.py)

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

    def _linears_with_torch_init(self) -> set[int]:
        base = getattr(self, self.base_model_prefix, self)
        owners = [base.multi_modal_projector, getattr(base, "alignment", None)]
        return {id(m) for owner in owners if owner is not None for m in owner.modules() if isinstance(m, nn.Linear)}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also write the full `auto_map` and the processor's remote-code file next to the weights."""
        processing_file = Path(__file__).with_name("processing_aligngpt.py")
        auto_map = dict(REMOTE_AUTO_MAP, **(PROCESSOR_AUTO_MAP if processing_file.is_file() else {}))
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        super().save_pretrained(save_directory, *args, **kwargs)
        if processing_file.is_file():
            for path in [str(processing_file), *get_relative_import_files(str(processing_file))]:
                copyfile(path, Path(save_directory) / Path(path).name)


def positions_from_mask(attention_mask: torch.Tensor, sequence_length: int) -> torch.LongTensor:
    """Position ids that count only attended tokens, so left and right padding give identical positions."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -sequence_length:]


class AlignGPTModel(AlignGPTPreTrainedModel):
    """Vision tower + projector + level table/gate + language model, without the LM head."""

    _auto_class = "AutoModel"

    def __init__(self, config: AlignGPTConfig):
        super().__init__(config)
        config.check_token_ids()
        self.vision_tower = AutoModel.from_config(config.vision_config)
        if config.projector_type == "abstractor":
            self.multi_modal_projector = AlignGPTVisualAbstractor(config)
        else:
            self.multi_modal_projector = AlignGPTMultiModalProjector(config)
        if config.uses_alignment_token:
            self.alignment = AlignGPTAlignment(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """[num_images, 3, H, W] -> the vision tower's output with `pooler_output` = one projected
        `(image_seq_length, text_hidden)` tensor per image, as transformers' LLaVA returns it.

        `vision_feature_layer`/`vision_feature_select_strategy` default to the config's; `output_hidden_states` and
        `output_attentions` ask the vision tower for them (the hidden states are otherwise left out of the output).
        """
        outputs, features = self._image_outputs(pixel_values, vision_feature_layer, vision_feature_select_strategy,
                                                **kwargs)
        outputs.pooler_output = list(features)
        return outputs

    def _image_outputs(self, pixel_values, feature_layer=None, select_strategy=None, **kwargs):
        """(vision outputs, projected features [num_images, image_seq_length, text_hidden]): the forward's path."""
        feature_layer = self.config.vision_feature_layer if feature_layer is None else feature_layer
        select_strategy = select_strategy or self.config.vision_feature_select_strategy
        keep_hidden = kwargs.pop("output_hidden_states", None)
        keep_hidden = self.config.vision_config.output_hidden_states if keep_hidden is None else keep_hidden
        vision_kwargs = {key: kwargs[key] for key in ("output_attentions",) if key in kwargs}
        vision_dtype = self.vision_tower.get_input_embeddings().weight.dtype
        outputs = self.vision_tower(
            pixel_values.to(vision_dtype), output_hidden_states=True, return_dict=True, **vision_kwargs
        )
        features = outputs.hidden_states[feature_layer]
        if select_strategy == "default":
            features = features[:, 1:]
        if self.config.vision_feature_post_layernorm:
            features = self.vision_tower.post_layernorm(features)
        projector_dtype = next(self.multi_modal_projector.parameters()).dtype
        if not keep_hidden:
            outputs.hidden_states = None
        return outputs, self.multi_modal_projector(features.to(projector_dtype))

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
        pixels_withheld: bool = False,
        **kwargs,
    ) -> AlignGPTModelOutputWithPast:
        r"""
        alignment_levels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Level (0..N-1, N-1 strongest) per sample: image rows take the table row E[level] instead of the gate
            (stage-1 pre-training and the "fixed level" inference mode). Ignored for rows without an image.
        gate_text_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Restricts the text tokens the gate averages (1 = may count). Trainers pass `labels == -100` so the
            gate sees the prompt only; BOS, `<align>`, `<image>` and padding never count.
        pixels_withheld (`bool`, defaults to `False`): set by `generate` on the steps where transformers withholds
            `pixel_values` (decoding steps, and every pass of an assistant/draft model): placeholder ids are then
            embedded as plain tokens, as LLaVA does, instead of being refused.

        `inputs_embeds` may come with `pixel_values`: the `<image>`/`<align>` slots are found by comparing each vector
        with the embedded placeholder ids (as LLaVA does), so prompt-tuning adapters can prepend their own vectors.
        The KV cache and every other language-model argument travel in `kwargs` under the installed transformers'
        names (`past_key_values` up to 5.23, `cache` from 5.24), so one file serves both.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        check_model_inputs(input_ids, inputs_embeds, attention_mask, pixel_values, alignment_levels,
                           self.config.vision_config)
        image_features = alignment_weights = None
        segments, use_cache = packed_call(self.language_model.config, attention_mask, position_ids, use_cache, kwargs)
        image_outputs = vision_anchor = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_outputs, image_features = self._image_outputs(pixel_values, **kwargs)
            image_outputs.pooler_output = list(image_features)  # as get_image_features returns it
        elif input_ids is not None and self.training and torch.is_grad_enabled():
            vision_anchor = self._vision_anchor()  # where image batches run the tower: one module order on all ranks
        if input_ids is not None:
            embeddings = self.get_input_embeddings()
            word_embeds = embeddings(safe_token_ids(input_ids, embeddings.num_embeddings))
            if vision_anchor is not None:
                word_embeds = word_embeds + 0.0 * vision_anchor
        elif image_features is not None:  # inputs_embeds with pixels: placeholders found by value
            input_ids, word_embeds = self._placeholder_ids(inputs_embeds), inputs_embeds
        if input_ids is not None and pixels_withheld and image_features is None:
            inputs_embeds = word_embeds
        elif input_ids is not None:
            inputs_embeds, image_features, alignment_weights = self._merge_multimodal(
                input_ids, word_embeds, image_features, attention_mask, alignment_levels, gate_text_mask, segments
            )
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1])
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        return AlignGPTModelOutputWithPast(
            **outputs, image_outputs=image_outputs, image_hidden_states=image_features, alignment_weights=alignment_weights
        )

    def _placeholder_ids(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """Ids for `inputs_embeds`: the placeholder id where a vector equals its embedding, a plain token elsewhere."""
        table = self.get_input_embeddings()
        placeholders = (self.config.image_token_id, self.config.alignment_token_id)
        plain = min({0, 1, 2} - set(placeholders))
        ids = torch.full(inputs_embeds.shape[:2], plain, dtype=torch.long, device=inputs_embeds.device)
        for token_id in placeholders:
            vector = table(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
            ids = ids.masked_fill((inputs_embeds == vector).all(-1), token_id)
        return ids

    def _merge_multimodal(self, input_ids, word_embeds, image_features, attention_mask, alignment_levels, gate_mask,
                          segments=None):
        """Scatter image features into `<image>` slots and alignment vectors into `<align>` slots.

        All placeholder checks share one device-to-host copy (LLaVA makes one too), so a GPU step waits once.
        `segments` (packed rows, see packing_aligngpt.py): counts, levels and the gate run per sample, not per row.
        """
        image_id, align_id = self.config.image_token_id, self.config.alignment_token_id
        if image_features is None:
            if input_ids.shape[1] > 1:  # not on decoding steps: generate suppresses both ids, and a sync stalls a GPU
                check_no_placeholders(input_ids == image_id, input_ids == align_id, input_ids,
                                      self.get_input_embeddings().num_embeddings)
            if self.training and torch.is_grad_enabled():
                word_embeds = word_embeds + self._static_graph_anchor(word_embeds)
            return word_embeds, None, None

        image_mask, align_mask = input_ids == image_id, input_ids == align_id
        image_features = image_features.to(word_embeds.device, word_embeds.dtype)
        levels = None
        if alignment_levels is not None and self.config.uses_alignment_token:
            levels = torch.as_tensor(alignment_levels, device=input_ids.device).long().reshape(-1)
        image_tokens_per_row, align_per_row = placeholder_counts(image_mask, align_mask, segments)
        check_placeholders(
            image_tokens_per_row, align_per_row, image_features.shape, self.config.uses_alignment_token,
            levels, self.config.num_alignment_levels, input_ids, self.get_input_embeddings().num_embeddings,
        )
        images_per_row = image_tokens_per_row // image_features.shape[1]
        inputs_embeds = word_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
        if not self.config.uses_alignment_token:
            return inputs_embeds, image_features, None

        rows_with_image = images_per_row > 0
        weights = None
        if levels is not None:
            vectors = self.alignment.vectors_for_levels(levels.clamp(0, self.config.num_alignment_levels - 1))
        else:
            if self.config.uses_gate:
                text_mask = gate_text_mask(image_mask, align_mask, attention_mask, gate_mask)
                dots = (image_text_dots(word_embeds, text_mask, image_features, images_per_row) if segments is None
                        else packed_image_text_dots(word_embeds, text_mask, image_features, images_per_row, *segments))
                weights = self.alignment.gate(dots)
            vectors = self.alignment.vectors_for_weights(weights, images_per_row.shape[0])
            if weights is not None:
                weights = weights.masked_fill(~rows_with_image.unsqueeze(-1), float("nan"))
        # Image rows first, in batch order: masked_scatter fills the `<align>` slots from the front of its source,
        # and the leftover text-only rows are never read. A stable sort needs no host sync (boolean indexing would).
        vectors = vectors[torch.argsort((~rows_with_image).to(torch.uint8), stable=True)]
        inputs_embeds = inputs_embeds.masked_scatter(align_mask.unsqueeze(-1), vectors.to(inputs_embeds.dtype))
        return inputs_embeds, image_features, weights

    def _vision_anchor(self) -> torch.Tensor | None:
        """Zero-input pass through the trainable (or ZeRO-3-partitioned) vision path of an image-free training batch.

        It runs where image batches run the tower, before the word embeddings, so every rank gathers ZeRO-3 shards and
        walks its backward in one module order; in another order the ranks wait on each other's collectives.
        """
        device = self.get_input_embeddings().weight.device
        if any(p.requires_grad or hasattr(p, "ds_id") for p in self.vision_tower.parameters()):
            size = self.config.vision_config.image_size
            blank = torch.zeros(1, self.config.vision_config.num_channels, size, size, device=device)
            return self._image_outputs(blank)[1].sum()
        if any(p.requires_grad or hasattr(p, "ds_id") for p in self.multi_modal_projector.parameters()):
            tokens = self.config.num_vision_feature_tokens or self.config.image_seq_length
            projector_dtype = next(self.multi_modal_projector.parameters()).dtype
            blank = torch.zeros(1, tokens, self.config.vision_config.hidden_size, device=device, dtype=projector_dtype)
            return self.multi_modal_projector(blank).sum()
        return None

    def _static_graph_anchor(self, word_embeds: torch.Tensor) -> torch.Tensor:
        """Zero-valued term touching the trainable gate and level table in image-free training batches (the vision
        side is `_vision_anchor`, added to the word embeddings).

        DDP, ZeRO-3 and FSDP expect every trainable parameter in every step's graph; the cost is one gate pass on a
        zero input per image-free batch.
        """
        terms = []
        alignment = getattr(self, "alignment", None)
        if alignment is not None and hasattr(alignment, "fc1") and alignment.fc1.weight.requires_grad:
            terms.append(alignment.gate(word_embeds.new_zeros(1, self.config.image_seq_length)).sum())
        if alignment is not None and alignment.level_embeddings.requires_grad:
            terms.append(alignment.level_embeddings.sum())
        return 0.0 * sum(terms) if terms else word_embeds.new_zeros(())


class AlignGPTForConditionalGeneration(AlignGPTPreTrainedModel, GenerationMixin):
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
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: AlignGPTConfig):
        super().__init__(config)
        self.model = AlignGPTModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self.generation_config.suppress_tokens = sorted({config.image_token_id, config.alignment_token_id})

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

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
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> AlignGPTCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids to predict (-100 = ignored). With `gate_text_scope="prompt"` the gate averages only positions
            whose label is -100, so training sees the same text as inference.
        See [`AlignGPTModel.forward`] for `alignment_levels` and `gate_text_mask`. Loss keyword arguments
        (`num_items_in_batch`, `shift_labels`, ...) reach `self.loss_function` as in LLaVA, so gradient accumulation
        in `transformers.Trainer` normalises by the tokens of the whole accumulated batch.
        """
        if labels is not None:
            check_labels(labels, (input_ids if input_ids is not None else inputs_embeds).shape[:2],
                         all_ignored_ok=kwargs.get("num_items_in_batch") is not None)
        if labels is not None and gate_text_mask is None and self.config.gate_text_scope == "prompt":
            gate_text_mask = labels == -100
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            alignment_levels=alignment_levels,
            gate_text_mask=gate_text_mask,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return AlignGPTCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            image_hidden_states=outputs.image_hidden_states,
            alignment_weights=outputs.alignment_weights,
        )

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration=False, **kwargs):
        """transformers' inputs, plus: `pixels_withheld` where it withholds the pixels (decoding steps, assistant
        drafts), and the gate's text mask from the 2-D padding mask before a static cache turns that mask 4-D."""
        padding_mask = kwargs.get("attention_mask")
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        if model_inputs.get("pixel_values") is None:
            model_inputs.pop("gate_text_mask", None)  # no gate runs; a growing mask would retrace a compiled step
            if not is_first_iteration:
                model_inputs["pixels_withheld"] = True
        elif model_inputs.get("gate_text_mask") is None and padding_mask is not None and padding_mask.dim() == 2:
            tokens = model_inputs["inputs_embeds"] if model_inputs.get("input_ids") is None else model_inputs["input_ids"]
            model_inputs["gate_text_mask"] = padding_mask[:, -tokens.shape[1]:]
        return model_inputs

    # generate() checks its keyword arguments against this signature: show the parent's (its cache argument is
    # `past_key_values` up to transformers 5.23, `cache` from 5.24).
    prepare_inputs_for_generation.__signature__ = inspect.signature(GenerationMixin.prepare_inputs_for_generation)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Freeze the gate's text to the prompt, so decoding without a cache reproduces the cached ALIGN vector."""
        num_new_tokens = kwargs.get("num_new_tokens", args[1] if len(args) > 1 else 1)
        gate_mask = model_kwargs.get("gate_text_mask")
        if gate_mask is None and model_kwargs.get("attention_mask") is not None:
            gate_mask = model_kwargs["attention_mask"]
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if gate_mask is not None:
            padding = gate_mask.new_zeros(gate_mask.shape[0], num_new_tokens)
            model_kwargs["gate_text_mask"] = torch.cat([gate_mask, padding], dim=-1)
        return model_kwargs

    @classmethod
    def from_llava(cls, model_or_path, alignment_token_id: int | None = None, **config_kwargs):
        """AlignGPT from a transformers LLaVA (`LlavaForConditionalGeneration` or its folder/Hub id): LLaVA's weights
        bit for bit, a fresh level table and gate (this class's init), a vocabulary row for `<align>`.

        `alignment_token_id`: the id the tokenizer gives `<align>` (default: a new row after LLaVA's vocabulary).
        `config_kwargs` set the alignment fields (`alignment_mode`, `num_alignment_levels`, ...); with
        `alignment_mode="none"` the model computes LLaVA's logits. For the processor too: `aligngpt-hf from-llava`.
        """
        from .llava_aligngpt import aligngpt_from_llava

        return aligngpt_from_llava(cls, model_or_path, alignment_token_id, **config_kwargs)


__all__ = ["AlignGPTForConditionalGeneration", "AlignGPTModel", "AlignGPTPreTrainedModel"]

# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""AlignGPT configuration: LLaVA-1.5's fields plus the alignment ones, checked when the config is made."""

import difflib
import warnings

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec

ALIGNMENT_MODES = ("adaptive", "global", "local", "mean", "none")
GATE_TEXT_SCOPES = ("prompt", "all")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "abstractor")
SELECT_STRATEGIES = ("default", "full")

# Tokens a vision encoder puts in front of its patch tokens (CLIP: one CLS token; SigLIP: none).
VISION_PREFIX_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}

REMOTE_AUTO_MAP = {  # written into `auto_map` on save, so every loader finds its entry with trust_remote_code
    "AutoConfig": "configuration_aligngpt.AlignGPTConfig",
    "AutoModel": "modeling_aligngpt.AlignGPTForConditionalGeneration",  # see docs/native.md, "Auto classes"
    "AutoModelForImageTextToText": "modeling_aligngpt.AlignGPTForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_aligngpt.AlignGPTForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_aligngpt.AlignGPTProcessor"}
# Fields that only the original AlignGPT code writes; our layout never has them.
ORIGINAL_FORMAT_FIELDS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer")


class AlignGPTConfig(PreTrainedConfig):
    r"""
    Configuration of an AlignGPT model: a LLaVA-1.5-style vision-language model whose sequence carries one extra
    *alignment* token right after BOS, built from a learned table of `num_alignment_levels` embeddings.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Any transformers vision encoder config (CLIP, SigLIP). A full `CLIPConfig`/`SiglipConfig` is reduced to its
            `vision_config`. Defaults to CLIP ViT-L/14-336.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Any causal LM config (Llama/Vicuna, Mistral, Qwen2, ...). Defaults to Llama.
        num_alignment_levels (`int`, defaults to 8):
            N, the rows of the level table. Row N-1 is the strongest ("global") alignment.
        alignment_mode (`str`, defaults to `"adaptive"`):
            `adaptive` (gate over the local rows + global row), `global`, `local`, `mean` (ablations of the paper's
            Table 4) or `none` (no alignment token: plain LLaVA).
        gate_hidden_size (`int`, defaults to 256): hidden width of the gate MLP.
        gate_text_scope (`str`, defaults to `"prompt"`):
            Which text the gate averages in training: `prompt` (unsupervised tokens only, as at inference) or `all`
            (every text token, answers included, as the original training did).
        projector_type (`str`, defaults to `"mlp2x_gelu"`): `linear`, `mlp2x_gelu`, or `abstractor` (mPLUG-Owl's visual
            abstractor: learned queries over the visual tokens, `abstractor_num_queries + 1` tokens per image).
        projector_hidden_act (`str`, defaults to `"gelu"`): activation of the `mlp2x_gelu` projector.
        multimodal_projector_bias (`bool`, defaults to `True`): whether the projector linears have a bias.
        vision_feature_layer (`int`, defaults to -2): hidden state of the vision tower fed to the projector.
        vision_feature_select_strategy (`str`, defaults to `"default"`): `default` drops the CLS token, `full` keeps all.
        vision_feature_post_layernorm (`bool`, defaults to `False`):
            Apply the vision tower's `post_layernorm` to every selected token (mPLUG-Owl does; LLaVA does not).
        abstractor_num_queries, abstractor_num_layers, abstractor_num_heads, abstractor_intermediate_size,
        abstractor_attention_dropout, abstractor_layer_norm_eps:
            Shape of the `abstractor` projector (mPLUG-Owl v1: 64 queries, 6 layers, 16 heads, SwiGLU width 2816,
            attention dropout 0.1, inner LayerNorm eps 1e-6). Its width is the vision width.
        image_token_id (`int`, defaults to 32000): id of the `<image>` placeholder token.
        alignment_token_id (`int`, defaults to 32001): id of the `<align>` token.
        image_seq_length (`int`, *optional*):
            Tokens per image. Derived from the vision config and the select strategy; a given value must agree.
        tie_word_embeddings (`bool`, defaults to `False`): tie the LM head to the input embeddings.

    Example:

    ```python
    >>> from transformers import CLIPVisionConfig, LlamaConfig
    >>> from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration

    >>> vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    ...                           image_size=32, patch_size=8)
    >>> text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                    num_attention_heads=4, num_key_value_heads=2)
    >>> config = AlignGPTConfig(vision_config=vision, text_config=text, image_token_id=126, alignment_token_id=127)
    >>> config.image_seq_length  # (32 / 8) ** 2 patches, CLS dropped
    16
    >>> model = AlignGPTForConditionalGeneration(config)
    ```
    """

    model_type = "aligngpt"
    _auto_class = "AutoConfig"
    attribute_map = {"image_token_index": "image_token_id"}
    # Trainer.evaluate/predict: logits only (as LLaVA's); the image outputs and gate weights vary in kind per batch
    keys_to_ignore_at_inference = ["cache", "past_key_values", "image_outputs", "image_hidden_states", "alignment_weights"]
    sub_configs_defaults = {  # CLIP ViT-L/14-336 and Llama, as LLaVA-1.5
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", init_kwargs={
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 336, "patch_size": 14, "projection_dim": 768}),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_alignment_levels: int = 8
    alignment_mode: str = "adaptive"
    gate_hidden_size: int = 256
    gate_text_scope: str = "prompt"
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    vision_feature_post_layernorm: bool = False
    abstractor_num_queries: int = 64
    abstractor_num_layers: int = 6
    abstractor_num_heads: int = 16
    abstractor_intermediate_size: int = 2816
    abstractor_attention_dropout: float = 0.1
    abstractor_layer_norm_eps: float = 1e-6
    image_token_id: int = 32000
    alignment_token_id: int = 32001
    image_seq_length: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        original_fields = [name for name in ORIGINAL_FORMAT_FIELDS if name in kwargs]
        if original_fields:
            raise ValueError(
                f"This is an original-format AlignGPT config (it has {', '.join(original_fields)}), which the "
                "Hugging Face layout cannot load directly. Convert the checkpoint first: "
                "`aligngpt-hf convert SOURCE OUTPUT` (see `aligngpt-hf convert --help`), then load OUTPUT.")
        if kwargs.get("model_type", self.model_type) != self.model_type:  # transformers would only warn, then build
            fix = ("`AlignGPTForConditionalGeneration.from_llava(SOURCE)` or `aligngpt-hf from-llava SOURCE OUTPUT` "
                   "make an AlignGPT of it" if kwargs["model_type"] == "llava" else "load it with its own classes")
            raise ValueError(f"This config is of model type {kwargs['model_type']!r}, not 'aligngpt': {fix}.")
        self._warn_near_misses(kwargs)
        for name in ("vision_config", "text_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (dict, PreTrainedConfig)):
                raise TypeError(f"`{name}` must be a dict or a PreTrainedConfig, got {type(value).__name__} {value!r}.")
        if isinstance(self.vision_config, PreTrainedConfig) and hasattr(self.vision_config, "vision_config"):
            self.vision_config = self.vision_config.vision_config  # CLIPConfig/SiglipConfig -> vision part
        elif isinstance(self.vision_config, dict) and isinstance(self.vision_config.get("vision_config"), dict):
            self.vision_config = self.vision_config["vision_config"]
        super().__post_init__(**kwargs)
        text_type = self.text_config.model_type
        if text_type in VISION_PREFIX_TOKENS or text_type.endswith("vision_model"):
            raise ValueError(f"`text_config` is a {text_type!r} config, a vision tower; give the language model's "
                             "config (llama, qwen2, mistral, ...) and the tower as `vision_config`.")
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self._check_choices()
        self.image_seq_length = self._resolve_image_seq_length(self.image_seq_length)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """transformers' loader, which sets keyword overrides (`from_pretrained(path, alignment_mode=...)`) after
        `__init__`: they are checked here as the constructor checks its arguments."""
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._check_choices()
        return loaded

    def _check_choices(self):
        """Choices, sizes (positive integers) and a `vision_feature_layer` that indexes the tower's hidden states."""
        choices = {"alignment_mode": ALIGNMENT_MODES, "gate_text_scope": GATE_TEXT_SCOPES,
                   "projector_type": PROJECTOR_TYPES, "vision_feature_select_strategy": SELECT_STRATEGIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}.")
        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(f"`projector_hidden_act` is {self.projector_hidden_act!r}, not an activation transformers "
                             "knows (`transformers.activations.ACT2FN`: 'gelu', 'silu', 'relu', ...).")
        for name in ("vision_feature_post_layernorm", "multimodal_projector_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        dropout, eps = self.abstractor_attention_dropout, self.abstractor_layer_norm_eps
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`abstractor_attention_dropout` must be a probability in [0, 1), got {dropout!r}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"`abstractor_layer_norm_eps` must be a positive number, got {eps!r}.")
        if not isinstance(self.num_alignment_levels, int) or self.num_alignment_levels < 2:
            raise ValueError(
                f"`num_alignment_levels` must be an integer >= 2 (one global row plus at least one local row), "
                f"got {self.num_alignment_levels!r}.")
        if self.image_token_id == self.alignment_token_id:
            raise ValueError(f"`image_token_id` and `alignment_token_id` must differ, both are {self.image_token_id}.")
        sizes = ["gate_hidden_size", "abstractor_num_queries", "abstractor_num_layers", "abstractor_num_heads",
                 "abstractor_intermediate_size"] + (["image_seq_length"] if self.image_seq_length is not None else [])
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        layers, layer = getattr(self.vision_config, "num_hidden_layers", None), self.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"`vision_feature_layer` must be an integer (e.g. -2), got {layer!r}.")
        if layers is not None and not -(layers + 1) <= layer <= layers:
            raise ValueError(
                f"`vision_feature_layer={layer}` is outside the vision tower's {layers + 1} hidden states "
                f"(embeddings + {layers} layers): use a value in {-(layers + 1)}..{layers} (AlignGPT uses -2).")

    def check_token_ids(self):
        """Called when a model is built: `<image>`/`<align>` ids inside the vocabulary and distinct from BOS/EOS/PAD
        (a config alone may precede the tokenizer resize, so this is not checked at config creation)."""
        vocab_size, text = self.text_config.vocab_size, self.text_config
        specials = {name: getattr(text, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        for name in ("image_token_id", "alignment_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(
                    f"`{name}={value!r}` is outside the language model's vocabulary (0..{vocab_size - 1}). Add the "
                    "token to the tokenizer, resize `text_config.vocab_size`, and set the id the tokenizer gives.")
            for special, special_id in specials.items():
                ids = special_id if isinstance(special_id, (list, tuple)) else [special_id]
                if value in ids:
                    raise ValueError(
                        f"`{name}={value}` is also the text model's `{special}`; `<image>`/`<align>` need their own "
                        "tokens (tokenizer.add_special_tokens) so they never collide with BOS/EOS/padding.")

    def _resolve_image_seq_length(self, given: int | None) -> int:
        """Tokens per image in the LLM sequence: the gate's input width."""
        if self.vision_config.model_type == "siglip2_vision_model":
            raise ValueError(
                "`vision_config` is a SigLIP2 NaFlex tower ('siglip2_vision_model'): it needs `pixel_attention_mask` "
                "and `spatial_shapes` and gives each image its own number of patches, which a fixed `<image>` count "
                "and gate width cannot take. Use a fixed-resolution SigLIP2 checkpoint instead (google/siglip2-*-"
                "patch16-256/384/512 or -patch14-224/384, which load as 'siglip')."
            )
        if self.projector_type == "abstractor":
            derived, reason = self.abstractor_num_queries + 1, f"{self.abstractor_num_queries} abstractor queries + 1"
        else:
            derived = self.num_vision_feature_tokens
            if derived is None:
                if given is None:
                    raise ValueError(
                        f"Cannot derive `image_seq_length` for vision model type {self.vision_config.model_type!r}; "
                        "pass `image_seq_length` (feature tokens per image after the select strategy).")
                return given
            vision = self.vision_config
            reason = (f"{vision.model_type} at {vision.image_size}px with patch {vision.patch_size} and strategy "
                      f"{self.vision_feature_select_strategy!r}")
        if given is not None and given != derived:
            raise ValueError(
                f"`image_seq_length={given}` disagrees with the model: {reason} gives {derived} tokens per image "
                "(the gate's input width).")
        return derived

    def _warn_near_misses(self, kwargs: dict) -> None:
        """transformers keeps unknown keywords as plain attributes, so `alignment_modes="global"` would silently leave
        the mode adaptive: warn about a keyword that is one slip away from one of AlignGPT's fields."""
        fields = [name for name in type(self).__annotations__ if name not in kwargs]
        for key in kwargs:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
            if close and key not in self.attribute_map:
                warnings.warn(f"`{key}` is not an AlignGPTConfig field (did you mean `{close[0]}`?); it is kept as a "
                              "plain attribute and changes nothing.", UserWarning, stacklevel=3)

    @property
    def num_vision_feature_tokens(self) -> int | None:
        """Vision tokens fed to the projector (patches, plus CLS with strategy `full`); None if not derivable."""
        vision = self.vision_config
        prefix = VISION_PREFIX_TOKENS.get(vision.model_type)
        if prefix is None or not hasattr(vision, "image_size") or not hasattr(vision, "patch_size"):
            return None
        if self.vision_feature_select_strategy == "default" and prefix == 0:
            raise ValueError(
                f"`vision_feature_select_strategy='default'` drops a CLS token, but {vision.model_type!r} has none; "
                "use `vision_feature_select_strategy='full'`.")
        for name in ("image_size", "patch_size"):
            value = getattr(vision, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`vision_config.{name}` must be a positive integer, got {value!r}.")
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches if self.vision_feature_select_strategy == "default" else patches + prefix

    @property
    def uses_alignment_token(self) -> bool:
        return self.alignment_mode != "none"

    @property
    def uses_gate(self) -> bool:
        return self.alignment_mode in ("adaptive", "local")


__all__ = ["PROCESSOR_AUTO_MAP", "REMOTE_AUTO_MAP", "AlignGPTConfig"]

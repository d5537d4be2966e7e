"""aligngpt-hf: AlignGPT (adaptive-alignment LLaVA-style VLM) native to transformers, TRL and PEFT.

Importing the package registers AlignGPT with transformers' Auto classes (idempotent; nothing else happens at import).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_aligngpt import AlignGPTConfig
from .modeling_aligngpt import AlignGPTForConditionalGeneration, AlignGPTModel, AlignGPTPreTrainedModel
from .processing_aligngpt import AlignGPTProcessor

__version__ = "0.1.0"

# Heavier parts (TRL trainers, data adapters, conversion) load on first use, not at import.
_LAZY_EXPORTS = {
    "AlignGPTPretrainConfig": "aligngpt_hf.trainers",
    "AlignGPTPretrainTrainer": "aligngpt_hf.trainers",
    "AlignGPTInstructConfig": "aligngpt_hf.trainers",
    "AlignGPTInstructTrainer": "aligngpt_hf.trainers",
    "load_llava_json": "aligngpt_hf.data",
    "convert_checkpoint": "aligngpt_hf.convert",
    "push_to_hub": "aligngpt_hf.hub",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'aligngpt_hf' has no attribute {name!r}")


def register_auto_classes() -> None:
    """Map `model_type="aligngpt"` to our classes in transformers' Auto factories (safe to call repeatedly)."""
    AutoConfig.register(AlignGPTConfig.model_type, AlignGPTConfig, exist_ok=True)
    AutoModel.register(AlignGPTConfig, AlignGPTModel, exist_ok=True)
    AutoModelForImageTextToText.register(AlignGPTConfig, AlignGPTForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(AlignGPTConfig, AlignGPTForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(AlignGPTConfig, AlignGPTProcessor, exist_ok=True)


register_auto_classes()

__all__ = [
    *_LAZY_EXPORTS,
    "AlignGPTConfig",
    "AlignGPTForConditionalGeneration",
    "AlignGPTModel",
    "AlignGPTPreTrainedModel",
    "AlignGPTProcessor",
    "register_auto_classes",
]

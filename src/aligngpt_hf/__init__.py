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

from .models.configuration_aligngpt import AlignGPTConfig
from .models.modeling_aligngpt import AlignGPTForConditionalGeneration, AlignGPTModel, AlignGPTPreTrainedModel
from .models.processing_aligngpt import AlignGPTProcessor

__version__ = "0.1.0"

# Heavier parts (TRL trainers, data adapters, conversion) load on first use, not at import.
_LAZY_EXPORTS = {
    "AlignGPTPretrainConfig": "aligngpt_hf.training.configs",
    "AlignGPTPretrainTrainer": "aligngpt_hf.training.trainers",
    "AlignGPTInstructConfig": "aligngpt_hf.training.configs",
    "AlignGPTInstructTrainer": "aligngpt_hf.training.trainers",
    "load_llava_json": "aligngpt_hf.training.data",
    "convert_checkpoint": "aligngpt_hf.conversion.convert",
    "push_to_hub": "aligngpt_hf.hub.push",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'aligngpt_hf' has no attribute {name!r}")


def register_auto_classes() -> None:
    """Map `model_type="aligngpt"` to our classes in transformers' Auto factories (safe to call repeatedly).

    `AutoModel` gives the generation class, exactly as the saved `auto_map` says: an installed package's registration
    wins over a folder's `auto_map`, and lmms-eval's generic `huggingface` wrapper loads custom types through
    `AutoModel` and then calls `generate` (docs/native.md, "Auto classes"). The backbone is `model.model`.
    """
    AutoConfig.register(AlignGPTConfig.model_type, AlignGPTConfig, exist_ok=True)
    AutoModel.register(AlignGPTConfig, AlignGPTForConditionalGeneration, exist_ok=True)
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

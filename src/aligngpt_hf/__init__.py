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


def register_auto_classes() -> None:
    """Map `model_type="aligngpt"` to our classes in transformers' Auto factories (safe to call repeatedly)."""
    AutoConfig.register(AlignGPTConfig.model_type, AlignGPTConfig, exist_ok=True)
    AutoModel.register(AlignGPTConfig, AlignGPTModel, exist_ok=True)
    AutoModelForImageTextToText.register(AlignGPTConfig, AlignGPTForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(AlignGPTConfig, AlignGPTForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(AlignGPTConfig, AlignGPTProcessor, exist_ok=True)


register_auto_classes()

__all__ = [
    "AlignGPTConfig",
    "AlignGPTForConditionalGeneration",
    "AlignGPTModel",
    "AlignGPTPreTrainedModel",
    "AlignGPTProcessor",
    "register_auto_classes",
]

"""Peak GPU memory per device of a training run, estimated from parameter counts and shapes (no GPU needed).

The formula (docs/multi-gpu.md#memory-estimate) adds four terms per device: weights, gradients, optimizer states
(AdamW: two fp32 moments, plus an fp32 master copy where the weights are kept in 16-bit), and activations. P counts
all parameters, T the trainable ones, N the GPUs. Under mixed precision (bf16/fp16):

| strategy | weights | gradients | optimizer | gathered for compute |
| --- | --- | --- | --- | --- |
| ddp   | 4P (fp32, autocast) | 4T + 4T (DDP buckets) | 8T | - |
| zero2 | 2P (16-bit copy) | 2T / N | 12T / N (master + moments) | - |
| zero3 | 2P / N | 2T / N | 12T / N | 2 x 2 x one decoder layer (prefetch) |
| fsdp  | 4P / N (fp32 shards) | 4T / N | 8T / N | 2 x 2 x one decoder layer + 2 x root unit |

In fp32 the 16-bit copies are fp32 and there is no master copy. Activations (same for every strategy) in the
activation dtype (2 bytes mixed, 4 fp32), per language-model layer and token: with activation checkpointing only the
layer input (H) is kept, plus one layer recomputed in full during the backward pass, 11H + 4I elements (attention
through SDPA/flash: no S x S scores; Llama's gated MLP: I the intermediate size). The fused LM head of the trainer
never holds B x S x V logits. A trained vision tower adds the same terms for its layers at (image_size/patch)^2 + 1
tokens per image. Not counted: the CUDA context (about 0.5-1 GiB) and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")


@dataclass
class TrainingShape:
    """What the estimate needs from a planned run."""

    total_params: int
    trainable_params: int
    decoder_layer_params: int  # one language-model decoder layer (the FSDP/ZeRO-3 unit)
    root_params: int  # FSDP root unit: everything outside the decoder layers
    num_layers: int
    hidden_size: int
    intermediate_size: int
    batch_size: int  # per device
    seq_length: int
    mixed_precision: bool
    activation_checkpointing: bool
    num_gpus: int
    vision_layers: int = 0  # > 0 only when the vision tower trains
    vision_hidden_size: int = 0
    vision_intermediate_size: int = 0
    vision_tokens: int = 0


def _layer_activations(tokens: int, layers: int, hidden: int, intermediate: int, checkpointing: bool) -> int:
    """Stored activation elements of `layers` transformer layers over `tokens` tokens."""
    full_layer = tokens * (11 * hidden + 4 * intermediate)
    if checkpointing:
        return layers * tokens * hidden + full_layer
    return layers * full_layer


def activation_bytes(shape: TrainingShape) -> int:
    """Activations per device (bytes), language model plus a trained vision tower."""
    elements = _layer_activations(shape.batch_size * shape.seq_length, shape.num_layers, shape.hidden_size,
                                  shape.intermediate_size, shape.activation_checkpointing)
    if shape.vision_layers:
        elements += _layer_activations(shape.batch_size * shape.vision_tokens, shape.vision_layers,
                                       shape.vision_hidden_size, shape.vision_intermediate_size,
                                       shape.activation_checkpointing)
    return elements * (2 if shape.mixed_precision else 4)


def state_bytes(shape: TrainingShape, strategy: str) -> dict[str, float]:
    """Weights, gradients, optimizer states and gathered parameters per device (bytes) under `strategy`."""
    p, t, n = shape.total_params, shape.trainable_params, shape.num_gpus
    low = 2 if shape.mixed_precision else 4  # DeepSpeed casts the module to 16-bit under mixed precision
    master = 4 * t if shape.mixed_precision else 0
    unit = 2 * low * shape.decoder_layer_params  # one unit in use + one prefetched
    if strategy == "ddp":
        return {"weights": 4 * p, "gradients": 8 * t, "optimizer": 8 * t, "gathered": 0}
    if strategy == "zero2":
        return {"weights": low * p, "gradients": low * t / n, "optimizer": (8 * t + master) / n, "gathered": 0}
    if strategy == "zero3":
        return {"weights": low * p / n, "gradients": low * t / n, "optimizer": (8 * t + master) / n, "gathered": unit}
    if strategy == "fsdp":
        return {"weights": 4 * p / n, "gradients": 4 * t / n, "optimizer": 8 * t / n,
                "gathered": unit + low * shape.root_params}
    raise ValueError(f"Unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}.")


def estimate_memory(shape: TrainingShape) -> dict[str, dict[str, float]]:
    """Per strategy: each term and the total, in GiB (3 decimals)."""
    activations = activation_bytes(shape)
    estimate = {}
    for strategy in STRATEGIES:
        terms = {**state_bytes(shape, strategy), "activations": activations}
        estimate[strategy] = {key: round(value / GIB, 3) for key, value in terms.items()}
        estimate[strategy]["total"] = round(sum(terms.values()) / GIB, 3)
    return estimate


__all__ = ["STRATEGIES", "TrainingShape", "activation_bytes", "estimate_memory", "state_bytes"]

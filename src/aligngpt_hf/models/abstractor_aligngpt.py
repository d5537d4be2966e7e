# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""mPLUG-Owl's visual abstractor as an AlignGPT projector (`projector_type="abstractor"`).

Learned queries attend over [queries ; visual tokens] in L layers whose residual starts from the *normalised*
queries, with a SwiGLU FFN that has a LayerNorm on its inner activation; a linear map to the LLM width and a learned
end-of-image vector follow, so each image becomes `num_queries + 1` tokens (mPLUG-Owl v1, paper §3.1).
"""

import torch
from torch import nn


class AlignGPTAbstractorLayer(nn.Module):
    """One abstractor block: joint attention of the queries over [queries ; visual tokens], then SwiGLU."""

    def __init__(self, width: int, num_heads: int, intermediate_size: int, inner_eps: float, dropout: float):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"abstractor width {width} is not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm_queries = nn.LayerNorm(width)
        self.norm_visual = nn.LayerNorm(width)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))
        self.norm_ffn = nn.LayerNorm(width)
        self.gate_proj = nn.Linear(width, intermediate_size)
        self.up_proj = nn.Linear(width, intermediate_size)
        self.norm_inner = nn.LayerNorm(intermediate_size, eps=inner_eps)
        self.down_proj = nn.Linear(intermediate_size, width)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, width = states.shape
        return states.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        normed = self.norm_queries(queries)
        keys_values = torch.cat([normed, self.norm_visual(visual)], dim=1)
        attended = nn.functional.scaled_dot_product_attention(
            self._heads(self.q_proj(normed)), self._heads(self.k_proj(keys_values)),
            self._heads(self.v_proj(keys_values)), dropout_p=self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(queries.shape)
        hidden = normed + self.o_proj(attended)  # residual from the normalised queries, as mPLUG-Owl
        ffn_input = self.norm_ffn(hidden)
        inner = nn.functional.silu(self.gate_proj(ffn_input)) * self.up_proj(ffn_input)
        return hidden + self.down_proj(self.norm_inner(inner))


class AlignGPTVisualAbstractor(nn.Module):
    """[num_images, T, vision_width] -> [num_images, num_queries + 1, text_width]."""

    def __init__(self, config):
        super().__init__()
        width = config.vision_config.hidden_size
        self.query_tokens = nn.Parameter(torch.empty(config.abstractor_num_queries, width))
        self.layers = nn.ModuleList(
            AlignGPTAbstractorLayer(width, config.abstractor_num_heads, config.abstractor_intermediate_size,
                                    config.abstractor_layer_norm_eps, config.abstractor_attention_dropout)
            for _ in range(config.abstractor_num_layers))
        self.linear_out = nn.Linear(width, config.text_config.hidden_size)
        self.end_of_image = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        visual = visual.to(self.query_tokens.dtype)
        queries = self.query_tokens.to(visual.dtype).expand(visual.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, visual)
        outputs = self.linear_out(queries)
        end = self.end_of_image.to(outputs.dtype).expand(outputs.shape[0], 1, -1)
        return torch.cat([outputs, end], dim=1)


__all__ = ["AlignGPTAbstractorLayer", "AlignGPTVisualAbstractor"]

"""The Llama family in plain PyTorch: Llama, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

Names match Hugging Face checkpoints, except q/k/v and gate/up: one GEMM each
(`MergedLinear`, filled from the checkpoint's separate tensors). Llama and Qwen3 may put
biases on q/k/v/o (`attention_bias`), Llama on the MLP (`mlp_bias`). Activations are
flat, `[num_tokens, hidden]`. A forward pass takes the KV cache (a (K, V) pair per layer)
and the step's attention metadata. On CUDA the small operations are fused Triton kernels
(`ops/`): each RMSNorm takes the residual add before it, so a layer passes its residual
on; the attention layer norms (Qwen3) and rotates q, k and writes the cache in one.

Introduced in M0; changed in M1 (the KV cache), M4 (merged projections, fused kernels;
logits in the model's dtype).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ...attention.layer import Attention, AttentionMetadata
from ...config import ModelConfig
from ...ops.activation import silu_and_mul
from ..layers.layernorm import RMSNorm
from ..layers.linear import MergedLinear
from ..layers.rotary_embedding import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, d)
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = MergedLinear(h, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                                     bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_proj_bias)
        qk_norm = None
        if config.qk_norm:  # applied by the attention layer, fused with the rotation
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
            qk_norm = (self.q_norm, self.k_norm)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, d ** -0.5, rotary, qk_norm)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(positions, q, k, v, kv_cache, attn_metadata))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(silu_and_mul(gate, up) if x.is_cuda else F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                kv_cache, attn_metadata: AttentionMetadata):
        """(this layer's output, the residual stream before it is added): the add happens
        in the next norm, fused with it (the first layer has no residual yet)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, attn_metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                 config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, attn_metadata)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama, Qwen2 and Qwen3 differ only in the switches of `ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: one (k, v) per layer -> hidden [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """In the model's dtype: the sampler goes to fp32 only where it computes (a greedy
        argmax needs no fp32 copy of a [batch, vocab] table)."""
        return self.lm_head(hidden)

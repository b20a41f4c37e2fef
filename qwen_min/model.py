"""Qwen2 / Qwen2.5 decoder-only transformer, one small module per concept.

Shapes use B = batch, T = new tokens in this call, S = key length (cached + new), D = hidden size,
H = query heads, Hkv = key/value heads, hd = head_dim, V = vocabulary, F = MLP intermediate size.

The parameter names mirror the Hugging Face checkpoint minus its leading ``model.`` (see
``qwen_min/load.py`` for the explicit map), so ``layers.3.self_attn.q_proj`` here is
``model.layers.3.self_attn.q_proj`` there and in PEFT adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen_min.config import QwenConfig


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), the statistics always in fp32.

    Qwen2 normalises in fp32 and casts back to the input dtype *before* the gain; we do the same
    so bf16 results match the reference bit for bit.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding (RoPE), computed per call from positions.

    inv_freq[i] = theta^(-2i/hd) for i < hd/2; angle = position * inv_freq, duplicated to hd
    (the "rotate-half" layout, where dimension j pairs with j + hd/2).
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> Tensor:
        # Computed on the CPU, then moved (default: the device being built on): the same bits on every
        # device, and no arithmetic on the meta device, whose Python kernels import torch._dynamo (2 s).
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device="cpu").float() / self.head_dim
        return (1.0 / (self.theta**exponent)).to(device or torch.get_default_device())

    def reset_parameters(self) -> None:
        """Recompute the buffer (after the model was built on the meta device)."""
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions [B, T] -> cos, sin [B, T, hd]; angles in fp32, then cast like the reference.
        angles = positions[..., None].float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, hd], cos/sin [B, T, hd] -> x rotated by its position's angles."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Static, preallocated key/value cache for all layers: k, v [L, B, Hkv, max_len, hd].

    ``length`` is the number of positions already written; ``Qwen2.forward`` writes the new
    positions of every layer and then advances it. Preallocation means decoding never reallocates.
    """

    def __init__(self, config: QwenConfig, batch: int, max_len: int, *,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, hd] at positions length..length+T; return the keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_interleave(self, n: int) -> KVCache:
        """Each row repeated n times (row b -> rows b*n .. b*n+n-1): many samples share one prefill."""
        new = object.__new__(KVCache)
        new.k = self.k.repeat_interleave(n, dim=1)
        new.v = self.v.repeat_interleave(n, dim=1)
        new.length = self.length
        return new


class Attention(nn.Module):
    """Grouped-query self-attention with q/k/v biases and no output bias (the Qwen2 layout)."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                              # [B, Hkv, S, hd]
        y = self.attend(q, k, v, mask)                                                    # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(hd), masked) v for q [B, H, T, hd], k, v [B, Hkv, S, hd] -> [B, H, T, hd].

        Each group of H / Hkv query heads shares one KV head. mask [B, 1, T, S] (True = may attend),
        or None when nothing beyond causality is masked: T tokens with no cache prefix attend
        causally (the fused kernels then never build a T x T mask), and one new token sees every
        cached position. (torch's is_causal aligns the triangle top-left, so it must stay off at T = 1.)
        """
        T = q.shape[2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              enable_gqa=self.n_kv_heads != self.n_heads)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with silu(z) = z * sigmoid(z)."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Embedding(nn.Embedding):
    """nn.Embedding that leaves a meta-device weight uninitialised: meta tensors hold no values, and
    there torch's normal_ has no kernel of its own; its Python one imports torch._dynamo, about 2 s
    of every process that builds a model's structure (the loader and the FLOP counter do)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Qwen2(nn.Module):
    """The causal language model: embeddings, blocks, final norm, lm_head (tied or not)."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def hidden(self, input_ids: Tensor, *, attention_mask: Tensor | None = None,
               positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Final-norm hidden states [B, T, D] for input_ids [B, T].

        attention_mask [B, S]: 1 for real tokens, 0 for padding, over all S = cached + new positions
        (as in transformers). Positions default to the count of real tokens before each one, so
        left-padded rows start at position 0. With a cache, the new tokens are written at
        cache.length.. and the cache is advanced.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start} used + {T} new do not fit")
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
            else:
                positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        mask = self._mask(attention_mask, B, T, start, input_ids.device)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Logits [B, T, V] for input_ids [B, T] (see ``hidden`` for the other arguments)."""
        return self.lm_head(self.hidden(input_ids, attention_mask=attention_mask, positions=positions, cache=cache))

    @staticmethod
    def _mask(attention_mask: Tensor | None, B: int, T: int, start: int, device: torch.device) -> Tensor | None:
        """Boolean mask [B, 1, T, S] (True = may attend), or None for the plain causal case.

        Query i (absolute position start + i) sees key j <= start + i that is not padding. Every
        query also sees itself: a padding query would otherwise see nothing, softmax would give NaN,
        and that NaN would leak through 0 * NaN into later layers' real rows.
        """
        S = start + T
        if attention_mask is None and (start == 0 or T == 1):
            return None  # causal over the new tokens, or one new token that may see everything
        q_pos = torch.arange(start, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
            mask = mask & attention_mask.bool()[:, None, None, :] | (k_pos == q_pos)[None, None]
        return mask


@torch.no_grad()
def init_weights(model: nn.Module) -> nn.Module:
    """The Qwen2 initialisation, as transformers does it: every matrix normal(0, 0.02), every other
    parameter (biases) zero, norm weights one. Draws from torch's global generator; seed it first.
    Works on a model whose storage is uninitialised (built on meta, then ``to_empty``)."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() == 2:
            param.normal_(0.0, 0.02)
        else:
            param.zero_()
    return model


def empty_model(config: QwenConfig, dtype: torch.dtype, device: torch.device | str | None) -> Qwen2:
    """A ``Qwen2`` whose storage is allocated once and left uninitialised, for a loader to fill."""
    with torch.device("meta"):
        model = Qwen2(config)
    model = model.to(dtype).to_empty(device=device or "cpu")
    if config.tie_word_embeddings:  # to_empty gives each module its own tensor: tie again
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.reset_parameters()
    return model

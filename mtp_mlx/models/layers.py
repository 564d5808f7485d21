"""Building blocks shared by the Gemma 4 target and its MTP drafter."""

import math

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: ``x * (mean(x^2) + eps)^-1/2 * w`` in float32 (weight used as is, no +1)."""

    def __init__(self, dims: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight if "weight" in self else None
        return mx.fast.rms_norm(x, w, self.eps)


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(rope: dict, head_dim: int) -> mx.array:
    """Inverse frequencies [head_dim/2] for one layer type (spec §2.4).

    ``proportional`` rotates only ``partial_rotary_factor`` of the pairs but keeps the full
    ``head_dim`` in the exponent; the remaining pairs get frequency 0 (identity).
    """
    base = float(rope["rope_theta"])
    half = head_dim // 2
    if rope.get("rope_type", "default") == "proportional":
        n_rot = int(rope.get("partial_rotary_factor", 1.0) * head_dim // 2)
    else:
        n_rot = half
    j = mx.arange(0, 2 * n_rot, 2, dtype=mx.float32)
    inv = 1.0 / (base ** (j / head_dim))
    if n_rot < half:
        inv = mx.concatenate([inv, mx.zeros((half - n_rot,), dtype=mx.float32)])
    factor = float(rope.get("factor", 1.0) or 1.0)
    return inv / factor


def rope_cos_sin(positions: mx.array, inv_freq: mx.array, dtype) -> tuple:
    """cos/sin [B, L, 1, D] for absolute ``positions`` [B, L], computed in float32."""
    ang = positions.astype(mx.float32)[..., None] * inv_freq  # [B, L, D/2]
    ang = mx.concatenate([ang, ang], axis=-1)[:, :, None, :]
    return mx.cos(ang).astype(dtype), mx.sin(ang).astype(dtype)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Half-split ("neox") rotation of x [B, L, H, D]: dim j pairs with j + D/2."""
    half = x.shape[-1] // 2
    rot = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def scaled_embed_factor(hidden_size: int, dtype) -> mx.array:
    """sqrt(hidden) rounded to the weight dtype, as the reference does (spec §2.2)."""
    return mx.array(math.sqrt(hidden_size), dtype=mx.float32).astype(dtype)


def softcap(x: mx.array, cap) -> mx.array:
    if not cap:
        return x
    return mx.tanh(x / cap) * cap

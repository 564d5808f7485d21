"""Building blocks shared by the Gemma 4 target and its MTP drafter."""

import itertools
import math
import threading
from typing import Callable

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
    """Inverse frequencies [head_dim/2] for one layer type (full layers use proportional RoPE).

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


def rope_periods(inv_freq: mx.array) -> mx.array:
    """``mx.fast.rope``'s ``freqs`` (periods, 1/inv_freq; inf = not rotated)."""
    return mx.where(inv_freq > 0, 1.0 / mx.maximum(inv_freq, 1e-30), mx.inf)


def apply_rope(x: mx.array, offsets: mx.array, periods: mx.array) -> mx.array:
    """Half-split ("neox") RoPE of x [B, H, L, D] at positions offsets[b] + 0..L-1."""
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offsets, freqs=periods)


def scaled_embed_factor(hidden_size: int, dtype) -> mx.array:
    """sqrt(hidden) rounded to the weight dtype, as the reference does (it multiplies by a weight-dtype scalar)."""
    return mx.array(math.sqrt(hidden_size), dtype=mx.float32).astype(dtype)


def softcap(x: mx.array, cap) -> mx.array:
    if not cap:
        return x
    return mx.tanh(x / cap) * cap


FUSED_MAX_LEN = 9
"""Longest chunk (tokens per row) that runs a layer's compiled pieces: one decode token or a
verify chunk of up to MAX_DRAFT + 1. Longer chunks (prefill) run uncompiled, so that every new
prompt length does not trace the layers again."""


_THREAD = threading.local()
_THREAD_KEYS = itertools.count()


def _thread_key() -> int:
    """A number naming the calling thread, never reused by a later thread."""
    if not hasattr(_THREAD, "key"):
        _THREAD.key = next(_THREAD_KEYS)
    return _THREAD.key


def fused(module, name: str) -> Callable:
    """``module.<name>``, compiled with ``mx.compile`` once per module instance and thread.

    On small chunks a layer costs the number of operations it launches, not their size; the
    compiled function runs each chain of elementwise operations (the RMSNorm fallbacks, the
    GELU, residual adds, scalars) as one kernel and skips rebuilding the graph in Python.
    Every operation keeps its dtype, so the result is bit-identical to the uncompiled method
    (tested). The module's parameters are inputs of the compiled function, not constants, so
    weights updated after the first call (quantization, loading) are read afresh. A trace
    holds the streams it was made with, and MLX streams belong to one thread (the products
    split across CPU threads name theirs, ``ops.matmul``), so each thread traces its own.
    """
    table = module.__dict__.setdefault("_fused", {})
    key = (name, _thread_key())
    fn = table.get(key)
    if fn is None:
        fn = table[key] = mx.compile(getattr(module, name), inputs=module)
    return fn


def release_fused(*models) -> None:
    """Drop the compiled pieces of ``models`` (and of every module inside them); the next call
    compiles afresh.

    A thread that ran the models calls this before it ends (the server's engine thread does):
    MLX aborts at interpreter exit ("terminate called without an active exception") when a
    compiled function traced on a thread that has ended is destroyed then.
    """
    for model in models:
        if isinstance(model, nn.Module):
            for m in model.modules():
                m.__dict__.pop("_fused", None)
        elif model is not None:  # a wrapper around a model (a pipeline stage)
            release_fused(getattr(model, "model", None), getattr(model, "drafter", None))

"""Multi-position attention over a position-tagged KV cache.

Every key slot carries its absolute token position (``k_pos``; -1 marks an empty slot), every
query its own (``q_pos``). Key ``j`` is visible to query ``i`` of row ``b`` iff
``0 <= k_pos[b, j] <= q_pos[b, i]`` and, for a sliding layer, ``q_pos - k_pos < window``.
One rule covers prefill, the K+1-position verify chunk, ring buffers that have wrapped
(slots in physical order), ragged batches and the drafter's single query.

It serves every attention call of the target and the drafter (prefill, the K+1 verify
chunk, one-token decode steps, draft steps). Two implementations: ``attention_ref`` (pure
MLX, runs everywhere) and a fused Metal kernel (``kernels/verify_attention.metal``, launched
by ``attention_metal``). ``attention`` picks one from its ``backend`` argument, which callers
pass down from the engine: there is no process-global switch.
"""

from __future__ import annotations

import functools
import math
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from mtp_mlx.errors import MtpError


def visibility_mask(q_pos: mx.array, k_pos: mx.array, window: int) -> mx.array:
    """Boolean mask [B, 1, Lq, Lk] from q_pos [B, Lq] and k_pos [B, Lk] (int32)."""
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window:
        mask = mask & (qp - kp < window)
    return mask


def attention_ref(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    q_pos: mx.array,
    k_pos: mx.array,
    window: int = 0,
    scale: float = 1.0,
    mask: Optional[mx.array] = None,
) -> mx.array:
    """Reference attention. q [B, nH, Lq, D], k/v [B, nKV, Lk, D] -> [B, nH, Lq, D].

    Grouped-query heads (nH a multiple of nKV); softmax in float32. A query with no visible
    key (only possible for padding rows) gets an arbitrary finite value. ``mask``: the
    ``visibility_mask`` of these positions, when the caller shares one across layers.
    """
    if mask is None:
        mask = visibility_mask(q_pos, k_pos, window)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


# ---------------------------------------------------------------------------------------------
# Backend names: chosen by the caller and passed down (engine -> model -> layer -> here)
# ---------------------------------------------------------------------------------------------

ATTENTION_BACKENDS = ("auto", "reference", "metal")


def check_backend(name: str) -> str:
    """``name`` if it is a known attention backend, else a one-line ``MtpError``."""
    if name not in ATTENTION_BACKENDS:
        raise MtpError(f"unknown attention backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    return name


# ---------------------------------------------------------------------------------------------
# The Metal kernel: names, launch geometry and source, shared with kernels/check_kernels.py
# ---------------------------------------------------------------------------------------------

KERNEL_NAME = "verify_attention"
KERNEL_INPUT_NAMES = ("q", "k", "v", "q_pos", "k_pos", "window", "scale")
KERNEL_OUTPUT_NAMES = ("out",)
KERNEL_SOURCE_FILE = "verify_attention.metal"
KERNEL_HEADER_FILE = "common.h"
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_ITEMSIZE = {mx.float32: 4, mx.float16: 2, mx.bfloat16: 2}
MAX_HEAD_DIM = 512
MAX_SIMDGROUPS = 8  # simdgroups per threadgroup (256 threads)
TILE_BYTES = 16384  # threadgroup memory for one K tile plus one V tile (Metal allows 32 KiB)


@dataclass(frozen=True)
class KernelLaunch:
    """Everything ``mx.fast.metal_kernel`` needs besides the inputs."""

    template: tuple[tuple[str, object], ...]  # (name, dtype | int) in signature order
    grid: tuple[int, int, int]  # threads, as MLX's dispatchThreads takes them
    threadgroup: tuple[int, int, int]
    output_shape: tuple[int, ...]
    output_dtype: mx.Dtype


def kernel_launch(q_shape, k_shape, dtype: mx.Dtype) -> KernelLaunch:
    """Template arguments, grid and threadgroup for q [B, nH, Lq, D], k [B, nKV, Lk, D]."""
    batch, n_heads, n_q, head_dim = (int(x) for x in q_shape)
    n_kv = int(k_shape[1])
    per_lane = head_dim // 32
    rows_per_simdgroup = max(1, min(8, 32 // per_lane))
    keys_per_tile = max(1, min(32, TILE_BYTES // (2 * head_dim * _ITEMSIZE[dtype])))
    rows = n_heads // n_kv * n_q
    simdgroups = max(1, min(MAX_SIMDGROUPS, math.ceil(rows / rows_per_simdgroup)))
    blocks = math.ceil(rows / (simdgroups * rows_per_simdgroup))
    return KernelLaunch(
        template=(("T", dtype), ("D", head_dim), ("BK", keys_per_tile), ("RPS", rows_per_simdgroup)),
        grid=(32 * simdgroups * blocks, n_kv, batch),
        threadgroup=(32 * simdgroups, 1, 1),
        output_shape=(batch, n_heads, n_q, head_dim),
        output_dtype=dtype,
    )


def kernel_unsupported_reason(q: mx.array, k: mx.array, v: mx.array, q_pos: mx.array, k_pos: mx.array) -> str | None:
    """None when the kernel handles these shapes and dtypes, else why not (one line)."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        return f"expected q [B,nH,Lq,D] and k, v [B,nKV,Lk,D] of one shape, got {q.shape}, {k.shape}, {v.shape}"
    batch, n_heads, n_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        return f"q {q.shape} and k {k.shape} disagree on batch or head size"
    if head_dim % 32 or not 32 <= head_dim <= MAX_HEAD_DIM:
        return f"head size {head_dim} is not a multiple of 32 in 32..{MAX_HEAD_DIM}"
    if k.shape[1] == 0 or n_heads % k.shape[1]:
        return f"{n_heads} query heads are not a multiple of {k.shape[1]} kv heads"
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} are not one of float32, float16, bfloat16"
    if q_pos.shape not in ((batch, n_q), (1, n_q)) or k_pos.shape not in ((batch, k.shape[2]), (1, k.shape[2])):
        return f"q_pos {q_pos.shape} / k_pos {k_pos.shape} do not match [B, Lq] / [B, Lk]"
    if k.shape[2] == 0:
        return "empty key cache"
    return None


def _kernel_dir() -> Path:
    """kernels/ of a source checkout (editable install), else the copy the wheel installs."""
    candidates = [
        Path(__file__).resolve().parents[2] / "kernels",
        Path(sysconfig.get_paths()["data"]) / "share" / "mtp-mlx" / "kernels",
        Path(sys.prefix) / "share" / "mtp-mlx" / "kernels",
    ]
    for path in candidates:
        if (path / KERNEL_SOURCE_FILE).is_file():
            return path
    raise MtpError(f"kernel source {KERNEL_SOURCE_FILE} not found in {', '.join(map(str, candidates))}; reinstall mtp-mlx")


@functools.lru_cache(maxsize=1)
def kernel_source() -> tuple[str, str]:
    """(body, header) of the verify-attention kernel, read once."""
    folder = _kernel_dir()
    return (folder / KERNEL_SOURCE_FILE).read_text(), (folder / KERNEL_HEADER_FILE).read_text()


@functools.lru_cache(maxsize=1)
def _metal_kernel():
    body, header = kernel_source()
    return mx.fast.metal_kernel(
        name=KERNEL_NAME,
        input_names=list(KERNEL_INPUT_NAMES),
        output_names=list(KERNEL_OUTPUT_NAMES),
        source=body,
        header=header,
    )


def kernel_inputs(q, k, v, *, q_pos, k_pos, window: int, scale: float) -> list[mx.array]:
    """The kernel's inputs in KERNEL_INPUT_NAMES order (positions as int32 [B, L])."""
    batch = q.shape[0]
    q_pos = mx.broadcast_to(q_pos.astype(mx.int32), (batch, q.shape[2]))
    k_pos = mx.broadcast_to(k_pos.astype(mx.int32), (batch, k.shape[2]))
    return [q, k, v, q_pos, k_pos, mx.array([int(window)], dtype=mx.int32), mx.array([float(scale)], dtype=mx.float32)]


def attention_metal(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    q_pos: mx.array,
    k_pos: mx.array,
    window: int = 0,
    scale: float = 1.0,
) -> mx.array:
    """The fused Metal kernel; same contract as ``attention_ref`` (no-key rows get zeros)."""
    if not mx.metal.is_available():
        raise MtpError(
            "the Metal verify-attention kernel needs Metal, which is not available on this machine "
            "(mx.metal.is_available() is False); use attention backend 'auto' or 'reference'"
        )
    reason = kernel_unsupported_reason(q, k, v, q_pos, k_pos)
    if reason is not None:
        raise MtpError(f"the Metal verify-attention kernel cannot run this call: {reason}")
    launch = kernel_launch(q.shape, k.shape, q.dtype)
    (out,) = _metal_kernel()(
        inputs=kernel_inputs(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, scale=scale),
        template=list(launch.template),
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=[launch.output_shape],
        output_dtypes=[launch.output_dtype],
    )
    return out


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    q_pos: mx.array,
    k_pos: mx.array,
    window: int = 0,
    scale: float = 1.0,
    backend: str = "auto",
    mask: Optional[mx.array] = None,
) -> mx.array:
    """Dispatch on ``backend``: "metal" always takes the kernel (raising where it cannot
    run), "reference" never does, "auto" takes it when Metal is available and the shapes are
    supported. ``mask`` (optional, reference path only) is a precomputed ``visibility_mask``;
    the kernel computes visibility from the positions itself.
    """
    args = {"q_pos": q_pos, "k_pos": k_pos, "window": window, "scale": scale}
    if backend == "metal":
        return attention_metal(q, k, v, **args)
    if backend == "auto" and mx.metal.is_available() and kernel_unsupported_reason(q, k, v, q_pos, k_pos) is None:
        return attention_metal(q, k, v, **args)
    return attention_ref(q, k, v, mask=mask, **args)

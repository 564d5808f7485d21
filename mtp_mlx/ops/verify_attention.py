"""Multi-position attention over a position-tagged KV cache.

Every key slot carries its absolute token position (``k_pos``; -1 marks an empty slot), every
query its own (``q_pos``). Key ``j`` is visible to query ``i`` of row ``b`` iff
``0 <= k_pos[b, j] <= q_pos[b, i]`` and, for a sliding layer, ``q_pos - k_pos < window``.
One rule covers prefill, the K+1-position verify chunk, ring buffers that have wrapped
(slots in physical order), ragged batches and the drafter's single query.
"""

import mlx.core as mx


def visibility_mask(q_pos: mx.array, k_pos: mx.array, window: int) -> mx.array:
    """Boolean mask [B, 1, Lq, Lk] from q_pos [B, Lq] and k_pos [B, Lk] (int32)."""
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window:
        mask = mask & (qp - kp < window)
    return mask


def verify_attention_ref(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    q_pos: mx.array,
    k_pos: mx.array,
    window: int = 0,
    scale: float = 1.0,
) -> mx.array:
    """Reference attention. q [B, nH, Lq, D], k/v [B, nKV, Lk, D] -> [B, nH, Lq, D].

    Grouped-query heads (nH a multiple of nKV); softmax in float32. A query with no visible
    key (only possible for padding rows) gets an arbitrary finite value.
    """
    mask = visibility_mask(q_pos, k_pos, window)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def verify_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    q_pos: mx.array,
    k_pos: mx.array,
    window: int = 0,
    scale: float = 1.0,
    use_kernel: bool = True,
) -> mx.array:
    """Dispatch: the fused Metal kernel when available and allowed, else the reference."""
    return verify_attention_ref(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, scale=scale)

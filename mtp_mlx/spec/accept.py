"""Acceptance rules: pure functions of (draft tokens, distributions), no host syncs."""

from typing import Tuple

import mlx.core as mx


def accept_greedy(drafts: mx.array, target_logits: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """Greedy verification (spec §6.4).

    drafts [B, K]; target_logits [B, K+1, V] from the verify pass over [bonus, d_1..d_K].
    Draft d_i is accepted while it equals argmax of verify position i-1; the token after
    the accepted run is argmax of position n. Returns (n [B], next token [B], the target's
    argmax at every verify position [B, K+1]).
    """
    choice = mx.argmax(target_logits, axis=-1).astype(mx.int32)  # [B, K+1]
    K = drafts.shape[1]
    match = (drafts.astype(mx.int32) == choice[:, :K]).astype(mx.int32)
    n = mx.cumprod(match, axis=1).sum(axis=1) if K else mx.zeros((drafts.shape[0],), mx.int32)
    nxt = mx.take_along_axis(choice, n[:, None], axis=1)[:, 0]
    return n, nxt, choice

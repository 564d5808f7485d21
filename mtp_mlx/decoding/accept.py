"""Acceptance rules: pure functions of (draft tokens, distributions, noise), no host syncs.

Greedy: drafts equal to the target's argmax are kept. Sampled, two lossless rules:
  * rejection sampling (``accept_sampled`` / ``accept_rejection``): the most accepting rule,
    used for unseeded rows; its output depends on K, so a seed would not reproduce a run
    whose draft lengths differ;
  * the coupled rule (``accept_coupled``): the target's token at position t is
    argmax(log p_t + g_t) with Gumbel noise g_t drawn from (seed, request, t); the drafter
    proposes argmax(log q_t + g_t) with the *same* noise, and a draft is kept iff it equals the
    target's token. Every emitted token is exactly plain Gumbel-max sampling from p, so a
    seeded request's output does not depend on K, the drafter, its batch-mates or when it
    joined; it accepts less than rejection sampling when p and q differ.
"""

from typing import Optional, Tuple

import mlx.core as mx


def accept_greedy(drafts: mx.array, target_logits: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """Greedy verification.

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


def accept_sampled(
    drafts: mx.array, q_logp: mx.array, p_logp: mx.array, key: mx.array
) -> Tuple[mx.array, mx.array]:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023): lossless.

    drafts [B, K] drawn from q; q_logp [B, K, V] the drafter's filtered log-probs at each
    step; p_logp [B, K+1, V] the target's at each verify position. Draft i is accepted with
    probability min(1, p_{i-1}(d_i) / q_i(d_i)); at the first rejection n the next token is
    drawn from norm(max(p_n - q_{n+1}, 0)); after K acceptances from p_K.
    Returns (n [B], next token [B]).
    """
    B, K = drafts.shape
    k_accept, k_next = mx.random.split(key)
    u = mx.random.uniform(shape=(B, K), key=k_accept)
    g = mx.random.gumbel(shape=p_logp.shape, key=k_next)
    return accept_rejection(drafts, q_logp, p_logp, u, g)


def accept_rejection(drafts: mx.array, q_logp: mx.array, p_logp: mx.array, u: mx.array, g: mx.array,
                     kcap: Optional[mx.array] = None):
    """``accept_sampled`` with its noise given: uniforms u [B, K] for the accept tests and
    Gumbel noise g [B, K+1, V], one per verify position, of which the position after the
    accepted run draws the next token. ``kcap`` [B]: row b's own draft length (drafts past
    it are never accepted and its full run ends there). Returns (n [B], next [B])."""
    B, K = drafts.shape
    d = drafts[..., None].astype(mx.int32)
    p_d = mx.exp(mx.take_along_axis(p_logp[:, :K], d, axis=-1))[..., 0]  # p_{i-1}(d_i)
    q_d = mx.exp(mx.take_along_axis(q_logp, d, axis=-1))[..., 0]  # q_i(d_i)
    ok = u * q_d < p_d  # u < p/q without dividing by q
    if kcap is not None:
        ok = ok & (mx.arange(K)[None] < kcap[:, None])
    n = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1) if K else mx.zeros((B,), mx.int32)
    g_n = mx.take_along_axis(g, n[:, None, None], axis=1)[:, 0]
    return n, residual_draw(n, q_logp, p_logp, g_n, kcap)


def accept_coupled(drafts: mx.array, p_logp: mx.array, g: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """The coupled rule: g [B, K+1, V] is the Gumbel noise of each verify position's token
    (the same noise the drafts were drawn with). Returns (n [B], next [B], the target's
    token at every verify position [B, K+1])."""
    return accept_greedy(drafts, p_logp + g)


def residual_draw(n: mx.array, q_logp: mx.array, p_logp: mx.array, g: mx.array,
                  kcap: Optional[mx.array] = None) -> mx.array:
    """The token after n accepted drafts: from norm(max(p_n - q_{n+1}, 0)) if n < K (the row's
    ``kcap``), else p_n, drawn by Gumbel-max with the noise g [B, V]."""
    K = q_logp.shape[1]
    limit = kcap if kcap is not None else K
    p_n = mx.exp(mx.take_along_axis(p_logp, n[:, None, None], axis=1)[:, 0])  # [B, V]
    if K:
        q_next = mx.exp(mx.take_along_axis(q_logp, mx.minimum(n, K - 1)[:, None, None], axis=1)[:, 0])
        q_next = mx.where((n < limit)[:, None], q_next, 0.0)
        resid = mx.maximum(p_n - q_next, 0.0)
        # p == q on the support leaves no residual mass; that happens only through rounding
        # (such a draft is accepted with probability 1), so fall back to p_n.
        resid = mx.where(resid.sum(axis=-1, keepdims=True) > 0, resid, p_n)
    else:
        resid = p_n
    return mx.argmax(mx.log(resid) + g, axis=-1).astype(mx.int32)


def accept_exact_match(
    drafts: mx.array, q_logp: mx.array, p_logp: mx.array, key: mx.array
) -> Tuple[mx.array, mx.array]:
    """The common sample-and-compare rule (mlx-lm, mlx-vlm): draw y_j ~ p_j at every verify
    position and accept drafts while d_i == y_{i-1}; emit y_n. Lossless but it rejects
    good drafts; kept for comparison, not used by default."""
    B, K = drafts.shape
    y = mx.random.categorical(p_logp, axis=-1, key=key).astype(mx.int32)  # [B, K+1]
    match = (drafts.astype(mx.int32) == y[:, :K]).astype(mx.int32)
    n = mx.cumprod(match, axis=1).sum(axis=1) if K else mx.zeros((B,), mx.int32)
    return n, mx.take_along_axis(y, n[:, None], axis=1)[:, 0]

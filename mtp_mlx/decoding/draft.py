"""Drafting: K drafter steps from the target's last hidden state, reading the target cache.

Query-position conventions (which one the released drafters were trained with is not
published), chosen by ``position``:
  "B"  (default; vLLM, mlx-vlm): RoPE position P_b - 1, the last committed token.
  "A"  (HF 5.23's position): RoPE position P_b; same committed keys as "B".
  "hf" (reference parity only): HF 5.23's position *and* its key selection, which can
       include rejected drafts' K/V (stale entries); needs the pre-rollback view.
In "A" and "B" the drafter sees exactly the committed tokens 0..P_b-1 (sliding layers: the
last W of them, the window the target itself would use at P_b - 1).
"""

from dataclasses import dataclass
from typing import Dict

import mlx.core as mx

from ..cache import KVView, TargetCache
from ..models.gemma4_assistant import DraftMask
from ..ops.attention import visibility_mask

POSITIONS = ("A", "B", "hf")


@dataclass
class DraftContext:
    """What a round's K steps share: K/V views, RoPE position [B, 1] and masks per type
    (evaluated once per round)."""

    kv: Dict[str, KVView]
    q_pos: mx.array
    masks: Dict[str, DraftMask]

    def __post_init__(self):
        for t, m in self.masks.items():
            if t in self.kv and m.dense is None:
                m.dense = visibility_mask(m.q, self.kv[t].pos, m.window)


def draft_context(cache: TargetCache, window: int, position: str = "B") -> DraftContext:
    """Context for drafting once each row's cache holds exactly its committed tokens
    0..P_b-1 (rows may differ in length)."""
    last = mx.array(cache.offsets, dtype=mx.int32)[:, None] - 1  # [B, 1]
    masks = {"sliding_attention": DraftMask(last, window), "full_attention": DraftMask(last, 0)}
    q = last if position == "B" else last + 1
    return DraftContext(cache.drafter_view(), q, masks)


def hf_draft_context(views: Dict[str, KVView], P_b: int, end: int, q_len: int, window: int) -> DraftContext:
    """HF 5.23's selection (its K/V slice can hold stale entries of rejected drafts), from views taken *before* rollback of the latest
    target forward, which wrote ``q_len`` tokens ending at position ``end``."""
    pb = mx.array([[P_b]], dtype=mx.int32)
    t_start = max(0, end + 1 - (window - 1 + q_len))
    hi = min(end, t_start + P_b)
    lo = max(t_start, hi - window)
    masks = {
        "full_attention": DraftMask(pb, 0),
        "sliding_attention": DraftMask(mx.array([[hi]], dtype=mx.int32), hi - lo + 1),
    }
    return DraftContext(views, pb, masks)


def draft_greedy(target, drafter, ctx: DraftContext, token: mx.array, hidden: mx.array, k: int) -> mx.array:
    """K greedy draft tokens [B, K] from the bonus ``token`` [B, 1] and target ``hidden`` [B, 1, H]."""
    out = []
    for _ in range(k):
        hd, hidden = drafter(target.embed(token), hidden, ctx.kv, ctx.q_pos, ctx.masks)
        token = drafter.argmax(hd)  # [B, 1]
        out.append(token)
    return mx.concatenate(out, axis=1)


def draft_sampled(target, drafter, ctx: DraftContext, token: mx.array, hidden: mx.array, k: int,
                  logp_fn, key: mx.array):
    """K draft tokens drawn from the drafter's own filtered distribution q.

    ``logp_fn(seen [B, i+1], logits [B, 1, V]) -> log q [B, 1, V]`` applies the target's
    processors, temperature and filters, where ``seen`` is the bonus and the drafts so far.
    Returns (drafts [B, K], q log-probs [B, K, V]).
    """
    if k == 0:
        return mx.zeros((token.shape[0], 0), mx.int32), mx.zeros((token.shape[0], 0, drafter.cfg.text.vocab_size))
    seen, toks, qs = token, [], []
    for k_i in mx.random.split(key, k):
        hd, hidden = drafter(target.embed(token), hidden, ctx.kv, ctx.q_pos, ctx.masks)
        logq = logp_fn(seen, drafter.logits(hd))
        token = mx.random.categorical(logq, axis=-1, key=k_i).astype(mx.int32)  # [B, 1]
        seen = mx.concatenate([seen, token], axis=1)
        toks.append(token)
        qs.append(logq)
    return mx.concatenate(toks, axis=1), mx.concatenate(qs, axis=1)

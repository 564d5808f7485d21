"""Reference-parity driver: transformers 5.23's assisted greedy generation, reproduced.

transformers' drafter uses query position P_b and a K/V selection that can include the
rejected drafts of the previous round (stale entries) and, on sliding layers, the last W+1
entries. Reproducing that needs the cache as it was *before* each rollback, so this mode
has its own small loop (one row, greedy) instead of a branch inside the engine. It exists
for parity tests and for measuring the reference's acceptance; output tokens equal plain
greedy decoding like every other mode.
"""

from dataclasses import dataclass
from typing import Iterator, List, Sequence

import mlx.core as mx

from ..cache import KVView
from ..limits import MAX_DRAFT
from .accept import accept_greedy
from .draft import hf_draft_context


@dataclass
class RefRound:
    tokens: List[int]  # accepted drafts then the target's token (the prefill: the first token)
    drafts: List[int]  # what the drafter proposed this round
    accepted: int = 0


def _snapshot(cache):
    """Drafter views that later rollbacks cannot change."""
    return {t: KVView(v.keys, v.values, v.pos + 0) for t, v in cache.drafter_view().items()}


def hf_parity_rounds(target, drafter, prompt: Sequence[int], *, max_tokens: int, num_draft: int,
                     attention: str = "auto") -> Iterator[RefRound]:
    """Yield the prefill's token, then one ``RefRound`` per round, until ``max_tokens``
    tokens were emitted (no EOS handling: the reference is run without one)."""
    window = target.cfg.sliding_window
    cache = target.make_cache(max_draft=MAX_DRAFT)
    ids = mx.array([list(prompt)], dtype=mx.int32)
    P = len(prompt)
    if P > 1:
        target(ids[:, : P - 1], cache, logits_from=P - 2, attn_backend=attention)
    out = target(ids[:, P - 1 :], cache, attn_backend=attention)
    bonus = mx.argmax(out.logits[:, -1], axis=-1).astype(mx.int32)[:, None]
    hidden = out.hidden
    emitted = 1
    yield RefRound([bonus.item()], [])  # sync
    snap, end, q_len = _snapshot(cache), P - 1, P
    while emitted < max_tokens:
        k = min(num_draft, max_tokens - emitted - 1)
        ctx = hf_draft_context(snap, cache.offset, end, q_len, window)
        token, h, drafts = bonus, hidden, []
        for _ in range(k):
            hd, h = drafter(target.embed(token), h, ctx.kv, ctx.q_pos, ctx.masks, attention)
            token = drafter.argmax(hd).astype(mx.int32)
            drafts.append(token)
        drafts = mx.concatenate(drafts, axis=1) if drafts else mx.zeros((1, 0), mx.int32)
        P_b = cache.offset
        out = target(mx.concatenate([bonus, drafts], axis=1), cache, attn_backend=attention)
        n, nxt, _ = accept_greedy(drafts, out.logits)
        mx.eval(n, nxt, drafts)  # sync: one per round
        a = n.item()
        snap, end, q_len = _snapshot(cache), P_b + k, k + 1
        cache.trim(k - a)
        hidden = mx.take_along_axis(out.hidden, n[:, None, None], axis=1)
        bonus = nxt[:, None]
        proposed = drafts[0].tolist()
        toks = (proposed[:a] + [nxt.item()])[: max_tokens - emitted]
        emitted += len(toks)
        yield RefRound(toks, proposed, a)

"""Generation loops: plain greedy decoding and greedy speculative decoding.

Each yields one ``Step`` per target forward. The only host synchronisations are here, one
per step (marked ``# sync``). Rollback uses the cache's ``trim``, which raises rather than
trim less than asked.

Not here: tokenizing, detokenizing, stop strings, statistics (``mtp_mlx.api``).
"""

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx

from ..cache import KVView
from ..errors import MtpError
from .accept import accept_greedy
from .draft import POSITIONS, draft_context, draft_greedy, hf_draft_context

MAX_DRAFT = 8
PREFILL_STEP = 512


@dataclass
class Step:
    """Tokens emitted by one target forward (prefill: the first token)."""

    tokens: List[int]
    from_draft: List[bool]
    drafted: int = 0
    accepted: int = 0
    drafts: List[int] = field(default_factory=list)  # what the drafter proposed this round
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" on the last step


@dataclass
class _Budget:
    max_tokens: int
    eos: frozenset
    emitted: int = 0

    def take(self, tokens: List[int]) -> tuple:
        """Crop tokens at the first EOS (excluded) and at the budget."""
        out = []
        for t in tokens:
            if t in self.eos:
                return out, "stop"
            out.append(t)
            self.emitted += 1
            if self.emitted >= self.max_tokens:
                return out, "length"
        return out, None


def _check(prompt: Sequence[int], max_tokens: int, num_draft: int, max_pos: int) -> None:
    if len(prompt) == 0:
        raise MtpError("the prompt is empty: pass at least one token of text")
    if max_tokens < 1:
        raise MtpError(f"max_tokens {max_tokens} is out of range: use a value >= 1")
    if not 0 <= num_draft <= MAX_DRAFT:
        raise MtpError(f"num_draft_tokens {num_draft} is out of range: use 1..{MAX_DRAFT} (0 disables drafting)")
    if len(prompt) + max_tokens > max_pos:
        raise MtpError(
            f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the model's "
            f"{max_pos} positions: shorten the prompt or lower --max-tokens"
        )


def _prefill(target, cache, prompt: mx.array, step: int = PREFILL_STEP):
    """Run the prompt through the target in chunks; return the last position's output."""
    P = prompt.shape[1]
    for s in range(0, P - 1, step):
        e = min(s + step, P - 1)
        out = target(prompt[:, s:e], cache, logits_from=e - s - 1)
        mx.eval(cache.layers[next(iter(cache.layers))].keys)  # sync: bound prefill memory
    return target(prompt[:, P - 1 :], cache)


def generate_step(target, prompt: Sequence[int], *, max_tokens: int, eos_ids=()) -> Iterator[Step]:
    """Plain greedy decoding with the target alone (the reference the speculative loop must equal)."""
    _check(prompt, max_tokens, 0, target.cfg.max_position_embeddings)
    budget = _Budget(max_tokens, frozenset(eos_ids))
    cache = target.make_cache(max_draft=MAX_DRAFT)
    out = _prefill(target, cache, mx.array([list(prompt)], dtype=mx.int32))
    tok = mx.argmax(out.logits[:, -1], axis=-1).astype(mx.int32)
    mx.async_eval(tok)
    while True:
        # Queue the next forward before waiting on this token, so the device never idles.
        nxt = mx.argmax(target(tok[:, None], cache).logits[:, -1], axis=-1).astype(mx.int32)
        mx.async_eval(nxt)
        toks, reason = budget.take([tok.item()])  # sync
        yield Step(toks, [False] * len(toks), finish_reason=reason)
        if reason:
            return
        tok = nxt


def speculative_generate_step(
    target,
    drafter,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    num_draft: int = 4,
    eos_ids=(),
    position: str = "B",
) -> Iterator[Step]:
    """Greedy speculative decoding: draft K -> verify K+1 in one target forward -> accept
    the agreeing prefix plus the target's own next token -> roll back the rest.

    Output is token-identical to ``generate_step``. ``position`` picks the drafter's
    query-position convention (``mtp_mlx.spec.draft``).
    """
    _check(prompt, max_tokens, num_draft, target.cfg.max_position_embeddings)
    if position not in POSITIONS:
        raise MtpError(f"unknown draft position convention {position!r}: use one of {', '.join(POSITIONS)}")
    window = target.cfg.sliding_window
    budget = _Budget(max_tokens, frozenset(eos_ids))
    cache = target.make_cache(max_draft=max(num_draft, 1))
    prompt_arr = mx.array([list(prompt)], dtype=mx.int32)
    out = _prefill(target, cache, prompt_arr)
    # 1. Prefill picks the first token; its hidden state seeds the first round.
    bonus = mx.argmax(out.logits[:, -1:], axis=-1).astype(mx.int32)  # [B, 1]
    hidden = out.hidden[:, -1:]
    first = bonus.item()  # sync
    toks, reason = budget.take([first])
    yield Step(toks, [False] * len(toks), finish_reason=reason)
    if reason:
        return
    # HF-parity mode drafts from the latest forward's K/V before rollback (spec §5.3).
    hf = (_snapshot(cache), len(prompt) - 1, len(prompt)) if position == "hf" else None
    while True:
        k = min(num_draft, max_tokens - budget.emitted - 1)
        # 2. Draft K tokens from (bonus, hidden), reading the committed K/V in place.
        P_b = cache.offset
        if position == "hf":
            ctx = hf_draft_context(hf[0], P_b, hf[1], hf[2], window)
        else:
            ctx = draft_context(cache, window, position)
        drafts = draft_greedy(target, drafter, ctx, bonus, hidden, k) if k else mx.zeros((1, 0), mx.int32)
        # 3. Verify [bonus, d_1..d_K] in one target forward; accept the agreeing prefix.
        out = target(mx.concatenate([bonus, drafts], axis=1), cache)
        n, nxt, _ = accept_greedy(drafts, out.logits)
        mx.eval(n, nxt, drafts)  # sync: the one per round
        n_acc = n.item()
        proposed = drafts[0].tolist()
        emitted = proposed[:n_acc] + [nxt.item()]
        # 4. Roll back the K - n rejected entries; the next round starts from position n.
        if position == "hf":
            hf = (_snapshot(cache), P_b + k, k + 1)
        cache.trim(k - n_acc)
        bonus = nxt[:, None]
        hidden = out.hidden[:, n_acc : n_acc + 1]
        toks, reason = budget.take(emitted)
        yield Step(toks, [True] * min(len(toks), n_acc) + [False] * max(0, len(toks) - n_acc),
                   drafted=k, accepted=n_acc, drafts=proposed, finish_reason=reason)
        if reason:
            return


def _snapshot(cache):
    """Drafter views that later rollbacks cannot change (HF-parity mode only)."""
    return {t: KVView(v.keys, v.values, v.pos + 0) for t, v in cache.drafter_view().items()}

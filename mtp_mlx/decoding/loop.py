"""Generation loops: plain and speculative decoding, greedy or sampled, for 1..B rows.

Each loop yields one ``BatchStep`` per target forward. The consumer may ``send`` a set of
prompt indices back (instead of ``next``) to end those rows early, e.g. on a stop string:
they leave the batch before the next forward. The only host synchronisations are
here, one per step (marked ``# sync``). Every row keeps its own accepted count, EOS and
token budget (ragged rollback, never clamped to the batch minimum) and leaves the batch
when done. Rollback uses the cache's ``trim``, which raises rather than trim less than
asked. Logits processors see a row's committed tokens plus, at verify position j, the
drafts before it: never a rejected draft.

Not here: tokenizing, detokenizing, stop strings, statistics (``mtp_mlx.api``).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from ..cache import KVView, TargetCache
from ..errors import MtpError
from ..sampling import SamplingConfig, apply_processors, draw, log_probs
from .accept import accept_greedy, accept_sampled
from .draft import POSITIONS, draft_context, draft_greedy, draft_sampled, hf_draft_context

MAX_DRAFT = 8
PREFILL_STEP = 512
GREEDY = SamplingConfig()


@dataclass
class Step:
    """Tokens one target forward emitted for one row (prefill: the first token)."""

    tokens: List[int]
    from_draft: List[bool]
    drafted: int = 0
    accepted: int = 0
    drafts: List[int] = field(default_factory=list)  # what the drafter proposed this round
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" on a row's last step


BatchStep = Dict[int, Step]  # prompt index -> what that row got from this forward


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


def _check(prompts, max_tokens: Sequence[int], num_draft: int, max_pos: int) -> None:
    if not prompts:
        raise MtpError("no prompts: pass at least one")
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        name = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        if len(p) == 0:
            raise MtpError(f"{name} is empty: pass at least one token of text")
        if m < 1:
            raise MtpError(f"max_tokens {m} is out of range: use a value >= 1")
        if len(p) + m > max_pos:
            raise MtpError(
                f"{name} has {len(p)} tokens; with max_tokens {m} it exceeds the model's "
                f"{max_pos} positions: shorten it or lower --max-tokens"
            )
    if not 0 <= num_draft <= MAX_DRAFT:
        raise MtpError(f"num_draft_tokens {num_draft} is out of range: use 1..{MAX_DRAFT} (0 disables drafting)")


class _Rows:
    """Per-row host state of a batch: prompt index, budget and committed history."""

    def __init__(self, prompts, max_tokens, eos, sampling: SamplingConfig, processors):
        self.ids = list(range(len(prompts)))
        self.budgets = [_Budget(m, frozenset(eos)) for m in max_tokens]
        self.history = [list(p) for p in prompts]  # committed tokens, the newest excluded
        self.cfg = sampling
        self.processors = list(processors) + sampling.processors()
        self.key = mx.random.key(sampling.seed if sampling.seed is not None else 0)

    def next_key(self) -> mx.array:
        self.key, k = mx.random.split(self.key)
        return k

    def processed(self, chunk: mx.array, logits: mx.array, prefix: Optional[mx.array] = None) -> mx.array:
        """Logits [B, L, V] after each row's processors: position j sees the row's history,
        then ``prefix`` [B, n] (if any), then chunk[:j+1]."""
        if not self.processors:
            return logits
        rows = []
        for b, h in enumerate(self.history):
            hist = mx.array(h, dtype=mx.int32)
            if prefix is not None:
                hist = mx.concatenate([hist, prefix[b]])
            rows.append(apply_processors(self.processors, hist, chunk[b], logits[b : b + 1]))
        return mx.concatenate(rows)

    def logp(self, chunk: mx.array, logits: mx.array) -> mx.array:
        return log_probs(self.processed(chunk, logits), self.cfg)

    def logp_next(self, seen: mx.array, logits: mx.array) -> mx.array:
        """Log-probs for the position after history + seen [B, i] (drafting); logits [B, 1, V]."""
        return log_probs(self.processed(seen[:, -1:], logits, prefix=seen[:, :-1]), self.cfg)

    def pick(self, chunk: mx.array, logits: mx.array) -> mx.array:
        """Token [B] for the last position of logits [B, L, V]."""
        last = self.processed(chunk, logits)[:, -1]
        if self.cfg.greedy:
            return mx.argmax(last, axis=-1).astype(mx.int32)
        return draw(log_probs(last, self.cfg), self.next_key())

    def keep(self, rows: List[int]) -> None:
        self.ids = [self.ids[r] for r in rows]
        self.budgets = [self.budgets[r] for r in rows]
        self.history = [self.history[r] for r in rows]


def _prefill(target, prompts: Sequence[Sequence[int]], max_draft: int):
    """Prefill each group of equal-length prompts as one batch, in chunks, then stack the
    groups' caches. Returns (cache, last logits [B, 1, V], last hidden [B, 1, H], order)
    where row r of the batch is prompt ``order[r]``."""
    groups: Dict[int, List[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    caches, logits, hidden, order = [], [], [], []
    for P, idx in groups.items():
        cache = target.make_cache(max_draft=max_draft)
        ids = mx.array([list(prompts[i]) for i in idx], dtype=mx.int32)
        for s in range(0, P - 1, PREFILL_STEP):
            e = min(s + PREFILL_STEP, P - 1)
            target(ids[:, s:e], cache, logits_from=e - s - 1)
            mx.eval([c.keys for c in cache.layers.values()])  # sync: bound prefill memory
        out = target(ids[:, P - 1 :], cache)
        caches.append(cache)
        logits.append(out.logits)
        hidden.append(out.hidden)
        order.extend(idx)
    cache = caches[0] if len(caches) == 1 else TargetCache.stack(caches)
    return cache, mx.concatenate(logits), mx.concatenate(hidden), order


def _start(target, prompts, max_tokens, eos_ids, sampling, processors, num_draft):
    """Shared start of both loops: checks, per-row state, prefill, first tokens."""
    max_tokens = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    _check(prompts, max_tokens, num_draft, target.cfg.max_position_embeddings)
    # Rings always get MAX_DRAFT slots of slack, whatever K: then every position lands in the
    # same slot in plain and speculative runs, attention sums the same keys in the same order,
    # and half-precision results stay bitwise equal (else near-tied logits can flip).
    cache, logits, hidden, order = _prefill(target, prompts, MAX_DRAFT)
    rows = _Rows([prompts[i][:-1] for i in order], [max_tokens[i] for i in order], eos_ids, sampling, processors)
    rows.ids = order
    last = mx.array([[prompts[i][-1]] for i in order], dtype=mx.int32)
    first = rows.pick(last, logits)  # [B]
    for b, i in enumerate(order):
        rows.history[b].append(prompts[i][-1])
    return cache, rows, first, hidden


def _emit(rows: _Rows, tokens: List[List[int]], n_acc: List[int], drafts: List[List[int]], k: int):
    """Crop each row's tokens at EOS/budget; return the BatchStep and the rows still running."""
    step: BatchStep = {}
    alive = []
    for b, toks in enumerate(tokens):
        out, reason = rows.budgets[b].take(toks)
        n = n_acc[b]
        step[rows.ids[b]] = Step(out, [True] * min(len(out), n) + [False] * max(0, len(out) - n),
                                 drafted=k, accepted=n, drafts=drafts[b], finish_reason=reason)
        if reason is None:
            alive.append(b)
    return step, alive


def generate_batch(
    target, prompts: Sequence[Sequence[int]], *, max_tokens: Union[int, Sequence[int]], eos_ids=(),
    sampling: SamplingConfig = GREEDY, processors: Sequence = (),
) -> Iterator[BatchStep]:
    """Plain decoding with the target alone (the reference the speculative loop must equal)."""
    cache, rows, tok, _ = _start(target, prompts, max_tokens, eos_ids, sampling, processors, 0)
    mx.async_eval(tok)
    while True:
        nxt = None
        if not rows.processors:
            # Queue the next forward before waiting on this token, so the device never idles
            # (processors need the token's value first).
            nxt = rows.pick(tok[:, None], target(tok[:, None], cache).logits)
            mx.async_eval(nxt)
        ts = tok.tolist()  # sync
        step, alive = _emit(rows, [[t] for t in ts], [0] * len(ts), [[] for _ in ts], 0)
        alive = _unstopped(rows, alive, (yield step))
        if not alive:
            return
        if nxt is None:
            nxt = rows.pick(tok[:, None], target(tok[:, None], cache).logits)
        for b, t in enumerate(ts):
            rows.history[b].append(t)
        tok = nxt
        if len(alive) < len(ts):
            _keep(rows, cache, alive)
            tok = tok[mx.array(alive)]


def speculative_generate_batch(
    target,
    drafter,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: Union[int, Sequence[int]],
    num_draft: int = 4,
    eos_ids=(),
    position: str = "B",
    sampling: SamplingConfig = GREEDY,
    processors: Sequence = (),
    accept: Callable = accept_sampled,
) -> Iterator[BatchStep]:
    """Speculative decoding: draft K -> verify K+1 in one target forward -> accept each
    row's agreeing prefix plus one target token -> roll back each row's rejected rest.

    Greedy (``sampling.temperature == 0``) output is token-identical to ``generate_batch``
    row by row; sampled output has exactly the target's distribution (``accept`` is the
    rejection rule, replaceable for experiments). ``position`` picks the drafter's
    query-position convention (``mtp_mlx.decoding.draft``; "hf" needs a single row).
    """
    if position not in POSITIONS:
        raise MtpError(f"unknown draft position convention {position!r}: use one of {', '.join(POSITIONS)}")
    if position == "hf" and len(prompts) != 1:
        raise MtpError("draft position 'hf' (reference parity) supports one prompt at a time")
    window = target.cfg.sliding_window
    # 1. Prefill picks each row's first token; its hidden state seeds the first round.
    cache, rows, first, hidden = _start(target, prompts, max_tokens, eos_ids, sampling, processors, num_draft)
    ts = first.tolist()  # sync
    step, alive = _emit(rows, [[t] for t in ts], [0] * len(ts), [[] for _ in ts], 0)
    alive = _unstopped(rows, alive, (yield step))
    bonus = first[:, None]
    if len(alive) < len(ts):
        if not alive:
            return
        _keep(rows, cache, alive)
        bonus, hidden, ts = bonus[mx.array(alive)], hidden[mx.array(alive)], [ts[b] for b in alive]
    P = len(prompts[0])
    hf = (_snapshot(cache), P - 1, P) if position == "hf" else None
    while True:
        k = min(num_draft, max(b.max_tokens - b.emitted for b in rows.budgets) - 1)
        ctx = hf_draft_context(hf[0], cache.offset, hf[1], hf[2], window) if hf else draft_context(cache, window, position)
        # 2. Draft K tokens per row from (bonus, hidden), reading the committed K/V in place.
        B = bonus.shape[0]
        if sampling.greedy:
            drafts = draft_greedy(target, drafter, ctx, bonus, hidden, k) if k else mx.zeros((B, 0), mx.int32)
        else:
            drafts, q = draft_sampled(target, drafter, ctx, bonus, hidden, k, rows.logp_next, rows.next_key())
        # 3. Verify [bonus, d_1..d_K] of every row in one target forward and accept.
        chunk = mx.concatenate([bonus, drafts], axis=1)
        P_b = cache.offsets
        out = target(chunk, cache)
        if sampling.greedy:
            n, nxt, _ = accept_greedy(drafts, rows.processed(chunk, out.logits))
        else:
            n, nxt = accept(drafts, q, rows.logp(chunk, out.logits), rows.next_key())
        mx.eval(n, nxt, drafts)  # sync: the one per round
        n_acc, nexts, proposed = n.tolist(), nxt.tolist(), drafts.tolist()
        # 4. Roll back each row's K - n rejected entries; its next round starts from n.
        if hf:
            hf = (_snapshot(cache), P_b[0] + k, k + 1)
        cache.trim([k - a for a in n_acc])
        for b in range(B):
            rows.history[b].extend([ts[b]] + proposed[b][: n_acc[b]])
        hidden = mx.take_along_axis(out.hidden, n[:, None, None], axis=1)  # [B, 1, H]
        bonus, ts = nxt[:, None], nexts
        tokens = [proposed[b][: n_acc[b]] + [nexts[b]] for b in range(B)]
        step, alive = _emit(rows, tokens, n_acc, proposed, k)
        alive = _unstopped(rows, alive, (yield step))
        if not alive:
            return
        if len(alive) < B:
            _keep(rows, cache, alive)
            sel = mx.array(alive)
            bonus, hidden, ts = bonus[sel], hidden[sel], [ts[b] for b in alive]


def _unstopped(rows: _Rows, alive: List[int], stopped) -> List[int]:
    """The running rows minus those the consumer sent back as ended (prompt indices)."""
    return [b for b in alive if rows.ids[b] not in stopped] if stopped else alive


def _keep(rows: _Rows, cache: TargetCache, alive: List[int]) -> None:
    """Finished rows leave the batch."""
    rows.keep(alive)
    cache.select(alive)


def _single(batch: Iterator[BatchStep]) -> Iterator[Step]:
    for step in batch:
        yield step[0]


def generate_step(target, prompt: Sequence[int], *, max_tokens: int, **kwargs) -> Iterator[Step]:
    """Plain decoding of one prompt; yields one ``Step`` per token."""
    return _single(generate_batch(target, [prompt], max_tokens=max_tokens, **kwargs))


def speculative_generate_step(target, drafter, prompt: Sequence[int], *, max_tokens: int, **kwargs) -> Iterator[Step]:
    """Speculative decoding of one prompt; yields one ``Step`` per target forward."""
    return _single(speculative_generate_batch(target, drafter, [prompt], max_tokens=max_tokens, **kwargs))


def _snapshot(cache):
    """Drafter views that later rollbacks cannot change (HF-parity mode only)."""
    return {t: KVView(v.keys, v.values, v.pos + 0) for t, v in cache.drafter_view().items()}

"""The running batch, device side: token ids in, token ids out, one round per ``step``.

A ``Batch`` holds the rows being decoded (their shared target cache, each row's bonus token
and last hidden state) and the rows being prefilled. Between rounds the engine may
``insert`` new rows (prefilled in slices, at most one slice per round, then merged into the
running batch with their first token and hidden state, so they draft in their very next
round) and ``remove`` rows (they leave before the next forward). ``step(ks)`` runs one round:
draft k_b tokens per row (the round drafts max k_b; a row's drafts past its own k_b are
never accepted), verify all rows' chunks in one target forward, accept each row's agreeing
prefix plus one target token, and roll back each row's rejected rest. One host
synchronisation per round (marked ``# sync``), two in a round that cuts its drafts on the
drafter's confidence (``step(cut=p_min)``: the verify's width must be known on the host
before its graph is built, so the drafts and their probabilities are read first).

Greedy rows take the target's argmax. Sampled rows draw with Gumbel noise keyed by
(seed, request, position, purpose) (``mtp_mlx.sampling``): seeded rows use the coupled rule,
unseeded rows rejection sampling (``mtp_mlx.decoding.accept``); both are lossless.

Not here: tokenizing, detokenizing, stop strings, budgets, EOS, statistics and the choice of
K (``mtp_mlx.decoding.engine``).
"""

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..cache import TargetCache
from ..limits import MAX_BATCH, MAX_DRAFT, PREFILL_STEP
from ..sampling import (
    NOISE_ACCEPT,
    NOISE_DRAFT,
    NOISE_TARGET,
    SamplingConfig,
    apply_processors,
    gumbel,
    log_probs,
    stream_key,
    uniform,
)
from .accept import accept_coupled, accept_greedy, accept_rejection
from .draft import draft_context
from .policy import kept_by_cut


@dataclass
class RowSpec:
    """What a new row needs: its prompt (token ids), sampling settings and random stream."""

    uid: int
    prompt: List[int]
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0  # resolved by the engine (fresh entropy when the request gave none)
    request_index: int = 0
    coupled: bool = False  # the coupled rule (seeded requests) instead of rejection sampling
    processors: Sequence = ()
    logprobs: Optional[int] = None  # top alternatives per token; None = no logprobs


@dataclass
class TokenLogprob:
    """The target's log-probability of an emitted token, and the top alternatives."""

    token: int
    logprob: float
    top: List[tuple] = field(default_factory=list)  # [(token, logprob)], most likely first


@dataclass
class RowOut:
    """What one round gave one row: ``tokens`` = the accepted drafts then the target's own."""

    tokens: List[int]
    drafted: int = 0
    accepted: int = 0
    first: bool = False  # the prefill's token (no round)
    logprobs: Optional[List[TokenLogprob]] = None
    confidence: Optional[List[float]] = None  # the drafter's probability of each draft (step(confidence=True))


class _Row:
    """Host state of one row: its spec and committed tokens (the bonus excluded)."""

    def __init__(self, spec: RowSpec):
        self.spec = spec
        self.cfg = spec.sampling
        self.processors = list(spec.processors) + spec.sampling.processors()
        self.history: List[int] = list(spec.prompt[:-1])
        self.bonus: int = -1  # the newest emitted token (host copy of Batch.bonus)
        # Rows with equal settings are sampled together (the seed only picks the noise).
        self.group = (replace(self.cfg, seed=None), spec.coupled, spec.uid if self.processors else None)

    @property
    def uid(self) -> int:
        return self.spec.uid

    def processed(self, chunk: mx.array, logits: mx.array, prefix: Optional[mx.array] = None) -> mx.array:
        """Logits [1, L, V] after this row's processors: position j sees the history, then
        ``prefix`` [n], then chunk[:j+1] (chunk [L] int32)."""
        if not self.processors:
            return logits
        hist = mx.array(self.history, dtype=mx.int32)
        if prefix is not None:
            hist = mx.concatenate([hist, prefix.astype(mx.int32)])
        return apply_processors(self.processors, hist, chunk, logits)

    def keys(self, positions, purpose: int) -> list:
        return [stream_key(self.spec.seed, self.spec.request_index, p, purpose) for p in positions]



class _Prefill:
    """Rows of equal prompt length prefilled together into their own cache."""

    def __init__(self, rows: List[_Row], cache: TargetCache, start: int = 0):
        self.rows = rows
        self.cache = cache
        self.done = start  # prompt tokens already in the cache
        self._ids = None

    @property
    def ids(self) -> mx.array:
        if self._ids is None or self._ids.shape[0] != len(self.rows):
            self._ids = mx.array([r.spec.prompt for r in self.rows], dtype=mx.int32)
        return self._ids

    @property
    def length(self) -> int:
        return len(self.rows[0].spec.prompt)


class Batch:
    """Rows decoded together; see the module docstring."""

    def __init__(self, target, drafter=None, *, position: str = "B", attention: str = "auto",
                 prefill_group: int = MAX_BATCH, fused_ops: bool = True):
        self.target = target
        self.fused_ops = fused_ops  # compiled layer pieces (bit-identical; see models.layers.fused)
        self.prefill_group = prefill_group  # most rows prefilled together
        self.drafter = drafter
        self.position = position
        self.attention = attention
        self.window = target.cfg.sliding_window
        self.rows: List[_Row] = []
        self.cache: Optional[TargetCache] = None
        self.bonus: Optional[mx.array] = None  # [B, 1] the newest emitted token, not yet in the cache
        self.hidden: Optional[mx.array] = None  # [B, 1, H] the target hidden state that produced it
        self.pending: deque = deque()  # _Prefill jobs, oldest first
        self._ahead: Optional[tuple] = None  # (uids, the next plain round) queued ahead
        self.prefilled = False  # whether the latest step also ran a prefill slice
        self.steady = False  # whether the latest step ran as a round among rounds like it (see step)
        self._joined: Optional[tuple] = None  # (rows, cache, bonus, hidden) merged at the next boundary
        self.cut = False  # whether the latest step read the drafter's confidence before verifying

    # ---- membership ----------------------------------------------------------------------
    @property
    def uids(self) -> List[int]:
        """Running rows, in batch order."""
        return [r.uid for r in self.rows]

    @property
    def prefilling(self) -> List[int]:
        return [r.uid for job in self.pending for r in job.rows]

    def insert(self, spec: RowSpec, cache: Optional[TargetCache] = None, cached: int = 0) -> None:
        """Queue a row for prefill. ``cache``: a one-row cache already holding the first
        ``cached`` prompt tokens (a prefix-cache hit); the rest is prefilled."""
        row = _Row(spec)
        if cache is None:
            for job in self.pending:
                if job.done == 0 and job.length == len(spec.prompt) and len(job.rows) < self.prefill_group:
                    job.rows.append(row)
                    return
            cache = self.target.make_cache(max_draft=MAX_DRAFT)
        self.pending.append(_Prefill([row], cache, cached))

    def remove(self, uids) -> None:
        """Rows leave now (call between rounds); unknown or finished uids are ignored."""
        uids = set(uids)
        self.pending = deque(j for j in self._drop_pending(uids) if j.rows)
        keep = [b for b, r in enumerate(self.rows) if r.uid not in uids]
        if len(keep) == len(self.rows):
            return
        self._drop_ahead()
        if not keep:
            self.rows, self.cache, self.bonus, self.hidden = [], None, None, None
            return
        self.rows = [self.rows[b] for b in keep]
        self.cache.select(keep)
        sel = mx.array(keep)
        self.bonus, self.hidden = self.bonus[sel], self.hidden[sel]

    def _drop_pending(self, uids):
        for job in self.pending:
            keep = [i for i, r in enumerate(job.rows) if r.uid not in uids]
            if len(keep) < len(job.rows) and keep:
                job.rows = [job.rows[i] for i in keep]
                if job.done:
                    job.cache.select(keep)
            elif not keep:
                job.rows = []
            yield job

    def row_cache(self, uid: int) -> TargetCache:
        """A one-row copy of a running row's cache (its committed tokens; for the prefix cache)."""
        self._drop_ahead()
        b = self.uids.index(uid)
        return self.cache.copy_rows([b])

    def offsets(self) -> Dict[int, int]:
        """Committed tokens per running row (the bonus excluded)."""
        self._drop_ahead()
        return dict(zip(self.uids, self.cache.offsets)) if self.rows else {}

    # ---- one round ------------------------------------------------------------------------
    def step(self, ks: Optional[Dict[int, int]] = None, look_ahead: bool = True,
             cut: Optional[float] = None, confidence: bool = False) -> Dict[int, RowOut]:
        """One round; ``ks[uid]`` = that row's draft length (missing = 0). Returns what each
        row got: running rows one round's tokens, a row whose prefill finished its first token.

        ``cut``: a probability p_min. Each row's drafts are then cut before the first one the
        drafter gives a probability below p_min, and the verify is as wide as the longest
        row's kept drafts (a row's ``RowOut.drafted`` is what it kept). Greedy rounds only
        (rows with processors or sampling draft uncut); ``self.cut`` tells whether it ran.
        Any cut is lossless: the target verifies whatever prefix of the drafts it is given.
        ``confidence``: in an uncut greedy round, also return the drafter's probability of each
        of a row's drafts (``RowOut.confidence``), read at the round's one sync, so a policy can
        tell what a cut would have kept without cutting.

        ``look_ahead``: in a plain round, queue the next plain round's forward before the sync
        (pass False when the next round will draft: the queued forward would be thrown away).
        Afterwards ``steady`` tells whether the round ran as it would among rounds like it: a
        plain round that found its forward queued (or that cannot be queued ahead), a drafting
        round that did not first throw a queued forward away. Only steady rounds measure what a
        round costs (``DraftPolicy``)."""
        ks = ks or {}
        out: Dict[int, RowOut] = {}
        lazy: list = []
        self.cut = False
        plain = bool(self.rows) and not any(ks.get(r.uid, 0) for r in self.rows)
        round_ = None
        self.steady = not plain or not self._can_look_ahead()
        if self._ahead is not None:
            uids, ahead = self._ahead
            if plain and uids == self.uids:
                round_ = ahead  # computed (or computing) since the last round
                lazy.extend(round_[2:4] + (round_[5],))
                self._ahead = None
                self.steady = True
            else:
                self._drop_ahead()
                self.steady = False
        if round_ is None and self.rows:
            round_ = self._round(ks, lazy, cut, confidence)
        prefilled = self._prefill_slice(lazy, idle=round_ is None)
        if plain and look_ahead and round_ is not None and self._can_look_ahead():
            # Plain decoding: queue the next round's forward now, so the device works on it
            # while the host handles this round (undone with one trim if it goes unused).
            ahead = self._verify(round_[3][:, None], mx.zeros((len(self.rows), 0), mx.int32), None,
                                 [0] * len(self.rows), self.cache.offsets)
            self._ahead = (list(self.uids), ahead)
            mx.async_eval(ahead[2:4] + (ahead[5],))
        mx.eval(lazy)  # sync: the one per round
        if round_ is not None:
            out.update(self._finish_round(*round_))
        for job in prefilled:
            out.update(self._finish_prefill(*job))
        return out

    def _can_look_ahead(self) -> bool:
        return not any(r.processors or r.spec.logprobs is not None for r in self.rows)

    def _drop_ahead(self) -> None:
        """Undo the queued plain forward (its one cache entry per row)."""
        if self._ahead is not None:
            self._ahead = None
            self.cache.trim(1)

    def _round(self, ks: Dict[int, int], lazy: list, cut: Optional[float] = None, confidence: bool = False):
        rows, B = self.rows, len(self.rows)
        kb = [max(0, min(int(ks.get(r.uid, 0)), MAX_DRAFT)) for r in rows]
        K = max(kb)
        P = self.cache.offsets  # each row's bonus position
        greedy = all(r.cfg.greedy for r in rows)
        # 1. Draft K tokens per row from (bonus, hidden), reading the committed K/V in place.
        q = conf = None
        if K == 0:
            drafts = mx.zeros((B, 0), mx.int32)
            q = mx.zeros((B, 0, 1))
        elif greedy and not any(r.processors for r in rows):
            if cut is not None:
                drafts, conf = self._draft_greedy(K, confidence=True)
                mx.eval(drafts, conf)  # sync: a cutting round's first; the verify's width depends on it
                kb = [min(k, kept_by_cut(c, cut)) for k, c in zip(kb, conf.tolist())]
                K = max(kb)
                drafts = drafts[:, :K]
                self.cut = True
            elif confidence:
                drafts, conf = self._draft_greedy(K, confidence=True)
            else:
                drafts = self._draft_greedy(K)
        else:
            drafts, q = self._draft_sampled(K, kb, P)
        if K:
            # Start the drafter's steps now: the device runs them while the host builds the
            # verify graph (no sync; the round's one sync comes after the verify).
            mx.async_eval(drafts)
        out = self._verify(self.bonus, drafts, q, kb, P, None if self.cut else conf)
        lazy.extend(out[2:4] + (out[5],) + out[4] + tuple(x for v in out[6].values() for x in v))
        return out

    def _verify(self, bonus, drafts, q, kb: List[int], P: List[int], conf: Optional[mx.array] = None):
        """Steps 2 and 3 of a round: one target forward over [bonus, drafts] and acceptance.
        ``conf`` (the drafts' probabilities, [B, K]) is read with the drafts at the sync."""
        rows, K = self.rows, drafts.shape[1]
        greedy = all(r.cfg.greedy for r in rows)
        # 2. Verify [bonus, d_1..d_K] of every row in one target forward.
        chunk = mx.concatenate([bonus, drafts], axis=1)
        res = self.target(chunk, self.cache, attn_backend=self.attention, fused_ops=self.fused_ops)
        # 3. Accept each row's agreeing prefix (at most its own k_b) plus one target token.
        if greedy:
            logits = res.logits
            if any(r.processors for r in rows):
                logits = mx.concatenate([r.processed(chunk[b], logits[b : b + 1]) for b, r in enumerate(rows)])
            n, nxt, choice = accept_greedy(drafts, logits)
            if min(kb) < K:
                n = mx.minimum(n, mx.array(kb, dtype=n.dtype))
                nxt = mx.take_along_axis(choice, n[:, None], axis=1)[:, 0]
        else:
            n, nxt = _select(rows, chunk, drafts, q, res.logits, kb, P)
        lps = self._logprobs(chunk, drafts, res.logits, n, nxt)
        hidden = mx.take_along_axis(res.hidden, n[:, None, None], axis=1)  # [B, 1, H]
        return kb, K, n, nxt, (drafts,) if conf is None else (drafts, conf), hidden, lps

    def _finish_round(self, kb, K, n, nxt, drafts, hidden, lps) -> Dict[int, RowOut]:
        n_acc, nexts, proposed = n.tolist(), nxt.tolist(), drafts[0].tolist()
        conf = drafts[1].tolist() if len(drafts) > 1 else None  # [B][K]: step(confidence=True)
        # 4. Roll back each row's K - n rejected entries; its next round starts from n.
        self.cache.trim([K - a for a in n_acc])
        out = {}
        for b, r in enumerate(self.rows):
            toks = proposed[b][: n_acc[b]] + [nexts[b]]
            if r.processors:
                r.history.extend([r.bonus] + toks[:-1])
            r.bonus = nexts[b]
            out[r.uid] = RowOut(toks, kb[b], n_acc[b], logprobs=_unpack_logprobs(lps.get(b), toks),
                                confidence=conf[b][: kb[b]] if conf is not None else None)
        self.bonus, self.hidden = nxt[:, None], hidden
        return out

    def _draft_greedy(self, K: int, confidence: bool = False):
        """Drafts [B, K]; with ``confidence`` also the drafter's probability of each [B, K]."""
        ctx = draft_context(self.cache, self.window, self.position)
        token, hidden, out, probs = self.bonus, self.hidden, [], []
        for _ in range(K):
            hd, hidden = self.drafter(self.target.embed(token), hidden, ctx.kv, ctx.q_pos, ctx.masks, self.attention,
                                         fused_ops=self.fused_ops)
            if confidence:
                token, p = self.drafter.argmax_confidence(hd)  # [B, 1] each
                probs.append(p)
            else:
                token = self.drafter.argmax(hd)  # [B, 1]
            out.append(token)
        drafts = mx.concatenate(out, axis=1).astype(mx.int32)
        return (drafts, mx.concatenate(probs, axis=1)) if confidence else drafts

    def _draft_sampled(self, K: int, kb: List[int], P: List[int]):
        """Drafts [B, K] and q log-probs [B, K, V] (zeros for rows that are not rejection-
        sampled). Greedy rows take the drafter's argmax; sampled rows draw from their filtered
        q with their own noise (the target's noise for coupled rows). Processors see the
        row's history, the bonus and the drafts so far."""
        ctx = draft_context(self.cache, self.window, self.position)
        groups = _groups(self.rows)
        token, hidden, seen = self.bonus, self.hidden, self.bonus  # seen [B, j+1]
        qs = []
        for j in range(K):
            hd, hidden = self.drafter(self.target.embed(token), hidden, ctx.kv, ctx.q_pos, ctx.masks, self.attention,
                                         fused_ops=self.fused_ops)
            full = self.drafter.logits(hd)[:, 0]  # [B, V]
            picks, q_j = [], []
            for idx, rows in groups:
                lg = _processed_rows(rows, idx, full[:, None], seen[:, -1:], seen[:, :-1])[:, 0]  # [G, V]
                cfg = rows[0].cfg
                if cfg.greedy:
                    picks.append(mx.argmax(lg, axis=-1))
                    q_j.append(mx.zeros_like(lg))
                    continue
                lq = log_probs(lg, cfg)
                purpose = NOISE_TARGET if rows[0].spec.coupled else NOISE_DRAFT
                g = gumbel(_keys(rows, [[P[b] + j + 1] for b in idx], purpose), lq.shape[-1])
                picks.append(mx.argmax(lq + g, axis=-1))
                q_j.append(lq)
            token = _ungroup(groups, picks).astype(mx.int32)[:, None]  # [B, 1]
            qs.append(_ungroup(groups, q_j)[:, None])
            seen = mx.concatenate([seen, token], axis=1)
        return seen[:, 1:], mx.concatenate(qs, axis=1)

    def _logprobs(self, chunk, drafts, logits, n, nxt) -> Dict[int, tuple]:
        """Per row that asked for them: the target's log-probs of what each verify position
        emits (drafts before n, the next token at n; positions past n are never read)."""
        out = {}
        j = mx.arange(chunk.shape[1])
        for b, r in enumerate(self.rows):
            if r.spec.logprobs is not None:
                d = mx.concatenate([drafts[b], mx.zeros((1,), mx.int32)])
                emitted = mx.where(j == n[b], nxt[b], d)
                out[b] = _row_logprobs(r, chunk[b], logits[b : b + 1], emitted)
        return out

    # ---- prefill ----------------------------------------------------------------------------
    def _prefill_slice(self, lazy: list, idle: bool) -> list:
        """Run prefill slices: one when rows are running; when none are, every queued job
        (nobody waits, and the rows then start decoding together). Returns
        [(job, first tokens, hidden, logprobs)] for the jobs completed this round."""
        self.prefilled = bool(self.pending)
        done = []
        while self.pending:
            job = self.pending[0]
            P = job.length
            if job.done < P - 1:
                e = min(job.done + PREFILL_STEP, P - 1)
                self.target(job.ids[:, job.done : e], job.cache, logits_from=e - job.done - 1,
                            attn_backend=self.attention, fused_ops=self.fused_ops)
                job.done = e
                if job.done < P - 1:
                    written = [c.keys for c in job.cache.layers.values()]
                    if not idle:
                        lazy.extend(written)  # evaluated with the round: bounds prefill memory
                        return done
                    mx.eval(written)  # sync: nothing is running, bound prefill memory
                    continue
            # The last prompt token alone: its logits give the first token.
            res = self.target(job.ids[:, P - 1 :], job.cache, attn_backend=self.attention,
                              fused_ops=self.fused_ops)
            job.done = P
            G = len(job.rows)
            _, first = _select(job.rows, job.ids[:, P - 1 :], mx.zeros((G, 0), mx.int32), mx.zeros((G, 0, 1)),
                               res.logits, [0] * G, [P - 1] * G)
            lps = {g: _row_logprobs(r, job.ids[g, P - 1 :], res.logits[g : g + 1], first[g : g + 1])
                   for g, r in enumerate(job.rows) if r.spec.logprobs is not None}
            lazy.extend([first, res.hidden] + [x for v in lps.values() for x in v])
            self.pending.popleft()
            done.append((job, first, res.hidden, lps))
            if not idle:
                return done
        return done

    def _finish_prefill(self, job: _Prefill, first: mx.array, hidden: mx.array, lps: Dict[int, tuple]):
        firsts = first.tolist()
        out = {}
        for g, r in enumerate(job.rows):
            out[r.uid] = RowOut([firsts[g]], first=True, logprobs=_unpack_logprobs(lps.get(g), [firsts[g]]))
            r.history.append(r.spec.prompt[-1])
            r.bonus = firsts[g]
        bonus = first[:, None]
        self._drop_ahead()
        if not self.rows:
            self.rows, self.cache, self.bonus, self.hidden = list(job.rows), job.cache, bonus, hidden
        else:
            self.rows = self.rows + job.rows
            self.cache = TargetCache.stack([self.cache, job.cache])
            self.bonus = mx.concatenate([self.bonus, bonus])
            self.hidden = mx.concatenate([self.hidden, hidden])
        return out


def _groups(rows: List[_Row]) -> List[tuple]:
    """[(batch indices, rows)] of rows sampled together."""
    out: Dict[tuple, tuple] = {}
    for b, r in enumerate(rows):
        out.setdefault(r.group, ([], []))
        out[r.group][0].append(b)
        out[r.group][1].append(r)
    return list(out.values())


def _ungroup(groups, parts: List[mx.array]) -> mx.array:
    """Concatenate per-group results and put them back in batch order."""
    order = [b for idx, _ in groups for b in idx]
    cat = mx.concatenate(parts) if len(parts) > 1 else parts[0]
    if order == sorted(order):
        return cat
    inv = [0] * len(order)
    for pos, b in enumerate(order):
        inv[b] = pos
    return cat[mx.array(inv)]


def _keys(rows: List[_Row], positions: List[List[int]], purpose: int) -> mx.array:
    """PRNG keys [G * n, 2]: row i's keys for its positions, rows in order."""
    words = [w for r, ps in zip(rows, positions) for w in r.keys(ps, purpose)]
    return mx.array(np.array(words, dtype=np.uint32).reshape(len(words), 2))


def _processed_rows(rows, idx, logits, chunk, prefix=None) -> mx.array:
    """logits[idx] [G, L, V] after each row's processors (a group with processors is one row)."""
    sel = logits[mx.array(idx)] if len(idx) != logits.shape[0] else logits
    if not rows[0].processors:
        return sel
    b = idx[0]
    return rows[0].processed(chunk[b], sel, prefix=None if prefix is None else prefix[b])


def _select(rows: List[_Row], chunk, drafts, q, logits, kb: List[int], P: List[int]):
    """The accepted count n [B] and the next token [B] of every row, group by group: greedy
    rows by argmax, coupled rows by the coupled rule, the rest by rejection sampling; row b
    accepts at most kb[b] drafts. P[b]: the position of chunk[b, 0]."""
    K = drafts.shape[1]
    ns, nxts = [], []
    for idx, grp in _groups(rows):
        sel = mx.array(idx)
        d = drafts[sel] if K else mx.zeros((len(idx), 0), mx.int32)
        kc = mx.array([kb[b] for b in idx], dtype=mx.int32)
        lg = _processed_rows(grp, idx, logits, chunk)  # [G, K+1, V]
        cfg = grp[0].cfg
        positions = [list(range(P[b] + 1, P[b] + K + 2)) for b in idx]
        if cfg.greedy or grp[0].spec.coupled:
            if cfg.greedy:
                n, _, choice = accept_greedy(d, lg)
            else:
                g = gumbel(_keys(grp, positions, NOISE_TARGET), lg.shape[-1]).reshape(lg.shape)
                n, _, choice = accept_coupled(d, log_probs(lg, cfg), g)
            n = mx.minimum(n, kc)
            nxt = mx.take_along_axis(choice, n[:, None], axis=1)[:, 0]
        else:
            lp = log_probs(lg, cfg)
            g = gumbel(_keys(grp, positions, NOISE_TARGET), lp.shape[-1]).reshape(lp.shape)
            u = uniform(_keys(grp, [ps[:-1] for ps in positions], NOISE_ACCEPT)).reshape(len(idx), K) if K else \
                mx.zeros((len(idx), 0))
            n, nxt = accept_rejection(d, q[sel] if K else mx.zeros((len(idx), 0, lp.shape[-1])), lp, u, g, kcap=kc)
        ns.append(n.astype(mx.int32))
        nxts.append(nxt.astype(mx.int32))
    groups = _groups(rows)
    return _ungroup(groups, ns), _ungroup(groups, nxts)


def _row_logprobs(r: _Row, chunk: mx.array, logits: mx.array, emitted: mx.array) -> tuple:
    """(log-prob of each emitted token [L], and with top-m: top ids [L, m], their log-probs)
    from one row's processed logits [1, L, V] at temperature 1."""
    lp = r.processed(chunk, logits)[0].astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, emitted[:, None].astype(mx.int32), axis=1)[:, 0]
    m = r.spec.logprobs
    if not m:
        return (chosen,)
    top = mx.argsort(-lp, axis=-1)[:, :m]
    return (chosen, top, mx.take_along_axis(lp, top, axis=1))


def _unpack_logprobs(lp, toks: List[int]) -> Optional[List[TokenLogprob]]:
    if lp is None:
        return None
    chosen = lp[0].tolist()
    if len(lp) == 1:
        return [TokenLogprob(t, chosen[j]) for j, t in enumerate(toks)]
    ids, vals = lp[1].tolist(), lp[2].tolist()
    return [TokenLogprob(t, chosen[j], list(zip(ids[j], vals[j]))) for j, t in enumerate(toks)]

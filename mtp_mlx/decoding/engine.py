"""The decoding engine, host side: requests in, text events out, one round per ``step``.

The engine owns requests: a queue, admission into the running ``Batch`` (at most
``max_batch`` rows, prefilling included), each request's budget, EOS ids, detokenizer, stop
strings and statistics, the draft length of every row and round (fixed, or chosen by the
``DraftPolicy`` under ``"auto"``), cancellation and the prefix cache. Requests join and leave
between rounds; nothing waits for the batch to drain. ``generate``, ``stream_generate``,
``batch_generate``, the CLI and the server all run on it.

Not thread-safe: one thread calls ``submit``, ``cancel`` and ``step`` (a server gives the
engine its own thread).
"""

import functools
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from ..errors import MtpError
from ..limits import DEFAULT_MAX_TOKENS, DEFAULT_NUM_DRAFT, MAX_BATCH, MAX_DRAFT, check_num_draft
from ..ops import check_backend
from ..sampling import SamplingConfig, fresh_seed
from .batch import Batch, RowSpec, TokenLogprob
from .prefix_cache import PrefixCache
from .stats import RequestStats, RunStats

MAX_TOP_LOGPROBS = 20


@dataclass
class Request:
    """One generation request (token ids in; callers tokenize and apply chat templates)."""

    prompt: List[int]
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: SamplingConfig = SamplingConfig()
    stop: Sequence[str] = ()
    num_draft: Union[int, str] = DEFAULT_NUM_DRAFT  # "auto" | 0 (no drafting) | 1..MAX_DRAFT
    logprobs: Optional[int] = None  # None = off; n >= 0: each token's log-prob and the top n
    request_index: int = 0  # with the seed, names this request's random stream
    processors: Sequence = ()


@dataclass
class Event:
    """What one round gave one request."""

    uid: int
    text: str  # new text; never shows a stop string or anything after it
    tokens: List[int]
    from_draft: List[bool]
    logprobs: Optional[List[TokenLogprob]]
    finish_reason: Optional[str]  # None while running; "stop" | "length" | "cancelled"
    stats: RequestStats
    drafted: int = 0  # this round's K for the row
    accepted: int = 0  # drafts the target kept this round


class _StopFilter:
    """Holds back text that could be the start of a stop string (which may span tokens and
    rounds) and cuts at the first complete one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str, final: bool) -> Tuple[str, bool]:
        """(text safe to show, whether a stop string was hit)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        if final or not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False


class _Text:
    """Incremental detokenizer of one request (no tokenizer: no text)."""

    def __init__(self, tokenizer):
        self.detok = tokenizer.detokenizer if tokenizer is not None else None

    def add(self, tokens: List[int], final: bool) -> str:
        if self.detok is None:
            return ""
        for t in tokens:
            self.detok.add_token(t)
        if final:
            self.detok.finalize()
        return self.detok.last_segment


@dataclass
class _Live:
    """Host state of one submitted request."""

    uid: int
    req: Request
    spec: RowSpec
    stats: RequestStats
    text: _Text
    stops: _StopFilter
    emitted: int = 0  # tokens counted against the budget
    batch_tokens: List[int] = field(default_factory=list)  # everything the batch emitted (uncropped)


def bare_pair(target, drafter=None, tokenizer=None, eos_ids: Sequence[int] = ()):
    """A pair-like object for models built in memory (tests, scripts)."""
    return SimpleNamespace(target=target, drafter=drafter, tokenizer=tokenizer,
                           target_config=SimpleNamespace(eos_token_id=list(eos_ids)))


_EXACT: Dict[int, Dict[str, Tuple[bool, str]]] = {}  # id(target) -> {backend: (exact, line)}


def exactness(target, attention: str, forward=None, target_path=None) -> Tuple[bool, str]:
    """Whether a K+1-wide verify rounds exactly like one-token decoding for this target and
    backend (checked once per loaded target and backend; ``mtp_mlx.checks``). A target loaded
    from ``target_path`` also keeps its verdict in the tuning store, so the next start-up of
    the same checkpoint on the same machine and software skips the check."""
    from ..checks import speculation_gate, stored_speculation_gate

    if forward is not None:  # an injected forward (tests): never cached
        return speculation_gate(SimpleNamespace(target=target), attn_backend=attention, forward=forward)
    if id(target) not in _EXACT:
        _EXACT[id(target)] = {}
        weakref.finalize(target, _EXACT.pop, id(target), None)  # models are unhashable dicts
    per = _EXACT[id(target)]
    if attention not in per:
        per[attention] = (stored_speculation_gate(target, target_path, attn_backend=attention) if target_path
                          else speculation_gate(SimpleNamespace(target=target), attn_backend=attention))
    return per[attention]


_POLICIES: Dict[tuple, object] = {}  # (id(target), id(drafter)) -> the default DraftPolicy


@functools.lru_cache(maxsize=1)
def _kernel_ok() -> Tuple[bool, str]:
    """The Metal kernel's self-test, once per process, before its first use."""
    from ..checks import kernel_self_test

    res = kernel_self_test()
    return res.status != "fail", res.message


class Engine:
    def __init__(
        self,
        pair,
        *,
        max_batch: int = MAX_BATCH,
        use_drafter: bool = True,
        attention: str = "auto",
        position: str = "B",
        prefix_cache_bytes: int = 0,
        policy=None,
        exactness_forward=None,
        fused_ops: bool = True,
    ):
        """``exactness_forward``: a forward to run the load-time exactness check with instead
        of the target's (tests inject one whose wide path rounds differently). ``fused_ops``:
        run the layers' elementwise tails compiled (``models.layers.fused``; same tokens)."""
        if not 1 <= max_batch <= MAX_BATCH:
            raise MtpError(f"max_batch {max_batch} is out of range: use 1..{MAX_BATCH}")
        if position not in ("A", "B"):
            raise MtpError(f"unknown draft position convention {position!r}: use A or B")
        self.pair = pair
        self.target = pair.target
        self.drafter = pair.drafter if use_drafter else None
        self.tokenizer = pair.tokenizer
        self.max_batch = max_batch
        self.notices: List[str] = []  # one line each: what the load-time checks decided
        attention = check_backend(attention)
        if attention == "auto" and mx.metal.is_available():
            ok, line = _kernel_ok()
            if not ok:
                attention = "reference"
                self.notices.append(f"{line}; using the reference attention instead")
        self.greedy_exact = True
        if self.drafter is not None:
            # in-memory pairs (bare_pair) have no checkpoint path: their verdict is not stored
            self.greedy_exact, line = exactness(self.target, attention, exactness_forward,
                                                getattr(pair, "target_path", None))
            if not self.greedy_exact:
                self.notices.append(line)
        self.batch = Batch(self.target, self.drafter, position=position, attention=attention, fused_ops=fused_ops)
        eos = set(getattr(pair.target_config, "eos_token_id", None) or ())
        eos |= set(getattr(self.tokenizer, "eos_token_ids", None) or ())
        self.eos = frozenset(eos)
        self.queue: deque = deque()
        self.live: Dict[int, _Live] = {}
        self.cancelled: set = set()
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.policy = policy if policy is not None else self._default_policy()
        self.totals = RunStats()
        self.rounds = 0
        self._fixed: Dict[int, int] = {}  # the latest round's rows with a fixed K (see _plan)
        self._next_uid = 0

    def _default_policy(self):
        """One policy per loaded pair and process, so what it measured carries over between
        calls (``generate`` after ``generate``)."""
        if self.drafter is None:
            return None
        from .policy import DraftPolicy

        key = (id(self.target), id(self.drafter))
        if key not in _POLICIES:
            _POLICIES[key] = DraftPolicy(max_draft=MAX_DRAFT)
            weakref.finalize(self.target, _POLICIES.pop, key, None)
        return _POLICIES[key]

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Queue a request; returns its uid. Raises ``MtpError`` for a bad request."""
        self._check(request)
        uid = self._next_uid
        self._next_uid += 1
        seed = request.sampling.seed
        spec = RowSpec(uid, list(request.prompt), request.sampling,
                       seed=fresh_seed() if seed is None else seed, request_index=request.request_index,
                       coupled=seed is not None, processors=request.processors, logprobs=request.logprobs)
        stats = RequestStats(prompt_tokens=len(request.prompt), submitted=time.perf_counter())
        self.live[uid] = _Live(uid, request, spec, stats, _Text(self.tokenizer), _StopFilter(request.stop))
        self.queue.append(uid)
        return uid

    def _check(self, r: Request) -> None:
        cfg = self.target.cfg
        if not r.prompt:
            raise MtpError("the prompt is empty: pass at least one token of text")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size for t in r.prompt):
            raise MtpError(f"the prompt has token ids outside 0..{cfg.vocab_size - 1}: pass ids of this model's vocabulary")
        if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise MtpError(f"max_tokens {r.max_tokens!r} is out of range: use a value >= 1")
        if len(r.prompt) + r.max_tokens > cfg.max_position_embeddings:
            raise MtpError(
                f"the prompt has {len(r.prompt)} tokens; with max_tokens {r.max_tokens} it exceeds the "
                f"model's {cfg.max_position_embeddings} positions: shorten it or ask for fewer tokens"
            )
        check_num_draft(r.num_draft)
        if r.logprobs is not None and (not isinstance(r.logprobs, int) or not 0 <= r.logprobs <= MAX_TOP_LOGPROBS):
            raise MtpError(f"top logprobs {r.logprobs!r} is out of range: use 0..{MAX_TOP_LOGPROBS}")

    def cancel(self, uid: int) -> None:
        """The request leaves at the next round boundary (its last event says "cancelled")."""
        if uid in self.live:
            self.cancelled.add(uid)

    @property
    def running(self) -> int:
        return len(self.batch.uids) + len(self.batch.prefilling)

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def idle(self) -> bool:
        return not self.live

    # ---- rounds -----------------------------------------------------------------------------
    def step(self) -> List[Event]:
        """Cancellations, admission, then one round (with at most one prefill slice)."""
        events = self._cancel()
        while self.queue and self.running < self.max_batch:
            self._admit(self.queue.popleft())
        if not self.batch.uids and not self.batch.pending:
            return events
        ks = self._plan()
        cut, confidence = self._cut_plan(ks)
        tic = time.perf_counter()
        outs = self.batch.step(ks, look_ahead=not self._drafts_next(ks), cut=cut, confidence=confidence)
        seconds = time.perf_counter() - tic
        now = time.perf_counter()
        rounds = {u: o for u, o in outs.items() if not o.first}
        if rounds:
            self.rounds += 1
            if self.policy is not None:
                # Only a round that ran as it would among rounds like it measures a round's cost:
                # not one that also ran a prefill slice, nor the first plain round after drafting
                # (nothing was queued ahead), nor a drafting round that threw a queued forward away.
                steady = self.batch.steady and not self.batch.prefilled
                # A cut round tells the policy what each row planned, an uncut one that asked
                # for it the drafter's confidence (only a policy with ``cut`` / ``wants_confidence``
                # asks for either, so a policy of one's own need not take these arguments).
                cut_of = {"planned_ks": {u: ks.get(u, 0) for u in rounds}} if self.batch.cut else {}
                conf = {u: o.confidence for u, o in rounds.items() if o.confidence is not None}
                if conf:
                    cut_of["confidence"] = conf
                self.policy.observe({u: o.drafted for u, o in rounds.items()},
                                    {u: o.accepted for u, o in rounds.items()},
                                    seconds if steady else None, **cut_of)
        if self.prefix.max_bytes > 0:
            for uid, out in outs.items():
                if out.first:  # a segment boundary: the prompt's K/V, for later prompts that extend it
                    self.prefix.store(self.live[uid].spec.prompt, self.batch.row_cache(uid))
        done = []
        for uid, out in outs.items():
            ev = self._emit(self.live[uid], out, now)
            events.append(ev)
            if ev.finish_reason is not None:
                done.append(uid)
        self._finish(done)
        return events

    def _admit(self, uid: int) -> None:
        lv = self.live[uid]
        cache, n = self.prefix.lookup(lv.spec.prompt) if self.prefix.max_bytes > 0 else (None, 0)
        lv.stats.cached_tokens = n
        self.batch.insert(lv.spec, cache, n)

    def _plan(self) -> Dict[int, int]:
        """Each running row's K: a fixed K or the policy's choice, at most the row's budget
        left minus the target's own token."""
        if self.drafter is None:
            return {}
        uids = self.batch.uids
        caps, fixed = {}, {}
        for uid in uids:
            lv = self.live[uid]
            caps[uid] = max(0, min(MAX_DRAFT, lv.req.max_tokens - lv.emitted - 1))
            if not self.greedy_exact and lv.req.sampling.greedy:
                fixed[uid] = 0  # a wide verify would not round like decoding: no greedy drafting
            elif lv.req.num_draft != "auto":
                fixed[uid] = min(lv.req.num_draft, caps[uid])
        self._fixed = fixed
        if self.policy is None or len(fixed) == len(uids):
            return fixed
        plan = self.policy.plan(uids, caps, fixed)
        return {u: min(int(plan.get(u, 0)), caps[u]) for u in uids}

    def _cut_plan(self, ks: Dict[int, int]) -> Tuple[Optional[float], bool]:
        """(the policy's confidence cut for this round or None, whether an uncut round should
        report the drafter's confidence for the policy's estimate of what cutting would give).
        Rows with a fixed K are never cut; both are optional in a policy of one's own."""
        if self.policy is None or not any(ks.values()) or any(self._fixed.get(u, 0) for u in ks):
            return None, False
        cut = getattr(self.policy, "cut", None)
        p_min = cut() if cut is not None else None
        if p_min is not None:
            return p_min, False
        wants = getattr(self.policy, "wants_confidence", None)
        return None, bool(wants()) if wants is not None else False

    def _drafts_next(self, ks: Dict[int, int]) -> bool:
        """Whether the next round will likely draft (then no plain forward is queued ahead):
        a row with a fixed K drafts, or the policy expects to. A guess: a wrong one costs
        a little time, never a token."""
        if self.drafter is None or not ks:
            return False
        if any(k > 0 for k in self._fixed.values()):
            return True
        foretell = getattr(self.policy, "drafts_next", None)  # optional in a policy of one's own
        return foretell is not None and len(self._fixed) < len(ks) and foretell(len(ks))

    def _emit(self, lv: _Live, out, now: float) -> Event:
        lv.batch_tokens.extend(out.tokens)
        toks, reason = [], None
        for t in out.tokens:
            if t in self.eos:
                reason = "stop"
                break
            toks.append(t)
            lv.emitted += 1
            if lv.emitted >= lv.req.max_tokens:
                reason = "length"
                break
        n_draft = min(out.accepted, len(toks))
        if out.first:
            lv.stats.add_tokens(len(toks), now)
            if not toks:
                lv.stats.first_token_at = lv.stats.last_token_at = now
        else:
            lv.stats.add_round(out.drafted, out.accepted, len(toks), now)
        text, hit = lv.stops.feed(lv.text.add(toks, reason is not None), final=reason is not None)
        if hit:
            reason = "stop"
        logprobs = out.logprobs[: len(toks)] if out.logprobs is not None else None
        return Event(lv.uid, text, toks, [True] * n_draft + [False] * (len(toks) - n_draft), logprobs,
                     reason, lv.stats.snapshot(), out.drafted, out.accepted)

    def _finish(self, uids: List[int]) -> None:
        if not uids:
            return
        if self.prefix.max_bytes > 0:
            offsets = self.batch.offsets()
            for uid in uids:
                lv = self.live[uid]
                held = lv.spec.prompt + lv.batch_tokens[:-1]  # the newest token is not in the cache yet
                if uid in offsets and offsets[uid] == len(held):
                    self.prefix.store(held, self.batch.row_cache(uid))
        self.batch.remove(uids)
        for uid in uids:
            lv = self.live.pop(uid)
            self.totals.add_request(lv.stats)
            self.cancelled.discard(uid)
            if self.policy is not None:
                self.policy.forget(uid)

    def _cancel(self) -> List[Event]:
        if not self.cancelled:
            return []
        events = []
        for uid in list(self.cancelled):
            if uid in self.queue:
                self.queue.remove(uid)
            lv = self.live[uid]
            events.append(Event(uid, "", [], [], None, "cancelled", lv.stats.snapshot()))
        self._finish(list(self.cancelled))
        return events

    def run(self) -> Iterator[Event]:
        """``step`` until every submitted request has finished."""
        while self.live:
            yield from self.step()

    def metrics(self) -> dict:
        t = self.totals
        live = [lv.stats for lv in self.live.values()]
        return {
            "running": self.running, "queued": self.queued, "rounds": self.rounds,
            "requests_finished": t.requests,
            "prompt_tokens": t.prompt_tokens + sum(s.prompt_tokens for s in live),
            "generation_tokens": t.generation_tokens + sum(s.generation_tokens for s in live),
            "drafted": t.drafted + sum(s.drafted for s in live),
            "accepted": t.accepted + sum(s.accepted for s in live),
            "prefix_cache_hits": self.prefix.hits, "prefix_cache_misses": self.prefix.misses,
            "prefix_cache_hit_tokens": self.prefix.hit_tokens, "prefix_cache_bytes": self.prefix.bytes,
            "prefix_cache_entries": len(self.prefix.entries),
        }


def generate_ids(engine: Engine, prompts: Sequence[List[int]], **request) -> List[Tuple[List[int], RequestStats]]:
    """Run prompts to completion on ``engine``; (tokens, stats) per prompt, in order."""
    uids = [engine.submit(Request(list(p), **request)) for p in prompts]
    toks: Dict[int, List[int]] = {u: [] for u in uids}
    stats: Dict[int, RequestStats] = {}
    for ev in engine.run():
        if ev.uid in toks:
            toks[ev.uid].extend(ev.tokens)
            stats[ev.uid] = ev.stats
    return [(toks[u], stats[u]) for u in uids]

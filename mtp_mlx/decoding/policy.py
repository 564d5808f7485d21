"""How many tokens each row drafts this round, chosen from measured costs and acceptance.

Pure host code: no MLX, no clocks. The engine calls, once per round::

    ks = policy.plan(uids, caps)                 # K per row; the round's K is max(ks.values())
    p_min = policy.cut()                         # None, or cut the drafts on the drafter's confidence
    ... draft, verify, accept ...
    policy.observe(ks, accepted, seconds)        # what happened and how long the round took
                                                 # (a cut round: ks = drafts kept, planned = ks planned)
    policy.forget(uid)                           # a row left the batch

The model
---------
* Acceptance. For row i and draft position j, ``a_ij`` is the probability that draft j is
  accepted given that drafts 1..j-1 were. A row keeps counts per position, decayed by the
  rounds since they were last fed (at most ``decay_rounds_max`` rounds' worth, so it follows
  drift and a probe after a long park counts for a little more), blended with a shared prior
  per position that every row feeds and that persists across processes. K drafts commit
  ``E(K) = 1 + a_1 + a_1 a_2 + ... + a_1..a_K`` tokens on average. No row plans more than one
  position past the deepest position measured ``trust`` times, so depth is climbed one step
  at a time, never on optimism alone.
* Cost. ``C[b][k]`` is the smoothed wall time of a round whose largest K is k, for batch-size
  bucket b (1, 2, 3-4, 5-8, ...), k = 0 included. What enters the average is the median of the
  key's last three samples, clipped to ``[cost_clip[0], cost_clip[1]] x`` the current estimate:
  one stall does not move the estimate at all, and a run of stalls moves it by at most
  ``cost_alpha * (cost_clip[1] - 1)`` (7.5 % by default) per round.
  The first sample of each (bucket, k) in a process is dropped (kernel compilation, warm-up).
  Measured costs are made non-decreasing in k (noise must not make a deeper round look
  cheaper). Unmeasured costs are interpolated between measured k, else scaled from another
  bucket's measured shape, else extended linearly from the last two measured k, else
  ``C[b][0] * (1 + default_slope * k)``.
* Choice. For every candidate round depth k, each row drafts ``min(k, its cap, its frontier)``
  except rows whose own best depth is 0, which ride along at K = 0. The score is the rows'
  summed ``E`` over ``C[b][k]``; the best k wins only if it beats the incumbent by ``margin``.
  Rows with a fixed K (``fixed=``) are not chosen for but count in the round's K and cost.
* Parking and probing. A round at k = 0 is "parked". On a per-bucket schedule (every
  ``probe_first`` rounds, doubling to ``probe_max`` while probes change nothing, reset when the
  choice changes) the policy drafts one position deeper than its choice, parked rows included,
  to refresh the estimates that would otherwise never be measured again. Where no depth would
  pay even if every draft were accepted (by the measured costs: ``(k + 1) C[b][0] < C[b][k]``
  for every k, as on a CPU at batch 4), it probes at the longest interval straight away. A probe that takes
  its depth's first cost samples does not double the interval: it taught something new, so
  depth is climbed at the first interval's pace.
* Hard guard. Over the last ``guard_window`` drafting rounds of a bucket (parked probes
  excluded), the time plain decoding would have needed for the same tokens,
  ``sum(tokens_r / b_r) * C[b][0]``, is compared with the time taken (each round's time
  counted at most ``cost_clip[1]`` x the median of the last three raw times at its K: a stall
  slows plain decoding as much, so it must not trip the guard). Below
  ``1 - guard_epsilon`` the bucket is parked for ``guard_backoff`` rounds (doubling on each
  consecutive trip, to ``guard_backoff_max``; reset by a window that passes), whatever the model
  says: this catches a cost or acceptance model that is wrong. ``C[b][0]`` is taken at the time
  of the decision. If plain rounds were last timed before the window began (the bucket has been
  drafting), the machine may have slowed down since, plain decoding as much as drafting: the
  guard first runs three plain rounds (the first without the overlap, the next two cost
  samples) and then decides against the median of the latest three plain times.

* Cutting on the drafter's confidence. A cut round drafts the planned K, reads the drafts'
  probabilities on the host (a second synchronisation: the verify's width must be known before
  its graph is built) and verifies each row only up to its first draft below ``cut_p_min``;
  the verify is as wide as the longest kept run. It saves verify width and costs the overlap
  of drafting with building the verify. Whether that pays is measured, per bucket, with the
  same objective: tokens per second of the bucket's recent cut rounds against its recent uncut
  drafting rounds (``cut_window`` each). Cutting becomes the bucket's mode only when it wins by
  ``margin``; the mode not in use is re-tried for ``cut_burst`` rounds on a back-off schedule
  (every ``cut_first`` drafting rounds, doubling to ``cut_max`` while the mode stays the same).
  The ``cut_window`` uncut rounds before each such decision read the drafts' probabilities at
  their one sync (``wants_confidence``), so the policy knows what a cut would have kept and the
  tokens it would have given; other rounds skip that read. A trial of
  cutting runs only if those tokens over the cost of rounds as deep as the kept drafts (less
  than a cut round costs) beat the uncut rounds' measured tokens per second: a drafter whose
  confidence says nothing is never cut.
  Cut rounds teach the acceptance of the drafts they kept. That is acceptance given confidence,
  higher than an uncut round's, and it is what the depth of the next cut rounds should be chosen
  by (they too verify confident drafts only); should uncut rounds return, their own samples
  correct it within a few rounds, and the guard bounds a model that is wrong. Cut rounds are not
  cost samples of their K (their cost depends on where they cut); the guard counts them like
  any drafting round.

Worst-case loss against plain decoding
--------------------------------------
Let ``r1 = C[b][1] / C[b][0]`` (a probe round's cost over a plain round's), ``rho = C[b][k] /
C[b][0]`` the costliest drafting round against a plain one, ``eps = guard_epsilon``,
``W = guard_window``, ``P = probe_max``, ``G = guard_backoff_max``. Once the probe interval and
the guard back-off have reached their caps, the fraction of time lost to plain decoding is at most::

    loss <= eps + (r1 - 1) / P + W (rho - 1) / (W rho + G)

(drafting windows that pass the guard; one probe per P parked rounds; a model that keeps
insisting on a losing depth drafts W rounds per G parked rounds, W + 1 when a re-measure of the
plain round comes first: its three plain rounds lose nothing). Trials of the losing cut mode
are drafting rounds too, so the guard bounds them with the rest; against the better mode they
cost at most ``cut_burst / cut_max`` of the drafting rounds times their extra cost (4 / 512:
under 1 % even for a trial twice as slow). With the defaults
(eps = 0.02, P = 512, W = 32, G = 2048) and r1 = 1.5, rho = 2 that is
0.02 + 0.001 + 0.015 = 3.6 %; when the model's estimates hold (no guard trips) it is
2.1 %. Warm-up adds a one-off cost per (process, bucket): two plain rounds to measure
``C[b][0]`` (no loss), at most W drafting rounds before the guard can trip, and the probes
at 8, 16, ..., P rounds (seven probes before the cap).
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass, field
from typing import Collection, Deque, Dict, List, Optional, Sequence, Tuple

STATE_VERSION = 1
TRACE_LIMIT = 100_000  # rounds kept in the K trace (a long-running server drops the oldest)
PARK_SLACK = 0.05  # a parked choice is reused while the plain round costs at most this much more (see plan)


def prior_key(machine: str, mlx_version: str, pair_id: str, quantization: str) -> str:
    """The tuning-store key under which a policy's ``state()`` is persisted: costs and
    acceptance hold only for one machine, MLX version, target/drafter pair and quantization."""
    return " | ".join(str(part) for part in (machine, f"mlx {mlx_version}", pair_id, quantization))


def bucket_of(batch_size: int) -> int:
    """Batch-size bucket: the next power of two (1, 2, 3-4 -> 4, 5-8 -> 8, ...)."""
    return 1 << max(0, int(batch_size) - 1).bit_length()


def kept_by_cut(probs: Sequence[float], p_min: float) -> int:
    """How many leading drafts have a probability of at least ``p_min``: what a cut keeps."""
    n = 0
    while n < len(probs) and probs[n] >= p_min:
        n += 1
    return n


def _rate(rounds) -> float:
    """Tokens per second over (tokens, seconds) pairs."""
    seconds = sum(s for _, s in rounds)
    return sum(t for t, _ in rounds) / seconds if seconds > 0 else 0.0


def expected_tokens(rates: Sequence[float], k: int) -> float:
    """``1 + a_1 + a_1 a_2 + ... + a_1..a_k``: tokens committed on average by k drafts."""
    total, run = 1.0, 1.0
    for a in rates[:k]:
        run *= a
        total += run
    return total


@dataclass
class _Cost:
    estimate: float = 0.0
    samples: int = 0  # samples in the estimate (0 = unmeasured)
    seen: int = 0  # samples offered in this process (the first is dropped)
    recent: Deque[float] = field(default_factory=lambda: collections.deque(maxlen=3))
    last: int = -1  # the policy's round count when the latest sample entered ``recent``


@dataclass
class _RowStats:
    """Decayed per-position counts of one row: hits[j], trials[j] for position j+1."""

    hits: List[float]
    trials: List[float]
    last: List[int]  # round of the latest sample per position


@dataclass
class _Choice:
    k: int  # the round's depth for the automatic rows
    layout: Dict[int, int]  # K per row
    rates: Dict[int, List[float]]  # acceptance per row and position
    auto: List[int]  # rows the policy chooses for
    riders: List[int]  # automatic rows whose own best is 0
    limit: Dict[int, int]  # per automatic row: min(cap, frontier + 1)


@dataclass
class _Bucket:
    incumbent: int = 0
    probe_interval: int = 0
    since_probe: int = 0
    probing: bool = False  # the current round is a probe
    choice_before_probe: int = 0
    guard: Deque[Tuple[float, float, int]] = field(default_factory=collections.deque)  # (tokens/row, s, round)
    refresh: int = 0  # plain rounds still to run to re-measure the plain round before the guard decides
    refreshed: bool = False  # this guard episode already asked for a re-measure
    guard_until: int = 0  # round number until which the guard keeps the bucket parked
    guard_backoff: int = 0
    after_probe: Optional[int] = None  # the choice a probe just left (until the next plan)
    probe_new: bool = False  # the current probe takes its depth's first cost samples
    # cutting on the drafter's confidence (``cut_window`` rounds each, set by DraftPolicy._bucket):
    # recent (tokens, seconds) of cut and uncut drafting rounds
    cut_rounds: Deque[Tuple[float, float]] = field(default_factory=collections.deque)
    uncut_rounds: Deque[Tuple[float, float]] = field(default_factory=collections.deque)
    # what recent uncut rounds would have given cut: (tokens, the widest kept run)
    counterfactual: Deque[Tuple[float, int]] = field(default_factory=collections.deque)
    cut_mode: bool = False  # the bucket's mode: whether its drafting rounds cut
    cut_interval: int = 0  # drafting rounds between trials of the other mode
    cut_since: int = 0
    cut_trial: int = 0  # rounds of the current trial still to run
    # (rows, which may draft, fixed rows, version, other buckets' plain versions), the plain cost
    # up to which the choice stays parked, that choice, and the caps it was chosen under (see plan)
    parked: Optional[Tuple[tuple, float, "_Choice", tuple]] = None


class DraftPolicy:
    """The adaptive draft-length policy (see the module docstring for the rules).

    Args:
        max_draft: deepest K ever planned.
        prior: a ``state()`` of an earlier policy (same machine, MLX version, pair and
            quantization, see ``prior_key``): seeds the costs and the shared acceptance prior.
        margin: a challenger depth must beat the incumbent's score by this fraction.
        cost_alpha: weight of a new (clipped) cost sample in the smoothed cost.
        cost_clip: a cost sample is clipped to [lo, hi] x the current estimate first.
        default_slope: unmeasured cost growth per draft position, as a fraction of C[b][0],
            used until two depths of some bucket have been measured.
        init_accept / init_weight: acceptance assumed for position 1 before anything is
            measured, and its weight in pseudo-trials.
        prior_weight: pseudo-trials of the shared prior in a row's estimate.
        row_decay / prior_decay: decay per round of a row's / the shared counts (drift), applied
            when a sample arrives, for at most ``decay_rounds_max`` rounds of age.
        trust: samples after which a draft position counts as measured (frontier rule).
        probe_first / probe_max: the probe back-off schedule, in rounds.
        guard_window / guard_epsilon: the hard guard's window (drafting rounds) and tolerance.
        guard_backoff / guard_backoff_max: rounds a guard trip parks the bucket, doubling.
    """

    def __init__(
        self,
        max_draft: int = 8,
        prior: Optional[dict] = None,
        *,
        margin: float = 0.02,
        cost_alpha: float = 0.3,
        cost_clip: Tuple[float, float] = (0.8, 1.25),
        default_slope: float = 0.2,
        init_accept: float = 0.6,
        init_weight: float = 2.0,
        prior_weight: float = 2.0,
        row_decay: float = 0.95,
        prior_decay: float = 0.98,
        decay_rounds_max: int = 4,
        trust: int = 2,
        probe_first: int = 8,
        probe_max: int = 512,
        guard_window: int = 32,
        guard_epsilon: float = 0.02,
        guard_backoff: int = 32,
        guard_backoff_max: int = 2048,
        cut_p_min: float = 0.75,
        cut_window: int = 16,
        cut_first: int = 16,
        cut_max: int = 512,
        cut_burst: int = 4,
    ):
        if max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {max_draft}")
        self.max_draft = max_draft
        self.margin = margin
        self.cost_alpha = cost_alpha
        self.cost_clip = cost_clip
        self.default_slope = default_slope
        self.init_accept = init_accept
        self.init_weight = init_weight
        self.prior_weight = prior_weight
        self.row_decay = row_decay
        self.prior_decay = prior_decay
        self.decay_rounds_max = decay_rounds_max
        self.trust = trust
        self.probe_first = probe_first
        self.probe_max = probe_max
        self.guard_window = guard_window
        self.guard_epsilon = guard_epsilon
        self.guard_backoff_first = guard_backoff
        self.guard_backoff_max = guard_backoff_max
        self.cut_p_min = cut_p_min
        self.cut_window = cut_window
        self.cut_first = cut_first
        self.cut_max = cut_max
        self.cut_burst = cut_burst

        self._costs: Dict[int, Dict[int, _Cost]] = {}
        self._measured_memo: Dict[int, Dict[int, float]] = {}  # _measured per bucket until a cost changes
        # Bumped whenever what _choose reads changes, except a bucket's plain cost, which moves
        # every parked round and has its own counter per bucket (plan's parked memo).
        self._version = 0
        self._plain_version: Dict[int, int] = {}
        self._rates_memo: Optional[Tuple[int, List[float]]] = None  # (version, _prior_rates())
        self._prior_hits = [0.0] * max_draft
        self._prior_trials = [0.0] * max_draft
        self._prior_seen = [0] * max_draft  # undecayed samples per position (frontier)
        self._prior_last = [0] * max_draft  # round of the latest sample per position
        self._rows: Dict[int, _RowStats] = {}
        self._buckets: Dict[int, _Bucket] = {}
        self._round = 0
        self._planned: Optional[Tuple[int, List[int], Dict[int, int], Dict[int, int]]] = None  # last plan()
        self._planned_parked = False
        self._trace: List[Tuple[int, int, bool]] = []
        self._parked_rounds = 0
        self._probes = 0
        self._guard_trips = 0
        self._refresh_rounds = 0
        self._cut_planned = False  # whether the round just planned cuts (``cut()``)
        self._cut_eligible = False  # whether the cut decision chose the round just planned's mode
        self._confidence_wanted = False  # whether the round just planned reports the drafts' probabilities
        self._cut_rounds = 0
        self._reason = "no round yet"
        if prior:
            self._load(prior)

    @classmethod
    def from_state(cls, state: dict, **kwargs) -> "DraftPolicy":
        """A policy seeded with an earlier ``state()`` (same as ``DraftPolicy(prior=state)``)."""
        return cls(prior=state, **kwargs)

    # ---- acceptance -------------------------------------------------------------------------
    def _frontier(self) -> int:
        """Deepest position j such that positions 1..j each have ``trust`` samples."""
        j = 0
        while j < self.max_draft and self._prior_seen[j] >= self.trust:
            j += 1
        return j

    def _prior_rates(self) -> List[float]:
        """Shared acceptance per position; positions not yet trusted inherit the deepest
        trusted rate (position 1 always uses its own counts, seeded by ``init_accept``).
        Memoised until the counts change (every round asks)."""
        if self._rates_memo is not None and self._rates_memo[0] == self._version:
            return self._rates_memo[1]
        rates = []
        for j in range(self.max_draft):
            own = (self.init_weight * self.init_accept + self._prior_hits[j]) / (self.init_weight + self._prior_trials[j])
            rates.append(own if j == 0 or self._prior_seen[j] >= self.trust else rates[-1])
        self._rates_memo = (self._version, rates)
        return rates

    def _row_rates(self, uid: int, prior: List[float]) -> List[float]:
        row = self._rows.get(uid)
        if row is None:
            return prior
        w = self.prior_weight
        return [(w * p + h) / (w + t) for p, h, t in zip(prior, row.hits, row.trials)]

    def acceptance(self, uid: Optional[int] = None) -> List[float]:
        """Conditional acceptance per draft position: row ``uid``'s estimate, or the shared prior."""
        prior = self._prior_rates()
        return list(prior if uid is None else self._row_rates(uid, prior))  # a copy: the memo stays intact

    # ---- cost -------------------------------------------------------------------------------
    def _measured(self, bucket: int) -> Dict[int, float]:
        """Measured costs of the bucket, made non-decreasing in K (a round with more drafts does
        more work; noise must not make K+1 look cheaper than K): weighted pool-adjacent-violators.
        Memoised per bucket until one of its costs changes (plan() asks for it many times)."""
        memo = self._measured_memo.get(bucket)
        if memo is None:
            memo = self._measured_memo[bucket] = self._pav(bucket)
        return memo

    def _pav(self, bucket: int) -> Dict[int, float]:
        pts = sorted((k, c.estimate, min(c.samples, 10)) for k, c in self._costs.get(bucket, {}).items() if c.samples)
        blocks: List[List[float]] = []  # [value, weight, number of points]
        for _, est, w in pts:
            blocks.append([est, float(w), 1])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                v2, w2, n2 = blocks.pop()
                v1, w1, n1 = blocks.pop()
                blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
        values = [v for v, _, n in blocks for _ in range(n)]
        return {k: v for (k, _, _), v in zip(pts, values)}

    def cost(self, batch_size: int, k: int) -> Optional[float]:
        """Estimated seconds of a round of this batch size whose largest K is k; None while
        nothing about this bucket's plain round is known."""
        return self._cost(bucket_of(batch_size), k)

    def _cost(self, bucket: int, k: int) -> Optional[float]:
        pts = self._measured(bucket)
        if k in pts:
            return pts[k]
        if not pts:
            return None
        below = [j for j in pts if j < k]
        above = [j for j in pts if j > k]
        if below and above:  # interpolate between the nearest measured depths
            lo, hi = max(below), min(above)
            return pts[lo] + (pts[hi] - pts[lo]) * (k - lo) / (hi - lo)
        if not below:  # only deeper depths measured (rare): scale down along the default slope
            hi = min(above)
            return pts[hi] * (1 + self.default_slope * k) / (1 + self.default_slope * hi)
        lo = max(below)
        shape = self._shape_from_other_bucket(bucket, lo, k)
        if shape is not None:
            return pts[lo] * shape
        if len(below) >= 2:  # extend the last measured slope (never downward)
            lo2 = max(j for j in below if j != lo)
            slope = max(0.0, (pts[lo] - pts[lo2]) / (lo - lo2))
            return pts[lo] + slope * (k - lo)
        base = pts.get(0, pts[lo] / (1 + self.default_slope * lo))
        return pts[lo] + self.default_slope * base * (k - lo)

    def _shape_from_other_bucket(self, bucket: int, lo: int, k: int) -> Optional[float]:
        """C[b'][k] / C[b'][lo] from the nearest other bucket that measured both."""
        others = sorted((b for b in self._costs if b != bucket), key=lambda b: abs(math.log2(b / bucket)))
        for b in others:
            pts = self._measured(b)
            if lo in pts and k in pts and pts[lo] > 0:
                return pts[k] / pts[lo]
        return None

    def _record_cost(self, bucket: int, k: int, seconds: float) -> None:
        costs = self._costs.setdefault(bucket, {})
        c = costs.get(k)
        if c is None:
            c = costs[k] = _Cost()
        c.seen += 1
        if c.seen == 1 and c.samples == 0:
            return  # the first round at a new shape pays for compilation and warm-up
        self._measured_memo.pop(bucket, None)
        if k == 0:
            self._plain_version[bucket] = self._plain_version.get(bucket, 0) + 1
        else:
            self._version += 1
        c.last = self._round
        if c.samples == 0:
            c.estimate, c.samples = seconds, 1
            c.recent.append(seconds)
            return
        c.recent.append(seconds)
        lo, hi = self.cost_clip
        n = len(c.recent)
        sample = sorted(c.recent)[n // 2] if n == c.recent.maxlen else seconds  # the median of the latest (odd count)
        sample = min(max(sample, lo * c.estimate), hi * c.estimate)
        c.estimate += self.cost_alpha * (sample - c.estimate)
        c.samples += 1

    # ---- planning ---------------------------------------------------------------------------
    def _bucket(self, bucket: int) -> _Bucket:
        if bucket not in self._buckets:
            window = self.cut_window
            self._buckets[bucket] = _Bucket(probe_interval=self.probe_first, guard_backoff=self.guard_backoff_first,
                                            cut_interval=self.cut_first, cut_rounds=collections.deque(maxlen=window),
                                            uncut_rounds=collections.deque(maxlen=window),
                                            counterfactual=collections.deque(maxlen=window))
        return self._buckets[bucket]

    def plan(
        self,
        uids: Sequence[int],
        caps: Dict[int, int],
        fixed: Optional[Dict[int, int]] = None,
    ) -> Dict[int, int]:
        """K for each running row this round (0 = ride along without drafting).

        ``caps[uid]``: the most that row may draft (budget left, ``max_draft``). ``fixed``:
        rows that asked for a fixed K (capped by ``caps``): they get it, and the round's cost is
        that of the largest K in the round. The round's K is ``max(result.values())``.
        """
        fixed = dict(fixed or {})
        uids = list(uids)
        caps = {u: max(0, min(int(caps.get(u, 0)), self.max_draft)) for u in uids}
        bucket = bucket_of(len(uids)) if uids else 1
        state = self._bucket(bucket)
        self._planned = (bucket, uids, caps, fixed)
        self._planned_parked = False
        self._cut_planned = self._cut_eligible = self._confidence_wanted = False
        state.probing, state.after_probe = False, None
        ch = self._choose_parked(uids, caps, fixed, bucket, state)
        if ch is None:
            ks = {u: min(int(fixed.get(u, 0)), caps[u]) for u in uids}
            auto = [u for u in uids if u not in fixed and caps[u] > 0]
            self._planned_parked = bool(auto)
            self._reason = (f"measuring the plain round cost of batch bucket {bucket} first" if auto
                            else "no row may draft this round" if not any(ks.values()) else "fixed K rows only")
            return ks
        if ch.k != state.incumbent:
            state.probe_interval, state.since_probe = self.probe_first, 0
        state.incumbent = ch.k
        choice = dict(ch.layout)
        guarded = self._round < state.guard_until
        if state.refresh > 0 or guarded:
            fixed_only = {u: (k if u in fixed else 0) for u, k in choice.items()}  # automatic rows parked
        if state.refresh > 0:
            state.refresh -= 1
            if not any(fixed_only.values()):
                self._planned_parked = True
                self._refresh_rounds += 1
                self._reason = "re-measuring the plain round before the guard decides"
                return fixed_only
            state.refresh = 0  # a row with a fixed K drafts: no plain round to measure
        if guarded:
            choice = fixed_only
        depth = max(choice[u] for u in ch.auto)
        state.since_probe += 1
        if state.since_probe >= state.probe_interval and depth == 0 and self._skips_probe(state, bucket, guarded):
            state.probe_interval = self.probe_max
        if state.since_probe >= state.probe_interval:
            probe = {u: (min(depth + 1, caps[u], max(ch.limit[u], 1)) if u in ch.limit else k)
                     for u, k in choice.items()}
            if probe != choice:
                state.probing, state.choice_before_probe, state.since_probe = True, depth, 0
                # A probe that takes its depth's first cost samples teaches something new even
                # when the choice stays: the next probe comes as soon (depth is climbed probe by
                # probe, not ever more slowly). Only the cost counts here: a position that is
                # seldom reached (the ones before it rejected) would otherwise stay "new" forever.
                cost = self._costs.get(bucket, {}).get(max(probe.values()))
                state.probe_new = cost is None or cost.samples < 2
                self._probes += 1
                self._reason = f"probe at K={max(probe.values())} (every {state.probe_interval} rounds; choice K={depth})"
                return probe
        self._planned_parked = depth == 0
        if depth > 0 and not guarded and self.cut_first > 0 and not any(choice[u] for u in fixed):
            self._cut_eligible = True
            self._cut_planned = self._cut_decision(state, bucket)
            # What a cut would have kept is needed only by the next decision whether to try
            # cutting (``_cut_could_pay``), which reads the last ``cut_window`` uncut rounds:
            # only those report it (reading it costs a log-sum-exp per draft step).
            self._confidence_wanted = (not self._cut_planned and not state.cut_mode and state.cut_trial == 0
                                       and state.cut_interval - state.cut_since <= self.cut_window)
        # Worded only when asked for (summary): formatting every round costs a parked row's time.
        self._reason = lambda: self._explain(choice, ch, bucket, guarded, state)
        return choice

    def cut(self) -> Optional[float]:
        """For the round just planned: the drafter probability below which its rows' drafts are
        cut (``Batch.step(cut=...)``), or None for an uncut round."""
        return self.cut_p_min if self._cut_planned else None

    def wants_confidence(self) -> bool:
        """Whether the round just planned, if it drafts uncut, should report the drafter's
        probability of each draft (``Batch.step(confidence=True)``): what a cut would have kept."""
        return self._confidence_wanted

    def _cut_decision(self, state: _Bucket, bucket: int) -> bool:
        """Whether this drafting round cuts: the bucket's mode, or the other mode during a trial.
        A trial of cutting runs only if the recent uncut rounds say it could pay: the tokens a
        cut would have kept, over the cost of rounds as deep as the kept drafts (a cut round
        costs more than that: the drafts it threw away and the second sync), beat what the
        uncut rounds made per second."""
        if state.cut_trial > 0:
            state.cut_trial -= 1
            return not state.cut_mode
        state.cut_since += 1
        if state.cut_since >= state.cut_interval:
            state.cut_since = 0
            if not state.cut_mode and not self._cut_could_pay(state, bucket):
                state.cut_interval = min(2 * state.cut_interval, self.cut_max)
                return False
            state.cut_trial = self.cut_burst - 1
            return not state.cut_mode
        return state.cut_mode

    def _cut_could_pay(self, state: _Bucket, bucket: int) -> bool:
        if len(state.counterfactual) < self.cut_burst or not state.uncut_rounds:
            return False
        seconds = sum(self._cost(bucket, w) or 0.0 for _, w in state.counterfactual)
        if seconds <= 0:
            return False
        bound = sum(t for t, _ in state.counterfactual) / seconds
        return bound > _rate(state.uncut_rounds) * (1 + self.margin)

    def _cut_step(self, state: _Bucket, cut: bool, tokens: float, seconds: float) -> None:
        """Feed one drafting round to the cut decision; after a trial, settle the mode."""
        (state.cut_rounds if cut else state.uncut_rounds).append((tokens, seconds))
        if state.cut_trial > 0 or cut == state.cut_mode:
            return  # a trial still running, or a round of the mode in use
        # The trial just ended: compare the two modes' recent tokens per second.
        enough = min(len(state.cut_rounds), len(state.uncut_rounds)) >= self.cut_burst
        mode = enough and _rate(state.cut_rounds) > _rate(state.uncut_rounds) * (1 + self.margin)
        if mode == state.cut_mode:
            state.cut_interval = min(2 * state.cut_interval, self.cut_max)
        else:
            state.cut_mode, state.cut_interval = mode, self.cut_first

    def _skips_probe(self, state: _Bucket, bucket: int, guarded: bool) -> bool:
        """Whether a parked bucket's due probe is skipped for the longest interval: no depth
        would pay even if every draft were accepted, so a probe could only confirm it (the
        probes at the longest interval still re-measure the costs). ``plan`` acts on it and
        ``drafts_next`` foretells it, so both ask here."""
        return not guarded and state.probe_interval < self.probe_max and self._cannot_pay(bucket)

    def _cannot_pay(self, bucket: int) -> bool:
        """Whether, by the measured costs, no depth would beat a plain round even if every
        draft were accepted: (k + 1) tokens per row in a round of cost C[b][k] against one per
        C[b][0], for every k. Needs the plain cost and a measured drafting depth."""
        c0 = self._cost(bucket, 0)
        if not c0 or not any(k > 0 for k in self._measured(bucket)):
            return False
        return all((k + 1) * c0 < self._cost(bucket, k) for k in range(1, self.max_draft + 1))

    def drafts_next(self, batch_size: int) -> bool:
        """Whether the next round of this batch size will likely draft: its bucket's choice is a
        drafting depth, or a probe is due. The engine then does not queue a plain forward
        ahead, which would be thrown away (and would make the probe's cost sample wrong)."""
        bucket = bucket_of(batch_size)
        state = self._buckets.get(bucket)
        if state is None or not any(c.samples for c in self._costs.get(bucket, {}).values()):
            return False  # nothing measured: plan() measures the plain round first
        if state.refresh > 0:  # the re-measure's next plain round
            return False
        guarded = self._round < state.guard_until
        choice = state.incumbent if state.after_probe is None else state.after_probe
        if choice > 0 and not guarded:
            return True
        return state.since_probe + 1 >= state.probe_interval and not self._skips_probe(state, bucket, guarded)

    def _choose_parked(self, uids: List[int], caps: Dict[int, int], fixed: Dict[int, int], bucket: int,
                       state: _Bucket) -> Optional[_Choice]:
        """``_choose``, reusing a parked choice while nothing it depends on has changed but the
        bucket's plain cost, and that only downwards of a bound; the same answer, cheaper.

        A parked round teaches no acceptance and measures only the plain round, so a parked
        choice can change only if the plain cost moves. It stays parked as the plain cost falls:
        each depth's score against the plain round's, ``C[b][0] E(k) / C[b][k]``, does not
        grow as ``C[b][0]`` falls (measured ``C[b][k]`` do not depend on it, interpolated and
        extrapolated ones are affine in it with a non-negative intercept). So when the choice is
        parked, and also with the plain cost ``PARK_SLACK`` higher (and then still below every
        deeper measured cost, so that making costs non-decreasing pools nothing with it), it is
        reused until the plain cost exceeds that bound or anything else changes, except that a
        row's cap may shrink (a row nearing its token budget): fewer depths to choose from cannot
        make one beat parking. On the parked cells of this CPU this was about half of the
        policy's host time per round."""
        plain = self._costs.get(bucket, {}).get(0)
        key = (tuple(uids), tuple(caps[u] > 0 for u in uids), tuple(sorted((u, k, caps[u]) for u, k in fixed.items())),
               self._version, tuple(v for b, v in sorted(self._plain_version.items()) if b != bucket))
        memo = state.parked
        if (memo is not None and memo[0] == key and plain is not None and plain.samples and plain.estimate <= memo[1]
                and all(caps[u] <= c for u, c in zip(uids, memo[3]))):
            return memo[2]
        state.parked = None
        ch = self._choose(uids, caps, fixed, bucket)
        if ch is None or ch.k != 0 or len(ch.riders) != len(ch.auto) or plain is None or not plain.samples:
            return ch
        measured = plain.estimate
        bound = measured * (1 + PARK_SLACK)
        try:
            plain.estimate = bound
            self._measured_memo.pop(bucket, None)
            deeper = [c for k, c in self._measured(bucket).items() if k > 0]
            still = (self._measured(bucket)[0] == bound and all(bound < c for c in deeper)
                     and self._choose(uids, caps, fixed, bucket).riders == ch.auto)
        finally:
            plain.estimate = measured
            self._measured_memo.pop(bucket, None)
        if still:
            state.parked = (key, bound, ch, tuple(caps[u] for u in uids))
        return ch

    def _choose(self, uids: List[int], caps: Dict[int, int], fixed: Dict[int, int], bucket: int) -> Optional[_Choice]:
        """The best round depth by the measured objective, with hysteresis against the bucket's
        incumbent; None when no row may draft or the bucket's plain cost is still unknown."""
        ks = {u: min(int(fixed.get(u, 0)), caps[u]) for u in uids}
        auto = [u for u in uids if u not in fixed and caps[u] > 0]
        if not auto or self._cost(bucket, 0) is None:
            return None
        k_fixed = max(ks.values(), default=0)
        frontier = self._frontier()
        prior = self._prior_rates()
        rates = {u: self._row_rates(u, prior) for u in uids}
        limit = {u: min(caps[u], frontier + 1) for u in auto}
        drafters = [u for u in auto if self._own_best(rates[u], bucket, limit[u]) > 0]

        def layout(k: int) -> Dict[int, int]:
            out = dict(ks)
            for u in drafters:
                out[u] = min(max(k, k_fixed), limit[u])
            return out

        def score(k: int) -> float:
            lay = layout(k)
            tokens = sum(expected_tokens(rates[u], lay[u]) for u in uids)
            return tokens / self._cost(bucket, max(lay.values()))

        top = max((limit[u] for u in drafters), default=0)
        best = max(range(top + 1), key=score)
        incumbent = min(self._bucket(bucket).incumbent, top)
        if score(best) < score(incumbent) * (1 + self.margin):
            best = incumbent
        riders = [u for u in auto if u not in drafters]
        return _Choice(best, layout(best), rates, auto, riders, limit)

    def _own_best(self, rates: List[float], bucket: int, limit: int) -> int:
        """The depth that would maximise this row's tokens per second if it ran alone in the
        bucket's rounds."""
        return max(range(limit + 1), key=lambda k: expected_tokens(rates, k) / self._cost(bucket, k))

    def _explain(self, choice, ch: "_Choice", bucket, guarded, state) -> str:
        k, rates, riders = max(choice.values()), ch.rates, ch.riders
        if guarded:
            return (f"parked by the guard for {state.guard_until - self._round} more rounds: drafting ran below "
                    f"{1 - self.guard_epsilon:.2f}x plain speed")
        plain = self._cost(bucket, 0)
        n = len(choice)
        tokens = sum(expected_tokens(rates[u], choice[u]) for u in choice)
        speedup = tokens / self._cost(bucket, k) * plain / n
        if k == 0:
            best1 = max((expected_tokens(rates[u], 1) for u in choice), default=1.0)
            return (f"parked: drafting does not pay (best row would commit {best1:.2f} tokens at K=1 for a round "
                    f"{self._cost(bucket, 1) / plain:.2f}x as long as a plain one)")
        ride = f", {len(riders)} of {n} rows ride at K=0" if riders else ""
        cut = ""
        if state.cut_mode and state.uncut_rounds:
            gain = _rate(state.cut_rounds) / _rate(state.uncut_rounds)
            cut = (f"; drafts cut below drafter probability {self.cut_p_min:.2f} (measured {gain:.2f}x the uncut "
                   f"rounds' tokens/s)")
        return f"K={k}: {tokens / n:.2f} tokens per row per round, {speedup:.2f}x plain (predicted){ride}{cut}"

    # ---- learning ---------------------------------------------------------------------------
    def observe(
        self,
        ks: Dict[int, int],
        accepted: Dict[int, int],
        seconds: Optional[float],
        held_out: Collection[int] = (),
        planned_ks: Optional[Dict[int, int]] = None,
        confidence: Optional[Dict[int, List[float]]] = None,
    ) -> None:
        """Record a round: each row's K, how many of its drafts the target accepted, and the
        round's wall time (start of the round to the moment its tokens are known; None when the
        round also did other work, such as a prefill slice, and is no cost sample). Rows in
        ``held_out`` (or missing from ``accepted``) count for the cost but teach nothing about
        acceptance: pass rows whose acceptance was cut by an end-of-sequence or a stop string.
        ``planned_ks``: given when the round cut on the drafter's confidence (``Batch.cut``): the
        K each row planned; ``ks`` is then what each row kept and verified. ``confidence``: for
        an uncut round, the drafter's probability of each row's drafts (``wants_confidence``)."""
        if not ks:
            return
        batch = len(ks)
        bucket = bucket_of(batch)
        cut = planned_ks is not None
        k_round = max((planned_ks or ks).values())
        planned = self._planned if self._planned is not None and self._planned[0] == bucket else None
        state = self._bucket(bucket)
        probing = planned is not None and state.probing
        parked = self._planned_parked if planned is not None else False
        self._round += 1
        self._trace.append((batch, k_round, parked))
        if len(self._trace) > TRACE_LIMIT:
            del self._trace[: len(self._trace) - TRACE_LIMIT]
        self._parked_rounds += parked
        self._cut_rounds += cut
        if seconds is not None and not cut:
            self._record_cost(bucket, k_round, seconds)
        for uid, k in ks.items():
            if k > 0 and uid in accepted and uid not in held_out:
                self._learn(uid, k, int(accepted[uid]))
        tokens = sum(1 + min(int(accepted.get(u, 0)), k) for u, k in ks.items())
        if seconds is not None and k_round > 0 and planned is not None and self._cut_eligible:
            self._cut_step(state, cut, tokens, seconds)
            if confidence and not cut and set(confidence) >= set(ks):
                kept = {u: kept_by_cut(confidence[u][:k], self.cut_p_min) for u, k in ks.items()}
                state.counterfactual.append((sum(1 + min(int(accepted.get(u, 0)), kept[u]) for u in ks),
                                             max(kept.values())))
        # Probes from a parked choice are bounded on their own (one per probe interval).
        if seconds is not None and k_round > 0 and not (probing and state.choice_before_probe == 0):
            self._guard_step(bucket, state, tokens / batch, seconds, k_round, cut)
        if probing:
            self._after_probe(bucket, state, planned)
        self._planned, self._planned_parked, state.probing = None, False, False
        self._cut_planned = self._cut_eligible = self._confidence_wanted = False

    def _learn(self, uid: int, k: int, n_accepted: int) -> None:
        self._version += 1
        zeros = [0.0] * self.max_draft
        row = self._rows.setdefault(uid, _RowStats(list(zeros), list(zeros), [self._round] * self.max_draft))
        for j in range(min(n_accepted + 1, k)):  # positions reached: the accepted ones and the first miss
            hit = 1.0 if j < n_accepted else 0.0
            # Counts age with the rounds since they were last fed (capped), not per sample, so a
            # probe after a long park outweighs what was learnt before it.
            age = min(max(1, self._round - row.last[j]), self.decay_rounds_max)
            f = self.row_decay**age
            row.hits[j], row.trials[j], row.last[j] = f * row.hits[j] + hit, f * row.trials[j] + 1.0, self._round
            age = min(max(1, self._round - self._prior_last[j]), self.decay_rounds_max)
            f = self.prior_decay**age if self._prior_last[j] != self._round else 1.0
            self._prior_hits[j] = f * self._prior_hits[j] + hit
            self._prior_trials[j] = f * self._prior_trials[j] + 1.0
            self._prior_last[j] = self._round
            self._prior_seen[j] += 1

    def _guard_step(self, bucket: int, state: _Bucket, tokens_per_row: float, seconds: float, k: int,
                    cut: bool = False) -> None:
        c0 = self._costs.get(bucket, {}).get(0)
        if c0 is None or not c0.samples or seconds <= 0:
            return
        # A stall (another process, the OS) would slow plain decoding as much: a round counts at
        # most cost_clip[1] x the median of the latest raw times of rounds like it (not the
        # model's estimate, which may be the thing that is wrong), so one stall cannot trip it.
        # Rounds like a cut round are the latest cut rounds.
        if cut:
            recent = [s for _, s in list(state.cut_rounds)[-3:]]
        else:
            c = self._costs.get(bucket, {}).get(k)
            recent = list(c.recent) if c is not None else []
        if recent:
            seconds = min(seconds, self.cost_clip[1] * statistics.median(recent))
        state.guard.append((tokens_per_row, seconds, self._round))
        if len(state.guard) > self.guard_window:
            state.guard.popleft()
        if len(state.guard) < self.guard_window:
            return
        # The plain round it compares with: measured since the window began (a re-measure), the
        # median of the latest raw times (three at most: the machine as it is now, robust to one
        # stall); else the smoothed estimate.
        fresh = c0.last >= state.guard[0][2] and len(c0.recent) >= 2
        plain = statistics.median(c0.recent) if fresh else c0.estimate
        ratio = sum(t for t, _, _ in state.guard) * plain / sum(s for _, s, _ in state.guard)
        if ratio >= 1 - self.guard_epsilon:
            state.guard_backoff = self.guard_backoff_first
            state.refreshed = False
            return
        if not fresh and not state.refreshed:
            # Plain rounds were last timed before this window: a machine that slowed down since
            # would make drafting look worse than it is. Re-measure (three plain rounds: the
            # first runs without the overlap, the next two are cost samples), then decide.
            state.refresh, state.refreshed = 3, True
            return
        state.guard_until = self._round + state.guard_backoff
        self._reason = (f"guard: drafting ran at {ratio:.2f}x plain speed over the last {self.guard_window} "
                        f"drafting rounds; parked for {state.guard_backoff} rounds")
        state.guard_backoff = min(2 * state.guard_backoff, self.guard_backoff_max)
        state.guard.clear()
        state.refreshed = False
        state.incumbent = 0
        self._guard_trips += 1

    def _after_probe(self, bucket: int, state: _Bucket, planned) -> None:
        """Double the probe interval if the probe left the choice unchanged, else reset it."""
        _, uids, caps, fixed = planned
        uids = [u for u in uids if u in caps]
        ch = self._choose(uids, caps, fixed, bucket)
        guarded = self._round < state.guard_until
        after = 0 if ch is None or guarded else max(ch.layout[u] for u in ch.auto)
        state.after_probe = after
        if after != state.choice_before_probe:
            state.probe_interval = self.probe_first
        elif not state.probe_new:
            state.probe_interval = min(2 * state.probe_interval, self.probe_max)

    def forget(self, uid: int) -> None:
        """Drop a row that left the batch (what it taught the shared prior stays)."""
        if self._rows.pop(uid, None) is not None:
            self._version += 1

    # ---- reporting and persistence -------------------------------------------------------------
    def summary(self) -> dict:
        """K trace ``[(batch size, K, parked), ...]`` per round, fraction of rounds parked,
        probes and guard trips so far, and the reason for the latest choice (one line)."""
        rounds = self._round
        return {
            "rounds": rounds,
            "trace": list(self._trace),
            "parked_fraction": self._parked_rounds / rounds if rounds else 0.0,
            "probes": self._probes,
            "guard_trips": self._guard_trips,
            "refresh_rounds": self._refresh_rounds,
            "cut_rounds": self._cut_rounds,
            "cut_fraction": self._cut_rounds / rounds if rounds else 0.0,
            "cut_mode": {b: st.cut_mode for b, st in sorted(self._buckets.items())},
            "reason": self._reason() if callable(self._reason) else self._reason,
        }

    def state(self) -> dict:
        """What is worth keeping across processes (JSON-serialisable): smoothed costs per
        (bucket, K) and the shared acceptance counts per position."""
        return {
            "version": STATE_VERSION,
            "max_draft": self.max_draft,
            "costs": {
                str(b): {str(k): [c.estimate, c.samples] for k, c in ks.items() if c.samples}
                for b, ks in self._costs.items()
            },
            "acceptance": [[h, t, n] for h, t, n in zip(self._prior_hits, self._prior_trials, self._prior_seen)],
        }

    def _load(self, prior: dict) -> None:
        if prior.get("version") != STATE_VERSION:
            return  # an older layout: start fresh rather than misread it
        for b, ks in prior.get("costs", {}).items():
            for k, (estimate, samples) in ks.items():
                if int(k) <= self.max_draft and estimate > 0:
                    self._costs.setdefault(int(b), {})[int(k)] = _Cost(float(estimate), int(samples), 0)
        self._measured_memo.clear()
        self._version += 1
        for j, (h, t, n) in enumerate(prior.get("acceptance", [])[: self.max_draft]):
            self._prior_hits[j], self._prior_trials[j], self._prior_seen[j] = float(h), float(t), int(n)

"""``SyncedPolicy``: under ``mx.distributed`` every rank's policy learns from its own round
timings, yet every decision that changes which forwards a rank runs (each row's K, cutting on
the drafter's confidence, reading that confidence, queueing the next plain forward ahead) must
be the same on every rank, or one rank waits in a collective the others never join.

Two ranks run here as two threads whose all_sum meets at a barrier; the second rank times its
rounds very differently (a verify that costs far more), so its own policy would choose
otherwise. The test checks that it does choose otherwise, and that the synced answers agree
in every round all the same.
"""

import threading

from mtp_mlx.decoding.policy import DraftPolicy
from mtp_mlx.distributed.engine import SyncedPolicy
from tests.test_distributed import _Group
from tests.test_policy import CutSim


class _Ring:
    """all_sum between threads: each rank posts its list, all wait, each sums every post."""

    def __init__(self, n):
        self.barrier = threading.Barrier(n, timeout=30)
        self.posts = [None] * n

    def all_sum(self, rank, vals):
        self.posts[rank] = list(vals)
        self.barrier.wait()
        lengths = {len(p) for p in self.posts}
        assert len(lengths) == 1, f"ranks sent different lengths {lengths}: they would hang"
        out = [sum(x) for x in zip(*self.posts)]
        self.barrier.wait()
        return out


class _Recorded:
    """The synced policy as the engine asks it each round, recording the agreed answers and
    what the rank's own policy would have answered."""

    def __init__(self, synced):
        self.synced, self.record, self.own = synced, [], []

    def __getattr__(self, name):
        return getattr(self.synced, name)

    def plan(self, uids, caps, *args, **kwargs):
        ks = self.synced.plan(uids, caps, *args, **kwargs)
        s, inner, n = self.synced, self.synced.policy, len(uids)
        self.record.append((dict(ks), s.cut(), s.wants_confidence(), s.drafts_next(n)))
        self.own.append((inner.cut(), inner.drafts_next(n)))
        return ks


def _costs(rank):
    # rank 0: drafting pays (a cheap verify), and cutting on confidence pays (1 ms to read it);
    # rank 1: a verify position costs ten times as much, so on its own it would park.
    per_pos = 15 if rank == 0 else 150

    def uncut(b, k):
        return (30 + 4 * k + per_pos * (k + 1)) / 1000

    def cut(b, k, kept):
        return (30 + 4 * k + per_pos * (kept + 1) + 1.0) / 1000

    return uncut, cut


def _rank(rank, ring, rounds, out, errors):
    try:
        synced = SyncedPolicy(DraftPolicy(), _Group(2, rank), all_sum=lambda vals: ring.all_sum(rank, vals))
        policy = _Recorded(synced)
        # the same seed on both ranks: the same draws, as the same tokens would be
        sim = CutSim(policy, *_costs(rank), seed=0)
        sim.rows = {1: 0.8, 2: 0.6}
        sim.run(rounds // 2)
        sim.rows.pop(2)  # a row leaves and another joins
        sim.rows[3] = 0.9
        sim.run(rounds - rounds // 2)
        out[rank] = (policy.record, policy.own)
    except BaseException as e:  # reported by the main thread
        errors.append(e)
        ring.barrier.abort()


def test_every_rank_takes_rank_zeros_decisions():
    ring, out, errors, rounds = _Ring(2), [None, None], [], 1500
    threads = [threading.Thread(target=_rank, args=(r, ring, rounds, out, errors)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    (rec0, own0), (rec1, own1) = out
    assert rec0 == rec1  # every round: K per row, the cut, the confidence read, the look-ahead
    # The test means something: rank 0 drafts, cuts and foretells drafting rounds ...
    assert sum(max(ks.values()) > 0 for ks, *_ in rec0) > rounds // 2
    assert any(p is not None for _, p, _, _ in rec0)
    assert any(c for _, _, c, _ in rec0)
    assert sum(n for *_, n in rec0) > rounds // 2
    # ... and rank 1's own policy, timing its rounds differently, would have answered otherwise.
    assert sum(o1 != o0 for o0, o1 in zip(own0, own1)) > rounds // 4
    # Rank 0's own answers are the ones taken (its cut only rounded to float32 for the wire).
    for (_, p, _, n), (p_own, n_own) in zip(rec0, own0):
        assert (p is None) == (p_own is None) and (p is None or abs(p - p_own) < 1e-6)
        assert n == n_own


def test_questions_outside_the_planned_round_get_the_safe_answer():
    policy = SyncedPolicy(DraftPolicy(), _Group(1), all_sum=lambda vals: vals)
    assert policy.cut() is None and not policy.wants_confidence() and not policy.drafts_next(1)
    assert policy.plan([], {}) == {}
    assert policy.cut() is None and not policy.drafts_next(0)

"""The decoding engine under ``mx.distributed``: every rank runs its own ``Engine`` on the same
requests in the same order, and these two hooks keep their decisions identical:

- the adaptive draft length: rank 0's policy decides each round's K per row, whether it cuts
  drafts on the drafter's confidence and whether the next round drafts; the others adopt it
  (one all_sum of B + 4 ints per round; each rank's own timings would differ);
- requests without a seed: rank 0's fresh seed is shared (one all_sum per request), so the
  sampled tokens, acceptances and rollbacks agree on every rank. The request stays unseeded
  in every other respect (rejection sampling, not the coupled rule).

Everything else (greedy acceptance, seeded sampling) is already identical because the logits,
hidden states and drafts are the same arrays on every rank.
"""

import struct
from typing import Dict, Optional, Sequence

import mlx.core as mx

from ..decoding.engine import Engine, Request
from ..errors import MtpError
from .launch import group as default_group


def agree_seed(grp) -> int:
    """A fresh 62-bit seed from rank 0, the same on every rank."""
    import secrets

    mine = [secrets.randbits(31), secrets.randbits(31)] if grp.rank() == 0 else [0, 0]
    hi, lo = mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=grp).tolist()
    return (hi << 31) | lo


class SyncedPolicy:
    """Wraps a draft-length policy: rank 0's decisions are every rank's decisions.

    Each rank's policy learns from its own round timings, so left alone the ranks would choose
    differently. Every choice that changes which forwards a rank runs must agree, or one rank
    waits in a collective the others never join: each row's K (``plan``), whether the round cuts
    its drafts on the drafter's confidence and where (``cut``: a cut round syncs once more and
    verifies a different width), whether it reads that confidence (``wants_confidence``), and
    whether the next round will draft (``drafts_next``: a plain round otherwise queues the next
    forward ahead, and under pipeline parallel that forward's messages go out at once). Rank 0
    asks its policy all four right after planning, and one all_sum of B + 4 ints carries them.
    Every rank still feeds its own policy (``observe``); only rank 0's answers are used.

    ``all_sum`` (tests): a function from a list of ints to their sum over the ranks; the
    default is ``mx.distributed.all_sum`` over ``grp``."""

    def __init__(self, policy, grp, all_sum=None):
        self.policy = policy
        self.group = grp
        self._all_sum = all_sum or (lambda vals: mx.distributed.all_sum(mx.array(vals, dtype=mx.int32),
                                                                        group=grp).tolist())
        self._agreed = None  # (batch size, cut p_min or None, wants confidence, drafts next)

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def plan(self, uids: Sequence[int], caps: Dict[int, int], *args, **kwargs) -> Dict[int, int]:
        uids = list(uids)
        mine = self.policy.plan(uids, caps, *args, **kwargs)
        self._agreed = None
        if not uids:
            return {}
        if self.group.rank() == 0:
            p = self.policy
            cut = p.cut() if hasattr(p, "cut") else None
            conf = bool(p.wants_confidence()) if hasattr(p, "wants_confidence") else False
            nxt = bool(p.drafts_next(len(uids))) if hasattr(p, "drafts_next") else False
            vals = [int(mine.get(u, 0)) for u in uids]
            vals += [cut is not None, _float_bits(cut or 0.0), conf, nxt]
        else:
            vals = [0] * (len(uids) + 4)
        agreed = [int(v) for v in self._all_sum(vals)]
        ks, (has_cut, bits, conf, nxt) = agreed[: len(uids)], agreed[len(uids):]
        self._agreed = (len(uids), _bits_float(bits) if has_cut else None, bool(conf), bool(nxt))
        return dict(zip(uids, ks))

    def cut(self) -> Optional[float]:
        return self._agreed[1] if self._agreed is not None else None

    def wants_confidence(self) -> bool:
        return self._agreed[2] if self._agreed is not None else False

    def drafts_next(self, batch_size: int) -> bool:
        # Only the round just planned was agreed on; any other question gets the safe answer
        # (False: a plain round queues its next forward ahead; a wrong guess costs a little
        # time, never a token), the same on every rank.
        a = self._agreed
        return a is not None and a[0] == batch_size and a[3]

    def observe(self, *args, **kwargs):
        self._agreed = None
        return self.policy.observe(*args, **kwargs)

    def forget(self, uid: int) -> None:
        self.policy.forget(uid)


def _float_bits(x: float) -> int:
    """A float's float32 bit pattern as a signed int32 (an all_sum with zeros keeps it exact)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _bits_float(i: int) -> float:
    return struct.unpack("<f", struct.pack("<i", i))[0]


def _agreed_lookup(lookup, grp):
    """Prefix-cache lookups that hit on every rank or on none. Ranks hold different layers
    (pipeline) so their snapshots' sizes, evictions and rewind limits differ; a hit on one
    rank and a miss on another would give them different prefill lengths."""

    def agreed(prompt):
        cache, n = lookup(prompt)
        hi, neg_lo = mx.distributed.all_max(mx.array([n, -n], dtype=mx.int32), group=grp).tolist()
        if hi != -neg_lo:
            return None, 0
        return cache, n

    return agreed


class DistributedEngine(Engine):
    """``Engine`` whose per-rank decisions agree across ``group`` (default: the joined group).
    Every rank must submit the same requests in the same order and call ``step`` in lockstep
    (rank 0 reads them, e.g. from HTTP, and broadcasts them; see ``broadcast_request``)."""

    def __init__(self, pair, *, group=None, **kwargs):
        super().__init__(pair, **kwargs)
        self.group = group or default_group()
        if self.group.size() > 1:
            if self.policy is not None:
                self.policy = SyncedPolicy(self.policy, self.group)
            if self.prefix.max_bytes > 0:
                self.prefix.lookup = _agreed_lookup(self.prefix.lookup, self.group)

    def submit(self, request: Request) -> int:
        uid = super().submit(request)
        if request.sampling.seed is None and self.group.size() > 1:
            self.live[uid].spec.seed = agree_seed(self.group)
        return uid


def broadcast_json(obj, grp=None):
    """Rank 0's JSON-able ``obj`` on every rank (other ranks pass anything, e.g. None). Two
    all_sums: the length, then the bytes (skipped when empty)."""
    import json

    grp = grp or default_group()
    if grp.size() == 1:
        return obj
    blob = json.dumps(obj).encode() if grp.rank() == 0 else b""
    n = int(mx.distributed.all_sum(mx.array(len(blob), dtype=mx.int32), group=grp).item())
    mine = mx.array(list(blob), dtype=mx.int32) if grp.rank() == 0 else mx.zeros((n,), mx.int32)
    data = bytes(mx.distributed.all_sum(mine, group=grp).tolist())
    return json.loads(data.decode())


def request_to_dict(r: Request) -> dict:
    """A request as plain data (logits processors, being code, cannot cross ranks)."""
    from dataclasses import asdict

    if r.processors:
        raise MtpError("requests with logits processors cannot be sent to other ranks: use the sampling settings")
    d = asdict(r)
    d.pop("processors", None)
    d["stop"] = list(d["stop"])
    return d


def request_from_dict(d: dict) -> Request:
    from ..sampling import SamplingConfig

    d = dict(d)
    d["sampling"] = SamplingConfig(**d["sampling"])
    d["stop"] = tuple(d["stop"])
    return Request(**d)


class LockstepEngine(DistributedEngine):
    """For servers: rank 0 takes requests (e.g. over HTTP); every rank calls ``sync`` then
    ``step`` in a loop, so all ranks submit, cancel and stop at the same round."""

    def sync(self, new: Sequence[Request] = (), cancel: Sequence[int] = (), stop: bool = False):
        """Rank 0 passes the requests it accepted and the uids to cancel since its last call
        (other ranks pass nothing). Every rank submits and cancels the same ones. Returns
        (per new request in order its uid, or the ``MtpError`` that refused it, the same on every
        rank; whether rank 0 asked to stop)."""
        msg = {"new": [request_to_dict(r) for r in new], "cancel": list(cancel), "stop": bool(stop)}
        msg = broadcast_json(msg, self.group)
        uids = []
        for d in msg["new"]:
            try:  # a bad request (e.g. too long) is refused by the same checks on every rank
                uids.append(self.submit(request_from_dict(d)))
            except MtpError as err:
                uids.append(err)
        for uid in msg["cancel"]:
            self.cancel(uid)
        return uids, msg["stop"]


def follow(engine: LockstepEngine, on_events=None) -> None:
    """The loop of every rank but 0 under a server: take rank 0's requests, run the round,
    repeat until rank 0 asks to stop. ``on_events(events)``: optional (e.g. tests, logging).
    Rank 0's engine thread calls ``engine.sync(new, cancels, stop)`` then ``engine.step()``
    in the same rhythm, also while idle (the followers wait inside the collective)."""
    while True:
        _, stop = engine.sync()
        if stop:
            return
        events = engine.step()
        if on_events is not None:
            on_events(events)

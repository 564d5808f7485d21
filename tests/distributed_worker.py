"""One rank of the two-rank tests (tests/test_distributed.py starts two of these with MLX_RANK
and a generated MLX_HOSTFILE). Each rank writes what it saw to <out>/rank<r>.json and
<out>/rank<r>_<kind>.npz; the test compares the ranks with each other and with the
single-process reference every rank computes before splitting its model.

For each kind: logits of a prefill and a verify chunk (one process vs split), greedy plain
vs speculative tokens; for the --full kinds also a seeded sampled run twice, a two-row batch
with the adaptive draft length and an unseeded sampled run. Then, with --then-die, rank 1
exits in the middle of a generation and rank 0 must exit with a clear error (status 2).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtp_mlx.distributed import distribute, init_distributed  # noqa: E402
from mtp_mlx.distributed.launch import Watchdog, lost_peer_error, peer_lost  # noqa: E402
from mtp_mlx.errors import MtpError  # noqa: E402
from mtp_mlx.sampling import SamplingConfig  # noqa: E402

PROMPT_LEN = 36
GEN = 14  # 50 positions: past the fixtures' 32-token sliding window plus its 8 slots of slack (a wrapped ring)


def load_kind(fixtures: Path, kind: str):
    if kind == "tiny-e2b":  # in memory: 2 KV heads (E4B-like: split K/V beside KV-shared layers)
        from types import SimpleNamespace

        from tests.tiny import tiny_drafter, tiny_target

        target = tiny_target("e2b", window=8)
        return SimpleNamespace(target=target, drafter=tiny_drafter(target, centroid=True))
    from mtp_mlx import load

    return load(str(fixtures / kind / "target"), drafter=str(fixtures / kind / "assistant"), dtype="float32")


def prompt_for(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, vocab, size=PROMPT_LEN)]


def forward_logits(target, prompt, chunk):
    """Logits of a prefill over ``prompt`` then one verify-shaped chunk [1, len(chunk)]."""
    cache = target.make_cache()
    a = target(mx.array([prompt], dtype=mx.int32), cache)
    b = target(mx.array([chunk], dtype=mx.int32), cache)
    mx.eval(a.logits, b.logits, a.hidden, b.hidden)
    return np.array(a.logits), np.array(b.logits), np.array(b.hidden)


def generate(pair, prompts, num_draft, sampling=None, max_tokens=GEN, on_step=None, distributed=True,
             policy=None):
    """Token ids and stats per prompt from one engine run (all prompts submitted together)."""
    from mtp_mlx.decoding.engine import Engine, Request, bare_pair
    from mtp_mlx.distributed.engine import DistributedEngine

    pair = bare_pair(pair.target, pair.drafter)  # no EOS: every run has exactly max_tokens tokens
    eng = DistributedEngine(pair, policy=policy) if distributed else Engine(pair, policy=policy)
    uids = [eng.submit(Request(list(p), max_tokens=max_tokens, sampling=sampling or SamplingConfig(),
                               num_draft=num_draft)) for p in prompts]
    toks = {u: [] for u in uids}
    stats = {}
    for i, events in enumerate(iter(eng.step, None)):
        for ev in events:
            toks[ev.uid].extend(ev.tokens)
            stats[ev.uid] = ev.stats
        if on_step:
            on_step(i)
        if eng.idle:
            break
    return [{"tokens": toks[u], "accepted": stats[u].accepted, "rounds": stats[u].rounds,
             "ks": list(stats[u].ks)} for u in uids]


def policy_for(rank: int):
    """A draft-length policy per rank that would choose differently on its own: rank 0's is
    fresh (it measures plain rounds first, then tries drafting), rank 1's was taught on made-up
    rounds that every draft is accepted and costs nothing, so it would draft deep from the first
    round and never queue a plain forward ahead. Under ``DistributedEngine`` both must run rank
    0's rounds (K, cuts, the next plain forward queued ahead or not), or they would hang."""
    from mtp_mlx.decoding.policy import DraftPolicy

    policy = DraftPolicy()
    if rank != 0:
        for _ in range(200):
            for uids in ([1000], [1000, 1001]):
                ks = policy.plan(uids, {u: 8 for u in uids})
                policy.observe(ks, dict(ks), 0.01)
        for u in (1000, 1001):
            policy.forget(u)
    return policy


def prefix_reuse(pair, prompt, plain, on_step):
    """Turn 2 of a conversation through the prefix cache: the prompt plus the first 5 plain
    tokens continues exactly as the plain run did."""
    from mtp_mlx.decoding.engine import Request, bare_pair
    from mtp_mlx.distributed.engine import DistributedEngine

    eng = DistributedEngine(bare_pair(pair.target, pair.drafter), prefix_cache_bytes=1 << 24)
    out = []
    for p, m in ((prompt, GEN), (prompt + plain[:5], GEN - 5)):
        eng.submit(Request(list(p), max_tokens=m, num_draft=3))
        out.append([t for ev in eng.run() for t in ev.tokens])
        on_step(0)
    return {"tokens": out, "hits": eng.metrics()["prefix_cache_hits"]}


def serve_lockstep(pair, prompt, hot, rank, on_step):
    """A server's loop: only rank 0 has requests (a sampled one, then a greedy one joining
    at round 2, the first cancelled at round 6); every rank syncs then steps."""
    from mtp_mlx.decoding.engine import Request, bare_pair
    from mtp_mlx.distributed.engine import LockstepEngine, follow

    eng = LockstepEngine(bare_pair(pair.target, pair.drafter))
    toks, reasons, i = {}, {}, 0

    def record(events):
        for ev in events:
            toks.setdefault(str(ev.uid), []).extend(ev.tokens)
            if ev.finish_reason:
                reasons[str(ev.uid)] = ev.finish_reason
        on_step(0)

    if rank != 0:
        follow(eng, on_events=record)  # a follower: rank 0 decides everything
        return {"tokens": toks, "reasons": reasons}
    while True:
        new, cancel = [], []
        if i == 0:
            new = [Request(list(prompt), max_tokens=GEN, sampling=hot, num_draft=3)]
        if i == 2:
            new = [Request(list(prompt), max_tokens=GEN, num_draft=3)]
        if i == 6:
            cancel = [0]
        _, stop = eng.sync(new, cancel, stop=i > 2 and eng.idle)
        if stop:
            break
        record(eng.step())
        i += 1
    return {"tokens": toks, "reasons": reasons}


def parity(args, rank, grp, wd):
    report = {"rank": rank, "size": grp.size(), "mode": args.mode, "kinds": {}, "started": time.time()}
    for kind in args.kinds.split(","):
        wd.beat()
        pair = load_kind(Path(args.fixtures), kind)
        V = pair.target.cfg.vocab_size
        prompt = prompt_for(V)
        chunk = prompt_for(V, seed=1)[:4]
        beat = lambda i: wd.beat()  # noqa: E731
        ref_prefill, ref_chunk, ref_hidden = forward_logits(pair.target, prompt, chunk)
        ref_plain = generate(pair, [prompt], 0, distributed=False, on_step=beat)[0]
        wd.beat()
        distribute(pair, args.mode, grp)
        wd.beat()
        # The engine's load-time check (a wide verify vs one-token steps, many forwards in one
        # evaluation) on the split model: it must finish and agree on every rank.
        from mtp_mlx.checks import wide_verify_exact

        wide_exact = wide_verify_exact(pair.target).ok if kind in args.full.split(",") else None
        wd.beat()
        t0 = time.perf_counter()
        prefill, chunk_logits, hidden = forward_logits(pair.target, prompt, chunk)
        (plain,) = generate(pair, [prompt], 0, on_step=beat)
        (spec,) = generate(pair, [prompt], 3, on_step=beat)
        sampled = batch = unseeded = served = prefix = None
        if kind in args.full.split(","):
            hot = SamplingConfig(temperature=1.0, top_k=20, seed=11)
            sampled = [generate(pair, [prompt], 3, hot, on_step=beat)[0] for _ in range(2)]
            # Two rows of different lengths in one batch (the second prefilled while the first
            # runs), the adaptive draft length, and a request without a seed.
            batch = generate(pair, [prompt, prompt_for(V, seed=2)[:13]], "auto", on_step=beat,
                             policy=policy_for(rank))
            unseeded = generate(pair, [prompt], 3, SamplingConfig(temperature=1.0), on_step=beat)[0]
            served = serve_lockstep(pair, prompt, hot, rank, beat)
            prefix = prefix_reuse(pair, prompt, plain["tokens"], beat)
        np.savez(Path(args.out) / f"rank{rank}_{kind}.npz", prefill=prefill, chunk=chunk_logits, hidden=hidden)
        report["kinds"][kind] = {
            "prefill_diff": float(np.abs(prefill - ref_prefill).max()),
            "chunk_diff": float(np.abs(chunk_logits - ref_chunk).max()),
            "hidden_diff": float(np.abs(hidden - ref_hidden).max()),
            "logit_scale": float(max(np.abs(ref_prefill).max(), np.abs(ref_chunk).max())),
            "ref_plain": ref_plain, "plain": plain, "spec": spec, "sampled": sampled,
            "batch": batch, "unseeded": unseeded, "served": served, "prefix": prefix, "wide_exact": wide_exact,
            "plan": getattr(getattr(pair.target, "tp_plan", None), "kv", None),
            "whole": getattr(getattr(pair.target, "tp_plan", None), "whole", None),
            "seconds": time.perf_counter() - t0,
        }
        report["kinds"][kind]["plan"] = {str(k): v for k, v in (report["kinds"][kind]["plan"] or {}).items()}
    return report


def die(args, rank, grp, wd):
    from mtp_mlx.distributed.launch import load_distributed

    wd.beat()
    fx = Path(args.fixtures) / args.then_die  # split while loading: this rank reads only its part
    pair = load_distributed(str(fx / "target"), str(fx / "assistant"), mode=args.mode, dtype="float32", grp=grp)
    prompt = prompt_for(pair.target.cfg.vocab_size)

    def step(i):
        wd.beat()
        if i == 4:
            wd.timeout = 10.0  # rounds take well under a second here: do not wait long for the dead
        if rank == 1 and i == 5:
            os._exit(7)  # a rank that fails mid-run, without a goodbye

    generate(pair, [prompt], 3, on_step=step, max_tokens=200)
    return {"rank": rank, "finished": True}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["tensor", "pipeline"], required=True)
    ap.add_argument("--then-die", default="", help="afterwards rank 1 exits mid-run on this kind; rank 0 must "
                    "exit with a clear error")
    ap.add_argument("--kinds", default="e2b,dense,moe")
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--full", default="", help="kinds that also run sampled, batched and unseeded requests")
    ap.add_argument("--stall-timeout", type=float, default=60.0)
    args = ap.parse_args()
    grp = init_distributed(args.mode, backend="ring")
    rank = grp.rank()
    with Watchdog(args.stall_timeout, rank) as wd:
        try:
            report = parity(args, rank, grp, wd)
            report["finished"] = time.time()
            with open(Path(args.out) / f"rank{rank}.json", "w") as f:
                json.dump(report, f)
            if args.then_die:
                die(args, rank, grp, wd)
        except RuntimeError as e:
            if peer_lost(e):
                print(f"error: {lost_peer_error(e, rank)}", file=sys.stderr)
                sys.exit(2)
            raise
        except MtpError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

if __name__ == "__main__":
    main()

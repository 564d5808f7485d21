#!/usr/bin/env python
"""Profile one speculative round: operations per forward pass, syncs, and where the time goes;
ours next to mlx-vlm's MTP loop and mlx-lm's plain loop on the same checkpoint.

Operation counts are the primitives in the lazy MLX graph a piece builds before it is
evaluated (``mx.export_to_dot`` walks the graph; every rectangle is one primitive, so one
kernel launch or more on a GPU). Two views:

* pieces, built lazily one at a time: target prefill, one-token decode, verify of K + 1,
  the drafter's per-round masks, one drafter step, acceptance;
* whole loops: every host synchronisation (``mx.eval``, ``mx.async_eval``, ``array.item``,
  ``array.tolist`` ...) is intercepted and the graph it evaluates is counted, attributed to
  the library function that synced. ``async_eval`` is made synchronous while counting, so
  no graph is counted twice; timings come from separate, uninstrumented runs.

Time split of our round (each piece evaluated on its own, so no overlap): draft, verify,
accept, rollback and host bookkeeping, next to the real (overlapped) round time of the
Engine. For every loop (ours and the peers'): seconds per round and the host share of it
(wall time not spent blocked in a sync: Python, graph building, bookkeeping), and the
forward-pass times. The first round after the prefill is left out of the per-round figures
(it also evaluates work the prefill left lazy).

Each library runs in its own process, one at a time (the peers in ``--peers-python``, a venv
that is never part of our dependencies). Prints a table and JSON (``--json``).

    python scripts/profile_round.py --model DIR/target --drafter DIR/assistant --num-draft 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEERS_PYTHON = "/work/peers-venv/bin/python"
WORKERS = ("ours", "mlx-vlm", "mlx-lm")
_RECT = re.compile(r'label ="([^"]+)", shape=rectangle')


# ----------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------


def _arrays(tree) -> list:
    import mlx.core as mx

    out = []
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, mx.array):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type) and type(x).__module__.startswith(("mtp_mlx", "mlx_vlm", "mlx_lm")):
            stack.extend(vars(x).values())
    return out


def count_ops(*trees) -> Counter:
    """Primitives (by name) in the unevaluated graph behind the arrays in ``trees``."""
    import mlx.core as mx

    arrays = _arrays(list(trees))
    if not arrays:
        return Counter()
    f = io.StringIO()
    mx.export_to_dot(f, *arrays)
    return Counter(_RECT.findall(f.getvalue()))


class SyncCounter:
    """Intercept every host sync while active; record (caller, primitive counts) per sync."""

    LIBS = ("mtp_mlx", "mlx_vlm", "mlx_lm")

    def __init__(self):
        self.events: List[tuple] = []
        self._saved = {}

    def _caller(self) -> str:
        for fr in reversed(traceback.extract_stack()[:-3]):
            parts = Path(fr.filename).parts
            for lib in self.LIBS:
                if lib in parts:
                    return f"{lib}.{Path(fr.filename).stem}.{fr.name}"
        return "script"

    def _record(self, *args):
        self.events.append((self._caller(), count_ops(*args)))

    def __enter__(self):
        import mlx.core as mx

        orig_eval = mx.eval
        self._saved = {"eval": mx.eval, "async_eval": mx.async_eval}
        meths = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
        self._meths = {m: getattr(mx.array, m) for m in meths if hasattr(mx.array, m)}

        def eval_(*a):
            self._record(*a)
            return orig_eval(*a)

        mx.eval = eval_
        mx.async_eval = eval_  # synchronous while counting: nothing counted twice
        for m, f in self._meths.items():
            def wrap(self_arr, *a, _f=f, **k):
                self._record(self_arr)
                return _f(self_arr, *a, **k)
            setattr(mx.array, m, wrap)
        return self

    def __exit__(self, *exc):
        import mlx.core as mx

        mx.eval, mx.async_eval = self._saved["eval"], self._saved["async_eval"]
        for m, f in self._meths.items():
            setattr(mx.array, m, f)

    def take(self):
        ev, self.events = self.events, []
        return ev


class SyncTimer:
    """Time the host spends blocked in syncs (``mx.eval``, ``item``, ``tolist``) while active;
    the rest of the wall time is host work (Python, building graphs, bookkeeping)."""

    def __init__(self):
        self.blocked = 0.0

    def __enter__(self):
        import mlx.core as mx

        self._saved = (mx.eval, {m: getattr(mx.array, m) for m in ("item", "tolist")})

        def timed(f):
            def g(*a, **k):
                t0 = time.perf_counter()
                try:
                    return f(*a, **k)
                finally:
                    self.blocked += time.perf_counter() - t0
            return g

        mx.eval = timed(self._saved[0])
        for m, f in self._saved[1].items():
            setattr(mx.array, m, timed(f))
        return self

    def __exit__(self, *exc):
        import mlx.core as mx

        mx.eval = self._saved[0]
        for m, f in self._saved[1].items():
            setattr(mx.array, m, f)


def _summ(events) -> dict:
    total = Counter()
    by_caller: Dict[str, int] = {}
    syncs = 0
    for caller, c in events:
        n = sum(c.values())
        total += c
        if n:
            syncs += 1
            by_caller[caller] = by_caller.get(caller, 0) + n
    return {"ops": sum(total.values()), "syncs": syncs, "by_caller": by_caller, "primitives": dict(total)}


def _n(c: Counter) -> dict:
    return {"ops": sum(c.values()), "primitives": dict(c)}


def _median_time(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ----------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------


def worker_ours(job: dict) -> dict:
    import mlx.core as mx

    from mtp_mlx import load
    from mtp_mlx.decoding.accept import accept_greedy
    from mtp_mlx.decoding.draft import draft_context
    from mtp_mlx.decoding.engine import Engine, Request

    K, ids, reps = job["num_draft"], job["ids"], job["repeat"]
    t0 = time.perf_counter()
    pair = load(job["model"], job["drafter"])
    load_s = time.perf_counter() - t0
    target, drafter = pair.target, pair.drafter
    res: dict = {"load_s": load_s, "pieces": {}, "times": {}}
    P = res["pieces"]

    # 1. pieces, each built lazily and counted, then evaluated
    cache = target.make_cache(max_draft=8)
    prompt = mx.array([ids], dtype=mx.int32)
    out = target(prompt, cache)
    P["target prefill"] = _n(count_ops(out.logits, out.hidden, _cache_arrays(cache)))
    mx.eval(out.logits, out.hidden, _cache_arrays(cache))
    bonus = mx.argmax(out.logits[:, -1:], axis=-1).astype(mx.int32)
    hidden = out.hidden[:, -1:]
    mx.eval(bonus, hidden)

    def forward(n_tok):
        chunk = mx.concatenate([bonus] * n_tok, axis=1)
        o = target(chunk, cache)
        return o, chunk

    for name, n_tok in (("target decode (1 token)", 1), (f"target verify (K+1 = {K + 1})", K + 1)):
        o, _ = forward(n_tok)
        P[name] = _n(count_ops(o.logits, o.hidden, _cache_arrays(cache)))
        mx.eval(o.logits, o.hidden, _cache_arrays(cache))
        cache.trim([n_tok])
    ctx = draft_context(cache, target.cfg.sliding_window, "B")
    masks = [m.dense for m in ctx.masks.values()]
    P["drafter masks (once per round)"] = _n(count_ops(masks, ctx.q_pos))
    mx.eval(masks, ctx.q_pos)
    attention = _attention(job)
    hd, h2 = drafter(target.embed(bonus), hidden, ctx.kv, ctx.q_pos, ctx.masks, attention)
    tok = drafter.argmax(hd)
    P["drafter step (incl. head)"] = _n(count_ops(tok, h2))
    mx.eval(tok, h2)
    drafts = mx.concatenate([tok] * K, axis=1)
    o, chunk = forward(K + 1)
    mx.eval(o.logits, o.hidden)
    n, nxt, _ = accept_greedy(drafts, o.logits)
    hid = mx.take_along_axis(o.hidden, n[:, None, None], axis=1)
    P["acceptance (greedy)"] = _n(count_ops(n, nxt, hid))
    mx.eval(n, nxt, hid)
    P["LM head (1 position)"] = _n(count_ops(target.head(o.hidden[:, :1])))
    cache.trim([K + 1])

    # 2. forward-pass times
    T = res["times"]

    def timed_forward(n_tok):
        o, _ = forward(n_tok)
        mx.eval(o.logits, o.hidden, _cache_arrays(cache))
        cache.trim([n_tok])

    T["target decode (1 token)"] = _median_time(lambda: timed_forward(1), reps)
    T[f"target verify (K+1 = {K + 1})"] = _median_time(lambda: timed_forward(K + 1), reps)
    T["LM head, 1 position"] = _median_time(lambda: mx.eval(target.head(o.hidden[:, :1])), reps)
    T[f"LM head, {K + 1} positions"] = _median_time(lambda: mx.eval(target.head(o.hidden)), reps)

    def draft_k():
        t, h = bonus, hidden
        toks = []
        for _ in range(K):
            a, h = drafter(target.embed(t), h, ctx.kv, ctx.q_pos, ctx.masks, attention)
            t = drafter.argmax(a)
            toks.append(t)
        mx.eval(toks)

    T[f"{K} draft steps"] = _median_time(draft_k, reps)

    # 3. the Engine's own rounds: syncs and ops per round (counted), then time per round
    for mode, k, use in (("spec", K, True), ("plain", 0, False)):
        eng = Engine(pair, max_batch=1, use_drafter=use, attention=job.get("attention") or "auto")
        eng.eos, eng.tokenizer = frozenset(), None  # full budget; ids only, like the peers' loops
        rounds = []
        with SyncCounter() as sc:
            eng.submit(Request(list(ids), max_tokens=job["max_tokens"], num_draft=k))
            first = True
            while eng.live:
                evs = eng.step()
                s = _summ(sc.take())
                if first:
                    first = False  # the prefill step
                    res[f"engine {mode}: prefill step"] = s
                    continue
                s["tokens"] = sum(len(e.tokens) for e in evs)
                s["accepted"] = sum(e.accepted for e in evs)
                rounds.append(s)
        # the first round also evaluates work the prefill step left lazy: not a steady round
        res[f"engine {mode}: round"] = _round_summary(rounds[1:] if len(rounds) > 2 else rounds)
        eng.submit(Request(list(ids), max_tokens=job["max_tokens"], num_draft=k))
        stamps = []
        with SyncTimer() as st:
            while eng.live:
                t_a, b_a = time.perf_counter(), st.blocked
                evs = eng.step()
                stamps.append((time.perf_counter() - t_a, sum(len(e.tokens) for e in evs), st.blocked - b_a))
        rest = stamps[1:]
        res[f"engine {mode}: round"]["seconds_per_round"] = statistics.median(s for s, _, _ in rest)
        res[f"engine {mode}: round"]["host_seconds_per_round"] = statistics.median(s - b for s, _, b in rest)
        res[f"engine {mode}: round"]["tokens_per_second"] = sum(n for _, n, _ in rest) / sum(s for s, _, _ in rest)

    # 4. our round split into pieces, each evaluated on its own (no overlap)
    res["split"] = _split_round(target, drafter, ids, K, job["rounds"], attention, accept_greedy, draft_context)
    return res


def _attention(job):
    from mtp_mlx.ops import check_backend

    return check_backend(job.get("attention") or "auto")


def _cache_arrays(cache) -> list:
    return [a for c in cache.layers.values() for a in (c.keys, c.values, c.pos) if a is not None]


def _round_summary(rounds: List[dict]) -> dict:
    if not rounds:
        return {}
    mean = lambda k: statistics.fmean(r[k] for r in rounds)  # noqa: E731
    callers: Dict[str, List[int]] = {}
    for r in rounds:
        for c, n in r["by_caller"].items():
            callers.setdefault(c, []).append(n)
    prims = Counter()
    for r in rounds:
        prims += Counter(r["primitives"])
    return {
        "rounds": len(rounds), "ops_per_round": mean("ops"), "syncs_per_round": mean("syncs"),
        "tokens_per_round": sum(r["tokens"] for r in rounds) / len(rounds),
        "ops_per_token": sum(r["ops"] for r in rounds) / max(1, sum(r["tokens"] for r in rounds)),
        "ops_by_caller_per_round": {c: sum(v) / len(rounds) for c, v in callers.items()},
        "primitives_per_round": {k: v / len(rounds) for k, v in prims.most_common()},
    }


def _split_round(target, drafter, ids, K, n_rounds, attention, accept_greedy, draft_context) -> dict:
    import mlx.core as mx

    cache = target.make_cache(max_draft=8)
    out = target(mx.array([ids], dtype=mx.int32), cache)
    bonus = mx.argmax(out.logits[:, -1:], axis=-1).astype(mx.int32)
    hidden = out.hidden[:, -1:]
    mx.eval(bonus, hidden, _cache_arrays(cache))
    parts: Dict[str, List[float]] = {k: [] for k in ("draft", "verify", "accept", "rollback", "host")}
    accepted = []
    for _ in range(n_rounds):
        t0 = time.perf_counter()
        ctx = draft_context(cache, target.cfg.sliding_window, "B")
        tok, h, toks = bonus, hidden, []
        for _ in range(K):
            a, h = drafter(target.embed(tok), h, ctx.kv, ctx.q_pos, ctx.masks, attention)
            tok = drafter.argmax(a)
            toks.append(tok)
        drafts = mx.concatenate(toks, axis=1).astype(mx.int32)
        mx.eval(drafts)
        t1 = time.perf_counter()
        o = target(mx.concatenate([bonus, drafts], axis=1), cache)
        mx.eval(o.logits, o.hidden, _cache_arrays(cache))
        t2 = time.perf_counter()
        n, nxt, _ = accept_greedy(drafts, o.logits)
        hid = mx.take_along_axis(o.hidden, n[:, None, None], axis=1)
        mx.eval(n, nxt, hid)
        t3 = time.perf_counter()
        n_acc = n.tolist()
        cache.trim([K - a for a in n_acc])
        mx.eval(_cache_arrays(cache))
        t4 = time.perf_counter()
        toks_host = drafts.tolist()[0][: n_acc[0]] + nxt.tolist()
        bonus, hidden = nxt[:, None], hid
        accepted.append(n_acc[0])
        t5 = time.perf_counter()
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[k].append(dt)
        del toks_host
    return {"seconds_median": {k: statistics.median(v) for k, v in parts.items()},
            "accepted_per_round": sum(accepted) / len(accepted), "rounds": n_rounds}


def worker_lm(job: dict) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    K, ids, reps = job["num_draft"], job["ids"], job["repeat"]
    t0 = time.perf_counter()
    model, _ = load(job["model"])
    res: dict = {"load_s": time.perf_counter() - t0, "pieces": {}, "times": {}}
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    res["pieces"]["target prefill"] = _n(count_ops(logits, [c.state for c in cache]))
    mx.eval(logits, [c.state for c in cache])
    tok = mx.argmax(logits[:, -1:], axis=-1)
    for name, n_tok in (("target decode (1 token)", 1), (f"target verify (K+1 = {K + 1})", K + 1)):
        lg = model(mx.concatenate([tok] * n_tok, axis=1), cache=cache)
        res["pieces"][name] = _n(count_ops(lg, [c.state for c in cache]))
        mx.eval(lg, [c.state for c in cache])

    def fwd(n_tok):
        c = make_prompt_cache(model)
        mx.eval(model(mx.array([ids]), cache=c), [x.state for x in c])
        return c

    for name, n_tok in (("target decode (1 token)", 1), (f"target verify (K+1 = {K + 1})", K + 1)):
        c = fwd(n_tok)
        ts = []
        for _ in range(reps):
            t_a = time.perf_counter()
            mx.eval(model(mx.concatenate([tok] * n_tok, axis=1), cache=c), [x.state for x in c])
            ts.append(time.perf_counter() - t_a)
        res["times"][name] = statistics.median(ts)
    greedy = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
    with SyncCounter() as sc:
        steps = []
        for _ in generate_step(mx.array(ids), model, max_tokens=job["max_tokens"], sampler=greedy):
            steps.append(_summ(sc.take()))
    res["plain loop: prefill + first token"] = steps[0]
    rest = steps[1:]
    for s in rest:
        s["tokens"], s["accepted"] = 1, 0
    res["plain loop: token"] = _round_summary(rest[1:] if len(rest) > 2 else rest)
    with SyncTimer() as st:
        stamps = [(time.perf_counter(), st.blocked)
                  for _ in generate_step(mx.array(ids), model, max_tokens=job["max_tokens"], sampler=greedy)]
    res["plain loop: token"].update(_loop_times(stamps, len(stamps) - 1))
    return res


def _loop_times(stamps, rounds: int) -> dict:
    """Per-round wall and host (not blocked in a sync) seconds from (time, blocked) stamps
    taken at each yield, the first (after the prefill) excluded."""
    (t0, b0), (t1, b1) = stamps[0], stamps[-1]
    wall, blocked = t1 - t0, b1 - b0
    return {"seconds_per_round": wall / max(1, rounds), "host_seconds_per_round": (wall - blocked) / max(1, rounds),
            "tokens_per_second": (len(stamps) - 1) / wall if wall > 0 else None}


def worker_vlm(job: dict) -> dict:
    import mlx.core as mx
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.models import cache as vcache
    from mlx_vlm.speculative.drafters import load_drafter
    from mlx_vlm.utils import get_model_path, load_model

    K, ids, reps = job["num_draft"], job["ids"], job["repeat"]
    t0 = time.perf_counter()
    model = load_model(get_model_path(job["model"]))
    drafter, _ = load_drafter(job["drafter"], kind="mtp")
    drafter.prefer_requested_block_size = True
    res: dict = {"load_s": time.perf_counter() - t0, "pieces": {}, "times": {}}
    lm = model.language_model
    cache = vcache.make_prompt_cache(lm)
    out = lm(mx.array([ids]), cache=cache)
    res["pieces"]["target prefill"] = _n(count_ops(out.logits, [c.state for c in cache]))
    mx.eval(out.logits, [c.state for c in cache])
    tok = mx.argmax(out.logits[:, -1:], axis=-1)
    for name, n_tok in (("target decode (1 token)", 1), (f"target verify (K+1 = {K + 1})", K + 1)):
        o = lm(mx.concatenate([tok] * n_tok, axis=1), cache=cache)
        res["pieces"][name] = _n(count_ops(o.logits, [c.state for c in cache]))
        mx.eval(o.logits, [c.state for c in cache])
    for name, n_tok in (("target decode (1 token)", 1), (f"target verify (K+1 = {K + 1})", K + 1)):
        ts = []
        for _ in range(reps):
            t_a = time.perf_counter()
            o = lm(mx.concatenate([tok] * n_tok, axis=1), cache=cache)
            mx.eval(o.logits, [c.state for c in cache])
            ts.append(time.perf_counter() - t_a)
        res["times"][name] = statistics.median(ts)
    for mode, kw in (("mtp", dict(draft_model=drafter, draft_kind="mtp", draft_block_size=K + 1)), ("plain", {})):
        with SyncCounter() as sc:
            groups, before = [], _rounds(drafter)
            for _ in generate_step(mx.array([ids]), model, None, None, max_tokens=job["max_tokens"], temperature=0.0, **kw):
                groups.append(sc.take())
        n_rounds = _rounds(drafter) - before if kw else len(groups) - 1
        rest = [e for g in groups[1:] for e in g]
        s = _summ(rest)
        per = max(1, n_rounds)
        res[f"{mode} loop: prefill + first token"] = _summ(groups[0])
        res[f"{mode} loop: round"] = {
            "rounds": n_rounds, "ops_per_round": s["ops"] / per, "syncs_per_round": s["syncs"] / per,
            "tokens_per_round": (len(groups) - 1) / per, "ops_per_token": s["ops"] / max(1, len(groups) - 1),
            "ops_by_caller_per_round": {c: n / per for c, n in s["by_caller"].items()},
            "primitives_per_round": {k: v / per for k, v in Counter(s["primitives"]).most_common()},
        }
        before = _rounds(drafter)
        with SyncTimer() as st:
            stamps = [(time.perf_counter(), st.blocked) for _ in generate_step(
                mx.array([ids]), model, None, None, max_tokens=job["max_tokens"], temperature=0.0, **kw)]
        n_r = (_rounds(drafter) - before) if kw else len(stamps) - 1
        res[f"{mode} loop: round"].update(_loop_times(stamps, n_r))
    return res


def _rounds(drafter) -> int:
    return getattr(drafter, "speculative_total_rounds", 0)


# ----------------------------------------------------------------------------------------------
# orchestrator
# ----------------------------------------------------------------------------------------------


def run_worker(name: str, job: dict, python: str, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(dict(job, worker=name), f)
        path = f.name
    try:
        p = subprocess.run([python, str(Path(__file__).resolve()), "--worker", path],
                           capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(path)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
    raise RuntimeError(f"{name} failed (exit {p.returncode}): " + " | ".join(tail))


def _fmt(x, spec=".0f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(report: dict, K: int) -> None:
    r = report["results"]
    ours, vlm, lm = r.get("ours", {}), r.get("mlx-vlm", {}), r.get("mlx-lm", {})
    pieces = ["target prefill", "target decode (1 token)", f"target verify (K+1 = {K + 1})",
              "drafter masks (once per round)", "drafter step (incl. head)", "acceptance (greedy)", "LM head (1 position)"]
    print(f"\noperations per piece (primitives in the lazy graph)\n{'piece':<34} {'ours':>8} {'mlx-vlm':>8} {'mlx-lm':>8}")
    for p in pieces:
        vals = [x.get("pieces", {}).get(p, {}).get("ops") for x in (ours, vlm, lm)]
        print(f"{p:<34} {_fmt(vals[0]):>8} {_fmt(vals[1]):>8} {_fmt(vals[2]):>8}")
    print(f"\nwhole loops (per round; plain: per token)\n{'loop':<22} {'ops':>8} {'syncs':>6} {'tok/round':>9} "
          f"{'ops/tok':>8} {'s/round':>8} {'host s':>8} {'tok/s':>7}")
    rows = [("ours spec", ours.get("engine spec: round")), ("mlx-vlm MTP", vlm.get("mtp loop: round")),
            ("ours plain", ours.get("engine plain: round")), ("mlx-vlm plain", vlm.get("plain loop: round")),
            ("mlx-lm plain", lm.get("plain loop: token"))]
    for name, s in rows:
        if not s:
            continue
        print(f"{name:<22} {_fmt(s.get('ops_per_round')):>8} {_fmt(s.get('syncs_per_round'), '.1f'):>6} "
              f"{_fmt(s.get('tokens_per_round'), '.2f'):>9} {_fmt(s.get('ops_per_token'), '.0f'):>8} "
              f"{_fmt(s.get('seconds_per_round'), '.4f'):>8} {_fmt(s.get('host_seconds_per_round'), '.4f'):>8} "
              f"{_fmt(s.get('tokens_per_second'), '.2f'):>7}")
    print("\nops per round by the function that synced")
    for name, s in rows:
        if s:
            by = ", ".join(f"{c.split('.', 1)[1]} {v:.0f}" for c, v in sorted(s.get("ops_by_caller_per_round", {}).items(), key=lambda kv: -kv[1]))
            print(f"  {name:<14} {by}")
    if ours.get("split"):
        sp = ours["split"]["seconds_median"]
        tot = sum(sp.values())
        real = ours.get("engine spec: round", {}).get("seconds_per_round")
        print(f"\nour round, pieces evaluated separately (median s; accepted/round {ours['split']['accepted_per_round']:.2f})")
        print("  " + "  ".join(f"{k} {v:.4f} ({100 * v / tot:.0f}%)" for k, v in sp.items()) + f"  sum {tot:.4f}"
              + (f"  | Engine round (overlapped) {real:.4f}" if real else ""))
    print(f"\nforward-pass times (median s)\n{'piece':<28} {'ours':>8} {'mlx-vlm':>8} {'mlx-lm':>8}")
    names = sorted({k for x in (ours, vlm, lm) for k in x.get("times", {})})
    for n in names:
        vals = [x.get("times", {}).get(n) for x in (ours, vlm, lm)]
        print(f"{n:<28} {_fmt(vals[0], '.4f'):>8} {_fmt(vals[1], '.4f'):>8} {_fmt(vals[2], '.4f'):>8}")
    # where the difference comes from: primitive types, our verify vs mlx-vlm's, and per round
    for label, a, b in (("verify forward", ours.get("pieces", {}).get(f"target verify (K+1 = {K + 1})"),
                         vlm.get("pieces", {}).get(f"target verify (K+1 = {K + 1})")),
                        ("speculative round", ours.get("engine spec: round"), vlm.get("mtp loop: round"))):
        if not a or not b:
            continue
        pa = Counter(a.get("primitives") or a.get("primitives_per_round") or {})
        pb = Counter(b.get("primitives") or b.get("primitives_per_round") or {})
        diff = sorted(((k, pa.get(k, 0) - pb.get(k, 0)) for k in set(pa) | set(pb)), key=lambda kv: -abs(kv[1]))
        print(f"\n{label}: primitives ours - mlx-vlm (largest differences)")
        print("  " + ", ".join(f"{k} {v:+.0f}" for k, v in diff[:14] if round(v)))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--drafter")
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--prompt", default="Write a Python function that returns the n-th Fibonacci number.")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="repeat/cut the prompt to this many ids")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per profiled loop")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of the split timing")
    ap.add_argument("--repeat", type=int, default=3, help="repeats per forward-pass timing")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--workers", default=",".join(WORKERS), help=f"subset of {','.join(WORKERS)}")
    ap.add_argument("--peers-python", default=DEFAULT_PEERS_PYTHON)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        fn = {"ours": worker_ours, "mlx-vlm": worker_vlm, "mlx-lm": worker_lm}[job["worker"]]
        print("RESULT " + json.dumps(fn(job)), flush=True)
        return 0
    if not (args.model and args.drafter):
        ap.error("--model and --drafter are required")
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_peers import prompt_ids

    ids = prompt_ids(args.model, args.prompt, False, args.prompt_tokens)
    job = dict(model=str(Path(args.model).resolve()), drafter=str(Path(args.drafter).resolve()), ids=ids,
               num_draft=args.num_draft, max_tokens=args.max_tokens, rounds=args.rounds, repeat=args.repeat,
               attention=args.attention)
    results = {}
    for name in [w.strip() for w in args.workers.split(",") if w.strip()]:
        python = sys.executable if name == "ours" else args.peers_python
        t0 = time.perf_counter()
        try:
            results[name] = run_worker(name, job, python, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            results[name] = {"error": str(err)}
        print(f"[profile] {name} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    report = {"model": args.model, "drafter": args.drafter, "num_draft": args.num_draft, "prompt_tokens": len(ids),
              "max_tokens": args.max_tokens, "load_average": os.getloadavg(), "results": results}
    print_tables(report, args.num_draft)
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: {r['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

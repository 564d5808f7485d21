"""Benchmark: one process vs two ranks (tensor parallel, pipeline parallel) on this machine.

Reports per decode round: collectives (all_sum / send / recv calls), the bytes they carry,
tokens per target forward (must equal the single process: same tokens, same rounds) and
tokens/s. Two ranks run on 127.0.0.1 over the ring backend (``local_ring``); on one machine
the tokens/s figures show function, not speed.

    python scripts/bench_distributed.py                       # the 'agree' test fixture
    python scripts/bench_distributed.py --model DIR --drafter DIR --max-tokens 128
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Counter:
    """Wraps mx.distributed's collectives to count calls and payload bytes. Counts happen
    when the graph is built; every collective built during a decode round is evaluated."""

    def __init__(self):
        import mlx.core as mx

        self.calls = {"all_sum": 0, "send": 0, "recv": 0}
        self.bytes = dict.fromkeys(self.calls, 0)
        self._orig = {k: getattr(mx.distributed, k) for k in self.calls}
        for name in self.calls:
            setattr(mx.distributed, name, self._wrap(name))

    def _wrap(self, name):
        orig = self._orig[name]

        def f(*args, **kwargs):
            out = orig(*args, **kwargs)
            self.calls[name] += 1
            self.bytes[name] += out.nbytes
            return out

        return f

    def reset(self):
        for k in self.calls:
            self.calls[k] = self.bytes[k] = 0


def load_pair(args):
    from mtp_mlx import load

    if args.model:
        return load(args.model, drafter=args.drafter, dtype=args.dtype)
    fx = Path(args.fixtures)
    return load(str(fx / args.kind / "target"), drafter=str(fx / args.kind / "assistant"), dtype=args.dtype)


def prompt_ids(pair, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(3, pair.target.cfg.vocab_size, size=n)]


def run(pair, args, counter=None, distributed=False):
    """One greedy speculative generation; stats of the decode rounds (prefill excluded)."""
    import mlx.core as mx

    from mtp_mlx.decoding.engine import Engine, Request, bare_pair
    from mtp_mlx.distributed.engine import DistributedEngine

    bare = bare_pair(pair.target, pair.drafter)  # no EOS: exactly max_tokens tokens
    eng = DistributedEngine(bare) if distributed else Engine(bare)
    prompt = prompt_ids(pair, args.prompt_tokens)
    toks, stats, t_first = [], None, None
    eng.submit(Request(prompt, max_tokens=args.max_tokens, num_draft=args.num_draft))
    while not eng.idle:
        for ev in eng.step():
            toks.extend(ev.tokens)
            stats = ev.stats
        if t_first is None:  # the prefill's step: count only decode rounds from here
            mx.synchronize()
            t_first = time.perf_counter()
            if counter:
                counter.reset()
    seconds = time.perf_counter() - t_first
    rounds = max(stats.rounds, 1)
    out = {"tokens": toks, "rounds": stats.rounds, "accepted": stats.accepted, "drafted": stats.drafted,
           "tokens_per_forward": (len(toks) - 1) / rounds, "tokens_per_s": (len(toks) - 1) / seconds}
    if counter:
        out["collectives_per_round"] = {k: v / rounds for k, v in counter.calls.items()}
        out["bytes_per_round"] = {k: v / rounds for k, v in counter.bytes.items()}
    return out


def rank_main(args):
    from mtp_mlx.distributed import distribute, init_distributed

    grp = init_distributed(args.mode, backend="ring")
    pair = load_pair(args)
    distribute(pair, args.mode, grp)
    counter = Counter()
    run(pair, args, counter, distributed=True)  # warm-up (first-call costs)
    res = run(pair, args, counter, distributed=True)
    res["rank"] = grp.rank()
    if hasattr(pair.target, "tp_plan"):
        res["plan"] = pair.target.tp_plan.describe()
    if hasattr(pair.target, "bounds"):
        res["plan"] = f"pipeline stages {pair.target.bounds}, mirrored K/V {pair.target.carry}"
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="target checkpoint (default: the test fixture --kind)")
    ap.add_argument("--drafter")
    ap.add_argument("--fixtures", default=str(ROOT / "fixtures"))
    ap.add_argument("--kind", default="agree")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", default="tensor,pipeline")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=36)
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # set in the rank processes
    args = ap.parse_args()
    if args.mode:
        return rank_main(args)

    from mtp_mlx.distributed.launch import local_ring

    if not args.model:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import load_make_fixtures

        load_make_fixtures().main(["--out", args.fixtures, "--kinds", args.kind])
    pair = load_pair(args)
    run(pair, args)
    single = run(pair, args)
    results = {"single": single}
    passthrough = ["--fixtures", args.fixtures, "--kind", args.kind, "--dtype", args.dtype,
                   "--max-tokens", str(args.max_tokens), "--prompt-tokens", str(args.prompt_tokens),
                   "--num-draft", str(args.num_draft)]
    passthrough += (["--model", args.model] if args.model else []) + (["--drafter", args.drafter] if args.drafter else [])
    for mode in args.modes.split(","):
        ranks = local_ring([sys.executable, __file__, "--mode", mode, *passthrough], n=2, timeout=args.timeout)
        got = []
        for r in ranks:
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode != 0 or not lines:
                raise SystemExit(f"{mode}: rank {r.rank} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
            got.append(json.loads(lines[-1][len("RESULT "):]))
        results[mode] = got
    print(f"{'run':<10} {'tok/s':>7} {'tok/fwd':>7} {'rounds':>6} {'all_sum/rd':>10} {'send/rd':>7} {'recv/rd':>7} "
          f"{'bytes/rd':>10}  same tokens")
    print(f"{'1 process':<10} {single['tokens_per_s']:7.1f} {single['tokens_per_forward']:7.2f} {single['rounds']:6d}")
    for mode in args.modes.split(","):
        for res in results[mode]:
            c, b = res["collectives_per_round"], res["bytes_per_round"]
            same = res["tokens"] == single["tokens"] and res["rounds"] == single["rounds"]
            print(f"{mode[:4] + ' r' + str(res['rank']):<10} {res['tokens_per_s']:7.1f} {res['tokens_per_forward']:7.2f} "
                  f"{res['rounds']:6d} {c['all_sum']:10.1f} {c['send']:7.1f} {c['recv']:7.1f} "
                  f"{sum(b.values()):10.0f}  {same}")
        print(f"  {results[mode][0]['plan']}")
    if args.json:
        for v in [single] + [r for m in args.modes.split(",") for r in results[m]]:
            v.pop("tokens", None)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)

"""Decode-speed benchmark: plain decoding, ``auto`` and fixed draft lengths, at several batch
sizes and on several checkpoint pairs, plus our plain decoding against mlx-lm's own Gemma 4
on the same target (batch 1).

Warm-up first, then the median of several runs taken round-robin over every (pair, batch,
case), so that a slow spell of a shared machine lands on every case alike. Decode speed is
all rows' tokens after their first / (last token - first first token) (``decoding.stats``).
``auto`` keeps one policy per pair and batch size across its runs, as a long-running process
would (its warm-up run is where it first measures). Prints a table and JSON. Not a test:
nothing here asserts a speed.

    python scripts/bench.py [--pair TARGET:DRAFTER ...] [--batch 1 4] [--cases plain auto 1 2 3]

Peers mode (``--peers``): for each pair, run ``scripts/bench_peers.py`` instead: ours (plain and
speculative at K = 3, or the first fixed K of ``--cases`` when given), mlx-lm's plain decoding and
mlx-vlm's MTP decoding on the same checkpoint files and prompt ids, alternating processes
(``--runs`` rounds), and print the ratios (batch 1; the peers' loops decode one sequence).

    python scripts/bench.py --peers [--peers-python /path/to/venv/bin/python] --pair T:D
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import mlx.core as mx

from mtp_mlx import load
from mtp_mlx.decoding.engine import Engine, generate_ids
from mtp_mlx.decoding.policy import DraftPolicy

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef walk_tree(root):\n",
    "class LinkedList:\n    def __init__(self):\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items)\n",
]


DEFAULT_CASES = ["plain", "auto", "1", "2", "3", "4", "5", "6"]


def _demo_pair() -> str:
    from mtp_mlx import demo

    return f"{demo.DEMO_TARGET}:{demo.DEMO_DRAFTER}"


def _run(pair, batches, case, max_tokens, policy):
    """Decode each batch of prompts in turn (one engine each); speeds pool all of them: tokens
    after each row's first over the summed decode spans."""
    k = 0 if case == "plain" else ("auto" if case == "auto" else int(case))
    tokens = span = rounds = drafted = accepted = 0.0
    ks, trace = [], []
    before = policy.summary() if policy is not None else None
    for ids in batches:
        engine = Engine(pair, use_drafter=k != 0, max_batch=len(ids), policy=policy)
        rows = generate_ids(engine, ids, max_tokens=max_tokens, num_draft=k)
        t = engine.totals
        tokens += t.generation_tokens - t.requests
        span += t.last_token_at - t.first_token_at
        rounds += t.row_rounds
        drafted += t.drafted
        accepted += t.accepted
        ks += [k for _, s in rows for k in s.ks]
        trace = trace or rows[0][1].ks[:64]
    cut = None
    if before is not None:  # the share of this run's policy rounds that cut on confidence
        after = policy.summary()
        done = after["rounds"] - before["rounds"]
        cut = (after["cut_rounds"] - before["cut_rounds"]) / done if done else 0.0
    return {
        "decode_tps": tokens / span if span > 0 else 0.0,
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_forward": tokens / rounds if rounds else 0.0,
        "mean_k": statistics.mean(ks) if ks else 0.0,
        "parked": sum(1 for x in ks if x == 0) / len(ks) if ks else 1.0,
        "cut": cut,
        "k_trace": trace,
    }


def _mlx_lm_plain(path, ids, max_tokens):
    """mlx-lm's own greedy decoding of the same target (batch 1); None if unavailable."""
    try:
        from mlx_lm import load as lm_load
        from mlx_lm.generate import generate_step as lm_step
    except ImportError:
        return None
    try:
        model, _ = lm_load(str(path))
    except Exception as e:  # mlx-lm may not read every layout we do; report, don't fail
        print(f"mlx-lm could not load {path}: {e}", file=sys.stderr)
        return None

    def run():
        tokens = span = 0.0
        for prompt in ids:  # one sequence at a time, like our batch-1 cell
            stamps = []
            for _tok, _ in lm_step(mx.array(prompt), model, max_tokens=max_tokens,
                                   sampler=lambda x: mx.argmax(x, axis=-1)):
                stamps.append(time.perf_counter())
            tokens, span = tokens + len(stamps) - 1, span + stamps[-1] - stamps[0]
        return {"decode_tps": tokens / span, "acceptance": None,
                "tokens_per_forward": 1.0, "mean_k": 0.0, "parked": 1.0, "cut": None, "k_trace": []}

    return run


def _peers(args) -> int:
    """Run bench_peers.py per pair (each in its own processes) and print every pair's ratios."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_peers.py")
    k = "3" if args.cases == DEFAULT_CASES else next((c for c in args.cases if c.isdigit() and int(c) > 0), "3")
    ratios, rc = {}, 0
    for spec in args.pair or [_demo_pair()]:
        target, drafter = spec.rsplit(":", 1)
        cmd = [sys.executable, script, "--model", target, "--drafter", drafter, "--num-draft", k,
               "--max-tokens", str(args.max_tokens), "--rounds", str(args.runs), "--warmup", str(args.warmup)]
        if args.peers_python:
            cmd += ["--peers-python", args.peers_python]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{spec}: bench_peers failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            rc = 1
            continue
        report = json.loads(out.stdout.strip().splitlines()[-1])
        ratios[spec] = report
        print(f"{spec} (K={k}, {args.max_tokens} tokens, {args.runs} rounds)")
        for label, value in report["ratios"].items():
            print(f"  {label:<34} {value:.3f}x")
        for case, err in report["failed"].items():
            print(f"  {case}: could not run ({err[:120]})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ratios, f, indent=2)
    return rc


def _median(runs):
    out = {}
    for k, v in runs[0].items():
        if k == "k_trace":
            out[k] = runs[-1][k]
        else:
            vals = [r[k] for r in runs if r[k] is not None]
            out[k] = statistics.median(vals) if vals else None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", action="append", help="TARGET:DRAFTER (repeatable; default: the bundled demo pair)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-ids", default=None, help="JSON file: a list of token-id prompts (instead of PROMPTS)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mlx-lm", action="store_true", help="also time mlx-lm's plain decoding (batch 1)")
    ap.add_argument("--json", default=None, help="write results here (default: stdout only)")
    ap.add_argument("--peers", action="store_true",
                    help="compare with mlx-vlm (MTP) and mlx-lm (plain) on each pair via scripts/bench_peers.py")
    ap.add_argument("--peers-python", default=None,
                    help="the python of a separate venv holding mlx-vlm and mlx-lm (bench_peers.py's default otherwise)")
    args = ap.parse_args(argv)
    if args.peers:
        return _peers(args)

    pairs = {}
    for spec in args.pair or [_demo_pair()]:
        target, drafter = spec.rsplit(":", 1)
        pair = load(target, drafter)
        if args.prompt_ids:
            with open(args.prompt_ids) as f:
                prompts = json.load(f)
        else:
            prompts = [list(pair.tokenizer.encode(p)) for p in PROMPTS]
        pairs[spec] = (pair, prompts)
    cases = {}
    for spec, (pair, prompts) in pairs.items():
        for b in args.batch:
            # Batch 1 decodes every prompt in turn (one prompt alone would make the cell that
            # prompt's acceptance); larger batches hold the prompts side by side.
            batches = [[p] for p in prompts] if b == 1 else [[prompts[i % len(prompts)] for i in range(b)]]
            policy = DraftPolicy()
            for case in args.cases:
                cases[(spec, b, case)] = (lambda pair=pair, batches=batches, case=case, policy=policy:
                                          _run(pair, batches, case, args.max_tokens,
                                               policy if case == "auto" else None))
            if args.mlx_lm and b == 1:
                lm = _mlx_lm_plain(pair.target_path, [batch[0] for batch in batches], args.max_tokens)
                if lm is not None:
                    cases[(spec, b, "mlx-lm")] = lm
    for fn in cases.values():
        for _ in range(args.warmup):
            fn()
    runs = {key: [] for key in cases}
    order = list(cases)
    for r in range(args.runs):
        # Rotate the order every run, so that each case runs at each place of the cycle equally
        # often (a case's place in the cycle must not bias it), and start each from a collected
        # heap (no collection of an earlier case's garbage inside a timed one).
        for key in order[r % len(order):] + order[: r % len(order)]:
            gc.collect()
            runs[key].append(cases[key]())
    results = {key: _median(r) for key, r in runs.items()}

    report = {"max_tokens": args.max_tokens, "runs": args.runs, "warmup": args.warmup,
              "device": str(mx.default_device()), "machine": platform.machine(), "mlx": mx.__version__,
              "results": [], "summary": []}
    print(f"{'pair':<28} {'B':>2} {'case':<7} {'tok/s':>8} {'x plain':>8} {'accept':>7} {'tok/fwd':>8} {'mean K':>7} "
          f"{'parked':>7} {'cut':>5}")
    for (spec, b, case), r in results.items():
        plain = results[(spec, b, "plain")]["decode_tps"] if (spec, b, "plain") in results else None
        acc = f"{100 * r['acceptance']:.1f}%" if r["acceptance"] is not None else "-"
        ratio = f"{r['decode_tps'] / plain:.2f}x" if plain else "-"
        name = spec if len(spec) <= 28 else "..." + spec[-25:]
        print(f"{name:<28} {b:>2} {case:<7} {r['decode_tps']:>8.1f} {ratio:>8} {acc:>7} "
              f"{r['tokens_per_forward']:>8.2f} {r['mean_k']:>7.2f} {100 * r['parked']:>6.0f}% "
              f"{'-' if r['cut'] is None else format(100 * r['cut'], '.0f') + '%':>5}")
        report["results"].append({"pair": spec, "batch": b, "case": case, **r})
    for spec in pairs:
        for b in args.batch:
            got = {c: results[(spec, b, c)]["decode_tps"] for c in args.cases if (spec, b, c) in results}
            fixed = {c: v for c, v in got.items() if c.isdigit()}
            row = {"pair": spec, "batch": b}
            if "auto" in got and "plain" in got:
                row["auto_over_plain"] = got["auto"] / got["plain"]
            if "auto" in got and fixed:
                best = max(fixed, key=fixed.get)
                row["best_fixed_k"] = int(best)
                row["auto_over_best_fixed"] = got["auto"] / fixed[best]
            if (spec, b, "mlx-lm") in results and "plain" in got:
                row["plain_over_mlx_lm"] = got["plain"] / results[(spec, b, "mlx-lm")]["decode_tps"]
            report["summary"].append(row)
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())

"""Decode-speed benchmark: plain vs speculative decoding on one checkpoint pair, and our
plain decoding against mlx-lm's own Gemma 4 on the same target checkpoint.

Warm-up first, then the median of several runs (taken round-robin over the cases). Decode speed is (N - 1) / (t_N - t_1),
where t_i is when the i-th generated token reached the host (so prefill is excluded).
Prints a table and writes JSON (``--json``). Not a test: nothing here asserts a speed.

    python scripts/bench.py --model TARGET --drafter DRAFTER [--num-draft 1 2 3 4]
"""

import argparse
import json
import platform
import statistics
import sys
import time

import mlx.core as mx

from mtp_mlx import format_prompt, load
from mtp_mlx.decoding.loop import generate_step, speculative_generate_step

DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def _timed(tokens_iter):
    """(token count, decode tokens/s, stats) from an iterator of Steps."""
    stamps, n, drafted, accepted, forwards = [], 0, 0, 0, 0
    for i, step in enumerate(tokens_iter):
        now = time.perf_counter()
        n += len(step.tokens)
        stamps.extend([now] * len(step.tokens))
        drafted += step.drafted
        accepted += step.accepted
        forwards += i > 0
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    return {
        "tokens": n,
        "decode_tps": tps,
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_forward": (n - 1) / forwards if forwards else None,
    }


def _mlx_lm_plain(path, ids, max_tokens):
    """mlx-lm's own greedy decoding of the same target; None if mlx-lm cannot load it."""
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
        stamps = []
        prompt = mx.array(ids)
        for _tok, _ in lm_step(prompt, model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1)):
            stamps.append(time.perf_counter())
        return {"tokens": len(stamps), "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                "acceptance": None, "tokens_per_forward": 1.0}

    return run


def _median(runs):
    keys = runs[0].keys()
    return {k: (statistics.median([r[k] for r in runs]) if runs[0][k] is not None else None) for k in keys}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--raw", action="store_true", help="no chat template")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--num-draft", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm comparison")
    ap.add_argument("--json", default=None, help="write results here (default: stdout only)")
    args = ap.parse_args(argv)

    pair = load(args.model, args.drafter)
    ids = format_prompt(pair.tokenizer, args.prompt, raw=args.raw)
    # No EOS: every run decodes exactly max_tokens, so runs do the same work.
    cases = {"plain": lambda: _timed(generate_step(pair.target, ids, max_tokens=args.max_tokens, eos_ids=()))}
    for k in args.num_draft:
        cases[f"spec K={k}"] = (lambda k=k: _timed(speculative_generate_step(
            pair.target, pair.drafter, ids, max_tokens=args.max_tokens, num_draft=k, eos_ids=())))
    if not args.no_mlx_lm:
        lm = _mlx_lm_plain(pair.target_path, ids, args.max_tokens)
        if lm is not None:
            cases["mlx-lm plain"] = lm

    # Warm-up, then the runs round-robin over the cases, so that a slow spell of a shared
    # machine lands on every case alike instead of on whichever case was running.
    for fn in cases.values():
        for _ in range(args.warmup):
            fn()
    runs = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, fn in cases.items():
            runs[name].append(fn())
    results = {name: _median(r) for name, r in runs.items()}

    plain = results["plain"]["decode_tps"]
    print(f"{'case':<14} {'decode tok/s':>12} {'speed-up':>9} {'accept':>7} {'tok/fwd':>8}")
    for name, r in results.items():
        acc = f"{100 * r['acceptance']:.1f}%" if r["acceptance"] is not None else "-"
        tpf = f"{r['tokens_per_forward']:.2f}" if r["tokens_per_forward"] else "-"
        print(f"{name:<14} {r['decode_tps']:>12.1f} {r['decode_tps'] / plain:>8.2f}x {acc:>7} {tpf:>8}")
    report = {
        "model": args.model, "drafter": args.drafter, "prompt_tokens": len(ids),
        "max_tokens": args.max_tokens, "runs": args.runs, "warmup": args.warmup,
        "device": str(mx.default_device()), "machine": platform.machine(), "results": results,
    }
    if "mlx-lm plain" in results:
        report["ours_over_mlx_lm_plain"] = plain / results["mlx-lm plain"]["decode_tps"]
        print(f"our plain / mlx-lm plain: {report['ours_over_mlx_lm_plain']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

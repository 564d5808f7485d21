"""Acceptance of lossless speculative sampling vs the common exact-match rule.

Same pair, prompts and seeds for both rules: ours (accept with min(1, p/q), residual draw)
and sample-and-compare (accept only when the target's own sample equals the draft). Both
are lossless; the one that accepts more does fewer target forwards per token.

    python scripts/accept_rules.py --model TARGET --drafter DRAFTER [--temp 1.0 --top-p 0.95 --top-k 64]
"""

import argparse
import json

from mtp_mlx import SamplingConfig, format_prompt, load
from mtp_mlx.decoding.accept import accept_exact_match, accept_sampled
from mtp_mlx.decoding.loop import speculative_generate_step

PROMPTS = ["def quicksort(items):", "class Stack:", "import json\n\ndef load(path):", "for i in range(10):"]


def run(pair, rule, args):
    drafted = accepted = forwards = tokens = 0
    for seed in range(args.seeds):
        for text in PROMPTS:
            ids = format_prompt(pair.tokenizer, text, raw=True)
            cfg = SamplingConfig(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=seed)
            steps = list(speculative_generate_step(pair.target, pair.drafter, ids, max_tokens=args.max_tokens,
                                                   num_draft=args.num_draft, sampling=cfg, accept=rule))
            drafted += sum(s.drafted for s in steps)
            accepted += sum(s.accepted for s in steps)
            forwards += len(steps) - 1
            tokens += sum(len(s.tokens) for s in steps) - 1
    return {"acceptance": accepted / drafted, "tokens_per_forward": tokens / forwards, "drafted": drafted}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--temp", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    pair = load(args.model, args.drafter)
    report = {"settings": vars(args), "ours": run(pair, accept_sampled, args),
              "exact_match": run(pair, accept_exact_match, args)}
    for name in ("ours", "exact_match"):
        r = report[name]
        print(f"{name:<12} acceptance {100 * r['acceptance']:5.1f}%  tokens/forward {r['tokens_per_forward']:.2f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

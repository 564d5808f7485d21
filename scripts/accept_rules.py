"""Acceptance of the engine's two lossless sampling rules on the same pair, prompts and seeds.

* rejection sampling (unseeded requests): accept draft d with probability min(1, p(d)/q(d)),
  at the first rejection draw from norm(max(p - q, 0));
* the coupled rule (seeded requests): the drafter and the target share each position's
  Gumbel noise and a draft is kept iff it equals the target's own token, so a seeded
  request's output is the same whatever K, the drafter or the batch.

The one that accepts more does fewer target forwards per token.

    python scripts/accept_rules.py --model TARGET --drafter DRAFTER [--temp 1.0 --top-p 0.95 --top-k 64]
"""

import argparse
import json

from mtp_mlx import SamplingConfig, format_prompt, load
from mtp_mlx.decoding.batch import Batch, RowSpec

PROMPTS = ["def quicksort(items):", "class Stack:", "import json\n\ndef load(path):", "for i in range(10):"]


def run(pair, coupled: bool, args):
    drafted = accepted = rounds = tokens = 0
    cfg = SamplingConfig(temperature=args.temp, top_p=args.top_p, top_k=args.top_k)
    for seed in range(args.seeds):
        batch = Batch(pair.target, pair.drafter)
        for i, text in enumerate(PROMPTS):
            batch.insert(RowSpec(i, format_prompt(pair.tokenizer, text, raw=True), cfg, seed=seed, request_index=i,
                                 coupled=coupled))
        count = {i: 0 for i in range(len(PROMPTS))}
        while batch.uids or batch.prefilling:
            for uid, out in batch.step({u: args.num_draft for u in batch.uids}).items():
                count[uid] += len(out.tokens)
                if not out.first:
                    drafted, accepted, rounds = drafted + out.drafted, accepted + out.accepted, rounds + 1
                    tokens += len(out.tokens)
            batch.remove([u for u, n in count.items() if n >= args.max_tokens])
    return {"acceptance": accepted / drafted, "tokens_per_forward": tokens / rounds, "drafted": drafted}


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
    report = {"settings": vars(args), "rejection": run(pair, False, args), "coupled": run(pair, True, args)}
    for name in ("rejection", "coupled"):
        r = report[name]
        print(f"{name:<10} acceptance {100 * r['acceptance']:5.1f}%  tokens/forward {r['tokens_per_forward']:.2f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

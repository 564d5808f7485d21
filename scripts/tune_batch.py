"""Batch-size x draft-length sweep for one checkpoint pair (also: ``mtp-mlx tune``).

    python scripts/tune_batch.py --model TARGET --drafter DRAFTER [--max-tokens 128] [--runs 3]

Prints a table (aggregate and per-row tokens/s, acceptance, tokens per target forward) and
writes tuning.txt, tuning.csv, tuning.png and tuning.json into --out; the recommendation
(fastest K per batch size) is stored where ``mtp-mlx generate`` finds it for that pair on
this machine. Warm-up first, then the median of several runs.
"""

import sys

from mtp_mlx.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "tune", *sys.argv[1:]]
    main()

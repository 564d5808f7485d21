"""Batch-size x draft-length tuning: sweep, report, and the recommendation ``generate`` uses.

The sweep times decoding for every batch size in {1, 2, 4, 8} and draft length K in 1..6
plus no drafter (K = 0), warm-up first, then the median of several runs. Each pair of
checkpoints gets, per machine, the fastest K for every batch size; ``mtp-mlx generate``
uses it when ``--num-draft-tokens`` is not given.
"""

import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .decoding.engine import Engine, generate_ids

BATCH_SIZES = (1, 2, 4, 8)
DRAFT_LENGTHS = (0, 1, 2, 3, 4, 5, 6)  # 0 = no drafter


def tuning_file() -> Path:
    """Where recommendations are stored (``$MTP_MLX_HOME`` or ``~/.cache/mtp-mlx``)."""
    home = os.environ.get("MTP_MLX_HOME") or Path.home() / ".cache" / "mtp-mlx"
    return Path(home) / "tuning.json"


def machine_id() -> str:
    return f"{platform.node()}|{platform.machine()}|{platform.processor() or platform.system()}"


def pair_id(pair) -> str:
    return f"{Path(pair.target_path).resolve()}|{Path(pair.drafter_path).resolve() if pair.drafter_path else '-'}"


def recommended_num_draft(pair, batch_size: int, path: Optional[Path] = None) -> Optional[int]:
    """The tuned K (0 = no drafter) for this pair, machine and the nearest swept batch size,
    or None if this pair was never tuned here."""
    path = path or tuning_file()
    try:
        entry = json.loads(path.read_text())[machine_id()][pair_id(pair)]
    except (OSError, ValueError, KeyError):
        return None
    best = entry["best_num_draft"]
    nearest = min(best, key=lambda b: abs(int(b) - batch_size))
    return int(best[nearest])


def _one_run(pair, prompts, k, max_tokens) -> Dict:
    """Decode once at a fixed K (0 = no drafter; "auto" = the policy); aggregate and per-row
    tokens/s measured after each row's first token (``decoding.stats``)."""
    engine = Engine(pair, use_drafter=k != 0, max_batch=len(prompts))
    rows = generate_ids(engine, prompts, max_tokens=max_tokens, num_draft=k)
    t = engine.totals
    return {
        "aggregate_tps": t.generation_tps,
        "row_tps": statistics.median(s.generation_tps for _, s in rows),
        "acceptance": t.acceptance_rate if t.drafted else None,
        "tokens_per_forward": t.tokens_per_forward if t.row_rounds else None,
    }


def sweep(pair, prompts: Sequence[Sequence[int]], *, batch_sizes=BATCH_SIZES, draft_lengths=DRAFT_LENGTHS,
          max_tokens: int = 128, runs: int = 3, warmup: int = 1, progress=None) -> List[Dict]:
    """Time every (batch size, K); rows of a batch take prompts round-robin."""
    results = []
    for b in batch_sizes:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        for k in draft_lengths:
            if k and pair.drafter is None:
                continue
            for _ in range(warmup):
                _one_run(pair, batch, k, max_tokens)
            timed = [_one_run(pair, batch, k, max_tokens) for _ in range(runs)]
            row = {"batch": b, "num_draft": k}
            for key in timed[0]:
                vals = [t[key] for t in timed if t[key] is not None]
                row[key] = statistics.median(vals) if vals else None
            results.append(row)
            if progress:
                progress(row)
    return results


def recommend(results: List[Dict]) -> Dict[str, int]:
    """Fastest K (by aggregate tokens/s) for each batch size."""
    best = {}
    for r in results:
        b = str(r["batch"])
        if b not in best or r["aggregate_tps"] > best[b][1]:
            best[b] = (r["num_draft"], r["aggregate_tps"])
    return {b: k for b, (k, _) in best.items()}


def save_recommendation(pair, results: List[Dict], path: Optional[Path] = None) -> Dict:
    path = path or tuning_file()
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    entry = {"best_num_draft": recommend(results), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    data.setdefault(machine_id(), {})[pair_id(pair)] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return entry


def format_table(results: List[Dict]) -> str:
    lines = [f"{'batch':>5} {'K':>3} {'agg tok/s':>10} {'row tok/s':>10} {'accept':>7} {'tok/fwd':>8}"]
    for r in results:
        acc = f"{100 * r['acceptance']:.1f}%" if r["acceptance"] is not None else "-"
        tpf = f"{r['tokens_per_forward']:.2f}" if r["tokens_per_forward"] else "-"
        k = r["num_draft"] or "none"
        lines.append(f"{r['batch']:>5} {k:>3} {r['aggregate_tps']:>10.1f} {r['row_tps']:>10.1f} {acc:>7} {tpf:>8}")
    return "\n".join(lines)


def write_csv(results: List[Dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)


def write_plot(results: List[Dict], path: Path) -> bool:
    """Aggregate tokens/s against K, one line per batch size. False if matplotlib is missing
    (``pip install 'mtp-mlx[tune]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in sorted({r["batch"] for r in results}):
        rows = sorted((r for r in results if r["batch"] == b), key=lambda r: r["num_draft"])
        ax.plot([r["num_draft"] for r in rows], [r["aggregate_tps"] for r in rows], marker="o", label=f"batch {b}")
    ax.set_xlabel("draft tokens per round K (0 = no drafter)")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title("mtp-mlx batch x draft-length sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


DEFAULT_PROMPTS = (
    "def binary_search(items, target):",
    "class LinkedList:\n    def __init__(self):",
    "import os\n\ndef walk_tree(root):",
    "def parse_args(argv=None):",
)


def run_tuning(model, drafter, texts=None, *, max_tokens=128, runs=3, warmup=1, batch_sizes=BATCH_SIZES,
               draft_lengths=DRAFT_LENGTHS, out="tuning", save=True, echo=print) -> Dict:
    """Load the pair, sweep, write ``out/{tuning.txt,tuning.csv,tuning.png,tuning.json}`` and
    (``save``) store the recommendation. Returns the JSON report."""
    from .api import format_prompt
    from .errors import MtpError
    from .loading import load

    for b in batch_sizes:
        if not 1 <= b <= 8:
            raise MtpError(f"batch size {b} is out of range: use 1..8")
    for k in draft_lengths:
        if not 0 <= k <= 8:
            raise MtpError(f"draft length {k} is out of range: use 0..8 (0 = no drafter)")
    pair = load(model, drafter)
    prompts = [format_prompt(pair.tokenizer, t, raw=True) for t in (texts or DEFAULT_PROMPTS)]
    results = sweep(pair, prompts, batch_sizes=batch_sizes, draft_lengths=draft_lengths, max_tokens=max_tokens,
                    runs=runs, warmup=warmup,
                    progress=lambda r: echo(f"batch {r['batch']} K {r['num_draft']}: {r['aggregate_tps']:.1f} tok/s"))
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    (outdir / "tuning.txt").write_text(table + "\n")
    write_csv(results, outdir / "tuning.csv")
    plotted = write_plot(results, outdir / "tuning.png")
    report = {"model": str(model), "drafter": str(drafter), "machine": machine_id(), "max_tokens": max_tokens,
              "runs": runs, "warmup": warmup, "results": results, "recommendation": recommend(results)}
    (outdir / "tuning.json").write_text(json.dumps(report, indent=2))
    print(table)
    echo(f"recommended K per batch size: {report['recommendation']}")
    echo(f"wrote {outdir}/tuning.txt, tuning.csv, tuning.json" + (", tuning.png" if plotted else
         " (no PNG: pip install 'mtp-mlx[tune]' for matplotlib)"))
    if save:
        save_recommendation(pair, results)
        echo(f"saved the recommendation to {tuning_file()}: mtp-mlx generate uses it for this pair")
    return report

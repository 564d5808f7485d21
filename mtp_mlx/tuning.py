"""Batch-size x draft-length tuning: sweep, report, and the stored policy priors.

The sweep times decoding for every batch size in {1, 2, 4, 8} and draft length K in 1..6
plus no drafter (K = 0) and ``auto``, warm-up first, then the median of several runs. The
``auto`` runs share one draft-length policy, whose measured round costs and acceptance are
stored per (machine, MLX version, pair, quantization) in the tuning store; ``generate``
and ``serve`` start their policy from them (and ``generate`` stores what it learnt back).

The store also keeps the load-time exactness verdict (``mtp_mlx.checks``) per checkpoint,
software and machine (``exactness_key``), so a second start-up skips that check.
"""

import csv
import functools
import hashlib
import json
import os
import platform
import stat
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .decoding.engine import Engine, generate_ids
from .decoding.policy import DraftPolicy
from .limits import check_batch_size, check_num_draft

BATCH_SIZES = (1, 2, 4, 8)
DRAFT_LENGTHS = (0, 1, 2, 3, 4, 5, 6, "auto")  # 0 = no drafter


def tuning_file() -> Path:
    """Where recommendations are stored (``$MTP_MLX_HOME`` or ``~/.cache/mtp-mlx``)."""
    home = os.environ.get("MTP_MLX_HOME") or Path.home() / ".cache" / "mtp-mlx"
    return Path(home) / "tuning.json"


def machine_id() -> str:
    return f"{platform.node()}|{platform.machine()}|{platform.processor() or platform.system()}"


def pair_id(pair) -> str:
    return f"{Path(pair.target_path).resolve()}|{Path(pair.drafter_path).resolve() if pair.drafter_path else '-'}"


def _quantization(pair) -> str:
    """The target's weight format, part of the key of stored costs: dtype, or bits per weight."""
    import mlx.nn as nn

    emb = pair.target.embed_tokens
    if isinstance(emb, nn.QuantizedEmbedding):
        return f"q{emb.bits}g{emb.group_size}"
    return str(emb.weight.dtype).replace("mlx.core.", "")


def policy_key(pair) -> str:
    import mlx.core as mx

    from .decoding.policy import prior_key

    return prior_key(machine_id(), mx.__version__, pair_id(pair), _quantization(pair))


def _read_store(path: Path) -> dict:
    """The store, or {} when it is missing, unreadable or corrupt (it only holds what can be
    measured again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_store(path: Path, data: dict) -> None:
    """Write atomically: a temporary file of its own (two processes may save at once), then
    ``os.replace``, so a reader sees the old store or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644  # mkstemp's is 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_policy_prior(pair, path: Optional[Path] = None) -> Optional[dict]:
    """The stored policy state for this pair on this machine, MLX version and quantization."""
    return _read_store(path or tuning_file()).get("policy", {}).get(policy_key(pair))


def save_policy_prior(pair, state: dict, path: Optional[Path] = None) -> None:
    path = path or tuning_file()
    data = _read_store(path)
    data.setdefault("policy", {})[policy_key(pair)] = state
    _write_store(path, data)


# ---- the stored exactness verdict ----------------------------------------------------------------

EXACTNESS_ENTRIES = 64  # the store keeps this many verdicts, newest first (old keys never match again)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the source of everything that computes a verify or a decode step (models, ops,
    cache, limits, the check itself) and of the Metal kernel: editing any of it re-runs the check."""
    root = Path(__file__).resolve().parent
    files = sorted([*root.glob("models/*.py"), *root.glob("ops/*.py"), *root.glob("cache/*.py"),
                    root / "checks.py", root / "limits.py"])
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    from .errors import MtpError
    from .ops.attention import kernel_source

    try:
        h.update("\0".join(kernel_source()).encode())
    except MtpError:  # no kernel source installed: the Metal backend cannot run, nothing to hash
        h.update(b"no kernel")
    return h.hexdigest()[:16]


def checkpoint_fingerprint(target_path) -> str:
    """The resolved folder plus name, size and mtime of its config.json and weight files: a
    re-download, re-conversion or edit in place changes it, without reading any weights."""
    from .loading.weights import weight_files

    folder = Path(target_path).resolve()
    files = [folder / "config.json", *weight_files(folder)]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files.append(index)
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{folder}|{h.hexdigest()[:16]}"


def weights_format(target) -> str:
    """The weights as loaded: dtype and quantization (``dtype=`` at load changes it), every
    parameter dtype, and how many CPU threads products are split across."""
    from mlx.utils import tree_flatten

    from .checks import describe_target
    from .ops.matmul import threads

    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(target.parameters())})
    return f"{describe_target(target)} [{','.join(dtypes)}] x{threads(target)}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def exactness_key(target, target_path, attn_backend: str) -> str:
    """Everything the exactness verdict depends on; any change gives a new key, so the check runs again."""
    import mlx.core as mx

    parts = [
        machine_id(),  # another machine has another CPU/GPU, whose kernels may round differently
        f"mlx {mx.__version__}",  # MLX picks and implements the kernels (e.g. qmv_wide for 2+ rows)
        f"mlx-lm {_version('mlx-lm')}",  # MoE targets run mlx-lm's SwitchGLU
        str(mx.default_device()),  # the CPU and GPU backends are different code
        checkpoint_fingerprint(target_path),  # other weights or another architecture/config
        weights_format(target),  # a dtype override or quantization changes the matmul kernels
        f"attention {attn_backend}",  # the Metal kernel and the reference sum in different orders
        f"code {code_fingerprint()}",  # our own forward or check changed
    ]
    return " | ".join(parts)


def _safe_key(target, target_path, attn_backend: str) -> Optional[str]:
    """The key, or None when the verdict must be neither read nor stored, so the check simply
    runs: the key cannot be computed (a weight file vanished, an unreadable folder), or the
    target is split across processes (``mtp_mlx.distributed``: its forward runs collectives, so
    every rank must run the check together, and a rank that found a stored verdict while
    another did not would leave that one waiting)."""
    from .distributed.tensor import is_sharded
    from .errors import MtpError
    from .models.gemma4_text import Model

    if not isinstance(target, Model) or is_sharded(target):
        return None
    try:
        return exactness_key(target, target_path, attn_backend)
    except (OSError, MtpError):
        return None


def load_exactness(target, target_path, attn_backend: str, path: Optional[Path] = None) -> Optional[dict]:
    """The stored verdict ``{"exact", "message", "stored"}`` for this target, software and machine,
    or None (none stored, or the store is unreadable or corrupt: the caller runs the check)."""
    key = _safe_key(target, target_path, attn_backend)
    if key is None:
        return None
    entries = _read_store(path or tuning_file()).get("exactness")
    entry = entries.get(key) if isinstance(entries, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("exact"), bool)
            and isinstance(entry.get("message"), str) and isinstance(entry.get("stored"), str)):
        return None
    return entry


def save_exactness(target, target_path, attn_backend: str, exact: bool, message: str,
                   path: Optional[Path] = None) -> bool:
    """Store a verdict (pass or fail) with its one-line message. False when it could not be
    written (a read-only home, a full disk): the verdict is then just not remembered."""
    key = _safe_key(target, target_path, attn_backend)
    if key is None:
        return False
    path = path or tuning_file()
    if path.exists() and not os.access(path, os.R_OK):
        return False  # never replace a store we cannot read: it may hold stored costs
    data = _read_store(path)
    entries = data.get("exactness")
    entries = entries if isinstance(entries, dict) else {}
    entries.pop(key, None)
    entries[key] = {"exact": exact, "message": message,
                    "stored": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    data["exactness"] = dict(list(entries.items())[-EXACTNESS_ENTRIES:])  # insertion order: newest last
    try:
        _write_store(path, data)
    except OSError:
        return False
    return True


def _one_run(pair, prompts, k, max_tokens, policy=None) -> Dict:
    """Decode once at a fixed K (0 = no drafter; "auto" = ``policy``); aggregate and per-row
    tokens/s measured after each row's first token (``decoding.stats``)."""
    engine = Engine(pair, use_drafter=k != 0, max_batch=len(prompts), policy=policy)
    rows = generate_ids(engine, prompts, max_tokens=max_tokens, num_draft=k)
    t = engine.totals
    return {
        "aggregate_tps": t.generation_tps,
        "row_tps": statistics.median(s.generation_tps for _, s in rows),
        "acceptance": t.acceptance_rate if t.drafted else None,
        "tokens_per_forward": t.tokens_per_forward if t.row_rounds else None,
    }


def sweep(pair, prompts: Sequence[Sequence[int]], *, batch_sizes=BATCH_SIZES, draft_lengths=DRAFT_LENGTHS,
          max_tokens: int = 128, runs: int = 3, warmup: int = 1, progress=None, policy=None) -> List[Dict]:
    """Time every (batch size, K); rows of a batch take prompts round-robin. K = "auto" runs
    use ``policy`` (one policy across the sweep: what it measures is what gets stored)."""
    results = []
    for b in batch_sizes:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        for k in draft_lengths:
            if k and pair.drafter is None:
                continue
            for _ in range(warmup):
                _one_run(pair, batch, k, max_tokens, policy)
            timed = [_one_run(pair, batch, k, max_tokens, policy) for _ in range(runs)]
            row = {"batch": b, "num_draft": k}
            for key in timed[0]:
                vals = [t[key] for t in timed if t[key] is not None]
                row[key] = statistics.median(vals) if vals else None
            results.append(row)
            if progress:
                progress(row)
    return results


def recommend(results: List[Dict]) -> Dict[str, int]:
    """The fastest fixed K (0 = no drafter) per batch size (reported; ``auto`` is the default)."""
    best: Dict[str, int] = {}
    for b in sorted({r["batch"] for r in results}):
        rows = [r for r in results if r["batch"] == b and r["num_draft"] != "auto"]
        if rows:
            best[str(b)] = max(rows, key=lambda r: r["aggregate_tps"])["num_draft"]
    return best


def format_table(results: List[Dict]) -> str:
    lines = [f"{'batch':>5} {'K':>3} {'agg tok/s':>10} {'row tok/s':>10} {'accept':>7} {'tok/fwd':>8}"]
    for r in results:
        acc = f"{100 * r['acceptance']:.1f}%" if r["acceptance"] is not None else "-"
        tpf = f"{r['tokens_per_forward']:.2f}" if r["tokens_per_forward"] else "-"
        k = r["num_draft"] if r["num_draft"] != 0 else "none"
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
        rows = sorted((r for r in results if r["batch"] == b and r["num_draft"] != "auto"), key=lambda r: r["num_draft"])
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
    from .loading import load

    for b in batch_sizes:
        check_batch_size(b, "batch size sweep")
    for k in draft_lengths:
        check_num_draft(k, "draft length")
    pair = load(model, drafter)
    prompts = [format_prompt(pair.tokenizer, t, raw=True) for t in (texts or DEFAULT_PROMPTS)]
    policy = DraftPolicy(prior=load_policy_prior(pair))
    results = sweep(pair, prompts, batch_sizes=batch_sizes, draft_lengths=draft_lengths, max_tokens=max_tokens,
                    runs=runs, warmup=warmup, policy=policy,
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
    echo(f"fastest fixed K per batch size: {report['recommendation']}")
    echo(f"wrote {outdir}/tuning.txt, tuning.csv, tuning.json" + (", tuning.png" if plotted else
         " (no PNG: pip install 'mtp-mlx[tune]' for matplotlib)"))
    if save:
        save_policy_prior(pair, policy.state())
        echo(f"saved the measured round costs and acceptance to {tuning_file()}: mtp-mlx generate and serve "
             "start their draft-length choice from them for this pair")
    return report

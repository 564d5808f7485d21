"""Load-time checks that speculation is safe on this device, and ``mtp-mlx check``.

Two hazards are device-specific, so they are checked where the code runs, not in CI:

* Wide-verify exactness. Greedy speculative output equals the target's own greedy output only
  if a verify forward over K+1 tokens computes, for each position, exactly the bits that K+1
  one-token decode steps compute. Some backends pick different kernels for several rows
  (MLX's quantized matmul switches to ``qmv_wide`` for two or more rows on recent Apple GPUs),
  which round differently. ``wide_verify_exact`` compares the two bit for bit on a few random
  inputs; ``speculation_gate`` turns that into the engine's decision and its one-line reason.
* The Metal verify-attention kernel. Apple's compiler or the device may reject it or compute
  something else; ``kernel_self_test`` compiles it and compares it with the reference on small
  inputs before first use, so a failure becomes a one-line fallback instead of a crash.

``run_checks`` gathers both (plus MLX version, device and optional stored costs) for the
``check`` command; ``format_report`` prints it.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .errors import MtpError
from .limits import MAX_DRAFT
from .ops.matmul import shard_matmuls, threads

# Draft lengths the exactness check verifies, one per input: the widest verify the engine
# runs, a middle one, and the narrowest (two rows, the smallest "wide" matmul).
CHECK_DRAFTS = (MAX_DRAFT, 3, 1)
CHECK_PREFILL = 12
VARIANTS = ("float32", "float16", "bfloat16", "q8", "q4")
_BITS_VIEW = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}


@dataclass
class CheckResult:
    """One check: ``status`` is "pass", "fail" or "n/a"; ``message`` is one line."""

    name: str
    status: str
    message: str
    details: Dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """False only for a check that ran and failed."""
        return self.status != "fail"


# ---- wide-verify exactness ---------------------------------------------------------------------

def _bits(x: mx.array) -> np.ndarray:
    """The raw bits of a floating-point array (bfloat16 has no numpy type)."""
    return np.array(x.view(_BITS_VIEW[x.dtype.size]))


def _max_abs_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def describe_target(target) -> str:
    """"float16", "bfloat16 q4 (group 64)" ...: the target's weight dtype and quantization."""
    dtype = str(target.embed_tokens.scales.dtype if hasattr(target.embed_tokens, "scales")
                else target.embed_tokens.weight.dtype).replace("mlx.core.", "")
    quantized = [m for _, m in target.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")]
    if not quantized:
        return dtype
    bits = sorted({m.bits for m in quantized})
    groups = sorted({m.group_size for m in quantized})
    return f"{dtype} q{'/'.join(map(str, bits))} (group {'/'.join(map(str, groups))})"


def wide_verify_exact(
    target,
    *,
    label: Optional[str] = None,
    drafts: Sequence[int] = CHECK_DRAFTS,
    prefill: int = CHECK_PREFILL,
    seed: int = 0,
    batch: int = 1,
    attn_backend: str = "auto",
    forward: Optional[Callable] = None,
) -> CheckResult:
    """Compare a (K+1)-token verify forward with K+1 one-token forwards, bit for bit.

    Prefill ``prefill`` random tokens once. Then for each K in ``drafts`` (its own K+1 random
    tokens), run them as one forward on one copy of that cache and as K+1 single-token forwards
    on another; the logits and final hidden states must be equal in every bit. (At real model
    size on a CPU a forward costs about a second: one shared prefill instead of two per K keeps
    this start-up check short.)

    Args:
        target: the target model (``target(ids, cache, attn_backend=...)``, ``target.make_cache()``).
        label: what to call this target in the message (default: its dtype and quantization).
        batch: rows per forward (a batched verify against batched one-token steps).
        forward: ``forward(ids, cache)`` returning an object with ``logits`` and ``hidden``;
            default the target's own forward with ``attn_backend`` (tests inject others).

    Returns:
        CheckResult "pass" or "fail"; details: per K the max |diff| of logits and hidden.
    """
    label = label or describe_target(target)
    if forward is None:
        def forward(ids, cache):
            return target(ids, cache, attn_backend=attn_backend)
    vocab = target.cfg.vocab_size
    rng = np.random.default_rng(seed)
    rows: List[Dict] = []
    base = target.make_cache()
    # the whole forward is evaluated: a target split across processes must run every collective
    mx.eval(forward(mx.array(rng.integers(0, vocab, size=(batch, prefill)), dtype=mx.int32), base).logits)
    every_row = range(batch)
    for k in drafts:
        ids = mx.array(rng.integers(0, vocab, size=(batch, k + 1)), dtype=mx.int32)
        wide_cache, step_cache = base.copy_rows(every_row), base.copy_rows(every_row)
        wide = forward(ids, wide_cache)
        steps = [forward(ids[:, i: i + 1], step_cache) for i in range(k + 1)]
        logits = mx.concatenate([s.logits for s in steps], axis=1)
        hidden = mx.concatenate([s.hidden for s in steps], axis=1)
        mx.eval(wide.logits, wide.hidden, logits, hidden)
        rows.append({
            "k": k,
            "bit_equal": bool(np.array_equal(_bits(wide.logits), _bits(logits))
                              and np.array_equal(_bits(wide.hidden), _bits(hidden))),
            "max_abs_logits": _max_abs_diff(wide.logits, logits),
            "max_abs_hidden": _max_abs_diff(wide.hidden, hidden),
        })
    exact = all(r["bit_equal"] for r in rows)
    worst = max(r["max_abs_logits"] for r in rows)
    widths = "/".join(str(r["k"] + 1) for r in rows)
    if exact:
        message = f"{label}: {widths}-token verify forwards equal one-token steps bit for bit"
    else:
        bad = ", ".join(f"{r['k'] + 1}-wide" for r in rows if not r["bit_equal"])
        message = f"{label}: {bad} verify differs from one-token steps (max |logit diff| {worst:.3g})"
    return CheckResult("wide-verify", "pass" if exact else "fail", message,
                       {"target": label, "attn_backend": attn_backend, "batch": batch, "inputs": rows})


def speculation_gate(pair, *, attn_backend: str = "auto", forward: Optional[Callable] = None) -> Tuple[bool, str]:
    """The engine's load-time decision: (exact, one line to show).

    Exact: speculation is on. Not exact: greedy speculation must be declined (its output would
    differ from the target alone), and the line says so; sampled requests stay lossless in
    distribution either way.
    """
    result = wide_verify_exact(pair.target, attn_backend=attn_backend, forward=forward)
    return result.ok, gate_line(result.ok, result.message)


def gate_line(exact: bool, message: str, stored: Optional[str] = None) -> str:
    """The engine's one line for a verdict; ``stored``: when it was stored, for a verdict taken
    from the tuning store instead of checked now."""
    if exact:
        return f"exactness check passed ({f'stored {stored}: ' if stored else ''}{message})"
    source = f" (stored {stored}; `mtp-mlx check` checks again)" if stored else ""
    return (f"greedy speculation declined{source}: {message} on this device, so drafted output "
            "could differ from the target alone; decoding greedy requests without the drafter")


def stored_speculation_gate(target, target_path, *, attn_backend: str = "auto") -> Tuple[bool, str]:
    """``speculation_gate`` for a target loaded from ``target_path``, remembered in the tuning
    store (``tuning.exactness_key``: machine, MLX, device, checkpoint files, dtype, backend,
    our code). A stored verdict is used as is, and its line says so; otherwise the check runs
    and its verdict, pass or fail, is stored. An unreadable store or a failed write only means
    the check runs."""
    from . import tuning

    entry = tuning.load_exactness(target, target_path, attn_backend)
    if entry is not None:
        return entry["exact"], gate_line(entry["exact"], entry["message"], stored=entry["stored"])
    result = wide_verify_exact(target, attn_backend=attn_backend)
    tuning.save_exactness(target, target_path, attn_backend, result.ok, result.message)
    return result.ok, gate_line(result.ok, result.message)


# ---- the Metal kernel ---------------------------------------------------------------------------

# Small cases for the self-test: (dtype, batch, query heads, kv heads, queries, keys, head size, window)
KERNEL_CASES = (
    (mx.float32, 1, 4, 1, 1, 17, 64, 0),
    (mx.float32, 2, 8, 2, 9, 40, 128, 16),
    (mx.float16, 2, 4, 2, 9, 33, 256, 0),
    (mx.bfloat16, 3, 8, 1, 5, 70, 64, 32),
    (mx.float16, 1, 2, 2, 3, 12, 512, 0),
)
# (atol, rtol) per dtype: the kernel accumulates in float32 in another order than the reference
KERNEL_TOLERANCES = {mx.float32: (1e-4, 1e-4), mx.float16: (5e-3, 5e-3), mx.bfloat16: (4e-2, 2e-2)}


def _kernel_case(dtype, batch, n_heads, n_kv, n_q, n_k, head_dim, seed):
    keys = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((batch, n_heads, n_q, head_dim), key=keys[0]).astype(dtype)
    k = mx.random.normal((batch, n_kv, n_k, head_dim), key=keys[1]).astype(dtype)
    v = mx.random.normal((batch, n_kv, n_k, head_dim), key=keys[2]).astype(dtype)
    # ragged rows: row b holds n_k - 2b tokens, the rest of its slots empty (-1)
    k_pos = np.full((batch, n_k), -1, dtype=np.int32)
    q_pos = np.zeros((batch, n_q), dtype=np.int32)
    for b in range(batch):
        held = n_k - 2 * b
        k_pos[b, :held] = np.arange(held)
        q_pos[b] = np.arange(held - n_q, held)
    return q, k, v, mx.array(q_pos), mx.array(k_pos)


def kernel_self_test(*, metal_available: Optional[bool] = None, kernel: Optional[Callable] = None) -> CheckResult:
    """Compile the Metal verify-attention kernel and compare it with the reference.

    Off Metal: "n/a". On Metal: "pass", or "fail" with one line when compiling, launching or
    any comparison goes wrong (the caller then uses the reference). ``kernel``: the function to
    test (default ``attention_metal``; tests inject broken ones).
    """
    from .ops.attention import attention_metal, attention_ref

    if metal_available is None:
        metal_available = mx.metal.is_available()
    if not metal_available:
        return CheckResult("kernel", "n/a", "Metal verify-attention kernel: not applicable (no Metal)")
    kernel = kernel or attention_metal
    worst: Dict[str, float] = {}
    for i, (dtype, batch, n_heads, n_kv, n_q, n_k, head_dim, window) in enumerate(KERNEL_CASES):
        name = f"{str(dtype).replace('mlx.core.', '')} B={batch} heads={n_heads}/{n_kv} Lq={n_q} Lk={n_k} D={head_dim}"
        try:
            q, k, v, q_pos, k_pos = _kernel_case(dtype, batch, n_heads, n_kv, n_q, n_k, head_dim, i)
            got = kernel(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, scale=head_dim**-0.5)
            want = attention_ref(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, scale=head_dim**-0.5)
            mx.eval(got, want)
        except Exception as err:  # compiler or launch failure: report it, the caller falls back
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return CheckResult("kernel", "fail",
                               f"Metal verify-attention kernel failed ({name}): {type(err).__name__}: {first}"[:300],
                               {"case": name})
        atol, rtol = KERNEL_TOLERANCES[dtype]
        g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
        excess = np.abs(g - w) - (atol + rtol * np.abs(w))
        worst[name] = float(np.abs(g - w).max())
        if not np.all(np.isfinite(g)) or excess.max() > 0:
            return CheckResult("kernel", "fail",
                               f"Metal verify-attention kernel differs from the reference ({name}): "
                               f"max |diff| {worst[name]:.3g}", {"case": name, "max_abs": worst})
    return CheckResult("kernel", "pass", f"Metal verify-attention kernel matches the reference on "
                       f"{len(KERNEL_CASES)} cases (max |diff| {max(worst.values()):.3g})", {"max_abs": worst})


# ---- variants and the report ----------------------------------------------------------------------

def load_variant(target_path, variant: str, *, base: str = "bfloat16"):
    """The target at ``target_path`` cast to a dtype ("float32", "float16", "bfloat16"), or cast
    to ``base`` and quantized ("q8", "q4": group size 64, as ``mtp-mlx convert -q`` does from
    its default bfloat16)."""
    from .loading.convert import _quantize
    from .loading.weights import load_target

    if variant not in VARIANTS:
        raise MtpError(f"unknown check variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if variant.startswith("q"):
        model, cfg = load_target(target_path, base)
        if cfg.quantization:
            raise MtpError(f"{target_path} is already quantized: check its {variant} variant from the float original")
        _quantize(model, int(variant[1:]), 64, router=cfg.text.enable_moe_block)
        mx.eval(model.parameters())
    else:
        model, _ = load_target(target_path, variant)
    shard_matmuls(model)  # checked as it runs when loaded (split products are bit-identical)
    return model


def device_line() -> str:
    """MLX's default device, plus the chip where MLX can tell it."""
    device = str(mx.default_device())
    if mx.metal.is_available():
        try:
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            device += f" ({info.get('device_name', 'Apple GPU')})"
        except Exception:  # device_info is informational only
            pass
    return f"{device} on {platform.system()} {platform.machine()}"


def run_checks(
    pair,
    *,
    variants: Sequence[str] = (),
    attn_backend: str = "auto",
    costs: Optional[dict] = None,
) -> dict:
    """Everything ``mtp-mlx check`` reports, as a JSON-ready dict: MLX version and device, the
    kernel self-test, wide-verify exactness of the loaded target and of each of ``variants``
    (see ``load_variant``), and ``costs`` (the stored draft-policy state, if any).

    The loaded target is always checked afresh, and its verdict replaces the stored one that
    engine start-ups reuse (``stored_speculation_gate``)."""
    from . import tuning

    kernel = kernel_self_test()
    backend = attn_backend if kernel.ok else "reference"
    exactness = [wide_verify_exact(pair.target, label=f"loaded ({describe_target(pair.target)})",
                                   attn_backend=backend)]
    # always checked afresh above; the verdict replaces the one engine start-ups reuse
    stored = tuning.save_exactness(pair.target, pair.target_path, backend, exactness[0].ok, exactness[0].message)
    for v in variants:
        exactness.append(wide_verify_exact(load_variant(pair.target_path, v), label=v, attn_backend=backend))
    return {
        "mlx_version": mx.__version__,
        "device": device_line(),
        "matmul_threads": threads(pair.target),
        "metal": bool(mx.metal.is_available()),
        "kernel": asdict(kernel),
        "attn_backend": backend,
        "exactness": [asdict(r) for r in exactness],
        "exactness_stored": str(tuning.tuning_file()) if stored else None,
        "costs": costs,
    }


def _status(status: str) -> str:
    return {"pass": "ok  ", "fail": "FAIL", "n/a": "n/a "}[status]


def format_report(report: dict) -> str:
    """The report as lines of text, one per finding."""
    n = report.get("matmul_threads", 1)
    lines = [f"MLX {report['mlx_version']}, device {report['device']}"
             + (f", large products split across {n} CPU threads" if n > 1 else ""),
             f"[{_status(report['kernel']['status'])}] {report['kernel']['message']}"]
    for r in report["exactness"]:
        lines.append(f"[{_status(r['status'])}] wide verify, {r['message']}")
    exact = all(r["status"] != "fail" for r in report["exactness"][:1])
    lines.append("speculation: " + ("on (greedy output equals the target alone)" if exact else
                                    "greedy speculation declined on this device for the loaded target"))
    if report.get("exactness_stored"):
        lines.append(f"stored this verdict in {report['exactness_stored']}: engine start-ups reuse it")
    costs = report.get("costs")
    if not costs:
        lines.append("stored costs: none (they are measured while decoding)")
    else:
        lines.append("stored round costs (ms) per batch bucket and K:")
        for bucket, ks in sorted(costs.get("costs", {}).items(), key=lambda kv: int(kv[0])):
            cells = ", ".join(f"K={k} {1000 * est:.1f}" for k, (est, _) in sorted(ks.items(), key=lambda kv: int(kv[0])))
            lines.append(f"  batch <= {bucket}: {cells}")
        acc = [h / t for h, t, _ in costs.get("acceptance", []) if t > 0]
        if acc:
            lines.append("  acceptance per draft position: " + ", ".join(f"{a:.2f}" for a in acc))
    return "\n".join(lines)


def check(
    model: Optional[str] = None,
    drafter: Optional[str] = None,
    variants: Optional[List[str]] = None,
    attention: str = "auto",
    as_json: bool = False,
    costs: Optional[dict] = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """What ``mtp-mlx check`` runs: load the pair (default the bundled demo pair, checked in
    every variant), run the checks, print the report (or JSON). Returns the report.

    Typer wiring (in cli.py): ``--model``, ``--drafter``, ``--variant`` (repeatable, choices
    ``VARIANTS``), ``--attention``, ``--json``; ``costs`` is the stored policy state for the pair.
    """
    import json

    from . import demo
    from .loading import load

    for v in variants or ():
        if v not in VARIANTS:
            raise MtpError(f"unknown check variant {v!r}: use one of {', '.join(VARIANTS)}")
    if model is None:
        if not demo.available():
            raise MtpError("no --model given and the bundled demo pair is not installed: pass --model")
        model, drafter = str(demo.DEMO_TARGET), str(demo.DEMO_DRAFTER)
        variants = list(VARIANTS) if variants is None else variants
    pair = load(model, drafter)
    report = run_checks(pair, variants=variants or (), attn_backend=attention, costs=costs)
    echo(json.dumps(report, indent=2) if as_json else format_report(report))
    return report


__all__ = ["CHECK_DRAFTS", "CheckResult", "VARIANTS", "check", "describe_target", "format_report",
           "gate_line", "kernel_self_test", "load_variant", "run_checks", "speculation_gate",
           "stored_speculation_gate", "wide_verify_exact"]

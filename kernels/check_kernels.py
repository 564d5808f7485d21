#!/usr/bin/env python3
"""CPU checker for kernels/verify_attention.metal (`make check-kernels`).

No Apple GPU is in reach, so the Metal source is proven here instead: the kernel body and
header are wrapped exactly the way ``mx.fast.metal_kernel`` wraps them (kernels/shim/
mlx_signature.py, with the names, template arguments, grid and threadgroup that
mtp_mlx/ops/attention.py passes), compiled with g++ against kernels/shim/metal_shim.h
(the Metal subset: address spaces, half/bfloat, threadgroup memory, barriers, SIMD-group
functions) and run on the CPU with every GPU thread a fiber, so barriers and SIMD-group
reductions really synchronise. Outputs are compared with ``attention_ref`` on random
inputs over a sampled grid: batch 1-8, K 0-8 draft tokens (Lq = K+1), head sizes 64/256/512,
GQA ratios 1-16, float32/float16/bfloat16, full attention, sliding windows with contexts shorter
than the window, and ring buffers wrapped around it (slots permuted, empty slots at -1).
Some cases run twice under different thread schedules and must agree bit for bit.

Usage: python kernels/check_kernels.py [--quick] [--jobs N] [--seed S] [--body F] [--header F]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "shim"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx.core as mx
import mlx_signature as sig

import mtp_mlx.ops  # noqa: F401

va = sys.modules["mtp_mlx.ops.attention"]

SHIM_HEADER = HERE / "shim" / "metal_shim.h"
DEFAULT_BUILD_DIR = HERE / ".build"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++20", "-O2", "-Wall", "-Wno-attributes", "-Wno-unused-variable",
            "-Wno-unused-but-set-variable", "-Wno-unknown-pragmas"]

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Two bounds per dtype, (atol, rtol), both must hold on every row that sees a key:
# against attention_ref, which is itself rounded (MLX's CPU attention in half/bfloat is
# off by a few output ULPs), and against float64 attention on the same rounded inputs, where the
# kernel (float softmax and accumulation, one final rounding) must stay within one output ULP.
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (5e-3, 5e-3), "bfloat16": (4e-2, 2e-2)}
TOLERANCES_F64 = {"float32": (1e-5, 1e-5), "float16": (1e-4, 2.0**-10), "bfloat16": (1e-3, 2.0**-7)}
POLICIES = ("forward", "reverse", "random")
CONTEXTS = ("full", "short", "wrapped")


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CaseSpec:
    batch: int
    n_q: int  # Lq = K + 1 (1: one decode step)
    head_dim: int
    gqa: int  # nH / nKV
    context: str  # full | short | wrapped | padded
    dtype: str
    n_kv: int = 1
    window: int = 0  # chosen by make_inputs when 0 and the context needs one
    scale_mode: str = "one"  # one | rsqrt
    policy: str = "forward"
    seed: int = 0
    recheck_policy: str | None = None  # run again under this schedule; outputs must be identical

    @property
    def label(self) -> str:
        return (f"B{self.batch} Lq{self.n_q} D{self.head_dim} G{self.gqa} kv{self.n_kv} {self.context:7s} "
                f"{self.dtype:8s} {self.policy}")


def sample_cases(quick: bool = False, seed: int = 0) -> list[CaseSpec]:
    """All pairs of (batch, Lq, head size, GQA ratio, context, dtype) values, greedily covered.

    quick: a handful of cheap cases that still touch every head size, dtype and context.
    """
    rng = np.random.default_rng(seed)
    if quick:
        base = [
            CaseSpec(2, 5, 256, 4, "wrapped", "bfloat16", n_kv=1),
            CaseSpec(1, 1, 512, 2, "full", "float32", n_kv=2, scale_mode="rsqrt"),
            CaseSpec(3, 3, 64, 16, "short", "float16", n_kv=1),
            CaseSpec(2, 9, 64, 1, "wrapped", "float32", n_kv=2),
            CaseSpec(2, 4, 64, 2, "padded", "bfloat16", n_kv=1),
        ]
        return [dataclasses.replace(c, policy=POLICIES[i % 3], seed=int(rng.integers(1 << 30)),
                                    recheck_policy="random" if i == 0 else None)
                for i, c in enumerate(base)]

    factors = {
        "batch": list(range(1, 9)),
        "n_q": list(range(1, 10)),
        "head_dim": [256, 512],
        "gqa": [1, 2, 4, 8, 16],
        "context": list(CONTEXTS),
        "dtype": list(DTYPES),
    }
    names = list(factors)
    uncovered = {((a, va_), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va_ in factors[a] for vb in factors[b]}

    def pairs(c):
        return {((a, c[a]), (b, c[b])) for a, b in itertools.combinations(names, 2)}

    def cost(c):  # rough shim work: threads x keys; prefer cheap candidates among equals
        return c["batch"] * c["gqa"] * c["n_q"]

    chosen = []
    while uncovered:
        best, best_score = None, (-1, 0)
        for _ in range(60):
            cand = {k: v[int(rng.integers(len(v)))] for k, v in factors.items()}
            # seed the candidate with an uncovered pair so every round makes progress
            (fa, xa), (fb, xb) = sorted(uncovered)[int(rng.integers(len(uncovered)))]
            cand[fa], cand[fb] = xa, xb
            score = (len(pairs(cand) & uncovered), -cost(cand))
            if score > best_score:
                best, best_score = cand, score
        uncovered -= pairs(best)
        chosen.append(best)

    cases = []
    for i, c in enumerate(chosen):
        cases.append(CaseSpec(
            **c,
            n_kv=1 + int(rng.integers(2)) if c["gqa"] <= 4 else 1,
            scale_mode="rsqrt" if i % 4 == 3 else "one",
            policy=POLICIES[i % 3],
            seed=int(rng.integers(1 << 30)),
            recheck_policy=POLICIES[(i + 2) % 3] if i % 5 == 0 else None,
        ))
    # Fixed cases: small head sizes (the tiny test models), Gemma-4-like geometry with a real
    # window, padded query rows, and the largest grid point in float32.
    cases += [
        CaseSpec(2, 5, 64, 2, "wrapped", "float32", n_kv=2, seed=7, policy="reverse"),
        CaseSpec(3, 9, 64, 4, "full", "bfloat16", n_kv=1, seed=8, policy="random"),
        CaseSpec(1, 1, 128, 8, "short", "float16", n_kv=1, seed=9, policy="forward"),
        CaseSpec(2, 3, 128, 1, "padded", "float32", n_kv=2, seed=10, policy="random"),
        CaseSpec(1, 5, 256, 2, "wrapped", "bfloat16", n_kv=4, window=512, seed=11, policy="random",
                 recheck_policy="forward"),
        CaseSpec(2, 9, 512, 8, "full", "bfloat16", n_kv=1, seed=12, policy="forward"),
        CaseSpec(4, 3, 256, 4, "padded", "float16", n_kv=2, seed=13, policy="reverse"),
        CaseSpec(3, 7, 512, 2, "padded", "bfloat16", n_kv=2, seed=16, policy="random"),
        CaseSpec(8, 9, 512, 16, "wrapped", "float32", n_kv=1, seed=14, policy="random"),
        CaseSpec(3, 2, 32, 3, "wrapped", "float32", n_kv=2, seed=15, policy="forward"),
    ]
    return cases


def make_inputs(spec: CaseSpec) -> dict:
    """Random q/k/v and positions for one case (numpy float32 / int32), plus the window."""
    rng = np.random.default_rng(spec.seed)
    B, Lq, D = spec.batch, spec.n_q, spec.head_dim
    window = spec.window
    if spec.context in ("full", "padded"):
        window = 0
        lens = rng.integers(Lq, Lq + 60, size=B)  # tokens in cache, the verify chunk included
        cap = int(lens.max()) + int(rng.integers(0, 9))  # trailing empty slots
        k_pos = np.full((B, cap), -1, np.int32)
        for b in range(B):
            k_pos[b, : lens[b]] = np.arange(lens[b])
    else:
        if not window:
            window = int(rng.choice([8, 16, 24, 40]))
        cap = window + Lq - 1 + int(rng.integers(0, 5))  # ring: window + chunk (+ slack)
        if spec.context == "short":
            window = max(window, cap)  # every context is shorter than the window
            lens = rng.integers(Lq, cap + 1, size=B)
        else:
            lens = rng.integers(cap + 1, 4 * cap + 2, size=B)  # wrapped at least once
            if B > 1:
                lens[0] = int(rng.integers(Lq, cap + 1))  # a ragged row that has not wrapped
        k_pos = np.full((B, cap), -1, np.int32)
        for b in range(B):
            for p in range(max(0, lens[b] - cap), lens[b]):
                k_pos[b, p % cap] = p
    q_pos = np.stack([np.arange(lens[b] - Lq, lens[b]) for b in range(B)]).astype(np.int32)
    if spec.context == "padded":  # padding queries: position -1, they see no key
        for b in range(B):
            n_pad = int(rng.integers(0, Lq))
            if n_pad:
                q_pos[b, Lq - n_pad:] = -1
    Lk = k_pos.shape[1]
    nH = spec.gqa * spec.n_kv
    scale = 1.0 if spec.scale_mode == "one" else 1.0 / math.sqrt(D)
    q_std = 2.5 / math.sqrt(D) / scale  # scores of order a few units
    q = (rng.standard_normal((B, nH, Lq, D)) * q_std).astype(np.float32)
    k = rng.standard_normal((B, spec.n_kv, Lk, D)).astype(np.float32)
    v = rng.standard_normal((B, spec.n_kv, Lk, D)).astype(np.float32)
    return {"q": q, "k": k, "v": v, "q_pos": q_pos, "k_pos": k_pos, "window": window, "scale": scale}


def visible(q_pos, k_pos, window):
    qp = q_pos[:, None, :, None].astype(np.int64)
    kp = k_pos[:, None, None, :].astype(np.int64)
    m = (kp >= 0) & (kp <= qp)
    if window:
        m &= qp - kp < window
    return m  # [B, 1, Lq, Lk]


def truth_f64(q, k, v, q_pos, k_pos, window, scale):
    """Float64 attention on the already-rounded inputs (for the error report)."""
    G = q.shape[1] // k.shape[1]
    kk = np.repeat(k.astype(np.float64), G, axis=1)
    vv = np.repeat(v.astype(np.float64), G, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), kk) * scale
    m = visible(q_pos, k_pos, window)
    s = np.where(m, s, -np.inf)
    mx_ = np.max(s, axis=-1, keepdims=True)
    mx_ = np.where(np.isfinite(mx_), mx_, 0.0)
    p = np.where(m, np.exp(s - mx_), 0.0)
    den = p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p / np.where(den > 0, den, 1.0), vv)


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

def strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", src)


def lint(body: str, header: str) -> list[str]:
    """Constructs outside what the shim models (see metal_shim.h), as messages."""
    problems = []
    b, h = strip_comments(body), strip_comments(header)
    for where, src in (("body", b), ("header", h)):
        if re.search(r"\bthreadgroup\s+[\w:<>\s]+?[*&]", src):
            problems.append(f"{where}: threadgroup pointer or reference (the shim models threadgroup arrays only)")
        if re.search(r"#\s*include", src):
            problems.append(f"{where}: #include (MLX's preamble already includes metal_stdlib)")
    if re.search(r"\bthreadgroup\b", h):
        problems.append("header: threadgroup variable outside the kernel body")
    if re.search(r"\b(device|constant)\s+[\w:<>\s]+?[*&]", b):
        problems.append("body: typed pointer into a buffer; index the inputs directly (MLX declares inputs "
                        "with fewer than 8 elements in `constant`, others in `device`)")
    return problems


def array_info(a: mx.array) -> sig.ArrayInfo:
    return sig.ArrayInfo(dtype=sig.dtype_name(a.dtype), ndim=a.ndim, size=a.size)


_kernels: dict = {}


def _kernel_object(body: str, header: str):
    key = (body, header)
    if key not in _kernels:
        _kernels[key] = mx.fast.metal_kernel(name=va.KERNEL_NAME, input_names=list(va.KERNEL_INPUT_NAMES),
                                             output_names=list(va.KERNEL_OUTPUT_NAMES), source=body, header=header)
    return _kernels[key]


def mlx_generated_source(body: str, header: str, inputs: list[mx.array], launch) -> str | None:
    """The exact source MLX generates for this call, or None if this MLX does not show it.

    MLX prints it (C++ stdout) when called with verbose=True; without Metal it still builds it
    while mx.export_function traces the call. Not thread-safe (redirects file descriptor 1).
    """
    kernel = _kernel_object(body, header)

    def call(*arrays):
        return kernel(inputs=list(arrays), template=list(launch.template), grid=launch.grid,
                      threadgroup=launch.threadgroup, output_shapes=[launch.output_shape],
                      output_dtypes=[launch.output_dtype], verbose=True)

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryDirectory(prefix="mtp-export-") as tmp, open(Path(tmp) / "stdout", "w+b") as cap:
        os.dup2(cap.fileno(), 1)
        try:
            if mx.metal.is_available():
                mx.eval(call(*inputs))
            else:
                mx.export_function(str(Path(tmp) / "f.mlxfn"), call, *inputs)
        except (RuntimeError, ValueError):
            pass  # MLX refuses after printing (or without printing: then the renderer is used)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        cap.seek(0)
        text = cap.read().decode()
    m = re.search(r"Generated source code for `[^`]*`:\n```\n(.*)\n```\n", text, flags=re.DOTALL)
    return m.group(1) if m else None


def rendered_source(body: str, header: str, inputs: list[mx.array], launch) -> str:
    return sig.render(name=va.KERNEL_NAME, input_names=va.KERNEL_INPUT_NAMES, inputs=[array_info(a) for a in inputs],
                      output_names=va.KERNEL_OUTPUT_NAMES, output_dtypes=[launch.output_dtype], source=body,
                      header=header, template=launch.template)


def translation_unit(body: str, header: str, inputs: list[mx.array], launch, prefer_mlx: bool = True) -> tuple[str, str]:
    """(C++ translation unit, "mlx" | "rendered"): the shim, the kernel source, a main()."""
    src, origin = (mlx_generated_source(body, header, inputs, launch) if prefer_mlx else None), "mlx"
    if src is None:
        src, origin = rendered_source(body, header, inputs, launch), "rendered"
    main = sig.launcher(src, input_names=va.KERNEL_INPUT_NAMES, inputs=[array_info(a) for a in inputs],
                        output_names=va.KERNEL_OUTPUT_NAMES, output_dtypes=[launch.output_dtype])
    return '#include "metal_shim.h"\n' + src + main, origin


class Builder:
    """Compiles translation units once per distinct source (cached on disk by hash)."""

    def __init__(self, build_dir: Path):
        self.build_dir = build_dir
        self.shim_hash = hashlib.sha256(SHIM_HEADER.read_bytes()).hexdigest()
        self.compiles = 0
        self.compile_seconds = 0.0
        self._futures: dict[str, cf.Future] = {}
        self._pool = cf.ThreadPoolExecutor(max_workers=2)

    def binary(self, tu: str) -> cf.Future:
        key = hashlib.sha256((self.shim_hash + " ".join(CXXFLAGS) + CXX + tu).encode()).hexdigest()[:20]
        if key not in self._futures:
            self._futures[key] = self._pool.submit(self._build, key, tu)
        return self._futures[key]

    def _build(self, key: str, tu: str) -> Path:
        out = self.build_dir / key
        exe = out / "check"
        if exe.is_file():
            return exe
        out.mkdir(parents=True, exist_ok=True)
        src = out / f"kernel.{os.getpid()}.cpp"
        src.write_text(tu)
        t0 = time.time()
        tmp = out / f"check.tmp{os.getpid()}"
        proc = subprocess.run([CXX, *CXXFLAGS, "-I", str(SHIM_HEADER.parent), str(src), "-o", str(tmp)],
                              check=False, capture_output=True, text=True)
        self.compile_seconds += time.time() - t0
        self.compiles += 1
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src} failed:\n{proc.stderr[-4000:]}")
        if proc.stderr.strip():
            (out / "warnings.txt").write_text(proc.stderr)
        os.replace(src, out / "kernel.cpp")
        os.replace(tmp, exe)
        return exe


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------

def raw_bytes(a: mx.array) -> bytes:
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a)).tobytes()


def case_bytes(inputs: list[mx.array], launch, policy: str, seed: int) -> bytes:
    """A case file for the shim's main(): schedule, grid, threadgroup, input buffers, output sizes."""
    parts = [b"MTPK", np.array([POLICIES.index(policy), seed & 0xFFFFFFFF, *launch.grid, *launch.threadgroup],
                               np.uint32).tobytes(), np.array([len(inputs)], np.uint32).tobytes()]
    for a in inputs:
        data = raw_bytes(a)
        parts += [np.array([sig.DTYPE_CODES[sig.dtype_name(a.dtype)], a.ndim], np.uint32).tobytes(),
                  np.array(a.shape, np.int32).tobytes(), np.array([len(data)], np.uint64).tobytes(), data]
    shape = launch.output_shape
    dname = sig.dtype_name(launch.output_dtype)
    itemsize = 4 if dname == "float32" else 2
    parts += [np.array([1], np.uint32).tobytes(),
              np.array([sig.DTYPE_CODES[dname], len(shape)], np.uint32).tobytes(),
              np.array(shape, np.int32).tobytes(), np.array([math.prod(shape) * itemsize], np.uint64).tobytes()]
    return b"".join(parts)


def read_output(path: Path, launch) -> np.ndarray:
    """The kernel's output as float32 (half and bfloat widened exactly)."""
    dname = sig.dtype_name(launch.output_dtype)
    raw = path.read_bytes()
    if dname == "float32":
        return np.frombuffer(raw, np.float32).reshape(launch.output_shape).copy()
    bits = np.frombuffer(raw, np.uint16).reshape(launch.output_shape)
    if dname == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclasses.dataclass
class Result:
    spec: CaseSpec
    ok: bool
    message: str
    max_err: float = float("nan")  # against attention_ref
    max_err_truth: float = float("nan")  # against float64 on the same inputs
    seconds: float = 0.0
    lk: int = 0
    window: int = 0
    grid: tuple = ()
    threadgroup: tuple = ()


def run_binary(exe: Path, case_file: Path, out_file: Path, timeout: float) -> tuple[int, str]:
    proc = subprocess.run([str(exe), str(case_file), str(out_file)], check=False, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, (proc.stderr or proc.stdout).strip()


@dataclasses.dataclass
class Prepared:
    spec: CaseSpec
    data: dict
    arrays: dict
    inputs: list
    launch: object
    binary: cf.Future | None
    origin: str
    problem: str | None = None


def prepare_case(spec: CaseSpec, builder: Builder, body: str, header: str, prefer_mlx: bool) -> Prepared:
    """Inputs, launch geometry and (asynchronously) the binary. Main thread only."""
    data = make_inputs(spec)
    dt = DTYPES[spec.dtype]
    arrays = {n: mx.array(data[n]).astype(dt) for n in ("q", "k", "v")}
    arrays["q_pos"], arrays["k_pos"] = mx.array(data["q_pos"]), mx.array(data["k_pos"])
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    reason = va.kernel_unsupported_reason(q, k, v, arrays["q_pos"], arrays["k_pos"])
    if reason:
        return Prepared(spec, data, arrays, [], None, None, "", problem=f"wrapper rejects the case: {reason}")
    launch = va.kernel_launch(q.shape, k.shape, q.dtype)
    window, scale = data["window"], data["scale"]
    inputs = va.kernel_inputs(q, k, v, q_pos=arrays["q_pos"], k_pos=arrays["k_pos"], window=window, scale=scale)
    mx.eval(inputs)
    tu, origin = translation_unit(body, header, inputs, launch, prefer_mlx)
    # Everything the worker threads need, as numpy (MLX streams belong to this thread).
    ref = va.attention_ref(q, k, v, q_pos=arrays["q_pos"], k_pos=arrays["k_pos"], window=window, scale=scale)
    data["ref"] = np.array(ref.astype(mx.float32))
    data["rounded"] = {n: np.array(arrays[n].astype(mx.float32)) for n in ("q", "k", "v")}
    data["case_bytes"] = {p: case_bytes(inputs, launch, p, spec.seed)
                          for p in filter(None, (spec.policy, spec.recheck_policy))}
    return Prepared(spec, data, arrays, inputs, launch, builder.binary(tu), origin)


def check_case(prep: Prepared, workdir: Path, timeout: float) -> Result:
    t0 = time.time()
    spec, data, launch = prep.spec, prep.data, prep.launch
    window, scale = data["window"], data["scale"]
    base = {"spec": spec, "lk": data["k"].shape[2], "window": window}
    if prep.problem:
        return Result(ok=False, message=prep.problem, **base)
    base.update(grid=launch.grid, threadgroup=launch.threadgroup)
    try:
        exe = prep.binary.result()
    except RuntimeError as err:
        return Result(ok=False, message=str(err), seconds=time.time() - t0, **base)

    outputs = {}
    for policy in filter(None, (spec.policy, spec.recheck_policy)):
        case_file = workdir / f"{spec.seed}_{policy}.case"
        out_file = workdir / f"{spec.seed}_{policy}.out"
        case_file.write_bytes(data["case_bytes"][policy])
        try:
            rc, msg = run_binary(exe, case_file, out_file, timeout)
        except subprocess.TimeoutExpired:
            return Result(ok=False, message=f"timed out after {timeout:.0f}s ({policy})",
                          seconds=time.time() - t0, **base)
        if rc != 0:
            return Result(ok=False, message=f"kernel run failed ({policy}, exit {rc}): {msg}",
                          seconds=time.time() - t0, **base)
        outputs[policy] = read_output(out_file, launch)
    got = outputs[spec.policy]
    if spec.recheck_policy and not np.array_equal(got.view(np.uint32), outputs[spec.recheck_policy].view(np.uint32)):
        return Result(ok=False, seconds=time.time() - t0, **base,
                      message=f"schedule-dependent output: {spec.policy} and {spec.recheck_policy} differ "
                              "(a data race between threads)")

    ref, rounded = data["ref"], data["rounded"]
    truth = truth_f64(rounded["q"], rounded["k"], rounded["v"], data["q_pos"], data["k_pos"], window, scale)
    seen = visible(data["q_pos"], data["k_pos"], window).any(-1)  # [B, 1, Lq]: rows with a key
    rows = np.broadcast_to(seen[..., None], got.shape)
    if not np.all(np.isfinite(got)):
        bad = np.argwhere(~np.isfinite(got))[0]
        return Result(ok=False, message=f"non-finite output at {tuple(bad)}", seconds=time.time() - t0, **base)
    err = np.where(rows, np.abs(got - ref), 0.0)
    err_truth = np.where(rows, np.abs(got - truth), 0.0)
    max_err, max_err_truth = float(err.max()), float(err_truth.max())
    msg, ok = "ok", True
    for what, e, want, (atol, rtol) in (("reference", err, ref, TOLERANCES[spec.dtype]),
                                        ("float64", err_truth, truth, TOLERANCES_F64[spec.dtype])):
        excess = e - (atol + rtol * np.abs(want))
        if (excess > 0).any():
            at = np.unravel_index(int(np.argmax(excess)), excess.shape)
            msg = (f"mismatch with {what} at [b={at[0]}, h={at[1]}, i={at[2]}, d={at[3]}]: kernel {got[at]:.6g}, "
                   f"{what} {want[at]:.6g} (atol {atol:g}, rtol {rtol:g})")
            ok = False
            break
    return Result(ok=ok, message=msg, max_err=max_err, max_err_truth=max_err_truth, seconds=time.time() - t0, **base)


def run_checks(cases: list[CaseSpec], *, body: str | None = None, header: str | None = None, jobs: int = 2,
               build_dir: Path = DEFAULT_BUILD_DIR, timeout: float = 300.0, verbose: bool = False,
               prefer_mlx_source: bool = True, stream=sys.stdout) -> tuple[list[Result], dict]:
    """Runs every case; returns the results and statistics. Lint problems fail every case."""
    default_body, default_header = va.kernel_source()
    body = default_body if body is None else body
    header = default_header if header is None else header
    problems = lint(body, header)
    if problems:
        return [Result(spec=c, ok=False, message="lint: " + "; ".join(problems)) for c in cases], {}
    builder = Builder(build_dir)
    results: list[Result] = []
    t0 = time.time()
    prepared = [prepare_case(c, builder, body, header, prefer_mlx_source) for c in cases]
    origins = sorted({p.origin for p in prepared if p.origin})
    with tempfile.TemporaryDirectory(prefix="mtp-check-") as tmp, cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(check_case, p, Path(tmp), timeout): p.spec for p in prepared}
        for fut in cf.as_completed(futures):
            try:
                r = fut.result()
            except Exception as err:  # noqa: BLE001 - a checker bug must not look like a pass
                r = Result(spec=futures[fut], ok=False, message=f"checker error: {err!r}")
            results.append(r)
            if verbose or not r.ok:
                status = "PASS" if r.ok else "FAIL"
                print(f"{status} {r.spec.label} Lk{r.lk:<4d} W{r.window:<4d} err {r.max_err:.2e} "
                      f"(f64 {r.max_err_truth:.2e}) "
                      f"{r.seconds:5.1f}s  {'' if r.ok else r.message}", file=stream, flush=True)
    builder._pool.shutdown()
    order = {c: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[r.spec])
    stats = {"compiles": builder.compiles, "compile_seconds": builder.compile_seconds,
             "seconds": time.time() - t0, "source": "+".join(origins)}
    return results, stats


def coverage_table(results: list[Result]) -> str:
    """Pass counts per value of every factor, and the D x GQA and context x dtype crosses."""
    lines = []

    def row(title, key, values):
        cells = []
        for val in values:
            sel = [r for r in results if key(r) == val]
            if sel:
                cells.append(f"{val}:{sum(r.ok for r in sel)}/{len(sel)}")
        lines.append(f"  {title:10s} " + "  ".join(cells))

    lines.append("coverage (value: passed/run)")
    row("batch", lambda r: r.spec.batch, range(1, 9))
    row("K (Lq-1)", lambda r: r.spec.n_q - 1, range(9))
    row("head dim", lambda r: r.spec.head_dim, sorted({r.spec.head_dim for r in results}))
    row("GQA", lambda r: r.spec.gqa, sorted({r.spec.gqa for r in results}))
    row("kv heads", lambda r: r.spec.n_kv, sorted({r.spec.n_kv for r in results}))
    row("context", lambda r: r.spec.context, [*CONTEXTS, "padded"])
    row("dtype", lambda r: r.spec.dtype, list(DTYPES))
    row("scale", lambda r: r.spec.scale_mode, ["one", "rsqrt"])
    row("schedule", lambda r: r.spec.policy, POLICIES)
    row("rechecked", lambda r: r.spec.recheck_policy is not None, [True])
    for title, fa, fb, va_, vb in (
        ("D x GQA", lambda r: r.spec.head_dim, lambda r: r.spec.gqa,
         sorted({r.spec.head_dim for r in results}), sorted({r.spec.gqa for r in results})),
        ("ctx x dtype", lambda r: r.spec.context, lambda r: r.spec.dtype, [*CONTEXTS, "padded"], list(DTYPES)),
    ):
        lines.append(f"  {title}: " + " ".join(f"{b:>9}" for b in vb))
        for a in va_:
            cells = []
            for b in vb:
                sel = [r for r in results if fa(r) == a and fb(r) == b]
                cells.append(f"{sum(r.ok for r in sel)}/{len(sel)}" if sel else "-")
            lines.append(f"  {a!s:>11}: " + " ".join(f"{c:>9}" for c in cells))
    errs, errs64 = defaultdict(float), defaultdict(float)
    for r in results:
        if r.ok:
            errs[r.spec.dtype] = max(errs[r.spec.dtype], r.max_err)
            errs64[r.spec.dtype] = max(errs64[r.spec.dtype], r.max_err_truth)
    lines.append("  max |kernel - reference| (|kernel - float64|) on passing cases: "
                 + ", ".join(f"{d} {errs[d]:.2e} ({errs64[d]:.2e})" for d in DTYPES if d in errs))
    lk = [r.lk for r in results if r.lk]
    if lk:
        lines.append(f"  key slots Lk: {min(lk)}..{max(lk)}; windows: "
                     + ", ".join(str(w) for w in sorted({r.window for r in results if r.window})))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a handful of cheap cases")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--body", type=Path, help="check this kernel body instead of kernels/verify_attention.metal")
    ap.add_argument("--header", type=Path, help="and this header instead of kernels/common.h")
    ap.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--rendered", action="store_true",
                    help="compile the checker's own rendering of MLX's wrapper instead of MLX's generated text")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case, not only failures")
    args = ap.parse_args(argv)
    if shutil.which(CXX) is None:
        print(f"check-kernels: C++ compiler {CXX!r} not found", file=sys.stderr)
        return 2
    cases = sample_cases(quick=args.quick, seed=args.seed)
    if args.list:
        for c in cases:
            print(c.label)
        return 0
    body = args.body.read_text() if args.body else None
    header = args.header.read_text() if args.header else None
    print(f"check-kernels: {len(cases)} cases, {args.jobs} jobs, compiler {CXX}", flush=True)
    results, stats = run_checks(cases, body=body, header=header, jobs=args.jobs, build_dir=args.build_dir,
                                verbose=args.verbose, prefer_mlx_source=not args.rendered)
    print(coverage_table(results))
    n_ok = sum(r.ok for r in results)
    if stats:
        print(f"  kernel source compiled: {'as generated by mx.fast.metal_kernel' if stats['source'] == 'mlx' else stats['source']}; "
              f"{stats['compiles']} compiles ({stats['compile_seconds']:.0f}s), wall {stats['seconds']:.0f}s")
    print(f"{n_ok} passed, {len(results) - n_ok} failed")
    return 0 if n_ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

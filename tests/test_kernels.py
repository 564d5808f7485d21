"""The fused verify-attention kernel: dispatch, launch geometry, and the CPU checker.

The checker (kernels/check_kernels.py, `make check-kernels` runs its full grid) compiles the
Metal source against a C++ shim and runs it with real threadgroup/SIMD-group semantics; here a
quick subset runs, plus deliberately broken kernel variants that the checker must reject.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mtp_mlx.ops  # noqa: F401
from mtp_mlx.errors import MtpError

va = sys.modules["mtp_mlx.ops.attention"]
ROOT = Path(__file__).resolve().parents[1]
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
off_metal = pytest.mark.skipif(mx.metal.is_available(), reason="checks the behaviour without Metal")


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_kernels", ROOT / "kernels" / "check_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def small_inputs(batch=2, n_heads=4, n_kv=2, n_q=3, n_k=10, head_dim=64, dtype=mx.float32):
    q = mx.random.normal((batch, n_heads, n_q, head_dim), key=mx.random.key(0)).astype(dtype)
    k = mx.random.normal((batch, n_kv, n_k, head_dim), key=mx.random.key(1)).astype(dtype)
    v = mx.random.normal((batch, n_kv, n_k, head_dim), key=mx.random.key(2)).astype(dtype)
    q_pos = mx.broadcast_to(mx.arange(n_k - n_q, n_k, dtype=mx.int32), (batch, n_q))
    k_pos = mx.broadcast_to(mx.arange(n_k, dtype=mx.int32), (batch, n_k))
    return q, k, v, q_pos, k_pos


# --- dispatch -----------------------------------------------------------------------------------

@off_metal
def test_auto_dispatch_takes_the_reference_off_metal():
    q, k, v, q_pos, k_pos = small_inputs()
    for name in ("auto", "reference"):
        got = va.attention(q, k, v, q_pos=q_pos, k_pos=k_pos, window=4, scale=0.125, backend=name)
        want = va.attention_ref(q, k, v, q_pos=q_pos, k_pos=k_pos, window=4, scale=0.125)
        assert mx.array_equal(got, want)


@off_metal
def test_forcing_metal_off_metal_raises():
    q, k, v, q_pos, k_pos = small_inputs()
    with pytest.raises(MtpError, match="needs Metal"):
        va.attention(q, k, v, q_pos=q_pos, k_pos=k_pos, backend="metal")
    with pytest.raises(MtpError, match="needs Metal"):
        va.attention_metal(q, k, v, q_pos=q_pos, k_pos=k_pos)
    # "reference" is the reference whatever the machine
    got = va.attention(q, k, v, q_pos=q_pos, k_pos=k_pos, backend="reference")
    assert mx.array_equal(got, va.attention_ref(q, k, v, q_pos=q_pos, k_pos=k_pos))


def test_unknown_backend_is_rejected():
    with pytest.raises(MtpError, match="unknown attention backend"):
        va.check_backend("cuda")
    assert va.check_backend("reference") == "reference"


def test_supported_shapes():
    q, k, v, q_pos, k_pos = small_inputs()
    assert va.kernel_unsupported_reason(q, k, v, q_pos, k_pos) is None
    q48, k48, v48, _, _ = small_inputs(head_dim=48)
    assert "head size 48" in va.kernel_unsupported_reason(q48, k48, v48, q_pos, k_pos)
    q3 = mx.zeros((2, 3, 3, 64))
    assert "not a multiple" in va.kernel_unsupported_reason(q3, k, v, q_pos, k_pos)
    assert "dtypes" in va.kernel_unsupported_reason(q, k.astype(mx.float16), v, q_pos, k_pos)
    q1k, k1k, v1k, _, _ = small_inputs(head_dim=1024)
    assert va.kernel_unsupported_reason(q1k, k1k, v1k, q_pos, k_pos) is not None


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("gqa,n_q", [(1, 1), (2, 5), (8, 9), (16, 9), (3, 2)])
def test_launch_geometry(dtype, head_dim, gqa, n_q):
    n_kv, batch = 2, 3
    launch = va.kernel_launch((batch, gqa * n_kv, n_q, head_dim), (batch, n_kv, 17, head_dim), dtype)
    t = dict(launch.template)
    tg = launch.threadgroup
    assert tg[1:] == (1, 1) and tg[0] % 32 == 0 and 32 <= tg[0] <= 32 * va.MAX_SIMDGROUPS
    assert launch.grid[0] % tg[0] == 0 and launch.grid[1:] == (n_kv, batch)
    blocks = launch.grid[0] // tg[0]
    rows = gqa * n_q
    assert blocks * (tg[0] // 32) * t["RPS"] >= rows > (blocks - 1) * (tg[0] // 32) * t["RPS"]
    itemsize = 4 if dtype == mx.float32 else 2
    assert 2 * t["BK"] * head_dim * itemsize + 4 * t["BK"] <= 32 * 1024  # Metal's threadgroup memory
    assert 1 <= t["BK"] <= 32  # lane j of a simdgroup keeps slot j's score
    assert t["RPS"] * head_dim // 32 <= 32  # float registers per lane for q and for the output
    assert launch.output_shape == (batch, gqa * n_kv, n_q, head_dim)


# --- the generated source the checker compiles ----------------------------------------------------

@pytest.mark.parametrize("dtype,batch,n_q", [(mx.float32, 1, 3), (mx.float16, 4, 5), (mx.bfloat16, 2, 9)])
def test_rendered_wrapper_matches_mlx(checker, dtype, batch, n_q):
    """The checker's own rendering of MLX's signature equals the text MLX generates."""
    q, k, v, q_pos, k_pos = small_inputs(batch=batch, n_q=n_q, dtype=dtype)
    launch = va.kernel_launch(q.shape, k.shape, dtype)
    inputs = va.kernel_inputs(q, k, v, q_pos=q_pos, k_pos=k_pos, window=8, scale=1.0)
    body, header = va.kernel_source()
    generated = checker.mlx_generated_source(body, header, inputs, launch)
    if generated is None:
        pytest.skip("this MLX does not show its generated kernel source")
    assert checker.rendered_source(body, header, inputs, launch) == generated
    call, params = checker.sig.parse_signature(generated)
    assert params[:2] == ["q", "q_shape"] and "out" in params and "threadgroup_position_in_grid" in params
    assert call.endswith(checker.sig.template_def(launch.template))


def test_lint_rejects_constructs_the_shim_does_not_model(checker):
    body, header = va.kernel_source()
    assert checker.lint(body, header) == []
    bad = body.replace("threadgroup int kp_tile[BK];", "threadgroup int kp_tile[BK];\nthreadgroup int* kp_ptr = kp_tile;")
    assert any("threadgroup pointer" in p for p in checker.lint(bad, header))
    bad = body.replace("const int win = window[0];", "const constant int32_t* wp = window;\nconst int win = wp[0];")
    assert any("typed pointer" in p for p in checker.lint(bad, header))


# --- the checker --------------------------------------------------------------------------------

@needs_cxx
def test_checker_quick_subset_passes(checker):
    results, _ = checker.run_checks(checker.sample_cases(quick=True))
    failed = [f"{r.spec.label}: {r.message}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert len(results) == 5
    assert {r.spec.head_dim for r in results} >= {64, 256, 512}
    assert {r.spec.dtype for r in results} == {"float32", "float16", "bfloat16"}


# Cases for the broken variants: several simdgroups and several key tiles, a wrapped ring.
def _mutation_cases(checker):
    C = checker.CaseSpec
    return [C(2, 9, 64, 1, "wrapped", "float32", n_kv=1, window=40, seed=5, policy="forward"),
            C(1, 5, 64, 4, "wrapped", "float32", n_kv=1, window=48, seed=6, policy="random")]


@needs_cxx
def test_checker_catches_off_by_one_window(checker):
    _, header = va.kernel_source()
    broken = header.replace("qp - kp < window", "qp - kp <= window")
    assert broken != header
    results, _ = checker.run_checks(_mutation_cases(checker), header=broken)
    assert not all(r.ok for r in results)
    assert any("mismatch" in r.message for r in results)


@needs_cxx
def test_checker_catches_a_missing_barrier(checker):
    body, _ = va.kernel_source()
    barrier = "  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);\n}\n"
    assert body.count(barrier) == 1  # the one that ends the key-tile loop
    broken = body.replace(barrier, "}\n")
    results, _ = checker.run_checks(_mutation_cases(checker), body=broken)
    assert not all(r.ok for r in results)


@needs_cxx
def test_checker_catches_simdgroup_divergence(checker):
    body, _ = va.kernel_source()
    broken = body.replace("if (metal::simd_any(vis)) {", "if (vis) {")
    assert broken != body
    results, _ = checker.run_checks(_mutation_cases(checker)[:1], body=broken)
    assert not results[0].ok
    assert "divergence" in results[0].message or "deadlock" in results[0].message

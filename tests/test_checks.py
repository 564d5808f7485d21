"""Load-time checks: wide-verify exactness (with injected inexact backends), the Metal kernel
self-test (injected kernels here; the real one on a Mac, marked ``metal``) and the report."""

import json

import mlx.core as mx
import pytest

from mtp_mlx import demo
from mtp_mlx.checks import (
    CHECK_DRAFTS,
    VARIANTS,
    check,
    describe_target,
    format_report,
    kernel_self_test,
    load_variant,
    run_checks,
    speculation_gate,
    wide_verify_exact,
)
from mtp_mlx.decoding.policy import DraftPolicy
from mtp_mlx.errors import MtpError
from mtp_mlx.ops.attention import attention_ref

pytestmark = pytest.mark.skipif(not demo.available(), reason="the bundled demo pair is not installed")
metal = pytest.mark.metal
needs_metal = pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (an Apple GPU)")
off_metal = pytest.mark.skipif(mx.metal.is_available(), reason="checks the behaviour without Metal")


@pytest.fixture(scope="module")
def pair():
    from mtp_mlx.loading import load

    return load(str(demo.DEMO_TARGET), str(demo.DEMO_DRAFTER))


def next_ulp(x: mx.array) -> mx.array:
    """x moved by one unit in the last place (same dtype)."""
    view = {2: mx.uint16, 4: mx.uint32}[x.dtype.size]
    return (x.view(view) + 1).view(x.dtype)


class WideRoundsDifferently:
    """A backend whose forward over several tokens rounds one value differently (as MLX's
    ``qmv_wide`` quantized matmul does on recent Apple GPUs)."""

    def __init__(self, target, where="logits", position=-1):
        self.target, self.where, self.position = target, where, position

    def __call__(self, ids, cache):
        out = self.target(ids, cache, attn_backend="reference")
        if ids.shape[1] > 1:  # positions from ``position`` on, in every forward over several tokens
            x = getattr(out, self.where)
            setattr(out, self.where, mx.concatenate([x[:, : self.position], next_ulp(x[:, self.position:])], axis=1))
        return out


# ---- wide-verify exactness -------------------------------------------------------------------------

@off_metal
def test_the_demo_target_is_exact_on_this_backend(pair):
    result = wide_verify_exact(pair.target)
    assert result.status == "pass", result.message
    assert [r["k"] for r in result.details["inputs"]] == list(CHECK_DRAFTS)
    assert all(r["bit_equal"] and r["max_abs_logits"] == 0.0 for r in result.details["inputs"])
    exact, line = speculation_gate(pair)
    assert exact and "passed" in line and "\n" not in line
    batched = wide_verify_exact(pair.target, batch=3, drafts=(4,))
    assert batched.status == "pass" and batched.details["batch"] == 3


@pytest.mark.parametrize("where,position", [("logits", -1), ("logits", 0), ("hidden", 3)])
def test_an_injected_inexact_wide_path_is_caught(pair, where, position):
    forward = WideRoundsDifferently(pair.target, where, position)
    result = wide_verify_exact(pair.target, forward=forward)
    assert result.status == "fail" and not result.ok
    rows = result.details["inputs"]
    key = "max_abs_logits" if where == "logits" else "max_abs_hidden"
    for r in rows:
        nudged = r["k"] + 1 > position  # a 2-wide verify has no position 3 to nudge
        assert r["bit_equal"] is not nudged
        assert (0 < r[key] < 0.1) if nudged else r[key] == 0  # one ulp: tiny, yet caught
    assert "verify differs from one-token steps" in result.message


def test_the_gate_declines_greedy_speculation_in_one_line(pair):
    exact, line = speculation_gate(pair, forward=WideRoundsDifferently(pair.target))
    assert not exact
    assert line.startswith("greedy speculation declined:") and "\n" not in line
    assert "float16" in line  # names what was checked


def test_only_the_prefill_being_wide_is_not_a_false_alarm(pair):
    calls = []

    def forward(ids, cache):  # wide forwards of the prefill are not compared, only the verify
        calls.append(ids.shape[1])
        return pair.target(ids, cache, attn_backend="reference")

    result = wide_verify_exact(pair.target, forward=forward, drafts=(2, 1), prefill=5)
    assert calls == [5, 3, 1, 1, 1, 2, 1, 1]  # one shared prefill, then per K a wide forward and its steps
    assert result.status == "pass"


# ---- variants ----------------------------------------------------------------------------------------

def test_variants_are_cast_or_quantized(pair):
    assert describe_target(pair.target) == "float16"
    assert describe_target(load_variant(pair.target_path, "bfloat16")) == "bfloat16"
    assert describe_target(load_variant(pair.target_path, "q4")) == "bfloat16 q4 (group 64)"
    assert describe_target(load_variant(pair.target_path, "q8", base="float32")) == "float32 q8 (group 64)"
    with pytest.raises(MtpError, match="unknown check variant"):
        load_variant(pair.target_path, "q3")


@off_metal
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_exact_on_the_cpu(pair, variant):
    # quantized on float32 scales: MLX's CPU quantized matmul is slow in half precision
    target = load_variant(pair.target_path, variant, base="float32")
    result = wide_verify_exact(target, label=variant, drafts=(3,))
    assert result.status == "pass", result.message


# ---- the kernel self-test -------------------------------------------------------------------------

@off_metal
def test_kernel_self_test_off_metal_is_not_applicable():
    result = kernel_self_test()
    assert result.status == "n/a" and result.ok
    assert result.message.endswith("not applicable (no Metal)")


def test_kernel_self_test_reports_a_kernel_that_matches():
    result = kernel_self_test(metal_available=True, kernel=attention_ref)
    assert result.status == "pass", result.message


def test_kernel_self_test_reports_a_kernel_that_fails_to_compile():
    def broken(*args, **kwargs):
        raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: use of undeclared identifier")

    result = kernel_self_test(metal_available=True, kernel=broken)
    assert result.status == "fail"
    assert "RuntimeError: [metal::Device] Unable to build metal library from source" in result.message
    assert "\n" not in result.message


def test_kernel_self_test_reports_a_kernel_that_computes_something_else():
    def off_by_a_little(q, k, v, **kw):
        out = attention_ref(q, k, v, **kw)
        return out + (0.05 if q.dtype == mx.float32 else 0.5)

    result = kernel_self_test(metal_available=True, kernel=off_by_a_little)
    assert result.status == "fail" and "differs from the reference" in result.message

    def nan_rows(q, k, v, **kw):
        out = attention_ref(q, k, v, **kw)
        return mx.where(mx.arange(out.shape[2])[None, None, :, None] == 0, mx.nan, out)

    assert kernel_self_test(metal_available=True, kernel=nan_rows).status == "fail"


@metal
@needs_metal
def test_the_metal_kernel_matches_the_reference_on_this_device():
    result = kernel_self_test()
    assert result.status == "pass", result.message


@metal
@needs_metal
def test_wide_verify_on_this_device_reports_every_variant(pair):
    """On a Mac: the check runs for every dtype and quantization and the gate follows it."""
    for variant in VARIANTS:
        result = wide_verify_exact(load_variant(pair.target_path, variant), label=variant)
        assert result.status in ("pass", "fail") and "\n" not in result.message
        print(result.message)
    exact, line = speculation_gate(pair)
    assert exact == wide_verify_exact(pair.target).ok
    print(line)


# ---- the report and the command ---------------------------------------------------------------------

def test_report_names_version_device_kernel_exactness_and_costs(pair):
    policy = DraftPolicy()
    for seconds, k in ((0.02, 0), (0.02, 0), (0.03, 2), (0.03, 2)):
        policy.observe({1: k}, {1: k}, seconds)
    report = run_checks(pair, costs=policy.state())
    json.dumps(report)
    assert report["mlx_version"] == mx.__version__
    text = format_report(report)
    lines = text.splitlines()
    assert lines[0].startswith(f"MLX {mx.__version__}, device ")
    assert "verify-attention kernel" in lines[1]
    assert "wide verify, loaded (float16)" in lines[2]
    assert "stored round costs" in text and "K=0 20.0" in text and "K=2 30.0" in text
    assert "acceptance per draft position: 1.00, 1.00" in text


def test_check_command_prints_the_report(pair):
    out = []
    report = check(str(demo.DEMO_TARGET), variants=["float32"], echo=out.append)
    assert report["costs"] is None and [r["name"] for r in report["exactness"]] == ["wide-verify"] * 2
    assert out == [format_report(report)]
    assert "wide verify, float32" in out[0] and "stored costs: none" in out[0]
    with pytest.raises(MtpError, match="unknown check variant"):
        check(str(demo.DEMO_TARGET), variants=["int3"], echo=out.append)

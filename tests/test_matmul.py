"""Large products split across CPU threads (mtp_mlx.ops.matmul): bit-identical to the whole
product, and the same tokens end to end."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mtp_mlx import load
from mtp_mlx.decoding.engine import Engine, generate_ids
from mtp_mlx.ops.matmul import ALIGN, MIN_ELEMENTS, default_parts, shard_matmuls, slices, threads


def test_slices_cover_the_rows_in_aligned_parts():
    for rows in (1, 63, 64, 65, 1000, 4096, 262144):
        for parts in (1, 2, 3, 8):
            s = slices(rows, parts)
            assert s[0][0] == 0 and s[-1][1] == rows and len(s) <= parts
            assert all(a < b for a, b in s) and all(s[i][1] == s[i + 1][0] for i in range(len(s) - 1))
            assert all(a % ALIGN == 0 for a, _ in s)
    assert slices(64, 2) == [(0, 64)]  # too small to split
    assert slices(1000, 2) == [(0, 512), (512, 1000)]


def _modules(dtype, quant_bits):
    mx.random.seed(0)
    lin = nn.Linear(384, 1000, bias=False)
    emb = nn.Embedding(1000, 384)
    if quant_bits:
        lin = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=quant_bits)
        emb = nn.QuantizedEmbedding.from_embedding(emb, group_size=64, bits=quant_bits)
    else:
        lin.set_dtype(dtype)
        emb.set_dtype(dtype)
    return lin, emb


@pytest.mark.parametrize("dtype,bits", [(mx.float32, 0), (mx.bfloat16, 0), (mx.float16, 0), (mx.float32, 4),
                                        (mx.float32, 8)])
def test_split_products_are_bit_identical(dtype, bits):
    lin, emb = _modules(dtype, bits)
    for shape in [(1, 1, 384), (1, 4, 384), (4, 9, 384), (3, 17, 384)]:
        x = mx.random.normal(shape).astype(dtype if not bits else mx.float32)
        whole = (lin(x), emb.as_linear(x))
        for parts in (2, 3):
            assert shard_matmuls(lin, parts, min_elements=0) == 1
            assert shard_matmuls(emb, parts, min_elements=0) == 1
            split = (lin(x), emb.as_linear(x))
            for a, b in zip(whole, split):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert mx.array_equal(a, b).item()
            assert threads(lin) == parts
        assert shard_matmuls(lin, 1, min_elements=0) == 0 and threads(lin) == 1
        assert type(lin) in (nn.Linear, nn.QuantizedLinear)
        shard_matmuls(emb, 1, min_elements=0)


def test_parameters_small_modules_and_bias_are_left_alone():
    big = nn.Linear(1024, 2048, bias=False)  # 2**21 weights: at the threshold
    small = nn.Linear(64, 64, bias=False)
    biased = nn.Linear(1024, 2048, bias=True)
    model = nn.Sequential(big, small, biased)
    names = sorted(k for k, _ in nn.utils.tree_flatten(model.parameters()))
    assert big.weight.size >= MIN_ELEMENTS > small.weight.size
    assert shard_matmuls(model, 2) == 1
    assert sorted(k for k, _ in nn.utils.tree_flatten(model.parameters())) == names
    assert type(small) is nn.Linear and type(biased) is nn.Linear
    assert shard_matmuls(model, 2) == shard_matmuls(model, 2)  # idempotent
    with pytest.raises(ValueError):
        shard_matmuls(model, 0)


def test_default_parts_follows_the_device():
    assert default_parts() >= 1
    if mx.default_device() == mx.cpu:
        import os

        assert default_parts() == max(1, min(os.cpu_count() or 1, 8))


@pytest.mark.parametrize("kind", ["agree", "e2b-mlx-4bit"])
def test_same_tokens_split_or_whole(fixtures, kind):
    """Greedy tokens, plain and K = 3, at B = 1 and 4, across window wraps: every product of
    the fixture split in two (the fixtures' products are below the size threshold, so it is
    lowered for the test) gives the same tokens as whole products."""
    pair = load(str(fixtures / kind / "target"), str(fixtures / kind / "assistant"), matmul_threads=1)
    assert threads(pair.target) == 1  # the fixtures' products are below the threshold anyway
    prompts = [[2, 5, 9, 11, 3, 7, 1, 4][: 3 + i] for i in range(4)]
    results = {}
    for parts in (1, 2):
        n = shard_matmuls(pair.target, parts, min_elements=0) + shard_matmuls(pair.drafter, parts, min_elements=0)
        assert (n > 0) == (parts > 1)
        for k in (0, 3):
            for rows in (prompts[:1], prompts):
                eng = Engine(pair, use_drafter=k > 0, max_batch=4)
                results[parts, k, len(rows)] = [t for t, _ in generate_ids(eng, rows, max_tokens=40, num_draft=k)]
    for k in (0, 3):
        for b in (1, 4):
            assert results[2, k, b] == results[1, k, b]
            assert results[1, k, b] == results[1, 0, b]


def test_split_products_run_on_any_thread(fixtures):
    """MLX streams belong to the thread that made them: a pair split on one thread (and traced
    there) decodes the same tokens on another, as the server's engine thread does."""
    import threading

    from mtp_mlx.models.layers import release_fused

    pair = load(str(fixtures / "agree" / "target"), str(fixtures / "agree" / "assistant"))
    assert shard_matmuls(pair.target, 2, min_elements=0) > 0
    assert shard_matmuls(pair.drafter, 2, min_elements=0) > 0
    prompts = [[2, 3, 4], [5, 6, 7, 8]]
    here = [t for t, _ in generate_ids(Engine(pair, max_batch=2), prompts, max_tokens=12, num_draft=2)]
    got = {}

    def work():
        try:
            got["tokens"] = [t for t, _ in generate_ids(Engine(pair, max_batch=2), prompts, max_tokens=12,
                                                        num_draft=2)]
        except Exception as e:  # reported below
            got["error"] = e
        finally:
            release_fused(pair.target, pair.drafter)  # traces of an ended thread must not outlive it

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert "error" not in got, got.get("error")
    assert got["tokens"] == here


def test_load_rejects_a_bad_thread_count(fixtures):
    from mtp_mlx.errors import MtpError

    for bad in (0, -2, 1.5, True):
        with pytest.raises(MtpError, match="matmul_threads .* out of range"):
            load(str(fixtures / "agree" / "target"), matmul_threads=bad)

"""The compiled layer pieces (``models.layers.fused``) change no bit of any output: the
target's logits and hidden states, the drafter's step, and greedy tokens, plain and
speculative, at B = 1 and 4, across sliding-window wraps, in every dtype the runtime loads."""

import mlx.core as mx
import numpy as np
import pytest

from mtp_mlx.decoding.draft import draft_context
from mtp_mlx.decoding.engine import Engine, Request, bare_pair
from mtp_mlx.loading import load
from tests.tiny import tiny_drafter, tiny_target


def _prompts(n_rows, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=int(rng.integers(10, 30))).tolist() for _ in range(n_rows)]


def _decode(pair, prompts, max_tokens, num_draft, fused_ops):
    engine = Engine(pair, use_drafter=num_draft != 0, max_batch=len(prompts), fused_ops=fused_ops)
    uids = [engine.submit(Request(p, max_tokens, num_draft=num_draft, request_index=i)) for i, p in enumerate(prompts)]
    toks = {u: [] for u in uids}
    for ev in engine.run():
        toks[ev.uid].extend(ev.tokens)
    return [toks[u] for u in uids]


# MLX's CPU gather_mm (the experts) runs in float32 only, so the MoE kind runs in float32.
@pytest.mark.parametrize("kind, dtype", [("e2b", mx.float32), ("e2b", mx.bfloat16), ("e2b", mx.float16),
                                         ("moe", mx.float32)])
def test_forward_and_draft_step_are_bit_identical(kind, dtype):
    target = tiny_target(kind, window=8)
    drafter = tiny_drafter(target)
    target.set_dtype(dtype)
    drafter.set_dtype(dtype)
    prompt = mx.array(_prompts(3, seed=1)[0][:12] * 2)[None]  # 24 tokens: the rings wrap
    outs = {}
    for fused_ops in (False, True):
        cache = target.make_cache()
        target(prompt, cache, fused_ops=fused_ops)
        got = []
        for chunk in ([[7]], [[9, 4, 11, 2]], [[5]] * 1, [[3, 3, 8, 1, 6, 2, 9, 4, 5]]):
            out = target(mx.array(chunk), cache, fused_ops=fused_ops)
            got += [out.logits, out.hidden]
        ctx = draft_context(cache, target.cfg.sliding_window)
        hd, nxt = drafter(target.embed(mx.array([[7]])), out.hidden[:, -1:], ctx.kv, ctx.q_pos, ctx.masks,
                          fused_ops=fused_ops)
        outs[fused_ops] = got + [hd, nxt, drafter.argmax(hd)]
    # The compiled pieces did run (and were not silently skipped).
    assert {"begin", "finish"} <= {name for name, _ in target.layers[0].__dict__.get("_fused", {})}
    assert {"inputs", "outputs"} <= {name for name, _ in target.__dict__.get("_fused", {})}
    assert {"start", "end"} <= {name for name, _ in drafter.__dict__.get("_fused", {})}
    for a, b in zip(outs[False], outs[True]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_greedy_tokens_identical_compiled_and_uncompiled(kind, batch):
    target = tiny_target(kind, window=8)
    pair = bare_pair(target, tiny_drafter(target))
    prompts = _prompts(batch, seed=batch)
    for k in (0, 3):
        ref = _decode(pair, prompts, 40, k, fused_ops=False)
        assert _decode(pair, prompts, 40, k, fused_ops=True) == ref


@pytest.mark.parametrize("batch", [1, 4])
def test_agreeing_pair_compiled_equals_uncompiled_and_plain(fixtures, batch):
    """A drafter that agrees often (so rounds accept several drafts), a 32-token window,
    prompts and outputs that wrap it several times."""
    pair = load(str(fixtures / "agree" / "target"), str(fixtures / "agree" / "assistant"))
    prompts = [np.random.default_rng(10 + i).integers(3, 500, size=20 + 9 * i).tolist() for i in range(batch)]
    plain = _decode(pair, prompts, 96, 0, fused_ops=False)
    for fused_ops in (False, True):
        assert _decode(pair, prompts, 96, 4, fused_ops=fused_ops) == plain
    assert _decode(pair, prompts, 96, 0, fused_ops=True) == plain

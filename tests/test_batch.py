"""Batches of 1..8 rows: ragged prompts, per-row acceptance, EOS and budgets; every row's
greedy output equals generating that prompt alone."""

import numpy as np
import pytest

from mtp_mlx.api import batch_generate
from mtp_mlx.errors import MtpError
from mtp_mlx.loading import load
from mtp_mlx.decoding.loop import generate_step, speculative_generate_batch, speculative_generate_step


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, 500, size=n).tolist()


@pytest.fixture(scope="module")
def agree(fixtures):
    return load(str(fixtures / "agree" / "target"), str(fixtures / "agree" / "assistant"))


def _collect(batch_steps, n):
    toks = [[] for _ in range(n)]
    rounds = [[] for _ in range(n)]
    for step in batch_steps:
        for r, s in step.items():
            toks[r].extend(s.tokens)
            if s.drafted:
                rounds[r].append(s.accepted)
    return toks, rounds


def test_batch_rows_equal_single_runs(agree):
    # Mixed prompt lengths (shorter and longer than the 32-token window), two equal lengths
    # (prefilled together), different budgets so rows leave the batch at different times.
    prompts = [_ids(5, 1), _ids(40, 2), _ids(17, 3), _ids(40, 4), _ids(70, 5)]
    budgets = [60, 45, 80, 12, 70]
    t, d = agree.target, agree.drafter
    toks, rounds = _collect(speculative_generate_batch(t, d, prompts, max_tokens=budgets, num_draft=4), 5)
    for r, (p, m) in enumerate(zip(prompts, budgets)):
        alone = [x for s in speculative_generate_step(t, d, p, max_tokens=m, num_draft=4) for x in s.tokens]
        plain = [x for s in generate_step(t, p, max_tokens=m) for x in s.tokens]
        assert toks[r] == alone == plain, f"row {r}"
        assert len(toks[r]) == m
    # Rows were not clamped to a common acceptance: in some round rows accepted differently.
    flat = [a for rr in rounds for a in rr]
    assert 0 in flat and 4 in flat and any(0 < a < 4 for a in flat)


def test_batch_eos_per_row(agree):
    t, d = agree.target, agree.drafter
    prompts = [_ids(9, 6), _ids(33, 7)]
    plain = [[x for s in generate_step(t, p, max_tokens=30) for x in s.tokens] for p in prompts]
    eos = plain[0][7]
    toks, _ = _collect(speculative_generate_batch(t, d, prompts, max_tokens=30, num_draft=3, eos_ids=[eos]), 2)
    for r in range(2):
        cut = plain[r].index(eos) if eos in plain[r] else 30
        assert toks[r] == plain[r][:cut]


def test_batch_api_order_and_limits(agree):
    res = batch_generate(agree, [_ids(8, 8), _ids(3, 9), _ids(20, 10)], max_tokens=10, num_draft_tokens=2)
    assert [r.prompt_tokens for r in res.results] == [8, 3, 20]
    assert all(len(r.tokens) == 10 for r in res.results)
    with pytest.raises(MtpError, match="1..8"):
        batch_generate(agree, [[1, 2]] * 9, max_tokens=4)


@pytest.mark.parametrize("use_drafter", [True, False])
def test_batch_stop_string_ends_its_row_early(agree, use_drafter):
    # Row 0 hits a stop string (taken from its own full output) early: it leaves the batch at
    # the step that completes it instead of running to its budget; row 1 is unaffected.
    prompts, m = [_ids(12, 11), _ids(25, 12)], 60
    full = batch_generate(agree, prompts, max_tokens=m, num_draft_tokens=3, use_drafter=use_drafter).results
    tok = agree.tokenizer
    text0 = full[0].text
    n_before = 10
    stop = text0[len(tok.decode(full[0].tokens[:n_before])):][:4]
    assert len(stop) == 4 and stop not in tok.decode(full[1].tokens)
    res = batch_generate(agree, prompts, max_tokens=m, num_draft_tokens=3, use_drafter=use_drafter,
                         stop=[stop]).results
    assert res[0].finish_reason == "stop" and res[0].text == text0[: text0.index(stop)]
    # it stopped within one step (at most K + 1 tokens) of completing the stop string
    done = next(i for i in range(1, m + 1) if stop in tok.decode(full[0].tokens[:i]))
    assert done <= len(res[0].tokens) <= done + 3 and res[0].tokens == full[0].tokens[: len(res[0].tokens)]
    assert res[1].tokens == full[1].tokens and res[1].finish_reason == "length"


@pytest.mark.parametrize("position", ["B", "A"])
def test_long_greedy_generation_equals_plain_on_trained_like_pair(agree, position):
    """>= 512 new tokens from a prompt longer than the window (the sliding caches wrap many
    times), with a real drafter whose rounds are fully, partly and not at all accepted."""
    t, d = agree.target, agree.drafter
    prompt = _ids(45, 11)
    plain = [x for s in generate_step(t, prompt, max_tokens=530) for x in s.tokens]
    steps = list(speculative_generate_step(t, d, prompt, max_tokens=530, num_draft=3, position=position))
    assert [x for s in steps for x in s.tokens] == plain and len(plain) == 530
    acc = [s.accepted for s in steps[1:] if s.drafted == 3]
    assert 0 in acc and 3 in acc and any(0 < a < 3 for a in acc)


def test_half_precision_greedy_stays_identical(fixtures):
    """In float16 the logits are coarse and near-ties are common; speculative output still
    equals plain output because every position lands in the same ring slot whatever K, so
    the verify pass sums exactly what one-token decoding sums."""
    pair = load(str(fixtures / "agree" / "target"), str(fixtures / "agree" / "assistant"), dtype="float16")
    t, d = pair.target, pair.drafter
    for seed in range(4):
        prompt = _ids(40 + 7 * seed, 100 + seed)
        plain = [x for s in generate_step(t, prompt, max_tokens=120) for x in s.tokens]
        for k in (1, 3, 6):
            spec = [x for s in speculative_generate_step(t, d, prompt, max_tokens=120, num_draft=k) for x in s.tokens]
            assert spec == plain, (seed, k)


def test_ring_layout_does_not_depend_on_k():
    """The invariant behind bitwise-equal verify and decode: position p sits in the same ring
    slot in plain and speculative runs (with K-sized rings an fp16 near-tie once flipped)."""
    from mtp_mlx.sampling import SamplingConfig
    from mtp_mlx.decoding.loop import _start
    from tests.tiny import tiny_target

    t = tiny_target("e2b", window=8)
    caps = set()
    for k in (0, 1, 3, 8):
        cache = _start(t, [list(range(3, 30))], 10, (), SamplingConfig(), (), k)[0]
        caps.add(tuple(c.capacity for c in cache.layers.values()))
    assert len(caps) == 1

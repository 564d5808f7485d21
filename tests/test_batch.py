"""Batches of 1..8 rows: ragged prompts, per-row acceptance, EOS and budgets; every row's
greedy output equals generating that prompt alone."""

import numpy as np
import pytest

from mtp_mlx.api import batch_generate
from mtp_mlx.errors import MtpError
from mtp_mlx.loading import load
from tests.decode import plain, rounds, run, spec


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, 500, size=n).tolist()


@pytest.fixture(scope="module")
def agree(fixtures):
    return load(str(fixtures / "agree" / "target"), str(fixtures / "agree" / "assistant"))


def test_batch_rows_equal_single_runs(agree):
    # Mixed prompt lengths (shorter and longer than the 32-token window), two equal lengths
    # (prefilled together), different budgets so rows leave the batch at different times.
    prompts = [_ids(5, 1), _ids(40, 2), _ids(17, 3), _ids(40, 4), _ids(70, 5)]
    budgets = [60, 45, 80, 12, 70]
    t, d = agree.target, agree.drafter
    toks, events = run(t, d, prompts, budgets, 4)
    for r, (p, m) in enumerate(zip(prompts, budgets)):
        assert toks[r] == spec(t, d, p, m, 4) == plain(t, p, m), f"row {r}"
        assert len(toks[r]) == m
    # Rows were not clamped to a common acceptance: in some round rows accepted differently.
    flat = [a for ev in events for k, a in rounds(ev) if k == 4]
    assert 0 in flat and 4 in flat and any(0 < a < 4 for a in flat)


def test_batch_eos_per_row(agree):
    t, d = agree.target, agree.drafter
    prompts = [_ids(9, 6), _ids(33, 7)]
    ref = [plain(t, p, 30) for p in prompts]
    eos = ref[0][7]
    toks, _ = run(t, d, prompts, 30, 3, eos_ids=[eos])
    for r in range(2):
        cut = ref[r].index(eos) if eos in ref[r] else 30
        assert toks[r] == ref[r][:cut]


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
    ref = plain(t, prompt, 530)
    (toks,), (events,) = run(t, d, [prompt], 530, 3, position=position)
    assert toks == ref and len(ref) == 530
    acc = [a for k, a in rounds(events) if k == 3]
    assert 0 in acc and 3 in acc and any(0 < a < 3 for a in acc)


def test_half_precision_greedy_stays_identical(fixtures):
    """In float16 the logits are coarse and near-ties are common; speculative output still
    equals plain output because every position lands in the same ring slot whatever K, so
    the verify pass sums exactly what one-token decoding sums."""
    pair = load(str(fixtures / "agree" / "target"), str(fixtures / "agree" / "assistant"), dtype="float16")
    t, d = pair.target, pair.drafter
    for seed in range(4):
        prompt = _ids(40 + 7 * seed, 100 + seed)
        ref = plain(t, prompt, 120)
        for k in (1, 3, 6):
            assert spec(t, d, prompt, 120, k) == ref, (seed, k)


def test_ring_layout_does_not_depend_on_k():
    """The invariant behind bitwise-equal verify and decode: position p sits in the same ring
    slot in plain and speculative runs (with K-sized rings an fp16 near-tie once flipped)."""
    from mtp_mlx.decoding.batch import Batch, RowSpec
    from tests.tiny import tiny_drafter, tiny_target

    t = tiny_target("e2b", window=8)
    caps = set()
    for k in (0, 1, 3, 8):
        batch = Batch(t, tiny_drafter(t) if k else None)
        batch.insert(RowSpec(0, list(range(3, 30))))
        batch.step()
        batch.step({0: k})
        caps.add(tuple(c.capacity for c in batch.cache.layers.values()))
    assert len(caps) == 1


def test_steady_rounds_and_look_ahead(agree):
    """``Batch.steady`` marks the rounds that measure a round's cost: a plain round whose
    forward was queued ahead, a drafting round that threw nothing away. Whatever the look-ahead
    does, the tokens are plain decoding's."""
    from mtp_mlx.decoding.batch import Batch, RowSpec

    t, d = agree.target, agree.drafter
    prompt = _ids(9, 13)
    b = Batch(t, d)
    b.insert(RowSpec(0, prompt))
    toks = b.step()[0].tokens  # the prefill's first token
    script = [  # (K, look_ahead, steady expected)
        (0, True, False),   # first plain round: nothing was queued
        (0, True, True),    # found its forward queued
        (2, True, False),   # threw the queued forward away
        (2, True, True),
        (0, False, False),  # first plain round after drafting; queues nothing ahead
        (2, True, True),    # so this drafting round throws nothing away
        (0, True, False),
        (0, True, True),
        (0, True, True),
    ]
    for k, look, steady in script:
        toks += b.step({0: k}, look_ahead=look)[0].tokens
        assert b.steady == steady, (k, look)
    assert toks == plain(t, prompt, len(toks))


@pytest.fixture(scope="module")
def demo():
    """The bundled trained pair: its drafter's confidence is informative (random fixtures'
    drafters are near-uniform), so cuts land between 0 and K."""
    from mtp_mlx.demo import DEMO_DRAFTER, DEMO_TARGET

    return load(str(DEMO_TARGET), str(DEMO_DRAFTER))


def test_cutting_on_drafter_confidence_keeps_greedy_output(demo):
    """Rounds that cut each row's drafts before its first draft below p_min, two rows at once:
    the tokens are plain decoding's, each row keeps what its own confidences allow (the verify
    is as wide as the longest), and p_min above 1 keeps nothing (a verify of the bonus alone)."""
    from mtp_mlx.decoding.batch import Batch, RowSpec

    t, d = demo.target, demo.drafter
    prompts = [demo.tokenizer.encode("class LinkedList:\n    def __init__(self):\n"),
               demo.tokenizer.encode("import os\n\n\ndef walk_tree(root):\n")]
    for p_min in (0.6, 1.01):
        b = Batch(t, d)
        for i, p in enumerate(prompts):
            b.insert(RowSpec(i, list(p)))
        toks = {u: o.tokens for u, o in b.step().items()}
        kept = []
        while min(len(v) for v in toks.values()) < 40:
            outs = b.step({0: 4, 1: 4}, cut=p_min)
            assert b.cut
            for u, o in outs.items():
                toks[u] += o.tokens
                assert o.accepted <= o.drafted <= 4
                kept.append(o.drafted)
        for u, p in enumerate(prompts):
            n = len(toks[u])
            assert toks[u] == plain(t, list(p), n), (p_min, u)
        if p_min > 1:
            assert set(kept) == {0}
        else:
            assert any(0 < k < 4 for k in kept) and len(set(kept)) >= 2, kept


def test_cut_is_ignored_by_sampled_rounds(demo):
    """Sampled rows draft uncut (their drafts are draws, not the drafter's argmax)."""
    from mtp_mlx.decoding.batch import Batch, RowSpec
    from mtp_mlx.sampling import SamplingConfig

    b = Batch(demo.target, demo.drafter)
    b.insert(RowSpec(0, demo.tokenizer.encode("def f(x):\n"), SamplingConfig(temperature=0.8), seed=3))
    b.step()
    out = b.step({0: 3}, cut=0.99)[0]
    assert not b.cut and out.drafted == 3


def test_uncut_rounds_report_what_a_cut_would_keep(demo):
    """``step(confidence=True)`` returns the drafter's probability of each draft at the round's
    one sync; a cut round from the same state keeps exactly the leading drafts at or above
    p_min of those probabilities."""
    from mtp_mlx.decoding.batch import Batch, RowSpec

    prompt = demo.tokenizer.encode("def binary_search(items, target):\n")
    seen = set()
    for steps in range(1, 8):
        a, b = Batch(demo.target, demo.drafter), Batch(demo.target, demo.drafter)
        for x in (a, b):
            x.insert(RowSpec(0, list(prompt)))
            x.step()
            for _ in range(steps - 1):
                x.step({0: 2})
        conf = a.step({0: 4}, confidence=True)[0].confidence
        assert len(conf) == 4 and all(0.0 < p <= 1.0 for p in conf)
        p_min = sorted(conf)[1]  # a threshold that keeps some drafts and not others, mostly
        kept = b.step({0: 4}, cut=p_min)[0].drafted
        want = next((j for j, p in enumerate(conf) if p < p_min), 4)
        assert kept == want, (conf, p_min, kept)
        seen.add(kept)
    assert len(seen) >= 2, seen

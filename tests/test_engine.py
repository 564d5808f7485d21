"""The engine's invariants on tiny random targets, independent of checkpoints: greedy
speculative output == plain greedy output, across sliding-window wraps, with rounds of full,
partial and zero acceptance; budgets and EOS are exact; rows join and leave a running batch
without changing anyone's output; K may change every round."""

import mlx.core as mx
import pytest

from mtp_mlx.decoding.engine import Engine, Request, bare_pair
from mtp_mlx.errors import MtpError
from tests.decode import plain, rounds, run, spec
from tests.tiny import tiny_drafter, tiny_target


class ScriptedDrafter:
    """Proposes the target's true greedy continuation, corrupted on a schedule, so rounds
    are fully accepted, rejected at the first draft, or rejected part-way."""

    def __init__(self, reference, vocab):
        self.ref, self.vocab = reference, vocab
        self.q, self.j = None, 0

    def __call__(self, emb, hidden, kv, q_pos, masks, attn_backend="auto", fused_ops=True):
        q = q_pos.item()  # test-only host sync
        self.j = 0 if q != self.q else self.j + 1
        self.q = q
        p_b = q + 1  # convention B
        true = self.ref[p_b + 1 + self.j] if p_b + 1 + self.j < len(self.ref) else 0
        wrong_at = {0: None, 1: 0, 2: 2}[p_b % 3]
        tok = (true + 1) % self.vocab if self.j == wrong_at else true
        return mx.array([[tok]]), hidden

    def argmax(self, hd):
        return hd.astype(mx.int32)


@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_greedy_spec_equals_plain_with_mixed_acceptance(kind):
    target = tiny_target(kind, window=8)
    prompt = list(range(5, 5 + 21))  # longer than the window
    ref = plain(target, prompt, 520)
    assert len(ref) == 520
    drafter = ScriptedDrafter(prompt + ref, target.cfg.vocab_size)
    (toks,), (events,) = run(target, drafter, [prompt], 520, num_draft=4)
    assert toks == ref
    rr = rounds(events)
    assert any(a == d for d, a in rr), "no fully accepted round"
    assert any(a == 0 for d, a in rr), "no zero-acceptance round"
    assert any(0 < a < d for d, a in rr), "no partial round"
    # From-draft flags match the accepted counts.
    assert all(sum(e.from_draft) == min(e.accepted, len(e.tokens)) for e in events)


@pytest.mark.parametrize("position", ["A", "B"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_spec_equals_plain_real_drafter(position, k):
    target = tiny_target("e2b", window=8)
    drafter = tiny_drafter(target)
    prompt = list(range(3, 40))
    assert spec(target, drafter, prompt, 64, k, position=position) == plain(target, prompt, 64)


def test_max_tokens_exact_and_eos_stops():
    target = tiny_target("e2b")
    prompt = [7, 8, 9]
    ref = plain(target, prompt, 30)
    drafter = ScriptedDrafter(prompt + ref, target.cfg.vocab_size)
    for n in (1, 2, 5, 17):
        assert spec(target, drafter, prompt, n, 4) == ref[:n]
    eos = ref[10]
    cut = ref.index(eos)
    (toks,), (events,) = run(target, drafter, [prompt], 30, 4, eos_ids=[eos])
    assert toks == ref[:cut] and events[-1].finish_reason == "stop"


@pytest.mark.parametrize("bad", [dict(prompt=[]), dict(max_tokens=0), dict(num_draft=9), dict(prompt=[1, 10**6]),
                                 dict(max_tokens=5000), dict(logprobs=21)])
def test_bad_requests_raise_one_line(bad):
    target = tiny_target("e2b")
    args = dict(prompt=[1, 2], max_tokens=4, num_draft=2) | bad
    engine = Engine(bare_pair(target, tiny_drafter(target)))
    with pytest.raises(MtpError) as e:
        engine.submit(Request(**args))
    assert "\n" not in str(e.value)


# ---- rows joining and leaving a running batch --------------------------------------------------

import numpy as np  # noqa: E402

from mtp_mlx.loading import load  # noqa: E402
from mtp_mlx.sampling import SamplingConfig  # noqa: E402


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, 500, size=n).tolist()


_SOLO = {}


def _solo(pair, prompt, n):
    """Plain greedy output of one prompt alone (cached across parametrizations)."""
    key = (id(pair), tuple(prompt), n)
    if key not in _SOLO:
        _SOLO[key] = plain(pair.target, prompt, n)
    return _SOLO[key]


@pytest.fixture(scope="module")
def agree(fixtures):
    return load(str(fixtures / "agree" / "target"), str(fixtures / "agree" / "assistant"))


def _staggered(pair, use_drafter, schedule, budget, cancel=None, num_draft=3, sampling=SamplingConfig()):
    """Submit prompts at the given rounds into one engine; optionally cancel one at a round.
    Returns tokens per prompt index and the engine."""
    engine = Engine(pair, use_drafter=use_drafter)
    uids, toks, rnd = {}, {}, 0
    pending = sorted(schedule, key=lambda s: s[0])
    while pending or engine.live:
        while pending and pending[0][0] <= rnd:
            _, i, prompt = pending.pop(0)
            uids[engine.submit(Request(prompt, budget, sampling, num_draft=num_draft, request_index=0))] = i
            toks[i] = []
        if cancel and cancel[1] == rnd:
            engine.cancel(next(u for u, i in uids.items() if i == cancel[0]))
        for ev in engine.step():
            toks[uids[ev.uid]].extend(ev.tokens)
        rnd += 1
    return toks, engine


@pytest.mark.parametrize("use_drafter", [True, False])
def test_rows_joining_a_running_batch_equal_their_solo_runs(agree, use_drafter):
    """Rows join at different rounds: one longer than the 32-token window, one joining after
    the running row's rings have wrapped, two joining together later, one short; each runs
    512 tokens and equals its solo plain greedy output. A cancelled row leaves the others
    unchanged."""
    prompts = {0: _ids(45, 1), 1: _ids(5, 2), 2: _ids(70, 3), 3: _ids(17, 4), 4: _ids(9, 5)}
    schedule = [(0, 0, prompts[0]), (40, 1, prompts[1]), (70, 2, prompts[2]), (70, 3, prompts[3]),
                (75, 4, prompts[4])]
    toks, engine = _staggered(agree, use_drafter, schedule, 512, cancel=(4, 110))
    for i in range(4):
        solo = _solo(agree, prompts[i], 512)
        assert toks[i] == solo, f"row {i}: first difference at {next(j for j, (a, b) in enumerate(zip(toks[i], solo)) if a != b)}"
    solo4 = _solo(agree, prompts[4], 512)
    assert 0 < len(toks[4]) < 512 and toks[4] == solo4[: len(toks[4])]
    assert engine.running == 0 and not engine.live


class ScriptedPolicy:
    """K per row from a fixed schedule that includes 0 and differs between rows."""

    def __init__(self, schedule):
        self.schedule, self.round = schedule, 0

    def plan(self, uids, caps, fixed=None):
        self.round += 1
        return {u: self.schedule[(self.round + 3 * u) % len(self.schedule)] for u in uids}

    def observe(self, ks, accepted, seconds):
        pass

    def forget(self, uid):
        pass


def test_draft_length_changing_every_round_keeps_greedy_output(agree):
    prompts = [_ids(40, 6), _ids(12, 7), _ids(33, 8)]
    engine = Engine(agree, policy=ScriptedPolicy([0, 3, 1, 0, 8, 2, 5, 0, 4, 6, 7, 1]))
    uids = [engine.submit(Request(p, 200, num_draft="auto")) for p in prompts]
    toks = {u: [] for u in uids}
    ks = {u: set() for u in uids}
    for ev in engine.run():
        toks[ev.uid].extend(ev.tokens)
        if ev.stats.rounds:
            ks[ev.uid].add(ev.drafted)
    for u, p in zip(uids, prompts):
        assert toks[u] == plain(agree.target, p, 200)
        assert {0, 1, 3, 8} <= ks[u]


@pytest.mark.parametrize("num_draft", [3, "auto"])
def test_seeded_request_same_alone_in_a_batch_and_joining(agree, num_draft):
    """A seeded sampled request gives the same tokens alone, in a batch of 4 and when it joins
    a running batch; with a seed it also equals plain seeded sampling (the coupled rule)."""
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, top_k=64, seed=1234)
    prompt = _ids(30, 9)
    alone = spec(agree.target, agree.drafter, prompt, 60, num_draft, sampling=cfg)
    assert alone == plain(agree.target, prompt, 60, sampling=cfg)
    others = SamplingConfig(temperature=0.7)
    four = Engine(agree)
    mates = [four.submit(Request(p, 60, s, num_draft=num_draft)) for p, s in
             ((_ids(8, 10), others), (_ids(50, 11), SamplingConfig()), (_ids(3, 12), others))]
    mine = four.submit(Request(prompt, 60, cfg, num_draft=num_draft))
    assert [t for ev in four.run() if ev.uid == mine for t in ev.tokens] == alone and mine not in mates
    batch_row = _staggered(agree, True, [(0, 0, _ids(40, 13)), (0, 1, _ids(20, 14)), (7, 2, prompt)], 60,
                           num_draft=num_draft, sampling=cfg)[0][2]
    assert batch_row == alone
    mixed = Engine(agree)
    a = mixed.submit(Request(_ids(25, 15), 60, others, num_draft=num_draft))
    for _ in range(5):
        mixed.step()
    b = mixed.submit(Request(prompt, 60, cfg, num_draft=num_draft))
    got = [t for ev in mixed.run() if ev.uid == b for t in ev.tokens]
    assert got == alone and a != b


def test_unseeded_requests_differ(agree):
    cfg = SamplingConfig(temperature=1.0)
    prompt = _ids(20, 16)
    assert spec(agree.target, agree.drafter, prompt, 30, 3, sampling=cfg) != \
        spec(agree.target, agree.drafter, prompt, 30, 3, sampling=cfg)


def test_join_latency_is_one_prefill_slice(agree):
    """A request joining a busy batch gets its first token in the round after it is admitted
    (one prefill slice) and drafts in the round after that."""
    engine = Engine(agree)
    for i in range(3):
        engine.submit(Request(_ids(20 + i, 20 + i), 64, num_draft=3))
    for _ in range(5):
        engine.step()
    uid = engine.submit(Request(_ids(30, 30), 16, num_draft=3))
    first = engine.step()
    assert any(ev.uid == uid and ev.tokens for ev in first)
    second = engine.step()
    assert any(ev.uid == uid and ev.drafted == 3 for ev in second)


def test_an_inexact_wide_verify_declines_greedy_speculation(agree):
    """The load-time check finds a wide path that rounds differently: the engine says so in
    one line and greedy rows never draft (sampled rows still may)."""
    from tests.test_checks import WideRoundsDifferently

    engine = Engine(agree, exactness_forward=WideRoundsDifferently(agree.target))
    assert not engine.greedy_exact and len(engine.notices) == 1
    assert "greedy speculation declined" in engine.notices[0] and "\n" not in engine.notices[0]
    prompt = _ids(30, 40)
    uid = engine.submit(Request(prompt, 40, num_draft=3))
    events = [ev for ev in engine.run() if ev.uid == uid]
    assert all(ev.drafted == 0 for ev in events)
    assert [t for ev in events for t in ev.tokens] == plain(agree.target, prompt, 40)
    assert Engine(agree).greedy_exact  # the real forward is exact on this backend


def test_prefix_cache_second_turn_reuses_the_first_and_equals_a_cold_run(agree):
    """Turn 2 resends turn 1 (prompt longer than the window, so the rings have wrapped) plus
    its answer and a new message: it reuses the cached K/V (cached_tokens > 0) and its output
    equals a run without the cache, and the first round after the hit drafts."""
    turn1 = _ids(45, 50)
    engine = Engine(agree, prefix_cache_bytes=1 << 26)
    uid = engine.submit(Request(turn1, 40, num_draft=3))
    answer = [t for ev in engine.run() if ev.uid == uid for t in ev.tokens]
    turn2 = turn1 + answer + _ids(7, 51)
    uid = engine.submit(Request(turn2, 40, num_draft=3))
    events = [ev for ev in engine.run() if ev.uid == uid]
    hit = [t for ev in events for t in ev.tokens]
    assert events[-1].stats.cached_tokens >= len(turn1) + len(answer) - 1
    assert events[1].drafted == 3
    assert hit == plain(agree.target, turn2, 40)
    assert engine.metrics()["prefix_cache_hits"] == 1 and engine.metrics()["prefix_cache_bytes"] > 0
    # A prompt sharing only the first 20 tokens would need a wrapped ring rewound by more than
    # its slack: no hit, and still the right output.
    other = Engine(agree, prefix_cache_bytes=1 << 26)
    other.submit(Request(turn1, 20, num_draft=3))
    list(other.run())
    fork = turn1[:20] + _ids(30, 52)
    uid = other.submit(Request(fork, 10, num_draft=3))
    events = [ev for ev in other.run() if ev.uid == uid]
    assert events[-1].stats.cached_tokens == 0
    assert [t for ev in events for t in ev.tokens] == plain(agree.target, fork, 10)


def test_auto_rounds_that_cut_on_confidence_keep_greedy_output():
    """The engine end to end with a policy whose every drafting round cuts (the trained demo
    pair, whose drafter's confidence varies): the tokens are plain decoding's, the policy is
    told what each row planned and kept, and the statistics record the drafts kept."""
    from mtp_mlx.decoding.engine import generate_ids
    from mtp_mlx.decoding.policy import DraftPolicy
    from mtp_mlx.demo import DEMO_DRAFTER, DEMO_TARGET

    class AlwaysCut(DraftPolicy):
        def __init__(self):
            super().__init__(max_draft=8)
            self.seen = []

        def cut(self):
            return 0.6

        def observe(self, ks, accepted, seconds, held_out=(), planned_ks=None):
            self.seen.append((dict(ks), planned_ks))
            super().observe(ks, accepted, seconds, held_out, planned_ks)

    pair = load(str(DEMO_TARGET), str(DEMO_DRAFTER))
    prompts = [pair.tokenizer.encode("class LinkedList:\n    def __init__(self):\n"),
               pair.tokenizer.encode("def binary_search(items, target):\n")]
    policy = AlwaysCut()
    engine = Engine(pair, max_batch=2, policy=policy)
    got = generate_ids(engine, prompts, max_tokens=40, num_draft="auto")
    plain_engine = Engine(pair, use_drafter=False)
    want = generate_ids(plain_engine, prompts, max_tokens=40)
    assert [t for t, _ in got] == [t for t, _ in want]
    cut = [(ks, planned) for ks, planned in policy.seen if planned is not None]
    assert cut, "no round cut"
    assert all(ks[u] <= planned[u] for ks, planned in cut for u in ks)
    assert any(ks[u] < planned[u] for ks, planned in cut for u in ks)
    kept = [k for _, s in got for k in s.ks]
    assert sum(kept) == sum(s.drafted for _, s in got)

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

    def __call__(self, emb, hidden, kv, q_pos, masks, attn_backend="auto"):
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

"""The speculative loop's invariants on tiny random targets, independent of checkpoints:
greedy speculative output == plain greedy output, across sliding-window wraps, with rounds
of full, partial and zero acceptance; budgets and EOS are exact."""

import mlx.core as mx
import pytest

from mtp_mlx.errors import MtpError
from mtp_mlx.decoding.loop import generate_step, speculative_generate_step
from tests.tiny import tiny_drafter, tiny_target


def _tokens(steps):
    return [t for s in steps for t in s.tokens]


class ScriptedDrafter:
    """Proposes the target's true greedy continuation, corrupted on a schedule, so rounds
    are fully accepted, rejected at the first draft, or rejected part-way."""

    def __init__(self, reference, vocab):
        self.ref, self.vocab = reference, vocab
        self.q, self.j = None, 0

    def __call__(self, emb, hidden, kv, q_pos, masks):
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
    plain = _tokens(generate_step(target, prompt, max_tokens=520))
    assert len(plain) == 520
    drafter = ScriptedDrafter(prompt + plain, target.cfg.vocab_size)
    steps = list(speculative_generate_step(target, drafter, prompt, max_tokens=520, num_draft=4))
    assert _tokens(steps) == plain
    rounds = [(s.drafted, s.accepted) for s in steps[1:]]
    assert any(a == d for d, a in rounds), "no fully accepted round"
    assert any(a == 0 for d, a in rounds), "no zero-acceptance round"
    assert any(0 < a < d for d, a in rounds), "no partial round"
    # From-draft flags match the accepted counts.
    assert all(sum(s.from_draft) == min(s.accepted, len(s.tokens)) for s in steps)


@pytest.mark.parametrize("position", ["A", "B", "hf"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_spec_equals_plain_real_drafter(position, k):
    target = tiny_target("e2b", window=8)
    drafter = tiny_drafter(target)
    prompt = list(range(3, 40))
    plain = _tokens(generate_step(target, prompt, max_tokens=64))
    spec = _tokens(speculative_generate_step(target, drafter, prompt, max_tokens=64, num_draft=k, position=position))
    assert spec == plain


def test_max_tokens_exact_and_eos_stops():
    target = tiny_target("e2b")
    prompt = [7, 8, 9]
    plain = _tokens(generate_step(target, prompt, max_tokens=30))
    drafter = ScriptedDrafter(prompt + plain, target.cfg.vocab_size)
    for n in (1, 2, 5, 17):
        assert _tokens(speculative_generate_step(target, drafter, prompt, max_tokens=n, num_draft=4)) == plain[:n]
    eos = plain[10]
    cut = plain.index(eos)
    spec = list(speculative_generate_step(target, drafter, prompt, max_tokens=30, num_draft=4, eos_ids=[eos]))
    assert _tokens(spec) == plain[:cut] and spec[-1].finish_reason == "stop"


@pytest.mark.parametrize("bad", [dict(prompt=[]), dict(max_tokens=0), dict(num_draft=9)])
def test_bad_arguments_raise_one_line(bad):
    target = tiny_target("e2b")
    args = dict(prompt=[1, 2], max_tokens=4, num_draft=2) | bad
    with pytest.raises(MtpError) as e:
        list(speculative_generate_step(target, tiny_drafter(target), args.pop("prompt"), **args))
    assert "\n" not in str(e.value)

"""Sampling settings, the target/drafter distributions they define, and logits processors.

The distribution first, the draw second: lossless speculative sampling needs the target's
p *and* the drafter's q after the same temperature and filters, so ``log_probs`` returns
filtered log-probabilities (``-inf`` outside the kept set) rather than a token.
"""

import secrets
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .errors import MtpError

# A logits processor sees the token history (1-D) and logits [B, V]; returns new logits.
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy. top_k 0 and top_p 1.0 and min_p 0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    seed: Optional[int] = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature {self.temperature} is negative: use >= 0 (0 = greedy)"),
            (self.top_k >= 0, f"top_k {self.top_k} is negative: use >= 0 (0 = off)"),
            (0 < self.top_p <= 1, f"top_p {self.top_p} is out of range: use 0 < top_p <= 1"),
            (0 <= self.min_p < 1, f"min_p {self.min_p} is out of range: use 0 <= min_p < 1"),
            (self.repetition_penalty > 0, f"repetition_penalty {self.repetition_penalty} must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MtpError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processors(self) -> List[LogitsProcessor]:
        if self.repetition_penalty == 1.0:
            return []
        return [repetition_penalty(self.repetition_penalty, self.repetition_context_size)]


def log_probs(logits: mx.array, cfg: SamplingConfig) -> mx.array:
    """Filtered log-probabilities [..., V] in float32: temperature, then top-k, top-p, min-p
    (transformers' order). Tokens outside the kept set get -inf."""
    x = logits.astype(mx.float32) / cfg.temperature
    V = x.shape[-1]
    if 0 < cfg.top_k < V:
        kth = mx.sort(x, axis=-1)[..., V - cfg.top_k : V - cfg.top_k + 1]
        x = mx.where(x < kth, -mx.inf, x)
    lp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = mx.argsort(-lp, axis=-1)
        sorted_p = mx.exp(mx.take_along_axis(lp, order, axis=-1))
        before = mx.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each token
        keep_sorted = before < cfg.top_p
        keep = mx.put_along_axis(mx.zeros(lp.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
        lp = mx.where(keep, lp, -mx.inf)
    if cfg.min_p > 0:
        top = lp.max(axis=-1, keepdims=True)
        lp = mx.where(lp < top + mx.log(mx.array(cfg.min_p)), -mx.inf, lp)
    return lp - mx.logsumexp(lp, axis=-1, keepdims=True)


def draw(logp: mx.array, key: mx.array) -> mx.array:
    """One token per row from log-probabilities [..., V]."""
    return mx.random.categorical(logp, axis=-1, key=key).astype(mx.int32)


def repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Penalise tokens among the last ``context_size`` of the history (CTRL-style: divide
    positive logits by ``penalty``, multiply negative ones)."""

    def apply(history: mx.array, logits: mx.array) -> mx.array:
        if history.size == 0:
            return logits
        recent = history[-context_size:]
        sel = logits[:, recent]
        sel = mx.where(sel < 0, sel * penalty, sel / penalty)
        logits[:, recent] = sel
        return logits

    return apply


def apply_processors(
    processors: Sequence[LogitsProcessor], history: mx.array, chunk: mx.array, logits: mx.array
) -> mx.array:
    """Processed logits for each position j of a chunk: position j sees the history plus
    chunk[:j+1] only (so a verify position never sees drafts after it).

    history [H] int32; chunk [L] int32; logits [B, L, V] -> [B, L, V].
    """
    if not processors:
        return logits
    rows = []
    for j in range(logits.shape[1]):
        seen = mx.concatenate([history, chunk[: j + 1]])
        lj = logits[:, j]
        for proc in processors:
            lj = proc(seen, lj)
        rows.append(lj)
    return mx.stack(rows, axis=1)


# ---- per-row random streams ------------------------------------------------------------------
# A row's randomness is a pure function of (seed, request index, position, purpose), never of
# its batch-mates, its join time or the draft length: the same seeded request gives the same
# output alone or in any batch.
NOISE_TARGET, NOISE_DRAFT, NOISE_ACCEPT = 0, 1, 2
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints that scatters nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_key(seed: int, request: int, position: int, purpose: int) -> tuple:
    """The two uint32 words of the PRNG key for one (seed, request, position, purpose)."""
    h = _mix64(seed & _MASK64)
    for part in (request, position, purpose):
        h = _mix64(h ^ (part & _MASK64))
    return h >> 32, h & 0xFFFFFFFF


def noise_keys(seed: int, request: int, positions, purpose: int) -> mx.array:
    """PRNG keys [len(positions), 2] uint32 for ``mx.vmap``-ed draws."""
    words = [stream_key(seed, request, p, purpose) for p in positions]
    return mx.array(np.array(words, dtype=np.uint32).reshape(len(words), 2))


def gumbel(keys: mx.array, vocab: int) -> mx.array:
    """Standard Gumbel noise [N, V], one row per key."""
    return mx.vmap(lambda k: mx.random.gumbel(shape=(vocab,), key=k))(keys)


def uniform(keys: mx.array) -> mx.array:
    """One U[0, 1) draw per key [N]."""
    return mx.vmap(lambda k: mx.random.uniform(shape=(), key=k))(keys)


def fresh_seed() -> int:
    """A seed from the OS's entropy, for requests that give none."""
    return secrets.randbits(63)

"""Decode statistics: one definition, used by the API, the CLI, the server, tuning and the
benchmark scripts.

Definitions:
  rounds              target forwards after the prefill (one per round, drafting or not)
  acceptance_rate     accepted drafts / drafted tokens
  tokens_per_forward  tokens generated after the first / rounds (the first token comes from
                      the prefill; plain decoding gives exactly 1.0)
  generation_tps      tokens after the first / time from the first token to the last
  prompt_tps          prompt tokens / time from submission to the first token
  ttft                time from submission to the first token (queueing and prefill included)
"""

import time
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class RequestStats:
    """One request's counters (never shared between rows)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    generation_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    histogram: List[int] = field(default_factory=list)  # [n] = rounds that accepted n drafts
    ks: List[int] = field(default_factory=list)  # the K this row drafted, per round (append-only)
    submitted: float = 0.0
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None

    def add_round(self, k: int, accepted: int, tokens: int, now: float) -> None:
        self.rounds += 1
        self.drafted += k
        self.accepted += accepted
        self.ks.append(k)
        if k:
            self.histogram.extend([0] * (accepted + 1 - len(self.histogram)))
            self.histogram[accepted] += 1
        self.add_tokens(tokens, now)

    def add_tokens(self, n: int, now: float) -> None:
        if n and self.first_token_at is None:
            self.first_token_at = now
        if n:
            self.last_token_at = now
        self.generation_tokens += n

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return (self.generation_tokens - 1) / self.rounds if self.rounds else 0.0

    @property
    def ttft(self) -> float:
        return (self.first_token_at - self.submitted) if self.first_token_at is not None else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.ttft if self.ttft > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        if self.first_token_at is None or self.last_token_at is None or self.generation_tokens < 2:
            return 0.0
        dt = self.last_token_at - self.first_token_at
        return (self.generation_tokens - 1) / dt if dt > 0 else 0.0

    @property
    def parked_fraction(self) -> float:
        """Rounds in which this row drafted nothing, over all its rounds."""
        return sum(1 for k in self.ks if k == 0) / len(self.ks) if self.ks else 0.0

    def snapshot(self) -> "RequestStats":
        """A copy for one event. The K trace is append-only and shared with later snapshots
        (copying it every round would cost O(rounds) per round); ``ks[:rounds]`` is this one's."""
        return RequestStats(**{**self.__dict__, "histogram": list(self.histogram)})

    def as_dict(self) -> dict:
        """The figures a report or an HTTP response carries."""
        return {
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "generation_tokens": self.generation_tokens, "rounds": self.rounds,
            "drafted": self.drafted, "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_histogram": list(self.histogram),
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "prompt_tps": round(self.prompt_tps, 3), "generation_tps": round(self.generation_tps, 3),
            "ttft_s": round(self.ttft, 4), "parked_fraction": round(self.parked_fraction, 4),
        }


@dataclass
class RunStats:
    """Totals over the requests of one run or one engine's lifetime."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    rounds: int = 0  # batch rounds (one target forward each)
    row_rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None

    def add_request(self, r: RequestStats) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.generation_tokens += r.generation_tokens
        self.row_rounds += r.rounds
        self.drafted += r.drafted
        self.accepted += r.accepted
        if r.first_token_at is not None:
            self.first_token_at = min(self.first_token_at or r.first_token_at, r.first_token_at)
            self.last_token_at = max(self.last_token_at or 0.0, r.last_token_at or r.first_token_at)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Per row: tokens after each row's first / that row's rounds, pooled."""
        return (self.generation_tokens - self.requests) / self.row_rounds if self.row_rounds else 0.0

    @property
    def generation_tps(self) -> float:
        """All rows' tokens after their first / time from the first first token to the last token."""
        if self.first_token_at is None or self.last_token_at is None:
            return 0.0
        dt = self.last_token_at - self.first_token_at
        return (self.generation_tokens - self.requests) / dt if dt > 0 else 0.0

    @property
    def prompt_tps(self) -> float:
        dt = (self.first_token_at or 0.0) - self.started
        return self.prompt_tokens / dt if dt > 0 else 0.0

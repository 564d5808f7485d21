"""Prefix cache across requests: K/V snapshots of one row, reused by a later prompt that
starts with the same tokens (a conversation resending its history, a shared system prompt).

Snapshots are taken at segment boundaries (after a prompt's prefill and when a request
ends) and keyed by the exact tokens their cache holds. A later prompt reuses the snapshot
sharing its longest common prefix, where that prefix is still valid: full-attention layers
can go back to any length, but a sliding-window ring has overwritten its oldest slots, so it
can go back at most ``MAX_DRAFT`` positions from where the snapshot ended. At least the
prompt's last token is always prefilled, so the first round after a hit has the target's
hidden state and drafts. Budgeted in bytes, least recently used first out.
"""

from collections import OrderedDict
from typing import List, Optional, Tuple

from ..cache import TargetCache


def _common(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cache_bytes(cache: TargetCache) -> int:
    return sum(c.keys.nbytes + c.values.nbytes + c.pos.nbytes for c in cache.layers.values() if c.keys is not None)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: "OrderedDict[tuple, Tuple[TargetCache, int]]" = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0

    def store(self, tokens: List[int], cache: TargetCache) -> None:
        """Keep a one-row ``cache`` holding exactly ``tokens`` (the caller's copy)."""
        key = tuple(tokens)
        if self.max_bytes <= 0 or not key or key in self.entries:
            if key in self.entries:
                self.entries.move_to_end(key)
            return
        size = cache_bytes(cache)
        if size > self.max_bytes:
            return
        self.entries[key] = (cache, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, s) = self.entries.popitem(last=False)
            self.bytes -= s

    def lookup(self, prompt: List[int]) -> Tuple[Optional[TargetCache], int]:
        """(a fresh one-row cache holding the prompt's first n tokens, n) for the best valid
        snapshot, or (None, 0)."""
        best, best_n = None, 0
        for key, (cache, _) in self.entries.items():
            n = min(_common(list(key), prompt), len(prompt) - 1)
            if n > best_n and cache.can_rewind(n):
                best, best_n = key, n
        if best is None:
            self.misses += 1
            return None, 0
        self.entries.move_to_end(best)
        copy = self.entries[best][0].copy_rows([0])
        copy.rewind(best_n)
        self.hits += 1
        self.hit_tokens += best_n
        return copy, best_n

"""The target's KV cache, which the drafter reads in place.

Every slot carries the absolute position of the token it holds (``-1`` = empty), so one
masking rule (``mtp_mlx.ops.verify_attention``) serves full layers, sliding rings that have
wrapped, and rolled-back tails. Rollback is O(1): it moves the offset and marks the
rejected slots empty; it raises rather than trim less than asked.

Not here: the drafter owns no cache; KV-shared target layers own none either (they read
their producer's K/V inside the same forward).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from ..errors import MtpError


@dataclass
class KVView:
    """Keys, values and slot positions of one layer: k/v [B, nKV, S, D], pos [B, S]."""

    keys: mx.array
    values: mx.array
    pos: mx.array


class LayerCache:
    """K/V of one KV-owning layer.

    Full layers (``window=0``) keep a linear buffer grown in ``step``-sized chunks; slot ``j``
    holds position ``j``. Sliding layers keep a ring of ``window + max_draft`` slots, enough
    that writing a verify chunk of ``max_draft + 1`` tokens never overwrites a key that a
    query of that chunk (or a later one, after any rollback of up to ``max_draft``) needs.
    """

    def __init__(self, window: int = 0, max_draft: int = 8, step: int = 256):
        self.window = window
        self.max_draft = max_draft
        self.step = step
        self.capacity = window + max_draft if window else 0
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.pos: Optional[mx.array] = None  # [B, S] int32, sliding layers only
        self.offset = 0  # tokens held (next position to write)
        self._since_write = 0  # entries written by the latest update (the trimmable tail)

    # ---- writing -----------------------------------------------------------------------
    def update(self, k: mx.array, v: mx.array) -> KVView:
        """Append L entries at positions offset..offset+L-1; return what queries attend to.

        k, v: [B, nKV, L, D]. The returned view covers every key any of the L queries may
        see (for a sliding layer receiving a long chunk, the old ring plus the chunk).
        """
        L = k.shape[2]
        if self.window:
            view = self._update_ring(k, v)
        else:
            view = self._update_linear(k, v)
        self.offset += L
        self._since_write = L
        return view

    def _update_linear(self, k: mx.array, v: mx.array) -> KVView:
        B, H, L, D = k.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            extra = ((L + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, extra, D), dtype=k.dtype)
            new_v = mx.zeros((B, H, extra, v.shape[3]), dtype=v.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[:, :, : self.offset], new_k], axis=2)
                self.values = mx.concatenate([self.values[:, :, : self.offset], new_v], axis=2)
        self.keys[:, :, self.offset : end] = k
        self.values[:, :, self.offset : end] = v
        return self.view(end)

    def _update_ring(self, k: mx.array, v: mx.array) -> KVView:
        B, H, L, D = k.shape
        C = self.capacity
        new_pos = mx.broadcast_to(mx.arange(self.offset, self.offset + L, dtype=mx.int32), (B, L))
        if self.keys is None:
            self.keys = mx.zeros((B, H, C, D), dtype=k.dtype)
            self.values = mx.zeros((B, H, C, v.shape[3]), dtype=v.dtype)
            self.pos = mx.full((B, C), -1, dtype=mx.int32)
        if L <= self.max_draft + 1:
            # Short chunk: write first, then attend over the ring (no copy).
            self._scatter(k, v, new_pos)
            return KVView(self.keys, self.values, self.pos)
        # Long chunk (prefill): attend over old ring + chunk, then keep the last C entries.
        view = KVView(
            mx.concatenate([self.keys, k], axis=2),
            mx.concatenate([self.values, v], axis=2),
            mx.concatenate([self.pos, new_pos], axis=1),
        )
        keep = min(L, C)
        self._scatter(k[:, :, L - keep :], v[:, :, L - keep :], new_pos[:, L - keep :])
        return view

    def _scatter(self, k: mx.array, v: mx.array, pos: mx.array) -> None:
        slots = pos[0] % self.capacity
        self.keys[:, :, slots] = k
        self.values[:, :, slots] = v
        self.pos[:, slots] = pos

    # ---- reading -----------------------------------------------------------------------
    def view(self, length: Optional[int] = None) -> KVView:
        """The committed K/V (positions < ``length``, default all), without copying."""
        length = self.offset if length is None else length
        if self.window:
            return KVView(self.keys, self.values, self.pos)
        B = self.keys.shape[0]
        pos = mx.broadcast_to(mx.arange(length, dtype=mx.int32), (B, length))
        return KVView(self.keys[:, :, :length], self.values[:, :, :length], pos)

    # ---- rollback ----------------------------------------------------------------------
    def trim(self, n: int) -> int:
        """Drop the newest ``n`` entries. Raises if they cannot all be dropped."""
        if n == 0:
            return 0
        if n < 0 or n > self._since_write:
            raise MtpError(
                f"[LayerCache] cannot trim {n} entries: only the {self._since_write} written by "
                "the latest update can be rolled back"
            )
        if self.window:
            if n > self.max_draft:
                raise MtpError(
                    f"[LayerCache] cannot trim {n} entries from a sliding ring sized for "
                    f"{self.max_draft} drafts: build the cache with max_draft >= {n}"
                )
            slots = mx.arange(self.offset - n, self.offset, dtype=mx.int32) % self.capacity
            self.pos[:, slots] = -1
        self.offset -= n
        self._since_write -= n
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class TargetCache:
    """One ``LayerCache`` per KV-owning target layer (KV-shared layers have none)."""

    def __init__(self, layers: Dict[int, LayerCache], producers: Dict[str, int]):
        self.layers = layers
        self.producers = producers  # layer type -> producer layer index (spec §1.1)

    @property
    def offset(self) -> int:
        return next(iter(self.layers.values())).offset

    def trim(self, n: int) -> int:
        for c in self.layers.values():
            c.trim(n)
        return n

    def drafter_view(self) -> Dict[str, KVView]:
        """The producer layers' committed K/V, as views of this cache (no copies)."""
        return {t: self.layers[i].view() for t, i in self.producers.items()}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())


def make_target_cache(cfg, max_draft: int = 8) -> TargetCache:
    """Build the cache for a ``TextConfig``: one LayerCache per layer that owns K/V."""
    layers = {}
    for i in range(cfg.first_shared_layer):
        window = cfg.sliding_window if cfg.is_sliding(i) else 0
        layers[i] = LayerCache(window=window, max_draft=max_draft)
    producers = {}
    for t in ("sliding_attention", "full_attention"):
        p = cfg.producer(t)
        if p is not None:
            producers[t] = p
    return TargetCache(layers, producers)

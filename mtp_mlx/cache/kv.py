"""The target's KV cache, which the drafter reads in place.

Every slot carries the absolute position of the token it holds (``-1`` = empty), so one
masking rule (``mtp_mlx.ops.attention``) serves full layers, sliding rings that have
wrapped, rolled-back tails and ragged batches (each row has its own length). Rollback is
O(1) in host work: per-row offsets move back and the rejected slots are marked empty; it
raises rather than trim less than asked.

Not here: the drafter owns no cache; KV-shared target layers own none either (they read
their producer's K/V inside the same forward).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import mlx.core as mx

from ..errors import MtpError
from ..limits import MAX_DRAFT


@dataclass
class KVView:
    """Keys, values and slot positions of one layer: k/v [B, nKV, S, D], pos [B, S]."""

    keys: mx.array
    values: mx.array
    pos: mx.array


def _per_row(n: Union[int, Sequence[int]], rows: int) -> List[int]:
    return [n] * rows if isinstance(n, int) else list(n)


class LayerCache:
    """K/V of one KV-owning layer, for B rows of possibly different lengths.

    Full layers (``window=0``) keep a linear buffer grown in ``step``-sized chunks; slot ``j``
    holds position ``j``. Sliding layers keep a ring of ``window + max_draft`` slots (slot =
    position mod size), enough that writing a verify chunk of ``max_draft + 1`` tokens never
    overwrites a key that a query of that chunk, or a later one after any rollback of up to
    ``max_draft`` entries, still needs.
    """

    def __init__(self, window: int = 0, max_draft: int = MAX_DRAFT, step: int = 256):
        self.window = window
        self.max_draft = max_draft
        self.step = step
        self.capacity = window + max_draft if window else 0
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.pos: Optional[mx.array] = None  # [B, S] int32
        self.offsets: List[int] = []  # per row: tokens held (next position to write)
        self._since_write: List[int] = []  # per row: entries the latest update wrote

    @property
    def size(self) -> int:
        """Slots in use along the sequence axis (ring: all of them)."""
        return self.capacity if self.window else max(self.offsets, default=0)

    # ---- writing -----------------------------------------------------------------------
    def update(self, k: mx.array, v: mx.array, pos: Optional[mx.array] = None) -> KVView:
        """Append L entries per row at positions offsets[b] .. offsets[b]+L-1; return what
        the L queries attend to. k, v: [B, nKV, L, D]; ``pos``: those positions [B, L] int32
        when the caller has them already (the target's forward does; saves ops per layer)."""
        B, H, L, D = k.shape
        if self.keys is None:
            self.offsets, self._since_write = [0] * B, [0] * B
            S = self.capacity or self.step * ((L + self.step - 1) // self.step)
            self.keys = mx.zeros((B, H, S, D), dtype=k.dtype)
            self.values = mx.zeros((B, H, S, v.shape[3]), dtype=v.dtype)
            self.pos = mx.full((B, S), -1, dtype=mx.int32)
        if pos is None:
            pos = mx.array(self.offsets, dtype=mx.int32)[:, None] + mx.arange(L, dtype=mx.int32)
        new_pos = pos  # [B, L]
        if self.window and L > self.max_draft + 1:
            # Long chunk (prefill): attend over old ring + chunk, then keep the last entries.
            view = KVView(
                mx.concatenate([self.keys, k], axis=2),
                mx.concatenate([self.values, v], axis=2),
                mx.concatenate([self.pos, new_pos], axis=1),
            )
            keep = min(L, self.capacity)
            self._scatter(k[:, :, L - keep :], v[:, :, L - keep :], new_pos[:, L - keep :],
                          [o + L - keep for o in self.offsets])
        else:
            if not self.window:
                self._grow(max(self.offsets) + L)
            self._scatter(k, v, new_pos, self.offsets)
            view = None
        self.offsets = [o + L for o in self.offsets]
        self._since_write = [L] * B
        return view if view is not None else self.view()

    def _grow(self, needed: int) -> None:
        S = self.keys.shape[2]
        if needed <= S:
            return
        extra = self.step * ((needed - S + self.step - 1) // self.step)
        B, H, _, D = self.keys.shape
        self.keys = mx.concatenate([self.keys, mx.zeros((B, H, extra, D), self.keys.dtype)], axis=2)
        self.values = mx.concatenate(
            [self.values, mx.zeros((B, H, extra, self.values.shape[3]), self.values.dtype)], axis=2
        )
        self.pos = mx.concatenate([self.pos, mx.full((B, extra), -1, mx.int32)], axis=1)

    def _scatter(self, k: mx.array, v: mx.array, pos: mx.array, first: List[int]) -> None:
        """Write entries whose positions are pos [B, L]; ``first``: each row's first position."""
        B, H, L, D = k.shape
        lo = first[0] % self.capacity if self.window else first[0]
        if all(f == first[0] for f in first) and lo + L <= self.keys.shape[2]:
            # Fast path: every row writes the same contiguous slots (always so for one row).
            self.keys[:, :, lo : lo + L] = k
            self.values[:, :, lo : lo + L] = v
            self.pos[:, lo : lo + L] = pos
            return
        slots = pos % self.capacity if self.window else pos  # [B, L]
        idx = mx.broadcast_to(slots[:, None, :, None], (B, H, L, D))
        self.keys = mx.put_along_axis(self.keys, idx, k, axis=2)
        idx_v = mx.broadcast_to(slots[:, None, :, None], (B, H, L, v.shape[3]))
        self.values = mx.put_along_axis(self.values, idx_v, v, axis=2)
        self.pos = mx.put_along_axis(self.pos, slots, pos, axis=1)

    # ---- reading -----------------------------------------------------------------------
    def view(self) -> KVView:
        """The K/V held now, without copying (linear buffers: only the slots in use)."""
        S = self.size
        if self.window:
            return KVView(self.keys, self.values, self.pos)
        return KVView(self.keys[:, :, :S], self.values[:, :, :S], self.pos[:, :S])

    # ---- rollback and batch membership --------------------------------------------------
    def trim(self, n: Union[int, Sequence[int]]) -> None:
        """Drop the newest ``n[b]`` entries of each row. Raises if any cannot be dropped."""
        ns = _per_row(n, len(self.offsets))
        for b, nb in enumerate(ns):
            if nb < 0 or nb > self._since_write[b]:
                raise MtpError(
                    f"[LayerCache] cannot trim {nb} entries from row {b}: only the "
                    f"{self._since_write[b]} written by the latest update can be rolled back"
                )
            if self.window and nb > self.max_draft:
                raise MtpError(
                    f"[LayerCache] cannot trim {nb} entries from a sliding ring sized for "
                    f"{self.max_draft} drafts: build the cache with max_draft >= {nb}"
                )
        if not any(ns):
            return
        self.offsets = [o - nb for o, nb in zip(self.offsets, ns)]
        self._since_write = [w - nb for w, nb in zip(self._since_write, ns)]
        # Every slot at or past a row's new offset holds a rejected entry: mark it empty.
        new_off = mx.array(self.offsets, dtype=mx.int32)[:, None]
        self.pos = mx.where(self.pos >= new_off, -1, self.pos)

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows (a finished row leaves the batch)."""
        idx = mx.array(list(rows), dtype=mx.int32)
        self.keys, self.values, self.pos = self.keys[idx], self.values[idx], self.pos[idx]
        self.offsets = [self.offsets[r] for r in rows]
        self._since_write = [self._since_write[r] for r in rows]

    def copy_rows(self, rows: Sequence[int]) -> "LayerCache":
        """A new cache holding copies of these rows (later writes to either do not show in
        the other: MLX gathers make new arrays)."""
        out = LayerCache(self.window, self.max_draft, self.step)
        idx = mx.array(list(rows), dtype=mx.int32)
        out.keys, out.values, out.pos = self.keys[idx], self.values[idx], self.pos[idx]
        out.offsets = [self.offsets[r] for r in rows]
        out._since_write = [0] * len(out.offsets)
        return out

    def rewind(self, length: int) -> None:
        """Keep each row's first ``length`` positions (a prefix-cache hit on a shorter prefix).
        A ring can go back at most ``max_draft`` positions: older slots were overwritten."""
        for o in self.offsets:
            if length > o or (self.window and o - length > self.max_draft):
                raise MtpError(f"[LayerCache] cannot rewind a row of {o} positions to {length}")
        self.offsets = [length] * len(self.offsets)
        self._since_write = [0] * len(self.offsets)
        self.pos = mx.where(self.pos >= length, -1, self.pos)

    @classmethod
    def stack(cls, parts: Sequence["LayerCache"]) -> "LayerCache":
        """Join caches of separately prefilled row groups into one batch."""
        first = parts[0]
        out = cls(first.window, first.max_draft, first.step)
        S = max(p.keys.shape[2] for p in parts)
        for p in parts:
            p._grow(S)
        out.keys = mx.concatenate([p.keys for p in parts], axis=0)
        out.values = mx.concatenate([p.values for p in parts], axis=0)
        out.pos = mx.concatenate([p.pos for p in parts], axis=0)
        out.offsets = [o for p in parts for o in p.offsets]
        out._since_write = [0] * len(out.offsets)
        return out

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class TargetCache:
    """One ``LayerCache`` per KV-owning target layer (KV-shared layers have none)."""

    def __init__(self, layers: Dict[int, LayerCache], producers: Dict[str, int]):
        self.layers = layers
        self.producers = producers  # layer type -> the last target layer of that type that owns K/V

    @property
    def offsets(self) -> List[int]:
        """Per-row committed length (all layers agree)."""
        return next(iter(self.layers.values())).offsets

    @property
    def offset(self) -> int:
        """Length of a single-row cache."""
        (o,) = self.offsets
        return o

    def trim(self, n: Union[int, Sequence[int]]) -> None:
        for c in self.layers.values():
            c.trim(n)

    def select(self, rows: Sequence[int]) -> None:
        for c in self.layers.values():
            c.select(rows)

    def rewind(self, length: int) -> None:
        for c in self.layers.values():
            c.rewind(length)

    def can_rewind(self, length: int) -> bool:
        """Whether ``rewind(length)`` can keep every layer valid."""
        return all(length <= o and (not c.window or o - length <= c.max_draft)
                   for c in self.layers.values() for o in c.offsets)

    def copy_rows(self, rows: Sequence[int]) -> "TargetCache":
        return TargetCache({i: c.copy_rows(rows) for i, c in self.layers.items()}, self.producers)

    @classmethod
    def stack(cls, parts: Sequence["TargetCache"]) -> "TargetCache":
        layers = {i: LayerCache.stack([p.layers[i] for p in parts]) for i in parts[0].layers}
        return cls(layers, parts[0].producers)

    def drafter_view(self) -> Dict[str, KVView]:
        """The producer layers' K/V, as views of this cache (no copies)."""
        return {t: self.layers[i].view() for t, i in self.producers.items()}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())


def make_target_cache(cfg, max_draft: int = MAX_DRAFT) -> TargetCache:
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

"""Pipeline parallel Gemma 4 target: each rank holds a contiguous run of layers.

Rank 0 holds the first layers and the last rank the last ones (and the drafter's inputs: the
final hidden state and the producer layers' K/V). One target forward:

  rank s receives one message from rank s-1 (the hidden state [B, L, H] plus the new K/V rows
  of producer layers that later stages read), runs its layers, sends one message to rank s+1;
  the last rank applies the final norm and broadcasts the hidden state (one all_sum, the
  others adding zeros, which is exact); every rank then computes the logits with its own copy
  of the tied head. So the logits and hidden state are the same array on every rank, and every
  rank makes the same accept and rollback decisions.

KV-shared layers (E2B/E4B) attend to the K/V of a producer layer that may sit on an earlier
stage. That stage forwards the producer's new K/V rows with the hidden state; the reading
stage keeps a mirror of the producer's cache (same slots, same rollback), so only the new
rows move, never the cache. The last stage mirrors the producer layers the drafter reads when
it does not hold them itself.

The drafter (``PipelineDrafter``) runs on the last rank; each draft step's outputs are
broadcast with one all_sum of [B, 1, H_d + H], and every rank applies the drafter's head
itself, so every rank drafts the same tokens.

Ordering: MLX evaluates lazily, and a ``recv`` has no inputs, so nothing would stop a rank
from posting a forward's ``recv`` before the previous draft steps' all_sums, or interleaving
two forwards' messages. So a forward evaluates its input ids first and its collectives before
it returns (two host syncs per forward, only under pipeline parallel; each saves nothing
measurable against a network hop).
"""

import math
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVView, LayerCache, TargetCache
from ..errors import MtpError
from ..models.layers import scaled_embed_factor
from .tensor import ATTENTION_TYPES


def stage_bounds(n_layers: int, size: int) -> List[Tuple[int, int]]:
    """Contiguous [first, last) layer ranges per rank, as even as possible (earlier ranks get
    the extra layers: the last rank also runs the drafter)."""
    if n_layers < size:
        raise MtpError(f"pipeline over {size} ranks: the target has only {n_layers} layers: use at most "
                       f"{n_layers} ranks")
    base, extra = divmod(n_layers, size)
    out, a = [], 0
    for s in range(size):
        b = a + base + (1 if s < extra else 0)
        out.append((a, b))
        a = b
    return out


class _Dropped(nn.Module):
    """Stands in for a layer another rank holds (its weights are freed here)."""


class PipelineTarget:
    """A drop-in target (``target(ids, cache) -> TargetOut``) whose layers are split across
    ``group``. Attributes it does not define (``cfg``, ``embed``, ``head``...) come from the
    wrapped model."""

    def __init__(self, model, group, bounds: Optional[List[Tuple[int, int]]] = None):
        cfg = model.cfg
        self.model = model
        self.group = group
        self.size, self.rank = group.size(), group.rank()
        self.bounds = bounds or stage_bounds(cfg.num_hidden_layers, self.size)
        self.first, self.last = self.bounds[self.rank]
        self.is_last = self.rank == self.size - 1
        producers = {t: cfg.producer(t) for t in ATTENTION_TYPES}
        self.producers = {t: p for t, p in producers.items() if p is not None}
        # Producer layers each stage reads but does not hold (mirrored from upstream).
        needs = []
        for s, (a, b) in enumerate(self.bounds):
            need = {cfg.kv_source(i) for i in range(a, b) if not cfg.owns_kv(i)}
            if s == self.size - 1:
                need |= set(self.producers.values())
            needs.append(sorted(p for p in need if p < a))
        self.mirrors = needs[self.rank]
        # What crosses boundary s -> s+1: K/V of layers before stage s+1 read at or after it.
        self.carry = [sorted({p for t in range(s + 1, self.size) for p in needs[t] if p < self.bounds[s][1]})
                      for s in range(self.size)]
        self._drop_remote_weights()

    def __getattr__(self, name):
        return getattr(self.model, name)

    # ---- weights ------------------------------------------------------------------------
    def _drop_remote_weights(self) -> None:
        m, cfg = self.model, self.model.cfg
        for i in range(cfg.num_hidden_layers):
            if not self.first <= i < self.last:
                m.layers[i] = _Dropped()
        P = cfg.hidden_size_per_layer_input
        if P:
            # Keep only this stage's columns of the per-layer inputs (the per-layer norm works
            # on each layer's P-slice, so slicing is exact).
            lo, hi = self.first * P, self.last * P
            m.embed_tokens_per_layer.weight = m.embed_tokens_per_layer.weight[:, lo:hi]
            m.per_layer_model_projection.weight = m.per_layer_model_projection.weight[lo:hi]
        mx.eval(m.parameters())

    # ---- cache --------------------------------------------------------------------------
    def make_cache(self, max_draft: int = 8) -> TargetCache:
        cfg = self.model.cfg
        owned = [i for i in range(self.first, self.last) if cfg.owns_kv(i)]
        layers = {}
        for i in sorted(owned + self.mirrors):
            layers[i] = LayerCache(window=cfg.sliding_window if cfg.is_sliding(i) else 0, max_draft=max_draft)
        producers = {t: p for t, p in self.producers.items() if self.is_last and p in layers}
        return TargetCache(layers, producers)

    # ---- forward ------------------------------------------------------------------------
    def _per_layer_inputs(self, ids: mx.array, x0: mx.array) -> mx.array:
        m, cfg = self.model, self.model.cfg
        B, L = ids.shape
        n, P = self.last - self.first, cfg.hidden_size_per_layer_input
        t = m.embed_tokens_per_layer(ids)
        t = (t * scaled_embed_factor(P, t.dtype)).reshape(B, L, n, P)
        c = m.per_layer_model_projection(x0)
        c = (c.astype(mx.float32) * cfg.hidden_size**-0.5).astype(x0.dtype).reshape(B, L, n, P)
        c = m.per_layer_projection_norm(c)
        return ((c + t).astype(mx.float32) * 2.0**-0.5).astype(x0.dtype)

    def _kv_shape(self, i: int, B: int, L: int) -> Tuple[int, int, int, int]:
        cfg = self.model.cfg
        return (B, cfg.layer_kv_heads(i), L, cfg.layer_head_dim(i))

    def __call__(self, ids: mx.array, cache: TargetCache, logits_from: Optional[int] = None,
                 attn_backend: str = "auto", fused_ops: bool = False):
        """The target's forward, this rank's stage of it (``fused_ops`` is accepted for the
        target's call contract; the stages run uncompiled)."""
        from ..models.gemma4_text import TargetOut
        from ..ops.attention import visibility_mask

        m, cfg, grp = self.model, self.model.cfg, self.group
        mx.eval(ids)  # see the module docstring: this forward's recv must follow earlier collectives
        B, L = ids.shape
        H = cfg.hidden_size
        offsets = mx.array(cache.offsets or [0] * B, dtype=mx.int32)
        q_pos = offsets[:, None] + mx.arange(L, dtype=mx.int32)
        x0 = m.embed(ids)
        ple = self._per_layer_inputs(ids, x0) if cfg.hidden_size_per_layer_input else None
        views: Dict[int, KVView] = {}
        rows: Dict[int, Tuple[mx.array, mx.array]] = {}  # new K/V rows of producer layers
        if self.rank == 0:
            h = x0
        else:
            inbound = self.carry[self.rank - 1]
            shapes = [(B, L, H)] + [self._kv_shape(p, B, L) for p in inbound for _ in range(2)]
            sizes = [math.prod(s) for s in shapes]
            flat = mx.distributed.recv((sum(sizes),), x0.dtype, self.rank - 1, group=grp)
            cuts, acc = [], 0
            for n in sizes[:-1]:
                acc += n
                cuts.append(acc)
            parts = [p.reshape(s) for p, s in zip(mx.split(flat, cuts) if cuts else [flat], shapes)]
            h = parts[0]
            for j, p in enumerate(inbound):
                rows[p] = (parts[1 + 2 * j], parts[2 + 2 * j])
                if p in self.mirrors:
                    views[p] = cache.layers[p].update(*rows[p], q_pos)
        masks: Dict[str, mx.array] = {}
        for i in range(self.first, self.last):
            layer = m.layers[i]
            t = layer.layer_type
            attn = layer.self_attn
            if attn.owns_kv:
                k, v = attn.project_kv(layer.input_layernorm(h), offsets, m._periods[t])
                views[i] = cache.layers[i].update(k, v, q_pos)
                rows[i] = (k, v)
            kv = views[cfg.kv_source(i)]
            if t not in masks:
                masks[t] = visibility_mask(q_pos, kv.pos, attn.window)
            h = layer(h, offsets, m._periods[t], q_pos, kv, masks[t],
                      None if ple is None else ple[:, :, i - self.first], attn_backend)
        L_out = L - logits_from if logits_from else L
        if self.is_last:
            if logits_from:
                h = h[:, logits_from:]
            mine = m.norm(h)
        else:
            out = [h.reshape(-1)] + [a.astype(h.dtype).reshape(-1) for p in self.carry[self.rank] for a in rows[p]]
            sent = mx.distributed.send(mx.concatenate(out), self.rank + 1, group=grp)
            mine = mx.depends(mx.zeros((B, L_out, H), dtype=h.dtype), sent)
        hidden = mx.distributed.all_sum(mine, group=grp)
        # Run this forward's collectives now, in this order on every rank: a forward whose
        # outputs nobody reads (prefill slices) still sends, and two forwards queued in one
        # evaluation (a round and a prefill slice) cannot interleave their messages.
        mx.eval(hidden)
        shared = {t: views[p] for t, p in cache.producers.items() if p in views}
        return TargetOut(m.head(hidden), hidden, shared)


class PipelineDrafter:
    """The drafter under pipeline parallel: runs on the last rank (where its K/V and the final
    hidden state live); each step's outputs are broadcast so every rank's head picks the same
    draft. Other attributes (``cfg``, ``argmax``, ``logits``) come from the wrapped drafter."""

    def __init__(self, drafter, target: PipelineTarget):
        self.drafter = drafter
        self.group = target.group
        self.runs = target.is_last
        self._dtypes: Dict[tuple, mx.Dtype] = {}

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def __call__(self, emb, hidden, kv, q_pos, masks, *args, **kwargs):
        d = self.drafter
        Hd = d.cfg.text.hidden_size
        B = emb.shape[0]
        key = (emb.dtype, hidden.dtype)
        if key not in self._dtypes:  # the dtype the drafter computes in, known on every rank
            x = mx.concatenate([mx.zeros((1, 1, emb.shape[-1]), emb.dtype), mx.zeros((1, 1, hidden.shape[-1]), hidden.dtype)], -1)
            self._dtypes[key] = d.pre_projection(x).dtype
        dt = self._dtypes[key]
        if self.runs:
            hd, nxt = d(emb, hidden, kv, q_pos, masks, *args, **kwargs)
            mine = mx.concatenate([hd.astype(dt), nxt.astype(dt)], axis=-1)
        else:
            # Depend on this step's inputs so the all_sums of successive steps stay in order.
            mine = mx.depends(mx.zeros((B, 1, Hd + hidden.shape[-1]), dtype=dt), [emb, hidden])
        both = mx.distributed.all_sum(mine, group=self.group)
        return both[..., :Hd], both[..., Hd:]

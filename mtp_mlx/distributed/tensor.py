"""Tensor parallel Gemma 4 target: every rank holds a slice of every layer.

``shard_target(model, group)`` rewrites a loaded target in place (mlx-lm's pattern, which has
no Gemma 4 ``shard``): q and the MLP's gate/up are split by output (all-to-sharded), o and the
MLP's down by input (sharded-to-all, one ``all_sum``), the MoE experts along their
intermediate axis (one ``all_sum`` after the weighted sum). Embedding, LM head, norms, the
router and the per-layer-input (PLE) projections stay whole, so the residual stream, the
hidden state and the logits are the same array on every rank.

K/V heads: a layer's K/V projection is split when its KV heads divide by the group size;
otherwise (E2B and 12B have one KV head) each rank computes all of them and attends with the
slice its query heads read. The producer layers the drafter reads (the last KV-owning sliding
and full layer) always keep all their heads on every rank, so the drafter runs unchanged on
every rank with no collective and every rank drafts the same tokens.

Collectives per target forward: one ``all_sum`` of [B, L, H] after each attention, one after
each dense MLP, and one after each MoE block. The drafter adds none. A feed-forward block that
cannot be split evenly (its width, or for quantized weights its quantization groups) stays
whole on every rank and needs no all_sum (``TPPlan.whole`` lists them).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from ..cache import KVView
from ..errors import MtpError

ATTENTION_TYPES = ("sliding_attention", "full_attention")


@dataclass
class TPPlan:
    """What ``shard_target`` did: per layer, whether its K/V heads are split or replicated,
    and the all_sums one forward makes (``collectives``, each of [B, L, hidden_size])."""

    size: int
    rank: int
    kv: Dict[int, str] = field(default_factory=dict)  # layer -> "split" | "replicated" | "shared"
    collectives: int = 0
    whole: List[str] = field(default_factory=list)  # feed-forward blocks left whole on every rank

    def describe(self) -> str:
        split = sum(v == "split" for v in self.kv.values())
        rep = sum(v == "replicated" for v in self.kv.values())
        whole = f", {len(self.whole)} feed-forward blocks whole on every rank" if self.whole else ""
        return (f"tensor parallel over {self.size} ranks: K/V split in {split} layers, replicated in {rep}{whole}, "
                f"{self.collectives} all_sums per target forward")


def kv_slice(n_heads: int, n_kv: int, size: int, rank: int) -> Tuple[int, int]:
    """The KV heads [lo, hi) that this rank's query heads read, when q heads are split
    contiguously (rank r has q heads [r*n/size, (r+1)*n/size)) and query head j reads KV head
    j // (n_heads / n_kv) (grouped-query attention). Raises when the local heads do not form
    whole groups (then local attention would pair heads wrongly)."""
    nq = n_heads // size
    group = n_heads // n_kv
    q0 = rank * nq
    lo, hi = q0 // group, (q0 + nq - 1) // group + 1
    # Local q head j reads local KV head j // (nq / (hi - lo)): that must equal the global rule.
    n_local = hi - lo
    if nq % n_local or any((q0 + j) // group - lo != j // (nq // n_local) for j in range(nq)):
        raise MtpError(
            f"tensor parallel over {size} ranks: {n_heads} query heads with {n_kv} KV heads cannot be "
            f"split so that each rank holds whole head groups: use a group size that divides {n_kv} "
            f"or that {n_kv} divides"
        )
    return lo, hi


class _TPAttention:
    """Mixin over the target's Attention: attends to the K/V heads [kv_lo, kv_hi) of a
    replicated K/V (``kv_lo`` None: this rank's K/V is already its own slice)."""

    kv_lo: Optional[int] = None
    kv_hi: Optional[int] = None

    def __call__(self, x, offsets, periods, q_pos, kv: KVView, *args, **kwargs):
        if self.kv_lo is not None:
            kv = KVView(kv.keys[:, self.kv_lo : self.kv_hi], kv.values[:, self.kv_lo : self.kv_hi], kv.pos)
        return super().__call__(x, offsets, periods, q_pos, kv, *args, **kwargs)


class _TPExperts:
    """Mixin over the target's Experts: each rank holds every expert's slice of the
    intermediate axis; one all_sum completes the weighted sum."""

    group = None

    def __call__(self, *args, **kwargs):
        return mx.distributed.all_sum(super().__call__(*args, **kwargs), group=self.group)


def _mixed(obj, mixin):
    """Give ``obj`` the behaviour of ``mixin`` in front of its own class (same instance,
    same parameters; the model's classes stay untouched)."""
    cls = obj.__class__
    if issubclass(cls, mixin):
        return obj
    obj.__class__ = type(f"TP{cls.__name__}", (mixin, cls), {})
    return obj


def _check_divides(what: str, n: int, size: int, fix: str) -> None:
    if n % size:
        raise MtpError(f"tensor parallel over {size} ranks: {what} ({n}) does not divide by {size}: {fix}")


def _shard_linear(layer, kind: str, group):
    try:
        return shard_linear(layer, kind, group=group)
    except ValueError as e:  # quantized groups that straddle the split
        raise MtpError(f"tensor parallel: cannot split a {type(layer).__name__} ({e}): use fewer ranks "
                       f"or an unquantized checkpoint") from e


def kv_layout(cfg, size: int) -> Dict[int, str]:
    """Per layer of ``cfg`` (a TextConfig): "split" (its K/V heads divide among the ranks),
    "replicated" (every rank computes all heads: the drafter's producer layers, and layers
    whose heads do not divide) or "shared" (a KV-shared layer reading a replicated producer)."""
    producers = {p for p in (cfg.producer(t) for t in ATTENTION_TYPES) if p is not None}
    out = {}
    for i in range(cfg.num_hidden_layers):
        if not cfg.owns_kv(i):
            out[i] = "shared"
        elif i not in producers and cfg.layer_kv_heads(i) % size == 0:
            out[i] = "split"
        else:
            out[i] = "replicated"
    return out


def _splittable(down, size: int) -> bool:
    """Whether a feed-forward block whose output projection is ``down`` splits evenly along its
    intermediate axis: the width, and for quantized weights whole quantization groups (e.g. a
    704-wide expert in groups of 64 has 11 groups: not splittable in two)."""
    cols = down["scales"].shape[-1] if "scales" in down else down["weight"].shape[-1]
    return cols % size == 0


def check_tensor_parallel(cfg, size: int) -> None:
    """Raise MtpError when the attention heads of ``cfg`` (a TextConfig) cannot be split over
    ``size`` ranks. (A feed-forward block that cannot be split stays whole on every rank.)"""
    if size == 1:
        return
    _check_divides("the number of query heads", cfg.num_attention_heads, size,
                   "use a group size that divides it (Gemma 4 31B: 32 heads; 26B-A4B: 16; E2B: 8)")
    for i in range(cfg.num_hidden_layers):
        kv_slice(cfg.num_attention_heads, cfg.layer_kv_heads(i), size, 0)


def shard_target(model, group) -> TPPlan:
    """Shard a loaded Gemma 4 target in place across ``group`` (tensor parallel).

    The model keeps its call contract (``model(ids, cache) -> TargetOut``); logits and hidden
    states come out identical on every rank. Raises MtpError when the attention heads cannot be
    split over the group. Returns the plan (also stored as ``model.tp_plan``).
    """
    size, rank = group.size(), group.rank()
    cfg = model.cfg
    plan = TPPlan(size, rank)
    if size == 1:
        model.tp_plan = plan
        return plan
    check_tensor_parallel(cfg, size)
    layout = kv_layout(cfg, size)
    nh = cfg.num_attention_heads
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        n_kv = cfg.layer_kv_heads(i)
        attn.q_proj = _shard_linear(attn.q_proj, "all-to-sharded", group)
        attn.o_proj = _shard_linear(attn.o_proj, "sharded-to-all", group)
        attn.n_heads = nh // size
        plan.collectives += 1
        _mixed(attn, _TPAttention)
        if layout[i] == "split":
            attn.k_proj = _shard_linear(attn.k_proj, "all-to-sharded", group)
            if not attn.k_eq_v:
                attn.v_proj = _shard_linear(attn.v_proj, "all-to-sharded", group)
            attn.n_kv = n_kv // size
            attn.kv_lo = attn.kv_hi = None
        else:
            # All heads on every rank (the drafter's producers, a KV-shared layer reading one,
            # or KV heads that do not divide): attend with the slice the local q heads read.
            attn.kv_lo, attn.kv_hi = kv_slice(nh, n_kv, size, rank)
        plan.kv[i] = layout[i]
        mlp = layer.mlp
        if _splittable(mlp.down_proj, size):
            mlp.gate_proj = _shard_linear(mlp.gate_proj, "all-to-sharded", group)
            mlp.up_proj = _shard_linear(mlp.up_proj, "all-to-sharded", group)
            mlp.down_proj = _shard_linear(mlp.down_proj, "sharded-to-all", group)
            plan.collectives += 1
        else:
            plan.whole.append(f"layers.{i}.mlp")
        if getattr(layer, "moe", False):
            glu = layer.experts.switch_glu
            if _splittable(glu.down_proj, size):
                shard_inplace(glu.gate_proj, "all-to-sharded", group=group)
                shard_inplace(glu.up_proj, "all-to-sharded", group=group)
                shard_inplace(glu.down_proj, "sharded-to-all", group=group)
                _mixed(layer.experts, _TPExperts)
                layer.experts.group = group
                plan.collectives += 1
            else:
                plan.whole.append(f"layers.{i}.experts")
    mx.eval(model.parameters())
    model.tp_plan = plan
    return plan


def is_sharded(module: nn.Module) -> bool:
    return getattr(module, "tp_plan", None) is not None and module.tp_plan.size > 1

"""Gemma 4 MTP drafter: ``gemma4_assistant`` and ``gemma4_unified_assistant`` .

One draft step maps (scaled target embedding of the last token, target hidden) to a token
distribution and the next hidden to feed back. The drafter owns no K/V: its four layers
attend to the target's producer layers' K/V (passed in as ``KVView``s of the target cache).

Heads: the tied dense head (26B/31B/12B) and the centroid "ordered embedding" head
(E2B/E4B), whose greedy path never materialises the full-vocabulary logits.

Not here: the round itself (``mtp_mlx.decoding.draft``), which picks query positions and masks.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVView
from ..ops import attention
from ..ops.attention import visibility_mask
from .config import DrafterConfig
from .layers import MLP, RMSNorm, apply_rope, fused, rope_inv_freq, rope_periods


@dataclass
class DraftMask:
    """How one layer type's query sees the shared K/V: key visible iff
    ``0 <= pos <= q`` and ``q - pos < window`` (window 0 = unlimited). q: [B, 1] int32.
    ``dense``: that rule evaluated on the K/V's positions, when a round shares it across steps."""

    q: mx.array
    window: int
    dense: Optional[mx.array] = None


class Attention(nn.Module):
    def __init__(self, cfg, i: int):
        super().__init__()
        self.head_dim = hd = cfg.layer_head_dim(i)
        self.n_heads = cfg.num_attention_heads
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=False)

    def project_q(self, x, offsets, periods):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        return apply_rope(q.transpose(0, 2, 1, 3), offsets, periods)



class DecoderLayer(nn.Module):
    def __init__(self, cfg, i: int):
        super().__init__()
        H = cfg.hidden_size
        self.layer_type = cfg.layer_types[i]
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(H, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.layer_scalar = mx.ones((1,))

    # The layer as two pure pieces around its attention (which reads the target's K/V), so
    # the model can run them compiled (``layers.fused``).
    def begin(self, x, offsets, periods):
        """Q of this layer's attention for the residual stream ``x``."""
        return self.self_attn.project_q(self.input_layernorm(x), offsets, periods)

    def finish(self, x, o):
        """The rest of the layer from the attention's per-head output ``o`` [B, L, nH * D]."""
        x = x + self.post_attention_layernorm(self.self_attn.o_proj(o))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar.astype(x.dtype)


class TextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # the tied head only
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MaskedEmbedder(nn.Module):
    """Centroid head: score 2048 clusters, keep the top k, score only their tokens."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.num_centroids = cfg.num_centroids
        self.top_k = cfg.centroid_intermediate_top_k
        self.per_centroid = cfg.text.vocab_size // cfg.num_centroids
        self.centroids = nn.Linear(cfg.text.hidden_size, cfg.num_centroids, bias=False)
        self.token_ordering = mx.zeros((cfg.text.vocab_size,), dtype=mx.int32)

    def select(self, hd: mx.array, table: nn.Module) -> Tuple[mx.array, mx.array]:
        """(candidate ids [B, L, k*m], their logits [B, L, k*m]) for hidden hd [B, L, Hd]."""
        B, L, _ = hd.shape
        cl = self.centroids(hd)
        top = mx.argpartition(-cl, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        ids = self.token_ordering.reshape(self.num_centroids, self.per_centroid)[top]
        ids = ids.reshape(B, L, -1)
        rows = table(ids)  # [B, L, k*m, Hd]; a quantized table is dequantized by the gather
        logits = (rows @ hd[..., None]).squeeze(-1)
        return ids, logits


class Model(nn.Module):
    """The MTP assistant. Parameter names follow the HF checkpoint."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.model = TextModel(t)
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, cfg.backbone_hidden_size, bias=False)
        if cfg.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(cfg)
        self._periods = {
            lt: rope_periods(rope_inv_freq(t.rope_parameters[lt], t.global_head_dim if lt == "full_attention" else t.head_dim))
            for lt in set(t.layer_types)
        }

    def __call__(
        self,
        emb: mx.array,
        hidden: mx.array,
        kv: Dict[str, KVView],
        q_pos: mx.array,
        masks: Dict[str, DraftMask],
        attn_backend: str = "auto",
        fused_ops: bool = True,
    ) -> Tuple[mx.array, mx.array]:
        """One draft step.

        emb: scaled target embedding of the token to feed [B, 1, H_t]; hidden: target hidden
        (or the fed-back projection) [B, 1, H_t]; q_pos: RoPE position [B, 1].
        Returns (head hidden [B, 1, H_d] after the final norm, next hidden [B, 1, H_t]).
        ``fused_ops``: run the pieces around each attention compiled (bit-identical).
        """
        x = (fused(self, "start") if fused_ops else self.start)(emb, hidden)
        offsets = q_pos[:, 0]
        dense = {
            t: m.dense if m.dense is not None else visibility_mask(m.q, kv[t].pos, m.window)
            for t, m in masks.items() if t in kv
        }
        B, L, _ = x.shape
        for layer in self.model.layers:
            t = layer.layer_type
            begin, finish = (fused(layer, "begin"), fused(layer, "finish")) if fused_ops else (layer.begin, layer.finish)
            q = begin(x, offsets, self._periods[t])
            o = attention(q, kv[t].keys, kv[t].values, q_pos=masks[t].q, k_pos=kv[t].pos, window=masks[t].window,
                          scale=1.0, backend=attn_backend, mask=dense[t])
            x = finish(x, o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        return (fused(self, "end") if fused_ops else self.end)(x)

    def start(self, emb: mx.array, hidden: mx.array) -> mx.array:
        return self.pre_projection(mx.concatenate([emb, hidden], axis=-1))

    def end(self, x: mx.array) -> Tuple[mx.array, mx.array]:
        hd = self.model.norm(x)
        return hd, self.post_projection(hd)

    # ---- heads -----------------------------------------------------------------------
    def logits(self, hd: mx.array, fill: str = "-inf") -> mx.array:
        """Full-vocabulary logits [B, L, V]. Centroid head: unselected tokens get -inf
        (``fill="-inf"``, a true sparse distribution) or, for reference parity, HF's
        ``min(selected) - 1`` over the whole batch (``fill="hf"``)."""
        if not self.cfg.use_ordered_embeddings:
            return self.model.embed_tokens.as_linear(hd)
        ids, sel = self.masked_embedding.select(hd, self.model.embed_tokens)
        B, L, _ = hd.shape
        V = self.cfg.text.vocab_size
        value = sel.min() - 1 if fill == "hf" else mx.array(-mx.inf, dtype=sel.dtype)
        out = mx.full((B * L, V), value, dtype=sel.dtype)
        out[mx.arange(B * L)[:, None], ids.reshape(B * L, -1)] = sel.reshape(B * L, -1)
        return out.reshape(B, L, V)

    def _head_scores(self, hd: mx.array) -> Tuple[Optional[mx.array], mx.array]:
        """(candidate ids or None, their logits): the whole vocabulary for the dense head (ids
        None: the index is the token); the selected clusters' candidates for the centroid head."""
        if not self.cfg.use_ordered_embeddings:
            return None, self.model.embed_tokens.as_linear(hd)
        return self.masked_embedding.select(hd, self.model.embed_tokens)

    @staticmethod
    def _token_of(ids: Optional[mx.array], pick: mx.array) -> mx.array:
        return pick if ids is None else mx.take_along_axis(ids, pick[..., None], axis=-1)[..., 0]

    def argmax(self, hd: mx.array) -> mx.array:
        """Greedy token [B, L] without materialising the full vocabulary for the centroid head."""
        ids, sel = self._head_scores(hd)
        return self._token_of(ids, mx.argmax(sel, axis=-1))

    def argmax_confidence(self, hd: mx.array) -> Tuple[mx.array, mx.array]:
        """(greedy token [B, L], its probability [B, L] in float32): the drafter's confidence.

        The probability is that of the distribution ``logits`` describes: the whole vocabulary
        for the dense head; the selected clusters' candidates for the centroid head (the rest
        have probability 0), so it costs one log-sum-exp over the candidates already scored."""
        ids, sel = self._head_scores(hd)
        best = self._token_of(ids, mx.argmax(sel, axis=-1))
        sel = sel.astype(mx.float32)
        return best, mx.exp(sel.max(axis=-1) - mx.logsumexp(sel, axis=-1))

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        out = {}
        for name, w in weights.items():
            if name.startswith("lm_head"):
                continue  # tied to model.embed_tokens (the checkpoint's lm_head is a copy)
            if name.endswith("token_ordering"):
                w = w.astype(mx.int32)
            out[name] = w
        return out

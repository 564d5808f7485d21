"""Gemma 4 text stack (the speculative target), our own MLX implementation.

Covers every released kind: E2B/E4B (per-layer embeddings, KV-shared layers, double-wide
MLP), 26B-A4B (routed experts beside the dense MLP, V from the K projection), 31B (dense)
and the 12B ``gemma4_unified`` text stack. A forward over L tokens (prefill, one decode
token or a K+1 verify chunk) returns logits, the final-normed hidden states and the
producer layers' K/V that the drafter reads.

Not here: sampling, acceptance, rollback policy (``mtp_mlx.decoding``), weight I/O
(``mtp_mlx.loading``).
"""

from dataclasses import dataclass
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from ..cache import KVView, TargetCache, make_target_cache
from ..limits import MAX_DRAFT
from ..ops import attention
from ..ops.attention import visibility_mask
from .config import TextConfig
from .layers import FUSED_MAX_LEN, MLP, RMSNorm, apply_rope, fused, rope_inv_freq, rope_periods, scaled_embed_factor, softcap

# Checkpoint keys that belong to other modalities: never read (a CondGen checkpoint holds vision and audio towers).
_NON_TEXT = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "vision_embedder",
             "multi_modal_projector")
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def is_text_weight(name: str) -> bool:
    """Whether a checkpoint key is part of the text model (the only keys the loader reads)."""
    if any(part in name for part in _NON_TEXT):
        return False
    return not ("rotary_emb" in name or name.endswith(("input_max", "input_min", "output_max", "output_min")))


@dataclass
class TargetOut:
    """logits [B, L, V] (softcapped), hidden [B, L, H] (after the final norm), and the
    producer layers' K/V after this forward's cache update, keyed by layer type."""

    logits: mx.array
    hidden: mx.array
    shared_kv: Dict[str, KVView]


class GeGLU(nn.Module):
    def __call__(self, x, gate):
        return nn.gelu_approx(gate) * x


class Router(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = mx.ones((cfg.hidden_size,))
        self.per_expert_scale = mx.ones((cfg.num_experts,))
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.top_k_experts
        self.root = cfg.hidden_size**-0.5

    def __call__(self, h: mx.array):
        z = mx.fast.rms_norm(h, None, self.eps)
        # Scalars applied in float32 like torch's opmath (bf16 products would round differently).
        z = ((z * self.scale).astype(mx.float32) * self.root).astype(h.dtype)
        probs = mx.softmax(self.proj(z).astype(mx.float32), axis=-1)
        idx = mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        return idx, w * self.per_expert_scale[idx]


class Experts(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.switch_glu = SwitchGLU(
            cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, activation=GeGLU()
        )

    def __call__(self, x: mx.array, idx: mx.array, w: mx.array) -> mx.array:
        y = self.switch_glu(x, idx)  # [B, L, k, H]
        return (y * w[..., None].astype(y.dtype)).sum(axis=-2)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        self.head_dim = hd = cfg.layer_head_dim(i)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.layer_kv_heads(i)
        self.window = cfg.sliding_window if cfg.is_sliding(i) else 0
        self.owns_kv = cfg.owns_kv(i)
        self.k_eq_v = cfg.layer_k_eq_v(i)
        self.eps = cfg.rms_norm_eps
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        if self.owns_kv:
            self.k_proj = nn.Linear(H, self.n_kv * hd, bias=False)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(H, self.n_kv * hd, bias=False)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def project_kv(self, x: mx.array, offsets, periods):
        """K (normed, RoPE'd) and V (normed, no RoPE) as [B, nKV, L, D]."""
        B, L, _ = x.shape
        raw = self.k_proj(x).reshape(B, L, self.n_kv, self.head_dim)
        v = raw if self.k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv, self.head_dim)
        k = apply_rope(self.k_norm(raw).transpose(0, 2, 1, 3), offsets, periods)
        v = mx.fast.rms_norm(v, None, self.eps)
        return k, v.transpose(0, 2, 1, 3)

    def project_q(self, x: mx.array, offsets, periods) -> mx.array:
        """Q (normed, RoPE'd) as [B, nH, L, D]."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        return apply_rope(q.transpose(0, 2, 1, 3), offsets, periods)

    def __call__(self, x, offsets, periods, q_pos, kv: KVView, mask, attn_backend: str = "auto"):
        B, L, _ = x.shape
        q = self.project_q(x, offsets, periods)
        o = attention(
            q, kv.keys, kv.values, q_pos=q_pos, k_pos=kv.pos, window=self.window,
            scale=1.0, backend=attn_backend, mask=mask,
        )
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        H = cfg.hidden_size
        self.layer_type = cfg.layer_types[i]
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(H, cfg.layer_intermediate(i))
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(H, cfg.rms_norm_eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, cfg.rms_norm_eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, cfg.rms_norm_eps)
        self.ple = cfg.hidden_size_per_layer_input
        if self.ple:
            self.per_layer_input_gate = nn.Linear(H, self.ple, bias=False)
            self.per_layer_projection = nn.Linear(self.ple, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, h, offsets, periods, q_pos, kv, mask, ple_i=None, attn_backend="auto"):
        a = self.self_attn(self.input_layernorm(h), offsets, periods, q_pos, kv, mask, attn_backend)
        return self.after_attention(h, a, ple_i)

    # The same layer in two pure pieces around the attention itself, which the model compiles
    # (``layers.fused``) for decode and verify chunks; ``begin`` also normalises the input once
    # for Q, K and V.
    def begin(self, h, offsets, periods):
        """(Q,) or (Q, K, V) of this layer's attention for the residual stream ``h``."""
        attn = self.self_attn
        x = self.input_layernorm(h)
        q = attn.project_q(x, offsets, periods)
        return (q, *attn.project_kv(x, offsets, periods)) if attn.owns_kv else (q,)

    def finish(self, h, o, ple_i=None):
        """The rest of the layer from the attention's per-head output ``o`` [B, L, nH * D]."""
        return self.after_attention(h, self.self_attn.o_proj(o), ple_i)

    def after_attention(self, h, a, ple_i=None):
        """Everything after the attention output ``a``: residuals, norms, the MLP (and the
        experts), the per-layer input and the layer scalar."""
        h = h + self.post_attention_layernorm(a)
        r = h
        y = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:
            idx, w = self.router(r)
            e = self.experts(self.pre_feedforward_layernorm_2(r), idx, w)
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(e)
        h = r + self.post_feedforward_layernorm(y)
        if self.ple:
            g = nn.gelu_approx(self.per_layer_input_gate(h)) * ple_i
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return h * self.layer_scalar.astype(h.dtype)


class Model(nn.Module):
    """The Gemma 4 target. Parameter names are HF's text-model keys (experts: mlx-lm's)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        H, N = cfg.hidden_size, cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.layers = [DecoderLayer(cfg, i) for i in range(N)]
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        P = cfg.hidden_size_per_layer_input
        if P:
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, N * P)
            self.per_layer_model_projection = nn.Linear(H, N * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        self._periods = {
            t: rope_periods(rope_inv_freq(cfg.rope_parameters[t], cfg.global_head_dim if t == "full_attention" else cfg.head_dim))
            for t in set(cfg.layer_types)
        }

    # ---- pieces the drafter and the loop use ------------------------------------------
    def embed(self, ids: mx.array) -> mx.array:
        """Scaled token embedding ``E[ids] * bf16(sqrt(H))`` [B, L, H] (the scale is rounded to bf16 as the reference does)."""
        e = self.embed_tokens(ids)
        return e * scaled_embed_factor(self.cfg.hidden_size, e.dtype)

    def head(self, hidden: mx.array) -> mx.array:
        """Tied, softcapped LM head on final-normed hidden states."""
        return softcap(self.embed_tokens.as_linear(hidden), self.cfg.final_logit_softcapping)

    def make_cache(self, max_draft: int = MAX_DRAFT) -> TargetCache:
        return make_target_cache(self.cfg, max_draft=max_draft)

    def _per_layer_inputs(self, ids: mx.array, x0: mx.array) -> mx.array:
        cfg = self.cfg
        B, L = ids.shape
        N, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        t = self.embed_tokens_per_layer(ids)
        t = (t * scaled_embed_factor(P, t.dtype)).reshape(B, L, N, P)
        c = self.per_layer_model_projection(x0)
        c = (c.astype(mx.float32) * cfg.hidden_size**-0.5).astype(x0.dtype).reshape(B, L, N, P)
        c = self.per_layer_projection_norm(c)
        return ((c + t).astype(mx.float32) * 2.0**-0.5).astype(x0.dtype)

    # ---- forward ------------------------------------------------------------------------
    def __call__(
        self,
        ids: mx.array,
        cache: TargetCache,
        logits_from: Optional[int] = None,
        attn_backend: str = "auto",
        fused_ops: bool = True,
    ) -> TargetOut:
        """Run L tokens per row at positions offsets[b] .. offsets[b]+L-1, updating the cache.

        ``logits_from``: compute logits and hidden only from this index on (prefill needs only
        the last position); default all positions. ``fused_ops``: on decode and verify chunks,
        run the embedding, each layer's two pieces around its attention (``begin``,
        ``finish``) and the head compiled (``layers.fused``; bit-identical; off for a
        tensor-parallel model, whose layers hold collectives).
        """
        cfg = self.cfg
        B, L = ids.shape
        fused_ops = fused_ops and L <= FUSED_MAX_LEN and getattr(getattr(self, "tp_plan", None), "size", 1) == 1
        offsets = mx.array(cache.offsets or [0] * B, dtype=mx.int32)
        q_pos = offsets[:, None] + mx.arange(L, dtype=mx.int32)
        h, *ple = (fused(self, "inputs") if fused_ops else self.inputs)(ids)
        ple = ple[0] if ple else None
        views: Dict[int, KVView] = {}
        masks: Dict[str, mx.array] = {}  # one visibility mask per layer type and forward
        for i, layer in enumerate(self.layers):
            t = layer.layer_type
            attn = layer.self_attn
            ple_i = None if ple is None else ple[:, :, i]
            if fused_ops:
                qkv = fused(layer, "begin")(h, offsets, self._periods[t])
            if attn.owns_kv:
                k, v = qkv[1:] if fused_ops else attn.project_kv(layer.input_layernorm(h), offsets, self._periods[t])
                views[i] = cache.layers[i].update(k, v, q_pos)
            kv = views[cfg.kv_source(i)]
            if t not in masks:
                masks[t] = visibility_mask(q_pos, kv.pos, attn.window)
            if not fused_ops:
                h = layer(h, offsets, self._periods[t], q_pos, kv, masks[t], ple_i, attn_backend)
                continue
            o = attention(qkv[0], kv.keys, kv.values, q_pos=q_pos, k_pos=kv.pos, window=attn.window,
                          scale=1.0, backend=attn_backend, mask=masks[t])
            o = o.transpose(0, 2, 1, 3).reshape(B, L, -1)
            finish = fused(layer, "finish")
            h = finish(h, o) if ple_i is None else finish(h, o, ple_i)
        if logits_from:
            h = h[:, logits_from:]
        logits, hidden = (fused(self, "outputs") if fused_ops else self.outputs)(h)
        shared = {t: views[p] for t, p in cache.producers.items()}
        return TargetOut(logits, hidden, shared)

    def inputs(self, ids: mx.array):
        """(scaled embeddings,) or (scaled embeddings, per-layer inputs) of ``ids``."""
        h = self.embed(ids)
        return (h, self._per_layer_inputs(ids, h)) if self.cfg.hidden_size_per_layer_input else (h,)

    def outputs(self, h: mx.array):
        """(logits, final-normed hidden) from the last layer's output."""
        hidden = self.norm(h)
        return self.head(hidden), hidden

    # ---- weights ------------------------------------------------------------------------
    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map HF (CondGen or CausalLM) or mlx-lm checkpoint keys to ours."""
        cfg = self.cfg
        out = {}
        for name, w in weights.items():
            if not is_text_weight(name) or name.startswith("lm_head"):
                continue
            for p in _PREFIXES:
                if name.startswith(p):
                    name = name[len(p):]
                    break
            parts = name.split(".")
            if parts[0] == "layers" and not cfg.owns_kv(int(parts[1])):
                if any(f"self_attn.{n}." in name for n in ("k_proj", "v_proj", "k_norm", "v_norm")):
                    continue
            if name.endswith("experts.gate_up_proj"):
                gate, up = mx.split(w, 2, axis=-2)
                base = name[: -len("gate_up_proj")] + "switch_glu."
                out[base + "gate_proj.weight"] = gate
                out[base + "up_proj.weight"] = up
                continue
            if name.endswith("experts.down_proj"):
                out[name[: -len("down_proj")] + "switch_glu.down_proj.weight"] = w
                continue
            out[name] = w
        return out

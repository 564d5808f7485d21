"""Tiny random in-memory models for tests that need no checkpoint on disk."""

import mlx.core as mx

from mtp_mlx.models.config import DrafterConfig, TextConfig
from mtp_mlx.models.gemma4_assistant import Model as Drafter
from mtp_mlx.models.gemma4_text import Model as Target

SLIDING, FULL = "sliding_attention", "full_attention"


def target_config(kind: str = "e2b", window: int = 8) -> TextConfig:
    common = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, global_head_dim=64, intermediate_size=128, sliding_window=window,
                  final_logit_softcapping=30.0, max_position_embeddings=4096)
    if kind == "e2b":
        return TextConfig(num_hidden_layers=8, layer_types=[SLIDING] * 3 + [FULL] + [SLIDING] * 3 + [FULL],
                          num_kv_shared_layers=3, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                          vocab_size_per_layer_input=256, **common)
    if kind == "moe":
        return TextConfig(num_hidden_layers=6, layer_types=[SLIDING] * 5 + [FULL], attention_k_eq_v=True,
                          num_global_key_value_heads=1, enable_moe_block=True, num_experts=4,
                          top_k_experts=2, moe_intermediate_size=32, **common)
    raise ValueError(kind)


def drafter_config(target: TextConfig, centroid: bool = True) -> DrafterConfig:
    return DrafterConfig.from_dict({
        "model_type": "gemma4_assistant", "backbone_hidden_size": target.hidden_size,
        "use_ordered_embeddings": centroid, "num_centroids": 8, "centroid_intermediate_top_k": 2,
        "text_config": dict(vocab_size=target.vocab_size, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=target.num_key_value_heads,
                            num_global_key_value_heads=target.num_global_key_value_heads,
                            attention_k_eq_v=target.attention_k_eq_v,
                            head_dim=target.head_dim, global_head_dim=target.global_head_dim,
                            intermediate_size=64, layer_types=[SLIDING] * 3 + [FULL],
                            sliding_window=target.sliding_window),
    })


def _perturb(model, seed: int):
    """Randomise every parameter, including norm scales and layer scalars (identity at init)."""
    mx.random.seed(seed)
    from mlx.utils import tree_flatten, tree_unflatten

    params = []
    for name, p in tree_flatten(model.parameters()):
        if p.dtype == mx.int32:
            params.append((name, p))
        elif name.endswith(("norm.weight", "layer_scalar", "scale", "per_expert_scale")):
            params.append((name, 1.0 + 0.2 * mx.random.normal(p.shape)))
        else:
            params.append((name, 0.08 * mx.random.normal(p.shape)))
    model.update(tree_unflatten(params))
    return model


def tiny_target(kind: str = "e2b", window: int = 8, seed: int = 0) -> Target:
    return _perturb(Target(target_config(kind, window)), seed)


def tiny_drafter(target: Target, centroid: bool = True, seed: int = 1) -> Drafter:
    d = _perturb(Drafter(drafter_config(target.cfg, centroid)), seed)
    if centroid:
        d.masked_embedding.token_ordering = mx.random.permutation(target.cfg.vocab_size).astype(mx.int32)
    return d

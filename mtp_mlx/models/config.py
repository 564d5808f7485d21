"""Model configurations read from checkpoint ``config.json`` files.

Never rely on library defaults (they differ between Gemma 4 sizes and library versions): every field that changes the computation is
read from the file; the few defaults here are HF's own, used only when a key is absent.
"""

from dataclasses import dataclass, field
from typing import Optional

from ..errors import MtpError

TARGET_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
DRAFTER_MODEL_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")

DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    },
}


@dataclass
class TextConfig:
    """The Gemma 4 text stack (target, or the drafter's 4-layer body)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    intermediate_size: int
    layer_types: list
    sliding_window: int
    rms_norm_eps: float = 1e-6
    num_global_key_value_heads: Optional[int] = None
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    enable_moe_block: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    final_logit_softcapping: Optional[float] = None
    rope_parameters: dict = field(default_factory=lambda: dict(DEFAULT_ROPE))
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    model_type: str = "gemma4_text"

    # ---- derived per-layer geometry -------------------------------------------------
    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == "sliding_attention"

    def layer_head_dim(self, i: int) -> int:
        return self.head_dim if self.is_sliding(i) else self.global_head_dim

    def layer_kv_heads(self, i: int) -> int:
        if not self.is_sliding(i) and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def layer_k_eq_v(self, i: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(i)

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def owns_kv(self, i: int) -> bool:
        return i < self.first_shared_layer

    def producer(self, layer_type: str) -> Optional[int]:
        """Last KV-owning layer of ``layer_type`` (the layer whose K/V the drafter reads)."""
        owners = [i for i in range(self.first_shared_layer) if self.layer_types[i] == layer_type]
        return owners[-1] if owners else None

    def kv_source(self, i: int) -> int:
        """The layer whose K/V layer ``i`` attends to (itself, or its producer if shared)."""
        return i if self.owns_kv(i) else self.producer(self.layer_types[i])

    def layer_intermediate(self, i: int) -> int:
        wide = self.use_double_wide_mlp and not self.owns_kv(i)
        return self.intermediate_size * (2 if wide else 1)

    @classmethod
    def from_dict(cls, d: dict, model_type: Optional[str] = None) -> "TextConfig":
        d = dict(d)
        n = int(d["num_hidden_layers"])
        layer_types = d.get("layer_types")
        if layer_types is None:
            layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)
            ]
        layer_types = list(layer_types)
        layer_types[-1] = "full_attention"
        global_head_dim = d.get("global_head_dim")
        n_global_kv = d.get("num_global_key_value_heads")
        # transformers >= 5.23 saves a derived per_layer_config map instead of the per-layer lists.
        plc = d.get("per_layer_config") or {}
        for idx, over in plc.items():
            if layer_types[int(idx)] == "full_attention":
                global_head_dim = global_head_dim or over.get("head_dim")
                n_global_kv = n_global_kv or over.get("num_key_value_heads")
        rope = d.get("rope_parameters") or dict(DEFAULT_ROPE)
        hpl = d.get("hidden_size_per_layer_input") or 0
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=n,
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d["num_key_value_heads"]),
            head_dim=int(d.get("head_dim", 256)),
            global_head_dim=int(global_head_dim or 512),
            intermediate_size=int(d["intermediate_size"]),
            layer_types=layer_types,
            sliding_window=int(d.get("sliding_window", 512)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            num_global_key_value_heads=n_global_kv,
            attention_k_eq_v=bool(d.get("attention_k_eq_v", False)),
            num_kv_shared_layers=int(d.get("num_kv_shared_layers") or 0),
            use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
            hidden_size_per_layer_input=int(hpl),
            vocab_size_per_layer_input=int(d.get("vocab_size_per_layer_input") or 0),
            enable_moe_block=bool(d.get("enable_moe_block", False)),
            num_experts=d.get("num_experts"),
            top_k_experts=d.get("top_k_experts"),
            moe_intermediate_size=d.get("moe_intermediate_size"),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            rope_parameters=rope,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            model_type=model_type or d.get("model_type", "gemma4_text"),
        )


@dataclass
class TargetConfig:
    """A Gemma 4 target: its text stack plus top-level facts (EOS ids, quantization)."""

    text: TextConfig
    model_type: str
    eos_token_id: list
    quantization: Optional[dict] = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TargetConfig":
        model_type = d.get("model_type")
        if model_type not in TARGET_MODEL_TYPES:
            raise MtpError(
                f"unknown target model_type {model_type!r} in config.json: "
                f"expected one of {', '.join(TARGET_MODEL_TYPES)} (a Gemma 4 checkpoint)"
            )
        text = d.get("text_config", d)
        text_type = text.get("model_type") or model_type
        tc = TextConfig.from_dict(text, model_type=text_type)
        eos = d.get("eos_token_id", text.get("eos_token_id", 1))
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            text=tc,
            model_type=model_type,
            eos_token_id=eos,
            quantization=d.get("quantization") or d.get("quantization_config"),
            raw=d,
        )


@dataclass
class DrafterConfig:
    """A Gemma 4 MTP assistant (``gemma4_assistant`` / ``gemma4_unified_assistant``)."""

    text: TextConfig
    model_type: str
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    quantization: Optional[dict] = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "DrafterConfig":
        model_type = d.get("model_type")
        if model_type not in DRAFTER_MODEL_TYPES:
            raise MtpError(
                f"unknown drafter model_type {model_type!r} in config.json: expected one of "
                f"{', '.join(DRAFTER_MODEL_TYPES)} (a Gemma 4 '-assistant' checkpoint)"
            )
        text = dict(d["text_config"])
        # An assistant's num_kv_shared_layers of 0 means "all layers" (every drafter layer reads the target's K/V).
        if not text.get("num_kv_shared_layers"):
            text["num_kv_shared_layers"] = text["num_hidden_layers"]
        tc = TextConfig.from_dict(text)
        return cls(
            text=tc,
            model_type=model_type,
            backbone_hidden_size=int(d.get("backbone_hidden_size", 1536)),
            use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
            num_centroids=int(d.get("num_centroids", 2048)),
            centroid_intermediate_top_k=int(d.get("centroid_intermediate_top_k", 32)),
            quantization=d.get("quantization") or d.get("quantization_config"),
            raw=d,
        )

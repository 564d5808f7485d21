"""Device ops with a pure-MLX reference beside every custom kernel."""

from .verify_attention import (
    attention_backend,
    set_attention_backend,
    verify_attention,
    verify_attention_metal,
    verify_attention_ref,
)

__all__ = [
    "attention_backend",
    "set_attention_backend",
    "verify_attention",
    "verify_attention_metal",
    "verify_attention_ref",
]

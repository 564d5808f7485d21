"""Device ops with a pure-MLX reference beside every custom kernel."""

from .verify_attention import verify_attention, verify_attention_ref

__all__ = ["verify_attention", "verify_attention_ref"]

"""Device ops with a pure-MLX reference beside every custom kernel."""

from .attention import ATTENTION_BACKENDS, attention, attention_metal, attention_ref, check_backend

__all__ = ["ATTENTION_BACKENDS", "attention", "attention_metal", "attention_ref", "check_backend"]

from .kv import KVView, LayerCache, TargetCache, make_target_cache

__all__ = ["KVView", "LayerCache", "TargetCache", "make_target_cache"]

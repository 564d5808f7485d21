"""Running one Gemma 4 pair across several processes or Macs with ``mx.distributed``.

Tensor parallel (``shard_target``): every rank holds a slice of every target layer; the
drafter runs whole on every rank. Pipeline parallel (``PipelineTarget``): each rank holds a
contiguous run of layers; the drafter runs on the last rank. Either way every rank runs the
same decoding code, sees the same logits and emits the same tokens; ``engine.DistributedEngine``
keeps the ranks' draft lengths and fresh seeds in agreement.
"""

from .launch import distribute, init_distributed, is_rank0, load_distributed, local_ring
from .tensor import TPPlan, check_tensor_parallel, shard_target

__all__ = ["TPPlan", "check_tensor_parallel", "distribute", "init_distributed", "is_rank0",
           "load_distributed", "local_ring", "shard_target"]

"""Large matrix products split across CPU threads.

MLX's CPU backend runs each operation on one thread of its stream. A decode step of a real
Gemma 4 is a chain of matrix-vector products (the projections, the MLP and the 262 144-row
output projection), so on the CPU it uses one core however many the machine has. Here the
weight rows of every large projection are split into ``parts`` slices, each product runs on
its own CPU stream (one thread each), and the slices' outputs are concatenated:

    y = concat([x @ W[0:n1].T  (stream 1),  x @ W[n1:n2].T  (stream 2), ...], axis=-1)

Every output element is still the same dot product computed by the same kernel, so the
result is bit-identical to the single product (tested for float32, float16, bfloat16 and
4- and 8-bit weights). Slices start at multiples of ``ALIGN`` rows, which also keeps
quantization groups whole (they run along the input dimension).

Only for the CPU device: on a GPU one product already fills the device, so ``default_parts``
gives 1 there and nothing changes. Small products are left alone (``MIN_ELEMENTS``, two
million weights): on the bundled demo pair (a 4 096 x 128 head) splitting cost more in
extra operations and stream hand-offs than the second thread saved (plain decoding 48 -> 42
tok/s), while E2B's products (1 536 x 2 048 and up) run 1.5-1.9x faster split in two.

``shard_matmuls(model, parts)`` gives the model's large ``Linear``, ``QuantizedLinear`` and
tied ``Embedding`` heads this behaviour in place: same instances, same parameters (saving,
loading and quantizing see nothing new), another class in front of their own.
"""

import os
import threading
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

MIN_ELEMENTS = 1 << 21  # weights (unpacked) below which a product runs whole
ALIGN = 64  # slice boundaries, in output rows
MAX_PARTS = 8


def default_parts() -> int:
    """Threads for a large product: the machine's cores (at most ``MAX_PARTS``) when MLX
    computes on the CPU, else 1."""
    if mx.default_device() != mx.cpu:
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_PARTS))


_LOCAL = threading.local()


def cpu_streams(parts: int) -> Tuple[mx.Stream, ...]:
    """``parts`` CPU streams of the calling thread, made once per thread (MLX streams belong to
    the thread that made them; each runs its operations on a worker thread of its own)."""
    table = _LOCAL.__dict__.setdefault("streams", {})
    if parts not in table:
        table[parts] = tuple(mx.new_stream(mx.cpu) for _ in range(parts))
    return table[parts]


def slices(rows: int, parts: int) -> List[Tuple[int, int]]:
    """Row ranges ``[(start, end)]`` of at most ``parts`` near-equal slices, starting at
    multiples of ``ALIGN``; one range when ``rows`` is too small to split."""
    step = -(-rows // parts)
    step = -(-step // ALIGN) * ALIGN
    cuts = list(range(0, rows, step)) + [rows]
    return list(zip(cuts[:-1], cuts[1:]))


def _split(fn, x: mx.array, tensors, bounds) -> mx.array:
    """``concat([fn(x, *(t[a:b] for t in tensors), stream=s) ...], axis=-1)``, one CPU stream of
    the calling thread per slice."""
    streams = cpu_streams(len(bounds))
    outs = [fn(x, *(None if t is None else t[a:b] for t in tensors), stream=s) for (a, b), s in zip(bounds, streams)]
    return mx.concatenate(outs, axis=-1)


def _product(module, x: mx.array) -> mx.array:
    """``x @ W.T`` of a (quantized) linear or tied head ``module``, split by its ``_shards``."""
    bounds = module.__dict__["_shards"]
    if "scales" not in module:
        return _split(lambda x, w, stream: mx.matmul(x, w.T, stream=stream), x, (module["weight"],), bounds)

    def run(x, w, scales, biases, stream):
        return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True, group_size=module.group_size,
                                   bits=module.bits, mode=module.mode, stream=stream)

    return _split(run, x, (module["weight"], module["scales"], module.get("biases")), bounds)


class _ShardedCall:
    """In front of ``nn.Linear`` / ``nn.QuantizedLinear`` without bias."""

    def __call__(self, x: mx.array) -> mx.array:
        return _product(self, x)


class _ShardedHead:
    """In front of ``nn.Embedding`` / ``nn.QuantizedEmbedding``: the tied output projection."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _product(self, x)


_MIXINS = {
    nn.Linear: _ShardedCall,
    nn.QuantizedLinear: _ShardedCall,
    nn.Embedding: _ShardedHead,
    nn.QuantizedEmbedding: _ShardedHead,
}


_SHARDED = {base: type(f"Sharded{base.__name__}", (mixin, base), {}) for base, mixin in _MIXINS.items()}


def _elements(module) -> int:
    w = module["weight"]
    bits = getattr(module, "bits", None)
    return w.size * (32 // bits) if bits else w.size


def shard_matmuls(model: Optional[nn.Module], parts: Optional[int] = None, *,
                  min_elements: int = MIN_ELEMENTS) -> int:
    """Split the large products of ``model`` across ``parts`` CPU threads (default
    ``default_parts()``); returns how many modules now split. Modules of other classes
    (tensor-parallel layers, the experts' gathered products), with a bias, or with fewer
    than ``min_elements`` weights are left as they are. Calling it again with the same
    arguments changes nothing; ``parts=1`` undoes it."""
    if model is None:
        return 0
    parts = default_parts() if parts is None else int(parts)
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    count, changed = 0, False
    for module in model.modules():
        base = _base_class(module)
        if base is None or "bias" in module or _elements(module) < min_elements:
            continue
        bounds = slices(module["weight"].shape[0], parts) if parts > 1 else []
        shards = bounds if len(bounds) > 1 else None
        if shards == module.__dict__.get("_shards"):
            count += shards is not None
            continue
        changed = True
        if shards is None:
            module.__class__ = base
            module.__dict__.pop("_shards", None)
            continue
        if module.__class__ is base:
            module.__class__ = _SHARDED[base]
        module.__dict__["_shards"] = shards
        count += 1
    if changed:  # compiled pieces traced before would keep running the old products
        for m in model.modules():
            m.__dict__.pop("_fused", None)
    return count


def _base_class(module) -> Optional[type]:
    """The plain MLX class of a module this file can split (sharded or not), else None."""
    cls = module.__class__
    if cls in _MIXINS:
        return cls
    return next((base for base, sharded in _SHARDED.items() if cls is sharded), None)


def threads(model: Optional[nn.Module]) -> int:
    """The most CPU threads any product of ``model`` is split across (1: none is split)."""
    if model is None:
        return 1
    return max((len(m.__dict__["_shards"]) for m in model.modules() if "_shards" in m.__dict__), default=1)

#!/usr/bin/env python
"""Build random-weight Gemma 4 target/drafter pairs at the released models' real shapes.

Every tensor has the shape the released configuration implies: hidden sizes, head geometry,
the 262 144-token vocabulary, per-layer embeddings (E2B/E4B), routed experts (26B-A4B) and
the drafter's centroid head with 2 048 clusters (E2B/E4B). Nothing is downloaded.

========= ==================================================================================
kind      what (the released configuration; ``--layers N`` keeps its first N layers)
========= ==================================================================================
e2b       35 layers, H 1536, PLE 256, 20 KV-shared layers, double-wide MLP; centroid drafter
e4b       42 layers, H 2560, PLE 256, 18 KV-shared layers; centroid drafter
26b-a4b   30 layers, H 2816, 128 experts (top 8), K = V on full layers; dense-head drafter
31b       60 layers, H 5376, K = V on full layers; dense-head drafter
========= ==================================================================================

The folders are in the layout ``mlx_lm.convert`` writes (keys ``language_model.model.*``,
``config.json`` with ``text_config``; 4/8-bit: affine, group 64, ``router.proj`` at 8 bits as
mlx-lm does), so mtp-mlx, mlx-lm and mlx-vlm all load the same files. The drafter is in the
mlx-community layout (HF key names, ``token_ordering`` int32) and stays in ``--dtype``.

Weights are written tensor by tensor (large ones in row chunks, straight to their place in
pre-sized safetensors shards), so memory stays near one chunk plus the drafter's projected
table, whatever the model size. Every random draw comes from a key derived from ``--seed`` and
the tensor's name: a rebuild is byte-identical.

Agreement (default on; ``--no-agree`` gives plain random weights, where the drafter's proposals
are almost never accepted): the recipe of the test fixtures' agree pair (scripts/make_fixtures.py
``build_agree``) at real size. Token embeddings are clustered (clusters = the centroid head's),
the target's residual branches are scaled down so it tends to repeat its previous token, layer 0
gets an "anti-repeat" attention head (uniform attention over the window, minus a projection of
the tokens seen) so it does not always repeat, and the drafter proposes "repeat" (its
pre-projection and table are an orthonormal projection of the target's embedding), except for
a fraction of "misleading" tokens. Speculative runs then see a mix of full, partial and zero
acceptance.

The tokenizer is the bundled demo pair's (4 096 pieces, Gemma's special-token layout), its
vocabulary padded with filler pieces to the 262 144 ids the configs declare, so that any id a
random model emits detokenizes.

Usage::

    python scripts/make_real_shapes.py --kind e2b --out real/e2b-bf16
    python scripts/make_real_shapes.py --kind e2b --bits 4 --out real/e2b-4bit
    python scripts/make_real_shapes.py --kind 31b --layers 6 --bits 4 --out real/31b-6l-4bit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "mtp_mlx" / "demo" / "target"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

VOCAB = 262144
S, F = "sliding_attention", "full_attention"
EOS_IDS = [1, 106]
SHARD_BYTES = 4 << 30  # mlx-lm writes shards of about 5 GB; any size loads
CHUNK_ELEMENTS = 1 << 25  # rows per generated chunk: at most 32 M elements (128 MB float32)
INIT_STD = 0.02  # transformers' initializer_range for Gemma 4
ROPE = {
    F: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
    S: {"rope_theta": 10000.0, "rope_type": "default"},
}


def _pattern(n: int, period: int) -> List[str]:
    return [F if (i + 1) % period == 0 else S for i in range(n)]


# The released text configurations (as published with the models): target and drafter fields.
KINDS: Dict[str, dict] = {
    "e2b": dict(
        target=dict(
            hidden_size=1536, num_hidden_layers=35, layer_types=_pattern(35, 5), num_attention_heads=8,
            num_key_value_heads=1, num_global_key_value_heads=None, attention_k_eq_v=False,
            intermediate_size=6144, use_double_wide_mlp=True, enable_moe_block=False,
            hidden_size_per_layer_input=256, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=20,
            sliding_window=512, max_position_embeddings=131072,
        ),
        drafter=dict(
            hidden_size=256, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1,
            num_global_key_value_heads=None, attention_k_eq_v=False, use_ordered_embeddings=True,
            max_position_embeddings=131072,
        ),
    ),
    "e4b": dict(
        target=dict(
            hidden_size=2560, num_hidden_layers=42, layer_types=_pattern(42, 6), num_attention_heads=8,
            num_key_value_heads=2, num_global_key_value_heads=None, attention_k_eq_v=False,
            intermediate_size=10240, use_double_wide_mlp=False, enable_moe_block=False,
            hidden_size_per_layer_input=256, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=18,
            sliding_window=512, max_position_embeddings=131072,
        ),
        drafter=dict(
            hidden_size=256, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=2,
            num_global_key_value_heads=None, attention_k_eq_v=False, use_ordered_embeddings=True,
            max_position_embeddings=131072,
        ),
    ),
    "26b-a4b": dict(
        target=dict(
            hidden_size=2816, num_hidden_layers=30, layer_types=_pattern(30, 6), num_attention_heads=16,
            num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True,
            intermediate_size=2112, use_double_wide_mlp=False, enable_moe_block=True, num_experts=128,
            top_k_experts=8, moe_intermediate_size=704, hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=0, sliding_window=1024,
            max_position_embeddings=262144,
        ),
        drafter=dict(
            hidden_size=1024, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8,
            num_global_key_value_heads=2, attention_k_eq_v=True, use_ordered_embeddings=False,
            max_position_embeddings=262144,
        ),
    ),
    "31b": dict(
        target=dict(
            hidden_size=5376, num_hidden_layers=60, layer_types=_pattern(60, 6), num_attention_heads=32,
            num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True,
            intermediate_size=21504, use_double_wide_mlp=False, enable_moe_block=False,
            hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=0,
            sliding_window=1024, max_position_embeddings=262144,
        ),
        drafter=dict(
            hidden_size=1024, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=16,
            num_global_key_value_heads=4, attention_k_eq_v=True, use_ordered_embeddings=False,
            max_position_embeddings=262144,
        ),
    ),
    # The e2b layout at toy widths (not a released model): for tests of this script only.
    "tiny": dict(
        vocab=4096, num_centroids=32, centroid_top_k=4, head_dim=32, global_head_dim=64,
        target=dict(
            hidden_size=64, num_hidden_layers=6, layer_types=_pattern(6, 5), num_attention_heads=2,
            num_key_value_heads=1, num_global_key_value_heads=None, attention_k_eq_v=False,
            intermediate_size=128, use_double_wide_mlp=True, enable_moe_block=False,
            hidden_size_per_layer_input=16, vocab_size_per_layer_input=4096, num_kv_shared_layers=2,
            sliding_window=16, max_position_embeddings=131072,
        ),
        drafter=dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
            num_global_key_value_heads=None, attention_k_eq_v=False, use_ordered_embeddings=True,
            max_position_embeddings=131072,
        ),
    ),
}
RELEASED = ("e2b", "e4b", "26b-a4b", "31b")
NUM_CENTROIDS, CENTROID_TOP_K = 2048, 32


def geometry(kind: str) -> dict:
    """Vocabulary, centroid head and head sizes of a kind (the released values unless overridden)."""
    k = KINDS[kind]
    return dict(
        vocab=k.get("vocab", VOCAB), num_centroids=k.get("num_centroids", NUM_CENTROIDS),
        centroid_top_k=k.get("centroid_top_k", CENTROID_TOP_K), head_dim=k.get("head_dim", 256),
        global_head_dim=k.get("global_head_dim", 512),
    )

# The fixtures' agree recipe (make_fixtures.AGREE), tuned there for 8 layers; branch scales are
# divided by sqrt(N / 8) so N layers' branches add up to the same share of the residual stream.
AGREE = dict(
    # the scaled embedding's RMS (the residual stream's start); the token's own embedding must
    # neither drown the branches (the target only repeats) nor vanish in them (it never does).
    # 0.235 is the fixtures' value (H 128, std 0.02); at E2B's width it gave 80 % repeats.
    x0_rms=0.235,
    center_scale=1.0,
    branch_scale=0.075,
    drafter_branch_scale=0.05,
    anti_scale=0.7,
    misleading=0.0625,
    layer_scalar=(0.9, 1.1),  # narrower than the fixtures' (0.6, 1.4): 35-60 layers multiply them
)


def log(msg: str) -> None:
    print(f"[make_real_shapes] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------


def sliced_target(kind: str, layers: Optional[int]) -> dict:
    """The kind's target text fields, cut to its first ``layers`` layers (last one full).

    KV sharing keeps the released fraction of shared layers, reduced until the unshared prefix
    still has a layer of each type to produce the K/V (the drafter reads both types)."""
    t = dict(KINDS[kind]["target"])
    n_full = t["num_hidden_layers"]
    n = n_full if layers is None else int(layers)
    if not 2 <= n <= n_full:
        raise SystemExit(f"--layers {n} is out of range for {kind}: use 2..{n_full}")
    types = list(t["layer_types"][:n])
    types[-1] = F
    shared = t["num_kv_shared_layers"] * n // n_full
    while shared and set(types[: n - shared]) != {S, F}:
        shared -= 1
    t.update(num_hidden_layers=n, layer_types=types, num_kv_shared_layers=shared)
    return t


def target_text_config(kind: str, layers: Optional[int]) -> dict:
    t = sliced_target(kind, layers)
    geo = geometry(kind)
    tc = dict(
        attention_bias=False, attention_dropout=0.0, bos_token_id=2, eos_token_id=1,
        final_logit_softcapping=30.0, global_head_dim=geo["global_head_dim"], head_dim=geo["head_dim"],
        hidden_activation="gelu_pytorch_tanh", initializer_range=INIT_STD, model_type="gemma4_text",
        num_experts=None, top_k_experts=None, moe_intermediate_size=None, pad_token_id=0,
        rms_norm_eps=1e-6, rope_parameters=ROPE, tie_word_embeddings=True, use_bidirectional_attention=None,
        use_cache=True, vocab_size=geo["vocab"],
    )
    tc.update(t)
    return dict(sorted(tc.items()))


def target_config(kind: str, layers: Optional[int], dtype: str, quant: Optional[dict]) -> dict:
    tc = target_text_config(kind, layers)
    tc["dtype"] = dtype
    cfg = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "dtype": dtype,
        "eos_token_id": list(EOS_IDS),
        "model_type": "gemma4",
        "text_config": tc,
        "tie_word_embeddings": True,
        "transformers_version": "5.23.0",
        # mlx-lm's gemma4 wrapper copies the top-level vocab_size into text_config
        "vocab_size": tc["vocab_size"],
    }
    if quant:
        cfg["quantization"] = quant
        cfg["quantization_config"] = quant
    return cfg


def drafter_config(kind: str, dtype: str) -> dict:
    t, d = KINDS[kind]["target"], KINDS[kind]["drafter"]
    geo = geometry(kind)
    tc = dict(
        attention_bias=False, attention_dropout=0.0, attention_k_eq_v=d["attention_k_eq_v"], bos_token_id=2,
        dtype=dtype, enable_moe_block=False, eos_token_id=1, final_logit_softcapping=None,
        global_head_dim=geo["global_head_dim"], head_dim=geo["head_dim"], hidden_activation="gelu_pytorch_tanh", hidden_size=d["hidden_size"],
        hidden_size_per_layer_input=0, initializer_range=INIT_STD, intermediate_size=d["intermediate_size"],
        layer_types=[S, S, S, F], max_position_embeddings=d["max_position_embeddings"], model_type="gemma4_text",
        moe_intermediate_size=None, num_attention_heads=d["num_attention_heads"], num_experts=None,
        num_global_key_value_heads=d["num_global_key_value_heads"], num_hidden_layers=4,
        num_key_value_heads=d["num_key_value_heads"], num_kv_shared_layers=4, pad_token_id=0, rms_norm_eps=1e-6,
        rope_parameters=ROPE, sliding_window=t["sliding_window"], tie_word_embeddings=True, top_k_experts=None,
        use_bidirectional_attention=None, use_cache=True, use_double_wide_mlp=False, vocab_size=geo["vocab"],
        vocab_size_per_layer_input=0,
    )
    cfg = {
        "architectures": ["Gemma4AssistantForCausalLM"],
        "backbone_hidden_size": t["hidden_size"],
        "dtype": dtype,
        "model_type": "gemma4_assistant",
        "text_config": dict(sorted(tc.items())),
        "tie_word_embeddings": True,
        "transformers_version": "5.23.0",
        "use_ordered_embeddings": d["use_ordered_embeddings"],
    }
    if d["use_ordered_embeddings"]:
        cfg.update(num_centroids=geo["num_centroids"], centroid_intermediate_top_k=geo["centroid_top_k"])
    return cfg


# ----------------------------------------------------------------------------------------------
# parameter lists (names and shapes from the loaders' own model classes, built lazily)
# ----------------------------------------------------------------------------------------------


@dataclass
class Param:
    """One tensor to generate; ``quant`` = (bits, group size) when stored quantized."""

    name: str
    shape: Tuple[int, ...]
    dtype: str  # "float" (written in --dtype) or "int32"
    quant: Optional[Tuple[int, int]] = None


def target_params(config: dict, bits: Optional[int], group: int) -> Tuple[List[Param], dict]:
    """mlx-lm's parameter names and shapes for this config (its model built lazily: no weight
    is ever allocated) and, when quantized, mlx-lm's per-layer quantization choices."""
    from mlx_lm.models import gemma4

    model = gemma4.Model(gemma4.ModelArgs.from_dict(config))
    quantized: Dict[str, Tuple[int, int]] = {}
    overrides = {}
    if bits:
        pred = model.quant_predicate
        for path, m in model.named_modules():
            if not hasattr(m, "to_quantized") or m.weight.shape[-1] % group:
                continue
            q = pred(path, m)
            if isinstance(q, dict):
                overrides[path] = {"group_size": q["group_size"], "bits": q["bits"]}
                quantized[path] = (q["bits"], q["group_size"])
            elif q:
                quantized[path] = (bits, group)
    params = []
    for name, a in tree_flatten(model.parameters()):
        path = name.rsplit(".", 1)[0]
        q = quantized.get(path) if name.endswith(".weight") else None
        params.append(Param(name, tuple(a.shape), "float", q))
    quant = None
    if bits:
        quant = {"group_size": group, "bits": bits, "mode": "affine", **dict(sorted(overrides.items()))}
    return params, quant


def drafter_params(config: dict) -> List[Param]:
    from mtp_mlx.models.config import DrafterConfig
    from mtp_mlx.models.gemma4_assistant import Model

    model = Model(DrafterConfig.from_dict(config))
    return [
        Param(name, tuple(a.shape), "int32" if name.endswith("token_ordering") else "float")
        for name, a in tree_flatten(model.parameters())
    ]


# ----------------------------------------------------------------------------------------------
# streaming safetensors writer
# ----------------------------------------------------------------------------------------------

_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32", "int32": "I32"}
_ITEM = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "I32": 4}


@dataclass
class _Entry:
    file: int
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data in its file

    @property
    def row_bytes(self) -> int:
        return (self.shape[-1] if self.shape else 1) * _ITEM[self.dtype]


@dataclass
class ShardedWriter:
    """Safetensors shards whose headers are written first; tensors (or row ranges of them)
    are then written in place, in any order. Deterministic: same entries, same bytes."""

    folder: Path
    entries: Dict[str, _Entry] = field(default_factory=dict)
    files: List[Path] = field(default_factory=list)
    _handles: dict = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path, tensors: List[Tuple[str, str, Tuple[int, ...]]], shard_bytes=SHARD_BYTES):
        """``tensors``: (name, safetensors dtype, shape) in file order."""
        shards: List[List[Tuple[str, str, Tuple[int, ...]]]] = [[]]
        size = 0
        for t in tensors:
            nbytes = math.prod(t[2]) * _ITEM[t[1]]
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += nbytes
        w = cls(folder)
        n = len(shards)
        for i, shard in enumerate(shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {"__metadata__": {"format": "mlx"}}, 0
            for tname, dt, shape in shard:
                nbytes = math.prod(shape) * _ITEM[dt]
                header[tname] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = folder / name
            with open(path, "wb") as f:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                f.truncate(8 + len(raw) + offset)
            for tname, dt, shape in shard:
                start = 8 + len(raw) + header[tname]["data_offsets"][0]
                w.entries[tname] = _Entry(i, dt, tuple(shape), start)
            w.files.append(path)
        return w

    def write(self, name: str, a: mx.array, row: int = 0) -> None:
        """Write ``a`` as rows ``row..`` of tensor ``name`` (rows = all axes but the last)."""
        e = self.entries[name]
        want = _ST_DTYPE[str(a.dtype).split(".")[-1]]
        if want != e.dtype:
            raise ValueError(f"{name}: writing {want} into a {e.dtype} tensor")
        if a.dtype == mx.bfloat16:
            a = a.view(mx.uint16)
        data = np.asarray(a).tobytes()
        f = self._handle(e.file)
        f.seek(e.start + row * e.row_bytes)
        f.write(data)

    def _handle(self, i: int):
        if i not in self._handles:
            self._handles[i] = open(self.files[i], "r+b")
        return self._handles[i]

    def close(self, total_parameters: int) -> None:
        for h in self._handles.values():
            h.close()
        # mlx-vlm reads the index to tell modules the checkpoint lacks (vision, audio) from
        # missing weights, so it is written even for a single shard
        index = {
            "metadata": {
                "total_size": sum(math.prod(e.shape) * _ITEM[e.dtype] for e in self.entries.values()),
                "total_parameters": total_parameters,
            },
            "weight_map": {k: self.files[e.file].name for k, e in sorted(self.entries.items())},
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")


def stored_tensors(params: List[Param], dtype: str) -> List[Tuple[str, str, Tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every stored tensor (quantized: weight/scales/biases)."""
    out = []
    fl = _ST_DTYPE[dtype]
    for p in params:
        if p.dtype == "int32":
            out.append((p.name, "I32", p.shape))
        elif p.quant:
            bits, group = p.quant
            base = p.name[: -len(".weight")]
            *lead, cols = p.shape
            out.append((p.name, "U32", (*lead, cols * bits // 32)))
            out.append((f"{base}.scales", fl, (*lead, cols // group)))
            out.append((f"{base}.biases", fl, (*lead, cols // group)))
        else:
            out.append((p.name, fl, p.shape))
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# random generation
# ----------------------------------------------------------------------------------------------


def rng(seed: int, name: str) -> np.random.Generator:
    """A generator seeded from the seed and a tensor name (stable across runs and machines).
    numpy's PCG64 rather than mx.random: several times faster on a CPU, and these are GBs."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(h))


def rows_per_chunk(shape: Tuple[int, ...]) -> int:
    cols = shape[-1] if shape else 1
    return max(1, CHUNK_ELEMENTS // cols)


def chunked(shape: Tuple[int, ...]):
    """(index, first row, row count) of the fixed chunks of a tensor (rows = all but last axis)."""
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    step = rows_per_chunk(shape)
    for i, r0 in enumerate(range(0, rows, step)):
        yield i, r0, min(step, rows - r0)


def noise(g: np.random.Generator, shape, std: float = INIT_STD) -> mx.array:
    """Zero-mean noise of standard deviation ``std`` (uniform: cheaper than Gaussian draws)."""
    a = std * math.sqrt(3.0)
    return mx.array(g.random(shape, dtype=np.float32)) * (2 * a) - a


def uniform(g: np.random.Generator, shape, lo: float, hi: float) -> mx.array:
    return mx.array(g.random(shape, dtype=np.float32)) * (hi - lo) + lo


def orthonormal_columns(g: np.random.Generator, rows: int, cols: int) -> mx.array:
    q, _ = mx.linalg.qr(mx.array(g.standard_normal((rows, cols), dtype=np.float32)), stream=mx.cpu)
    return q


def is_norm(name: str) -> bool:
    return name.endswith(("norm.weight", "router.scale", "router.per_expert_scale"))


def base_value(seed: int, name: str, shape, agree: Optional[dict]) -> mx.array:
    """The unmodified float32 value of a small tensor (norm scales, layer scalars, ...)."""
    g = rng(seed, name)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        # scales near 1 make these random models' attention too sharp (see make_fixtures)
        return uniform(g, shape, 0.2, 0.45)
    if name.endswith("layer_scalar"):
        lo, hi = agree["layer_scalar"] if agree else (0.6, 1.4)
        return uniform(g, shape, lo, hi)
    if is_norm(name):
        return uniform(g, shape, 0.6, 1.4)
    return noise(g, shape)


# ----------------------------------------------------------------------------------------------
# the agree recipe's shared pieces
# ----------------------------------------------------------------------------------------------


@dataclass
class Agree:
    """State the target and the drafter share: clusters, projections, the projected table."""

    seed: int
    H: int
    Hd: int
    V: int  # vocabulary
    C: int  # clusters = the drafter's centroids (also used when its head is dense)
    p: dict
    perm: np.ndarray  # perm[c*m:(c+1)*m] = tokens of cluster c
    cluster_of: mx.array  # [V] int32
    centers: mx.array  # [C, H] float32
    Q: mx.array  # [Hd, H] orthonormal rows (drafter pre-projection of the embedding half)
    EQ: Optional[np.ndarray] = None  # [V, Hd] float32: target embedding rows projected by Q
    Q_np: Optional[np.ndarray] = None
    _table: Optional[mx.array] = None

    @classmethod
    def make(cls, seed: int, H: int, Hd: int, V: int, C: int, p: dict) -> "Agree":
        perm = rng(seed, "agree.perm").permutation(V)
        cluster_of = np.empty(V, dtype=np.int32)
        cluster_of[perm] = np.arange(V) // (V // C)
        centers = noise(rng(seed, "agree.centers"), (C, H), p["center_scale"])
        q = orthonormal_columns(rng(seed, "agree.Q"), H, Hd)
        return cls(seed, H, Hd, V, C, p, perm, mx.array(cluster_of), centers, q.T, Q_np=np.asarray(q.T))

    def embed_rows(self, r0: int, n: int) -> mx.array:
        """Target embedding rows r0..r0+n (float32): cluster centre + token noise."""
        token_noise = noise(rng(self.seed, f"agree.embed.{r0}"), (n, self.H), 1.0)
        c = self.p["center_scale"]
        rows = self.centers[self.cluster_of[r0 : r0 + n]] + token_noise
        return rows * (INIT_STD * self.embed_scale / math.sqrt(1 + c * c))

    @property
    def embed_scale(self) -> float:
        """Embedding std relative to INIT_STD such that E[tok] * sqrt(H) has RMS x0_rms."""
        return self.p["x0_rms"] / (INIT_STD * math.sqrt(self.H))

    def drafter_table(self) -> mx.array:
        """The drafter's embedding table: E[src] Q^T rescaled, where ``src`` maps a few
        "misleading" tokens per cluster to a neighbour (the drafter proposes a wrong token)."""
        if self._table is None:
            self._table = self._make_table()
        return self._table

    def _make_table(self) -> mx.array:
        m = self.V // self.C
        n_bad = int(round(self.p["misleading"] * m))
        src = np.arange(self.V)
        if n_bad >= 2:
            members = self.perm.reshape(self.C, m)[:, :n_bad]
            src[members.reshape(-1)] = np.roll(members, 1, axis=1).reshape(-1)
        ed = self.EQ[src]
        return mx.array(ed * (INIT_STD / ed.std()))


# ----------------------------------------------------------------------------------------------
# writing a target / a drafter
# ----------------------------------------------------------------------------------------------


def _store(w: ShardedWriter, p: Param, value: mx.array, row: int, dtype) -> None:
    """Cast (and quantize) a float32 row block of parameter ``p`` and write it."""
    v = value.astype(dtype)
    if p.quant:
        bits, group = p.quant
        wq, scales, biases = mx.quantize(v, group_size=group, bits=bits, mode="affine")
        base = p.name[: -len(".weight")]
        mx.eval(wq, scales, biases)
        w.write(p.name, wq, row)
        w.write(f"{base}.scales", scales, row)
        w.write(f"{base}.biases", biases, row)
    else:
        mx.eval(v)
        w.write(p.name, v, row)


def _layer(name: str) -> Optional[int]:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


def target_value(name: str, shape, seed: int, agree: Optional[Agree], n_layers: int, cfg: dict) -> Optional[mx.array]:
    """A whole (small or medium) target tensor, or None for the embedding (written by rows)."""
    v = base_value(seed, name, shape, agree.p if agree else None)
    if agree is None:
        return v
    p = agree.p
    scale = p["branch_scale"] * math.sqrt(8 / n_layers)
    if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight",
                      "post_per_layer_input_norm.weight")):
        v = v * scale
    if _layer(name) == 0:
        # layer 0: anti-repeat head (uniform attention over the window; V = a projection of the
        # token embedding, o_proj = minus that projection)
        hd0 = cfg["head_dim"]
        if name.endswith("self_attn.q_proj.weight"):
            return mx.zeros(shape)
        if name.endswith(("self_attn.v_proj.weight", "self_attn.o_proj.weight")):
            pq = orthonormal_columns(rng(seed, "agree.pq"), agree.H, hd0)
            if name.endswith("v_proj.weight"):
                ln = base_value(seed, name.replace("self_attn.v_proj", "input_layernorm"), (agree.H,), p)
                out = mx.zeros(shape)
                out[:hd0] = pq.T / ln[None, :]
                return out
            out = mx.zeros(shape)
            out[:, :hd0] = -pq
            return out
        if name.endswith("post_attention_layernorm.weight"):
            v = v * (p["anti_scale"] / p["branch_scale"]) / math.sqrt(8 / n_layers)
    return v


def write_target(folder: Path, params: List[Param], dtype, seed: int, agree: Optional[Agree], cfg: dict) -> int:
    w = ShardedWriter.create(folder, stored_tensors(params, str(dtype).split(".")[-1]))
    n_layers = cfg["num_hidden_layers"]
    total = 0
    for p in params:
        total += math.prod(p.shape)
        if p.name.endswith("embed_tokens.weight") and "per_layer" not in p.name and agree is not None:
            eq = np.empty((agree.V, agree.Hd), dtype=np.float32)
            for _, r0, n in chunked(p.shape):
                rows = agree.embed_rows(r0, n)
                _store(w, p, rows, r0, dtype)
                # numpy's BLAS: MLX's CPU matmul is far slower for this [rows, H] x [H, Hd]
                np.matmul(np.asarray(rows), agree.Q_np.T, out=eq[r0 : r0 + n])
            agree.EQ = eq
            continue
        special = agree is not None and _layer(p.name) == 0 and ".self_attn." in p.name
        if math.prod(p.shape) > CHUNK_ELEMENTS and not special:
            write_normal_chunks(w, p, seed, dtype)
            continue
        v = target_value(p.name, p.shape, seed, agree, n_layers, cfg)
        rows = math.prod(p.shape[:-1]) if len(p.shape) > 1 else 1
        _store(w, p, v.reshape(rows, -1) if len(p.shape) > 1 else v, 0, dtype)
    w.close(total)
    return total


def write_normal_chunks(w: ShardedWriter, p: Param, seed: int, dtype) -> None:
    """A large plain-random tensor, generated and written one row chunk at a time."""
    cols = p.shape[-1]
    for i, r0, n in chunked(p.shape):
        _store(w, p, noise(rng(seed, f"{p.name}#{i}"), (n, cols)), r0, dtype)


def drafter_value(name: str, shape, seed: int, agree: Optional[Agree], H: int) -> mx.array:
    if agree is None:
        if name.endswith("token_ordering"):
            return mx.array(rng(seed, name).permutation(shape[0]).astype(np.int32))
        return base_value(seed, name, shape, None)
    p = agree.p
    if name.endswith("token_ordering"):
        return mx.array(agree.perm.astype(np.int32))
    if name == "pre_projection.weight":
        v = base_value(seed, name, shape, p)
        return mx.concatenate([agree.Q / agree.embed_scale, v[:, H:] * 0.1], axis=1)
    if name == "model.embed_tokens.weight":
        return agree.drafter_table()
    if name == "masked_embedding.centroids.weight":
        table = agree.drafter_table()
        cent = table[mx.array(agree.perm)].reshape(agree.C, agree.V // agree.C, -1).mean(axis=1)
        row_norm = mx.linalg.norm(table, axis=-1).mean()
        return cent / mx.linalg.norm(cent, axis=-1, keepdims=True) * row_norm
    v = base_value(seed, name, shape, p)
    if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
        v = v * p["drafter_branch_scale"]
    return v


def write_drafter(folder: Path, params: List[Param], dtype, seed: int, agree: Optional[Agree], H: int) -> int:
    w = ShardedWriter.create(folder, stored_tensors(params, str(dtype).split(".")[-1]))
    total = 0
    for p in params:
        total += math.prod(p.shape)
        plain = agree is None or p.name not in ("model.embed_tokens.weight", "masked_embedding.centroids.weight")
        if plain and p.dtype != "int32" and math.prod(p.shape) > CHUNK_ELEMENTS:
            write_normal_chunks(w, p, seed + 1, dtype)
            continue
        v = drafter_value(p.name, p.shape, seed + 1, agree, H)
        if p.dtype == "int32":
            mx.eval(v)
            w.write(p.name, v.astype(mx.int32))
        else:
            rows = math.prod(p.shape[:-1]) if len(p.shape) > 1 else 1
            _store(w, p, v.reshape(rows, -1) if len(p.shape) > 1 else v, 0, dtype)
    w.close(total)
    return total


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def build(kind: str, out: Path, *, layers: Optional[int] = None, dtype: str = "bfloat16",
          bits: Optional[int] = None, group_size: int = 64, seed: int = 0, agree: bool = True,
          force: bool = False) -> dict:
    """Write ``out/target`` and ``out/assistant``; returns a summary (also ``out/BUILD.json``)."""
    if kind not in KINDS:
        raise SystemExit(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if bits not in (None, 4, 8):
        raise SystemExit(f"--bits {bits}: use 4 or 8 (or leave it out for {dtype})")
    out = Path(out)
    if out.exists():
        if not force:
            raise SystemExit(f"{out} exists: pass --force to rebuild it")
        shutil.rmtree(out)
    t0 = time.perf_counter()
    mx_dtype = getattr(mx, dtype)
    tcfg = target_config(kind, layers, dtype, None)
    params, quant = target_params(tcfg, bits, group_size)
    if quant:
        tcfg = target_config(kind, layers, dtype, quant)
    dcfg = drafter_config(kind, dtype)
    H, Hd = tcfg["text_config"]["hidden_size"], dcfg["text_config"]["hidden_size"]
    geo = geometry(kind)
    shared = Agree.make(seed, H, Hd, geo["vocab"], geo["num_centroids"], AGREE) if agree else None
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "target").mkdir(parents=True)
    (tmp / "assistant").mkdir()
    (tmp / "target" / "config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    (tmp / "assistant" / "config.json").write_text(json.dumps(dcfg, indent=2) + "\n")
    write_tokenizer(tmp / "target", geo["vocab"])
    n_target = write_target(tmp / "target", params, mx_dtype, seed, shared, tcfg["text_config"])
    log(f"{kind}: target written ({n_target / 1e9:.2f} B parameters, {time.perf_counter() - t0:.0f}s)")
    n_drafter = write_drafter(tmp / "assistant", drafter_params(dcfg), mx_dtype, seed, shared, H)
    summary = {
        "kind": kind, "layers": tcfg["text_config"]["num_hidden_layers"], "dtype": dtype, "bits": bits,
        "group_size": group_size if bits else None, "seed": seed, "agree": AGREE if agree else None,
        "target_parameters": n_target, "drafter_parameters": n_drafter,
        "target_bytes": _folder_bytes(tmp / "target"), "drafter_bytes": _folder_bytes(tmp / "assistant"),
    }
    (tmp / "BUILD.json").write_text(json.dumps(summary, indent=2) + "\n")  # no timings: byte-identical
    tmp.rename(out)
    summary["build_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"{kind}: done in {summary['build_seconds']}s -> {out}")
    return summary


def write_tokenizer(dst: Path, vocab: int) -> None:
    """The demo pair's tokenizer, its vocabulary padded with filler pieces ``<tN>`` up to
    ``vocab`` ids: random weights emit any of the 262 144 ids, and every one must detokenize.
    No merge produces a filler, so encoding is unchanged."""
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, dst / name)
    tok = json.loads((dst / "tokenizer.json").read_text())
    pieces = tok["model"]["vocab"]
    taken = set(pieces.values()) | {t["id"] for t in tok.get("added_tokens", [])}
    for i in range(len(taken), vocab):
        pieces[f"<t{i}>"] = i
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, separators=(",", ":")) + "\n")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", required=True, choices=sorted(KINDS), help="tiny = toy widths, for tests")
    ap.add_argument("--out", required=True, help="output folder (gets target/ and assistant/)")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N target layers (default all)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--bits", type=int, default=None, help="quantize the target to 4 or 8 bits (affine)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-agree", action="store_true", help="plain random weights (drafter rarely agrees)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    mx.set_default_device(mx.cpu)
    build(args.kind, Path(args.out), layers=args.layers, dtype=args.dtype, bits=args.bits,
          group_size=args.group_size, seed=args.seed, agree=not args.no_agree, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/make_real_shapes.py: the released configurations parse, imply the released shapes,
and the files it writes load in our loader, byte for byte the same on a rebuild.

The real sizes are checked on lazily built models (no weight is allocated); only the toy
``tiny`` kind is written to disk here. Full-size builds belong to the benchmark, not to CI.
"""

import importlib.util
import math
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mtp_mlx.loading import pair_fit
from mtp_mlx.models import gemma4_assistant, gemma4_text
from mtp_mlx.models.config import DrafterConfig, TargetConfig

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_real_shapes", ROOT / "scripts" / "make_real_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


mrs = _load_script()
S, F = "sliding_attention", "full_attention"

# What the released checkpoints imply (their published configs): full-attention layers,
# producer layers (last KV-owning layer of each type), per-layer-input table width.
RELEASED = {
    "e2b": dict(H=1536, N=35, full=list(range(4, 35, 5)), producers={S: 13, F: 14}, ple=35 * 256, Hd=256),
    "e4b": dict(H=2560, N=42, full=list(range(5, 42, 6)), producers={S: 22, F: 23}, ple=42 * 256, Hd=256),
    "26b-a4b": dict(H=2816, N=30, full=list(range(5, 30, 6)), producers={S: 28, F: 29}, ple=0, Hd=1024),
    "31b": dict(H=5376, N=60, full=list(range(5, 60, 6)), producers={S: 58, F: 59}, ple=0, Hd=1024),
}


def _configs(kind, layers=None):
    t = TargetConfig.from_dict(mrs.target_config(kind, layers, "bfloat16", None))
    d = DrafterConfig.from_dict(mrs.drafter_config(kind, "bfloat16"))
    return t, d


@pytest.mark.parametrize("kind", list(RELEASED))
def test_released_configs_parse_with_their_geometry(kind):
    want = RELEASED[kind]
    t, d = _configs(kind)
    c = t.text
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (want["H"], want["N"], 262144)
    assert [i for i, lt in enumerate(c.layer_types) if lt == F] == want["full"]
    assert {lt: c.producer(lt) for lt in (S, F)} == want["producers"]
    assert c.hidden_size_per_layer_input * c.num_hidden_layers == want["ple"]
    assert c.head_dim == 256 and c.global_head_dim == 512
    assert d.text.hidden_size == want["Hd"] and d.backbone_hidden_size == want["H"]
    assert d.use_ordered_embeddings == (want["ple"] > 0)
    assert d.num_centroids == 2048 and d.text.vocab_size == 262144
    assert pair_fit.mismatches(t, d) == []


@pytest.mark.parametrize("kind,layers", [("e2b", 2), ("e2b", 10), ("e4b", 7), ("31b", 6), ("26b-a4b", 2)])
def test_slices_keep_a_producer_of_each_type(kind, layers):
    t, d = _configs(kind, layers)
    c = t.text
    assert c.num_hidden_layers == layers and c.layer_types[-1] == F
    assert c.producer(S) is not None and c.producer(F) is not None
    released = mrs.KINDS[kind]["target"]
    assert c.num_kv_shared_layers <= released["num_kv_shared_layers"] * layers // released["num_hidden_layers"]
    assert pair_fit.mismatches(t, d) == []


def _shapes(model):
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("kind", list(RELEASED))
def test_real_parameter_shapes(kind):
    """Our model at the real size (built lazily) has the released tensor shapes, and the names
    and shapes the script writes (mlx-lm's) are exactly what our loader expects."""
    t, d = _configs(kind)
    c = t.text
    ours = _shapes(gemma4_text.Model(c))
    H, V = c.hidden_size, 262144
    assert ours["embed_tokens.weight"] == (V, H)
    sl, fl = c.producer(S), c.producer(F)
    assert ours[f"layers.{sl}.self_attn.q_proj.weight"] == (c.num_attention_heads * 256, H)
    assert ours[f"layers.{sl}.self_attn.k_proj.weight"] == (c.num_key_value_heads * 256, H)
    assert ours[f"layers.{fl}.self_attn.q_proj.weight"] == (c.num_attention_heads * 512, H)
    assert ours[f"layers.{fl}.self_attn.k_proj.weight"] == (c.layer_kv_heads(fl) * 512, H)
    assert (f"layers.{fl}.self_attn.v_proj.weight" in ours) == (not c.attention_k_eq_v)
    if kind == "e2b":
        assert ours["embed_tokens_per_layer.weight"] == (V, 35 * 256)
        assert ours["per_layer_model_projection.weight"] == (35 * 256, H)
        assert ours["layers.15.mlp.gate_proj.weight"] == (2 * 6144, H)  # double-wide on shared layers
        assert "layers.15.self_attn.k_proj.weight" not in ours
    if kind == "26b-a4b":
        assert ours["layers.0.experts.switch_glu.gate_proj.weight"] == (128, 704, H)
        assert ours["layers.0.experts.switch_glu.down_proj.weight"] == (128, H, 704)
        assert ours["layers.0.router.proj.weight"] == (128, H)
    params, _ = mrs.target_params(mrs.target_config(kind, None, "bfloat16", None), None, 64)
    prefix = "language_model.model."
    assert all(p.name.startswith(prefix) for p in params)
    assert {p.name[len(prefix):]: p.shape for p in params} == ours
    drafter = _shapes(gemma4_assistant.Model(d))
    assert drafter["pre_projection.weight"] == (d.text.hidden_size, 2 * H)
    assert drafter["model.embed_tokens.weight"] == (V, d.text.hidden_size)
    if d.use_ordered_embeddings:
        assert drafter["masked_embedding.centroids.weight"] == (2048, d.text.hidden_size)
        assert drafter["masked_embedding.token_ordering"] == (V,)
    assert {p.name: p.shape for p in mrs.drafter_params(mrs.drafter_config(kind, "bfloat16"))} == drafter


def test_quantized_layout_matches_mlx_lm():
    """4-bit: every quantizable matrix stored as packed uint32 + scales + biases (group 64),
    the MoE router at 8 bits, as mlx_lm.convert writes it."""
    cfg = mrs.target_config("26b-a4b", 2, "bfloat16", None)
    params, quant = mrs.target_params(cfg, 4, 64)
    stored = {n: (dt, shape) for n, dt, shape in mrs.stored_tensors(params, "bfloat16")}
    p = "language_model.model.layers.0."
    assert stored[p + "mlp.gate_proj.weight"] == ("U32", (2112, 2816 * 4 // 32))
    assert stored[p + "mlp.gate_proj.scales"] == ("BF16", (2112, 2816 // 64))
    assert stored[p + "experts.switch_glu.up_proj.weight"] == ("U32", (128, 704, 2816 * 4 // 32))
    assert stored[p + "router.proj.weight"] == ("U32", (128, 2816 * 8 // 32))
    assert quant[p[:-1] + ".router.proj"] == {"group_size": 64, "bits": 8}
    assert stored["language_model.model.embed_tokens.weight"] == ("U32", (262144, 2816 // 8))
    assert stored[p + "input_layernorm.weight"] == ("BF16", (2816,))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_shapes")
    mrs.build("tiny", out / "a", seed=3)
    return out


def test_rebuild_is_byte_identical(tiny_pair):
    mrs.build("tiny", tiny_pair / "b", seed=3)
    a, b = tiny_pair / "a", tiny_pair / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_other_seed_differs(tiny_pair):
    mrs.build("tiny", tiny_pair / "c", seed=4)
    a = (tiny_pair / "a" / "target" / "model.safetensors").read_bytes()
    assert a != (tiny_pair / "c" / "target" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bits", [None, 4])
def test_built_pair_loads_and_drafts_losslessly(tiny_pair, bits):
    """Our loader reads the files strictly; greedy speculative output equals plain output and
    the drafter's proposals are accepted some of the time (the agreement recipe works)."""
    from mtp_mlx import load
    from mtp_mlx.decoding.engine import Engine, generate_ids

    folder = tiny_pair / "a"
    if bits:
        folder = tiny_pair / "q"
        mrs.build("tiny", folder, seed=3, bits=bits, group_size=32)
    pair = load(str(folder / "target"), str(folder / "assistant"))
    assert pair.target.cfg.vocab_size == 4096
    if bits:
        assert pair.target.embed_tokens.bits == bits
    ids = pair.tokenizer.encode("def fibonacci(n):\n    return")
    eng = Engine(pair, max_batch=1)
    eng.eos = frozenset()  # random weights: run to the budget
    (plain, _), = generate_ids(eng, [ids], max_tokens=32, num_draft=0)
    (spec, st), = generate_ids(eng, [ids], max_tokens=32, num_draft=3)
    assert spec == plain
    assert 0 < st.accepted < st.drafted


def test_sizes_in_the_summary(tiny_pair):
    import json

    s = json.loads((tiny_pair / "a" / "BUILD.json").read_text())
    cfg = json.loads((tiny_pair / "a" / "target" / "config.json").read_text())
    assert cfg["vocab_size"] == cfg["text_config"]["vocab_size"] == 4096
    assert s["target_bytes"] >= 2 * s["target_parameters"]  # bf16
    n = sum(math.prod(a.shape) for _, a in mx.load(str(tiny_pair / "a" / "target" / "model.safetensors")).items())
    assert n == s["target_parameters"]

"""The fixture checkpoints (scripts/make_fixtures.py) and the HF reference harness (tests/reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import reference as ref
from tests.conftest import load_make_fixtures

MF = load_make_fixtures()
HF_KINDS = ["e2b", "e2b-text", "moe", "dense", "unified", "agree"]
MLX_KINDS = list(MF.MLX_KINDS)
TARGET_FILES = {"config.json", "model.safetensors", "generation_config.json", *MF.TOKENIZER_FILES}


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, 500, size=n).tolist()


def _cfg(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _text_cfg(folder: Path) -> dict:
    cfg = _cfg(folder)
    return cfg.get("text_config", cfg)


def _safetensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a folder's model.safetensors as numpy (bfloat16 read as float32)."""
    import mlx.core as mx

    out = {}
    for k, v in mx.load(str(folder / "model.safetensors")).items():
        out[k] = np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
    return out


# ---- the build ---------------------------------------------------------------------------------


def test_every_kind_is_built(fixtures):
    manifest = json.loads((fixtures / "manifest.json").read_text())
    assert set(manifest) == set(MF.ALL_KINDS)
    for kind in MF.ALL_KINDS:
        assert (fixtures / kind / ".complete").exists(), kind
        target, drafter = fixtures / kind / "target", fixtures / kind / "assistant"
        assert TARGET_FILES <= {p.name for p in target.iterdir()}, kind
        assert {"config.json", "model.safetensors"} <= {p.name for p in drafter.iterdir()}, kind
        assert not (drafter / "tokenizer.json").exists()


def test_rebuild_is_skipped(fixtures):
    marker = fixtures / "e2b" / ".complete"
    before = marker.stat().st_mtime_ns
    assert MF.main(["--out", str(fixtures), "--kinds", "e2b,moe-mlx"]) == 0
    assert marker.stat().st_mtime_ns == before


@pytest.mark.parametrize("kind", HF_KINDS)
def test_configs_look_released(fixtures, kind):
    spec = MF.SPECS[kind]
    target = fixtures / kind / "target"
    cfg = _cfg(target)
    tc = _text_cfg(target)
    assert cfg["eos_token_id"] == [1, 106]
    if "text_config" in cfg:
        assert cfg["vocab_size"] == 512  # mlx-lm's gemma4 wrapper needs it
    for c in (tc, _text_cfg(fixtures / kind / "assistant")):
        if spec.get("config_form") == "per_layer_config":
            assert "per_layer_config" in c and "global_head_dim" not in c
        else:
            assert "per_layer_config" not in c
            assert c["global_head_dim"] == spec["target"]["global_head_dim"]
            assert "num_global_key_value_heads" in c
        assert c["sliding_window"] == 32 and c["vocab_size"] == 512
    gen = json.loads((target / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106]


@pytest.mark.parametrize("kind", HF_KINDS)
def test_identity_weights_are_perturbed(fixtures, kind):
    for sub in ("target", "assistant"):
        weights = _safetensors(fixtures / kind / sub)
        ids = [k for k in weights if k.endswith(MF.IDENTITY_SUFFIXES) and not MF._is_tower(k)]
        assert ids, (kind, sub)
        still_one = [k for k in ids if np.allclose(weights[k], 1.0)]
        assert not still_one, still_one[:5]


def test_checkpoint_layouts(fixtures):
    e2b = _safetensors(fixtures / "e2b" / "target")
    assert any(k.startswith("model.audio_tower.") for k in e2b)
    assert any(k.startswith("model.vision_tower.") for k in e2b)
    assert e2b["model.audio_tower.subsample_conv_projection.layer0.conv.weight"].shape[0] == 128
    assert "model.language_model.layers.5.self_attn.k_proj.weight" not in e2b  # KV-shared layer
    assert e2b["model.language_model.layers.5.mlp.gate_proj.weight"].shape[0] == 2 * 256  # double-wide
    text = _safetensors(fixtures / "e2b-text" / "target")
    assert "model.embed_tokens_per_layer.weight" in text and not any("language_model" in k for k in text)
    moe = _safetensors(fixtures / "moe" / "target")
    assert moe["model.language_model.layers.0.experts.gate_up_proj"].shape == (8, 128, 128)
    assert "model.language_model.layers.5.self_attn.v_proj.weight" not in moe  # k_eq_v full layer
    uni = _safetensors(fixtures / "unified" / "target")
    assert "model.vision_embedder.patch_dense.weight" in uni and "model.embed_vision.embedding_projection.weight" in uni
    drafter = _safetensors(fixtures / "e2b" / "assistant")
    order = drafter["masked_embedding.token_ordering"]
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(512))
    assert "lm_head.weight" not in drafter


@pytest.mark.parametrize("kind", MLX_KINDS)
def test_mlx_layouts(fixtures, kind):
    target = _safetensors(fixtures / kind / "target")
    assert all(k.startswith("language_model.model.") for k in target)
    if kind.startswith("moe"):
        assert "language_model.model.layers.0.experts.switch_glu.gate_proj.weight" in target
    quantized = MF.MLX_KINDS[kind][1]
    assert ("language_model.model.embed_tokens.scales" in target) == quantized
    drafter = _safetensors(fixtures / kind / "assistant")
    hf = _safetensors(fixtures / MF.MLX_KINDS[kind][0] / "assistant")
    assert set(drafter) == set(hf) - {"lm_head.weight"}
    if "masked_embedding.token_ordering" in drafter:
        assert drafter["masked_embedding.token_ordering"].dtype == np.int32


@pytest.mark.parametrize("kind", ["e2b", "moe", "unified", "e2b-mlx", "moe-mlx-4bit"])
def test_tokenizer_loads_in_transformers_and_mlx_lm(fixtures, kind):
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from transformers import AutoTokenizer

    folder = fixtures / kind / "target"
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]) == [0, 1, 2, 3, 105, 106]
    ids = tok("def f(x):\n    return x").input_ids
    assert ids[0] == 2 and 3 not in ids
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"
    wrapped = load_tokenizer(folder, eos_token_ids=[1, 106])
    assert wrapped.encode("def f(x):\n    return x") == ids
    assert set(wrapped.eos_token_ids) == {1, 106}


# ---- the reference harness ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_ref():
    ref.require_torch()
    import torch

    return torch


@pytest.mark.parametrize("kind", ["e2b", "moe", "dense", "unified"])
def test_hf_loads_every_weight(fixtures, torch_ref, kind):
    from transformers import AutoModelForCausalLM

    ref.patch_kv_sharing_modes()
    for sub in ("target", "assistant"):
        _, info = AutoModelForCausalLM.from_pretrained(str(fixtures / kind / sub), output_loading_info=True)
        assert not any(info.values()), (kind, sub, info)


@pytest.mark.parametrize("kind", ["e2b", "e2b-text", "moe", "dense", "unified"])
def test_target_forward(fixtures, torch_ref, kind):
    spec = MF.SPECS[kind]
    folder = fixtures / kind / "target"
    pre, ver = _ids(40, 0), _ids(5, 1)
    r = ref.hf_target_forward(folder, pre, ver)
    model = ref.load_target(folder)
    assert ref.producer_layers(model) == spec["producers"]
    t = spec["target"]
    nkv = {"sliding_attention": t["num_key_value_heads"],
           "full_attention": t["num_global_key_value_heads"] if t["attention_k_eq_v"] else t["num_key_value_heads"]}
    hd = {"sliding_attention": t["head_dim"], "full_attention": t["global_head_dim"]}
    emb = model.get_input_embeddings().weight.detach().numpy()
    for step, n, total in (("prefill", 40, 40), ("verify", 5, 45)):
        s = r[step]
        assert s["logits"].shape == (1, n, 512) and s["hidden"].shape == (1, n, t["hidden_size"])
        # the hidden is post-norm: the tied head + softcap reproduces the logits
        np.testing.assert_allclose(30 * np.tanh(s["hidden"] @ emb.T / 30), s["logits"], atol=1e-5)
        for lt, (k, v) in s["shared_kv"].items():
            assert k.shape == v.shape and k.shape[:2] == (1, nkv[lt]) and k.shape[3] == hd[lt]
            pos = s["kv_positions"][lt]
            assert len(pos) == k.shape[2] and pos[-1] == total - 1
        assert s["kv_positions"]["full_attention"][0] == 0
    # the sliding producer returns its window tail + the new tokens
    assert r["verify"]["kv_positions"]["sliding_attention"][0] == 40 - 31
    # cached verify == uncached forward over the whole sequence
    full = ref.hf_target_forward(folder, pre + ver)["prefill"]
    np.testing.assert_allclose(r["verify"]["logits"], full["logits"][:, 40:], atol=1e-4)


def test_e2b_text_is_the_e2b_language_model(fixtures, torch_ref):
    pre = _ids(20, 2)
    a = ref.hf_target_forward(fixtures / "e2b" / "target", pre)["prefill"]["logits"]
    b = ref.hf_target_forward(fixtures / "e2b-text" / "target", pre)["prefill"]["logits"]
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kind", ["e2b", "moe", "unified"])
def test_drafter_step(fixtures, torch_ref, kind):
    tpath, dpath = fixtures / kind / "target", fixtures / kind / "assistant"
    pre = _ids(36, 4)
    r = ref.hf_target_forward(tpath, pre)["prefill"]
    e = ref.embed(tpath, [pre[-1]])
    out = ref.hf_drafter_step(dpath, np.concatenate([e, r["hidden"][:, -1:]], -1), r["shared_kv"], len(pre))
    d = MF.SPECS[kind]["drafter"]
    assert out["logits"].shape == (1, 1, 512)
    assert out["hidden"].shape == (1, 1, d["hidden_size"]) and out["pre_projection"].shape == (1, 1, d["hidden_size"])
    drafter = ref.load_drafter(dpath)
    post = drafter.post_projection.weight.detach().numpy()
    np.testing.assert_allclose(out["hidden"] @ post.T, out["projected"], atol=1e-5)
    if d["use_ordered_embeddings"]:
        cand = ref.masked_head_candidates(dpath, out["hidden"])
        assert len(cand) == d["centroid_intermediate_top_k"] * 512 // d["num_centroids"]
        assert int(out["logits"].argmax()) in cand
        fill = np.setdiff1d(np.arange(512), cand)
        assert np.all(out["logits"][0, 0, fill] == out["logits"][0, 0, cand].min() - 1)


@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_assisted_greedy_is_lossless(fixtures, torch_ref, kind):
    tpath, dpath = fixtures / kind / "target", fixtures / kind / "assistant"
    prompt = _ids(40, 6)
    res = ref.hf_assisted_greedy(tpath, dpath, prompt, max_new_tokens=20, num_assistant_tokens=3, eos_token_id=None)
    assert len(res["tokens"]) == 20
    assert list(res["tokens"]) == list(ref.hf_greedy(tpath, prompt, 20, eos_token_id=None))
    emitted = [t for r in res["rounds"] for t in r["emitted"]]
    assert emitted == list(res["tokens"][1:])  # token 0 comes from the prefill
    for r in res["rounds"]:
        assert len(r["drafts"]) <= 3 and len(r["emitted"]) == r["accepted"] + 1
        assert r["emitted"][: r["accepted"]] == r["drafts"][: r["accepted"]]


def test_agree_pair_has_a_mix_of_acceptance(fixtures, torch_ref):
    tpath, dpath = fixtures / "agree" / "target", fixtures / "agree" / "assistant"
    prompt = _ids(48, 0)  # longer than the sliding window (32)
    res = ref.hf_assisted_greedy(tpath, dpath, prompt, max_new_tokens=64, num_assistant_tokens=4, eos_token_id=None)
    s = ref.acceptance_summary(res)
    assert s["full"] > 0 and s["partial"] > 0 and s["zero"] > 0, s
    assert 0.3 <= s["rate"] <= 0.8, s
    assert list(res["tokens"]) == list(ref.hf_greedy(tpath, prompt, 64, eos_token_id=None))

"""mtp_mlx.loading.convert: round trips, quantization, mlx-lm compatibility, atomic writes."""

import json
import os

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten

from mtp_mlx.errors import MtpError
from mtp_mlx.loading import convert as convert_mod
from mtp_mlx.loading import load
from mtp_mlx.loading.convert import convert

from .loading_helpers import fixture_root

PROMPT = "Hello world, the quick brown fox"


@pytest.fixture(scope="module")
def fx():
    return fixture_root()


def _logits(pair):
    ids = mx.array([pair.tokenizer.encode(PROMPT)])
    return pair.target(ids, pair.target.make_cache()).logits


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("kind", ["e2b", "e2b-text", "moe", "unified", "dense"])
def test_round_trip_float32(fx, tmp_path, kind):
    out = tmp_path / "out"
    done = convert(str(fx / kind / "target"), str(out), drafter=str(fx / kind / "assistant"),
                   dtype="float32", progress=False)
    assert done.target_path == out and done.drafter_path == out / "assistant"
    orig = load(str(fx / kind / "target"), str(fx / kind / "assistant"), dtype="float32")
    conv = load(str(out), str(out / "assistant"))
    assert mx.array_equal(_logits(conv), _logits(orig)).item()
    a, b = dict(tree_flatten(orig.drafter.parameters())), dict(tree_flatten(conv.drafter.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert conv.tokenizer.eos_token_ids == {1, 106}
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["e2b", "moe", "e2b-text"])
def test_mlx_lm_reads_our_conversion(fx, tmp_path, kind):
    out = tmp_path / "out"
    convert(str(fx / kind / "target"), str(out), dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = "model." if kind == "e2b-text" else "language_model.model."
    assert all(k.startswith(prefix) for k in keys)
    assert "vision_config" not in config and "audio_config" not in config
    model, _ = mlx_lm.load(str(out))  # strict: every weight must match mlx-lm's own Gemma 4
    ours = load(str(out))
    ids = mx.array([ours.tokenizer.encode(PROMPT)])
    assert mx.allclose(model(ids), _logits(ours), atol=1e-4).item()


def test_quantized_target_and_drafter(fx, tmp_path):
    out = tmp_path / "q"
    convert(str(fx / "moe" / "target"), str(out), drafter=str(fx / "moe" / "assistant"),
            dtype="float32", q_bits=4, q_group_size=64, drafter_q_bits=8, drafter_q_group_size=32,
            progress=False)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 64) and config["quantization_config"] == q
    assert q["language_model.model.layers.0.router.proj"]["bits"] == 8
    dq = json.loads((out / "assistant" / "config.json").read_text())["quantization"]
    assert (dq["bits"], dq["group_size"]) == (8, 32)

    pair = load(str(out), str(out / "assistant"))
    layer = pair.target.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    assert layer.router.proj.bits == 8
    assert isinstance(pair.target.embed_tokens, nn.QuantizedEmbedding)
    assert pair.drafter.pre_projection.bits == 8 and pair.drafter.pre_projection.group_size == 32

    # float32 so that bf16 rounding cannot flip an expert choice between the two implementations
    model, _ = mlx_lm.load(str(out))
    ids = mx.array([pair.tokenizer.encode(PROMPT)])
    assert mx.allclose(model(ids), _logits(pair), atol=1e-4).item()


def test_drafter_elsewhere(fx, tmp_path):
    done = convert(str(fx / "dense" / "target"), str(tmp_path / "t"), drafter=str(fx / "dense" / "assistant"),
                   drafter_out=str(tmp_path / "d" / "drafter"), progress=False)
    assert done.drafter_path == tmp_path / "d" / "drafter"
    pair = load(str(done.target_path), str(done.drafter_path))
    assert pair.target.embed_tokens.weight.dtype == mx.bfloat16  # the default dtype


# ---- refusals -----------------------------------------------------------------------------
def test_refuses_non_empty_destination_unless_forced(fx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(MtpError) as err:
        convert(str(fx / "dense" / "target"), str(out), progress=False)
    assert "already exists and is not empty" in str(err.value) and "--force" in str(err.value)
    assert (out / "keep.txt").read_text() == "precious"
    convert(str(fx / "dense" / "target"), str(out), force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not _leftovers(tmp_path)


def test_refuses_to_write_over_its_input(fx, tmp_path):
    with pytest.raises(MtpError) as err:
        convert(str(fx / "dense" / "target"), str(fx / "dense"), force=True, progress=False)
    assert "would replace the input checkpoint" in str(err.value)


@pytest.mark.parametrize("kwargs,expect", [
    (dict(q_bits=7), "bits 7 is not supported"),
    (dict(q_bits=4, q_group_size=48), "group size 48 is not supported"),
    (dict(drafter_q_bits=4), "without a drafter"),
    (dict(dtype="int8"), "unknown dtype"),
])
def test_bad_arguments(fx, tmp_path, kwargs, expect):
    with pytest.raises(MtpError) as err:
        convert(str(fx / "dense" / "target"), str(tmp_path / "o"), progress=False, **kwargs)
    assert expect in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_refuses_to_requantize(fx, tmp_path):
    with pytest.raises(MtpError) as err:
        convert(str(fx / "moe-mlx-4bit" / "target"), str(tmp_path / "o"), q_bits=4, progress=False)
    assert "already quantized" in str(err.value)


def test_quantized_source_converts_without_requantizing(fx, tmp_path):
    out = tmp_path / "o"
    convert(str(fx / "e2b-mlx-4bit" / "target"), str(out), dtype="float16", progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    pair = load(str(out))
    assert pair.target.layers[0].self_attn.q_proj.scales.dtype == mx.float16


# ---- atomic writes ------------------------------------------------------------------------
def test_error_while_writing_tensors_leaves_nothing(fx, tmp_path, monkeypatch):
    real_save = mx.save_safetensors

    def save_then_fail(path, *a, **k):
        real_save(path, *a, **k)  # a complete file exists in the staging folder, then we fail
        raise OSError("disk full")

    monkeypatch.setattr(convert_mod.mx, "save_safetensors", save_then_fail)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(OSError):
        convert(str(fx / "e2b" / "target"), str(out), drafter=str(fx / "e2b" / "assistant"), progress=False)
    assert not (tmp_path / "new").exists()  # not even the parent folders it created
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_drafter_leaves_nothing(fx, tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_drafter_config", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(str(fx / "moe" / "target"), str(tmp_path / "out"), drafter=str(fx / "moe" / "assistant"),
                drafter_out=str(tmp_path / "d"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_conversion_keeps_the_old_folder(fx, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    monkeypatch.setattr(convert_mod, "_copy_files", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        convert(str(fx / "dense" / "target"), str(out), force=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not _leftovers(tmp_path)


def test_failed_commit_puts_everything_back(tmp_path, monkeypatch):
    staging = convert_mod._Staging()
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    (b / "old.txt").write_text("old b")
    for dest in (a, b):
        (staging.folder(dest) / "new.txt").write_text("new")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 3:  # a moved in, b backed up, then moving the new b in fails
            raise OSError("boom")
        real_replace(src, dst)

    monkeypatch.setattr(convert_mod.os, "replace", replace)
    with pytest.raises(OSError):
        staging.commit()
    monkeypatch.setattr(convert_mod.os, "replace", real_replace)
    staging.abort()
    assert not a.exists() and [p.name for p in b.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_sharded_output(fx, tmp_path, monkeypatch):
    def two_shards(tensors):
        keys = list(tensors)
        half = len(keys) // 2
        return [{k: tensors[k] for k in keys[:half]}, {k: tensors[k] for k in keys[half:]}]

    monkeypatch.setattr(convert_mod, "make_shards", two_shards)
    out = tmp_path / "out"
    convert(str(fx / "moe" / "target"), str(out), dtype="float32", progress=False)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == set(names)
    ours = load(str(out))
    assert mx.array_equal(_logits(ours), _logits(load(str(fx / "moe" / "target"), dtype="float32"))).item()
    model, _ = mlx_lm.load(str(out))
    assert mx.allclose(model(mx.array([ours.tokenizer.encode(PROMPT)])), _logits(ours), atol=1e-4).item()


def test_8bit_target_matches_mlx_lm_and_runs_speculatively(fx, tmp_path):
    out = tmp_path / "q8"
    convert(str(fx / "e2b" / "target"), str(out), drafter=str(fx / "e2b" / "assistant"), dtype="float32",
            q_bits=8, q_group_size=64, drafter_q_bits=4, drafter_q_group_size=32, progress=False)
    pair = load(str(out), str(out / "assistant"))
    assert pair.target.layers[0].self_attn.q_proj.bits == 8
    # The centroid head gathers rows of a quantized embedding (dequantizing).
    assert isinstance(pair.drafter.model.embed_tokens, nn.QuantizedEmbedding)
    model, _ = mlx_lm.load(str(out))
    ids = mx.array([pair.tokenizer.encode(PROMPT)])
    assert mx.allclose(model(ids), _logits(pair), atol=1e-4).item()
    from tests.decode import plain, spec

    prompt = pair.tokenizer.encode(PROMPT)
    assert spec(pair.target, pair.drafter, prompt, 40, 4) == plain(pair.target, prompt, 40)

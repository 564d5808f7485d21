"""mtp_mlx.loading: hub resolution, safetensors checks, role/pair checks, loading every layout."""

import gc
import fnmatch
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from mtp_mlx.errors import MtpError
from mtp_mlx.loading import check_configs, hub, load, pair_fit, weights
from mtp_mlx.loading.tokenizer import eos_token_ids
from mtp_mlx.models.config import DrafterConfig, TargetConfig
from mtp_mlx.models.gemma4_text import is_text_weight

from .loading_helpers import fixture_root

PROMPT = "Hello world, the quick brown fox"


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---- hub ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["./nope", "/no/such/folder", "~/no-such-folder-x", "a/b/c", "nope"])
def test_missing_local_path(bad):
    with pytest.raises(MtpError) as err:
        hub.resolve(bad, "model")
    assert "does not exist" in one_line(err) and "Hugging Face repo id" in str(err.value)


def test_existing_folder_is_used_as_is(tmp_path):
    assert hub.resolve(str(tmp_path), "model") == tmp_path


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(MtpError) as err:
        hub.resolve(str(f), "drafter")
    assert "is a file, not a folder" in one_line(err)


def test_repo_id_downloads_only_needed_files(monkeypatch, tmp_path):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns, kw))
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert hub.resolve("google/gemma-4-E2B-it", "model") == tmp_path
    (repo_id, patterns, kw), = calls
    assert repo_id == "google/gemma-4-E2B-it" and not kw

    def fetched(name):
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for name in ("config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert fetched(name), name
    for name in ("pytorch_model.bin", "model.pt", "modeling_gemma4.py", "model.gguf", "weights.pkl"):
        assert not fetched(name), name


class _NotFound(hf_errors.RepositoryNotFoundError):
    def __init__(self):
        Exception.__init__(self, "404 Client Error\nRepository Not Found for url: ...")


class _Gated(hf_errors.GatedRepoError):
    def __init__(self):
        Exception.__init__(self, "401 gated")


@pytest.mark.parametrize("exc,expect", [
    (_NotFound, "is neither a local folder nor a repo on the Hugging Face Hub"),
    (_Gated, "is gated"),
    (lambda: OSError("connection reset"), "could not download"),
])
def test_hub_failures_are_one_line(monkeypatch, exc, expect):
    def boom(*a, **k):
        raise exc()

    monkeypatch.setattr(hub, "snapshot_download", boom)
    with pytest.raises(MtpError) as err:
        hub.resolve("someone/some-model", "drafter")
    assert expect in one_line(err) and "'someone/some-model'" in str(err.value)


def test_real_offline_failure(monkeypatch, tmp_path):
    """A real snapshot_download call with HF_HUB_OFFLINE and an empty cache: no network used."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MtpError) as err:
        hub.resolve("mtp-mlx-tests/no-such-model-3f9a", "model")
    text = one_line(err)
    assert "HF_HUB_OFFLINE" in text and "mtp-mlx-tests/no-such-model-3f9a" in text


# ---- safetensors and config files --------------------------------------------------------
def _write(tmp_path, tensors, name="model.safetensors"):
    f = tmp_path / name
    mx.save_safetensors(str(f), tensors)
    return f


def test_header_of_good_file(tmp_path):
    f = _write(tmp_path, {"a": mx.ones((3, 4)), "b": mx.zeros((2,), dtype=mx.bfloat16)})
    header = weights.safetensors_header(f)
    assert set(header) == {"a", "b"} and header["a"]["shape"] == [3, 4]


@pytest.mark.parametrize("keep", [4, 20, 60, -1])
def test_truncated_file(tmp_path, keep):
    f = _write(tmp_path, {"a": mx.ones((64, 64)), "b": mx.ones((8,))})
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:-100])
    with pytest.raises(MtpError) as err:
        weights.safetensors_header(f)
    text = one_line(err)
    assert str(f) in text and "truncated or corrupt" in text and "re-download or re-convert" in text


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(MtpError) as err:
        weights.weight_files(tmp_path)
    assert "pickle" in one_line(err) and "safetensors" in str(err.value)


def test_folder_without_weights(tmp_path):
    with pytest.raises(MtpError) as err:
        weights.weight_files(tmp_path)
    assert "no *.safetensors" in one_line(err)


def test_index_naming_a_missing_shard(tmp_path):
    _write(tmp_path, {"a": mx.ones((2,))}, "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(MtpError) as err:
        weights.weight_files(tmp_path)
    assert "model-00002-of-00002.safetensors" in one_line(err)


def test_config_missing_or_broken(tmp_path):
    with pytest.raises(MtpError) as err:
        weights.read_config(tmp_path)
    assert "has no config.json" in one_line(err)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MtpError) as err:
        weights.read_config(tmp_path)
    assert "not valid JSON" in one_line(err)


def test_unread_tensors_are_never_materialised(tmp_path):
    """Vision/audio tensors are dropped before evaluation, so they never reach memory."""
    big = mx.zeros((2048, 4096), dtype=mx.float32)  # 32 MiB
    small = {"model.language_model.norm.weight": mx.ones((64,))}
    _write(tmp_path, {"model.vision_tower.big.weight": big, **small})
    del big
    gc.collect()  # earlier tests' garbage (models, caches) must not be freed or evaluated in the window measured
    mx.clear_cache()
    mx.reset_peak_memory()
    got = weights.read_weights(tmp_path, keep=is_text_weight)
    mx.eval(list(got.values()))
    assert list(got) == ["model.language_model.norm.weight"]
    assert mx.get_peak_memory() < 1 << 20


def test_unknown_dtype():
    with pytest.raises(MtpError) as err:
        weights.parse_dtype("float8")
    assert "unknown dtype 'float8'" in one_line(err)


# ---- roles and pair fit ---------------------------------------------------------------------
def _configs(fx, kind):
    t = weights.read_config(fx / kind / "target")
    d = weights.read_config(fx / kind / "assistant")
    return t, d


def test_unknown_model_type(tmp_path):
    with pytest.raises(MtpError) as err:
        pair_fit.check_role({"model_type": "llama"}, "model", tmp_path)
    assert "model_type 'llama'" in one_line(err) and "gemma4" in str(err.value)


def test_roles_swapped_one_at_a_time(tmp_path):
    with pytest.raises(MtpError) as err:
        pair_fit.check_role({"model_type": "gemma4_assistant"}, "model", tmp_path)
    assert "is a Gemma 4 drafter" in one_line(err)
    with pytest.raises(MtpError) as err:
        pair_fit.check_role({"model_type": "gemma4"}, "drafter", tmp_path)
    assert "not a drafter" in one_line(err)


def test_missing_config_field(tmp_path):
    raw = {"model_type": "gemma4", "text_config": {"hidden_size": 8}}
    with pytest.raises(MtpError) as err:
        pair_fit.parse_target(raw, tmp_path)
    assert "config.json lacks" in one_line(err)


def test_pair_mismatch_lists_every_difference(fx):
    t_raw, d_raw = _configs(fx, "e2b")
    target = TargetConfig.from_dict(t_raw)
    d_raw = json.loads(json.dumps(d_raw))
    d_raw["backbone_hidden_size"] = 256
    d_raw["text_config"]["head_dim"] = 16
    d_raw["text_config"]["sliding_window"] = 64
    d_raw["text_config"]["rope_parameters"]["full_attention"]["rope_theta"] = 10000.0
    drafter = DrafterConfig.from_dict(d_raw)
    with pytest.raises(MtpError) as err:
        pair_fit.check_pair(target, drafter, target_name="T", drafter_name="D")
    text = one_line(err)
    assert text.startswith("drafter D does not fit target T: ")
    for part in ("backbone_hidden_size 256 != target hidden_size 128", "head_dim 16 != target head_dim 32",
                 "sliding_window 64 != target sliding_window 32", "full_attention rope_parameters"):
        assert part in text
    assert text.endswith(pair_fit.FIT_HINT)


def test_fitting_pairs_pass(fx):
    for kind in ("e2b", "moe", "dense", "unified"):
        t_raw, d_raw = _configs(fx, kind)
        pair_fit.check_pair(TargetConfig.from_dict(t_raw), DrafterConfig.from_dict(d_raw))


def test_kv_head_mismatch(fx):
    t_raw, _ = _configs(fx, "moe")
    _, d_raw = _configs(fx, "dense")
    assert pair_fit.mismatches(TargetConfig.from_dict(t_raw), DrafterConfig.from_dict(d_raw))
    with pytest.raises(MtpError) as err:
        check_configs(fx / "moe" / "target", fx / "dense" / "assistant")
    assert "sliding-layer KV heads 4 != target sliding-layer KV heads 2" in one_line(err)
    assert "full-layer KV heads 2 != target full-layer KV heads 1" in str(err.value)


# ---- loading the fixtures -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx():
    return fixture_root()


def _logits(pair, text=PROMPT):
    ids = mx.array([pair.tokenizer.encode(text)])
    return pair.target(ids, pair.target.make_cache()).logits


@pytest.mark.parametrize("kind", ["e2b", "e2b-text", "moe", "dense", "unified", "e2b-mlx", "moe-mlx"])
def test_load_every_layout(fx, kind):
    pair = load(str(fx / kind / "target"), str(fx / kind / "assistant"))
    assert pair.drafter is not None and pair.tokenizer.eos_token_ids == {1, 106}
    logits = _logits(pair)
    assert logits.shape[-1] == pair.target_config.text.vocab_size
    assert mx.isfinite(logits).all().item()


def test_layouts_of_the_same_weights_agree(fx):
    ref = _logits(load(str(fx / "e2b" / "target")))
    for kind in ("e2b-text", "e2b-mlx"):
        assert mx.allclose(_logits(load(str(fx / kind / "target"))), ref, atol=1e-5).item(), kind


@pytest.mark.parametrize("kind,group", [("moe-mlx-4bit", 64), ("e2b-mlx-4bit", 32)])
def test_load_quantized_mlx_conversion(fx, kind, group):
    pair = load(str(fx / kind / "target"), str(fx / kind / "assistant"))
    q = pair.target.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, group)
    if pair.target_config.text.enable_moe_block:
        assert pair.target.layers[0].router.proj.bits == 8
    # mlx-lm reads the same folder with its own Gemma 4: the same quantized model
    ref_model, _ = mlx_lm.load(str(fx / kind / "target"))
    ids = mx.array([pair.tokenizer.encode(PROMPT)])
    logits = _logits(pair)
    assert mx.allclose(logits, ref_model(ids).astype(logits.dtype), atol=1e-4).item()


def test_dtype_cast(fx):
    pair = load(str(fx / "moe" / "target"), str(fx / "moe" / "assistant"), dtype="bfloat16")
    assert pair.target.embed_tokens.weight.dtype == mx.bfloat16
    assert pair.drafter.pre_projection.weight.dtype == mx.bfloat16


def test_drafter_token_ordering_is_int32(fx):
    pair = load(str(fx / "e2b" / "target"), str(fx / "e2b" / "assistant"), dtype="float16")
    assert pair.drafter.masked_embedding.token_ordering.dtype == mx.int32


def test_swapped_pair(fx):
    with pytest.raises(MtpError) as err:
        load(str(fx / "e2b" / "assistant"), str(fx / "e2b" / "target"))
    assert "swapped" in one_line(err)


def test_drafter_as_model_and_model_as_drafter(fx):
    with pytest.raises(MtpError) as err:
        load(str(fx / "e2b" / "assistant"))
    assert "is a Gemma 4 drafter" in one_line(err)
    with pytest.raises(MtpError) as err:
        load(str(fx / "e2b" / "target"), str(fx / "moe" / "target"))
    assert "not a drafter" in one_line(err)


def test_mismatched_pair_fails_before_reading_weights(fx, monkeypatch):
    monkeypatch.setattr(weights, "read_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(MtpError) as err:
        load(str(fx / "e2b" / "target"), str(fx / "moe" / "assistant"))
    assert "does not fit target" in one_line(err)


def test_truncated_checkpoint(fx, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(fx / "moe" / "target", folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(MtpError) as err:
        load(str(folder))
    assert str(f) in one_line(err) and "re-download" in str(err.value)


def test_checkpoint_that_does_not_match_its_config(fx, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(fx / "dense" / "target", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MtpError) as err:
        load(str(folder))
    assert "does not match its config.json" in one_line(err) and "wrong shape" in str(err.value)


def test_eos_ids_are_merged(fx, tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 1, "text_config": {"eos_token_id": [1, 7]}}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [106, 1]}))
    assert eos_token_ids(folder) == [1, 7, 106]
    assert set(eos_token_ids(fx / "e2b" / "target")) == {1, 106}


def test_missing_tokenizer(fx, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(fx / "dense" / "target", folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(MtpError) as err:
        load(str(folder))
    assert "has no tokenizer" in one_line(err)


def test_load_by_repo_id(fx, monkeypatch):
    """Repo ids go through snapshot_download (mocked to the fixtures); errors name the repo id."""
    repos = {"google/tiny-e2b": fx / "e2b" / "target", "google/tiny-e2b-assistant": fx / "e2b" / "assistant",
             "google/tiny-moe-assistant": fx / "moe" / "assistant"}
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: str(repos[repo_id]))
    pair = load("google/tiny-e2b", "google/tiny-e2b-assistant")
    assert pair.target_path == repos["google/tiny-e2b"] and pair.drafter is not None
    with pytest.raises(MtpError) as err:
        load("google/tiny-e2b", "google/tiny-moe-assistant")
    assert one_line(err).startswith("drafter google/tiny-moe-assistant does not fit target google/tiny-e2b: ")


def test_foreign_quantization_is_refused(fx, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(fx / "dense" / "target", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MtpError) as err:
        load(str(folder))
    assert "'compressed-tensors', which mtp-mlx cannot read" in one_line(err)

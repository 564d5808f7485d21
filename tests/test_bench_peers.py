"""scripts/bench_peers.py's view of a checkpoint for the peers: only values the config already
implies are added, the weights are the same files, and our loader reads the view as it reads
the original (same greedy tokens)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "scripts" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bp = _load_script()


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_released_form_needs_no_view(fixtures):
    for kind in ("agree", "e2b", "moe"):
        for role in ("target", "assistant"):
            assert bp.peer_config(_config(fixtures / kind / role)) is None, (kind, role)


def test_per_layer_config_form_gets_the_released_keys(fixtures):
    for role in ("target", "assistant"):
        raw = _config(fixtures / "dense" / role)
        text = raw.get("text_config", raw)
        assert "per_layer_config" in text and not text.get("global_head_dim")
        full = [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
        over = text["per_layer_config"][str(full[0])]
        got = bp.peer_config(raw)
        gtext = got.get("text_config", got)
        assert "per_layer_config" not in gtext
        assert gtext["global_head_dim"] == over["head_dim"]
        assert gtext["num_global_key_value_heads"] == over["num_key_value_heads"]
        assert raw.get("text_config", raw)["per_layer_config"]  # the input is left as it was
        # everything else is untouched
        rest = {k: v for k, v in gtext.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
        assert rest == {k: v for k, v in text.items()
                        if k not in ("per_layer_config", "global_head_dim", "num_global_key_value_heads")}


def test_unified_gets_the_sizes_it_implies(fixtures):
    raw = _config(fixtures / "unified" / "target")
    got = bp.peer_config(raw)
    v, a = raw["vision_config"], raw["audio_config"]
    assert got["vision_config"]["model_patch_size"] == v["patch_size"] * v["pooling_kernel_size"]
    for key in ("audio_samples_per_token", "hidden_size", "output_proj_dims"):
        assert got["audio_config"][key] == a["audio_embed_dim"]
    assert got["text_config"]["hidden_size_per_layer_input"] == 0
    drafter = bp.peer_config(_config(fixtures / "unified" / "assistant"))
    assert drafter["text_config"]["hidden_size_per_layer_input"] == 0


@pytest.mark.parametrize("kind", ["dense", "unified"])
def test_view_links_the_same_weights_and_decodes_the_same(fixtures, tmp_path, kind):
    from mtp_mlx import load, stream_generate

    def greedy(folder):
        out = stream_generate(load(str(folder)), ids, max_tokens=12, num_draft_tokens=0, temperature=0.0)
        return [t for r in out for t in r.tokens]

    src = fixtures / kind / "target"
    view = Path(bp.peer_view(str(src), str(tmp_path)))
    assert {p.name for p in view.iterdir()} == {p.name for p in src.iterdir()}
    for f in view.iterdir():
        if f.name != "config.json":
            assert f.is_symlink() and f.resolve() == (src / f.name).resolve()
    assert bp.peer_view(str(fixtures / "agree" / "target"), str(tmp_path / "x")) is None
    assert not (tmp_path / "x").exists()
    ids = [2, 17, 40, 9, 33, 101, 7]
    want = greedy(src)
    assert len(want) == 12 and greedy(view) == want

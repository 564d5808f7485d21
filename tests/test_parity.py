"""Numerical parity with the reference (transformers 5.23, float32) on every fixture kind:
target logits, final hidden and producer K/V for a prefill and a K+1 verify chunk; drafter
logits, hidden and projected hidden for contexts shorter than, equal to and longer than the
sliding window; and, in reference-parity mode, the drafted tokens of every round."""

import mlx.core as mx
import numpy as np
import pytest

from mtp_mlx.cache import KVView
from mtp_mlx.decoding.draft import hf_draft_context
from mtp_mlx.decoding.reference import hf_parity_rounds
from mtp_mlx.loading.weights import load_drafter, load_target
from tests import reference as ref
from tests.decode import plain

TOL = 1e-4
HF_KINDS = ["e2b", "e2b-text", "moe", "dense", "unified"]
# MLX conversions are compared with the reference run on the HF folder they came from.
MLX_KINDS = {"e2b-mlx": "e2b", "moe-mlx": "moe"}

pytestmark = pytest.mark.skipif(not ref.torch_available(), reason="the reference needs torch (CI installs it)")


def _ids(n, seed):
    return np.random.default_rng(seed).integers(3, 500, size=n).tolist()


def _kv_error(view: KVView, keys, values, positions) -> float:
    """Max abs difference of K and V, matched by absolute position (our rings are unordered)."""
    ours = np.array(view.pos[0])
    slot = {int(p): i for i, p in enumerate(ours) if p >= 0}
    missing = [int(p) for p in positions if int(p) not in slot]
    assert not missing, f"positions {missing[:5]} not in our cache"
    idx = [slot[int(p)] for p in positions]
    k = np.array(view.keys)[:, :, idx]
    v = np.array(view.values)[:, :, idx]
    return max(np.abs(k - keys).max(), np.abs(v - values).max())


def _target_errors(ours_path, ref_path):
    model, _ = load_target(ours_path)
    pre, ver = _ids(45, 0), _ids(5, 1)  # prefill longer than the window (32), then K+1 = 5
    expect = ref.hf_target_forward(ref_path, pre, ver)
    cache = model.make_cache(max_draft=8)
    errors = {}
    for step, ids in (("prefill", pre), ("verify", ver)):
        out = model(mx.array([ids]), cache)
        e = expect[step]
        errors[f"{step} logits"] = np.abs(np.array(out.logits) - e["logits"]).max()
        errors[f"{step} hidden"] = np.abs(np.array(out.hidden) - e["hidden"]).max()
        for t, (k, v) in e["shared_kv"].items():
            errors[f"{step} {t} K/V"] = _kv_error(out.shared_kv[t], k, v, e["kv_positions"][t])
    return errors


@pytest.mark.parametrize("kind", HF_KINDS + list(MLX_KINDS))
def test_target_matches_reference(fixtures, kind):
    ref_kind = MLX_KINDS.get(kind, kind)
    errors = _target_errors(fixtures / kind / "target", fixtures / ref_kind / "target")
    bad = {k: float(v) for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{kind}: {bad}"


@pytest.mark.parametrize("kind,source", [("moe-mlx-4bit", "moe"), ("e2b-mlx-4bit", "e2b")])
def test_quantized_target_tracks_reference(fixtures, kind, source):
    """4-bit weights change the numbers (a lot, on 64-wide random layers), not the
    computation: logits stay well correlated with the float32 reference. (Exact agreement
    with mlx-lm's own 4-bit model is checked in test_loading.)"""
    model, _ = load_target(fixtures / kind / "target")
    pre = _ids(40, 0)
    expect = ref.hf_target_forward(fixtures / source / "target", pre)["prefill"]["logits"][0]
    ours = np.array(model(mx.array([pre]), model.make_cache()).logits)[0]
    cos = (ours * expect).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(expect, axis=-1)
    assert cos.mean() > 0.6, cos


@pytest.mark.parametrize("kind", ["e2b", "moe", "dense", "unified", "e2b-mlx"])
@pytest.mark.parametrize("context", ["shorter", "equal", "longer"])
def test_drafter_matches_reference(fixtures, kind, context):
    ref_kind = MLX_KINDS.get(kind, kind)
    tpath, dpath = fixtures / ref_kind / "target", fixtures / ref_kind / "assistant"
    target, cfg = load_target(fixtures / kind / "target")
    drafter, _ = load_drafter(fixtures / kind / "assistant")
    W = cfg.text.sliding_window
    P = {"shorter": W - 12, "equal": W, "longer": W + 13}[context]
    pre = _ids(P, P)
    r = ref.hf_target_forward(tpath, pre)["prefill"]
    token = int(np.argmax(r["logits"][0, -1]))
    emb, hidden = ref.embed(tpath, [token]), r["hidden"][:, -1:]
    expect = ref.hf_drafter_step(dpath, np.concatenate([emb, hidden], -1), r["shared_kv"], P)
    views = {
        t: KVView(mx.array(k), mx.array(v), mx.array(r["kv_positions"][t][None].astype(np.int32)))
        for t, (k, v) in r["shared_kv"].items()
    }
    ctx = hf_draft_context(views, P, P - 1, P, W)
    ours_emb = target.embed(mx.array([[token]]))
    assert np.abs(np.array(ours_emb) - emb).max() <= TOL
    hd, projected = drafter(ours_emb, mx.array(hidden), ctx.kv, ctx.q_pos, ctx.masks)
    logits = drafter.logits(hd, fill="hf")
    errors = {
        "hidden": np.abs(np.array(hd) - expect["hidden"]).max(),
        "projected": np.abs(np.array(projected) - expect["projected"]).max(),
        "logits": np.abs(np.array(logits) - expect["logits"]).max(),
    }
    assert all(v <= TOL for v in errors.values()), errors
    # The greedy path (no full-vocabulary logits) picks the reference's argmax.
    assert drafter.argmax(hd).item() == int(np.argmax(expect["logits"][0, -1]))


@pytest.mark.parametrize("kind", ["agree", "e2b", "moe"])
def test_reference_parity_mode_drafts_equal_reference_candidates(fixtures, kind):
    """position="hf" reproduces HF's drafting (query position and K/V selection, stale
    entries included): every round's drafted tokens equal HF's candidates."""
    tpath, dpath = fixtures / kind / "target", fixtures / kind / "assistant"
    target, cfg = load_target(tpath)
    drafter, _ = load_drafter(dpath)
    prompt = _ids(40, 3)  # longer than the window: the sliding K/V wrap during the run
    expect = ref.hf_assisted_greedy(tpath, dpath, prompt, max_new_tokens=48, num_assistant_tokens=4,
                                    eos_token_id=None)
    steps = list(hf_parity_rounds(target, drafter, prompt, max_tokens=48, num_draft=4))
    ours = [s.drafts for s in steps[1:]]
    theirs = [r["drafts"] for r in expect["rounds"]]
    assert ours == theirs
    assert [t for s in steps for t in s.tokens] == list(expect["tokens"])


@pytest.mark.parametrize("kind", ["e2b", "moe", "unified"])
def test_plain_greedy_equals_reference_greedy(fixtures, kind):
    path = fixtures / kind / "target"
    target, _ = load_target(path)
    prompt = _ids(40, 5)
    assert plain(target, prompt, 40) == list(ref.hf_greedy(path, prompt, 40, eos_token_id=None))

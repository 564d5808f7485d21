"""Two ranks on 127.0.0.1 (ring backend, MLX_RANK + a generated MLX_HOSTFILE, free ports, no
ssh): the target split by tensor parallel and by pipeline parallel against one process.

Each run starts two ``tests/distributed_worker.py`` processes, bounded in time and killed in
``finally`` (``local_ring``). Every rank first computes the single-process reference with the
unsplit model, then splits it and repeats; the test compares both ranks' records.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mtp_mlx.distributed.launch import local_ring
from mtp_mlx.errors import MtpError
from tests import distributed_worker as worker

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "distributed_worker.py")
TIMEOUT = 420  # seconds per two-rank run (about 50-75 s on a 2-core CPU; far more when it is shared)


# e2b geometry (1 KV head, KV-shared layers, PLE; the agree pair, whose drafts are often
# accepted), 31B-like dense (K/V heads that split) and 26B-A4B-like MoE.
# moe-mlx-4bit: quantized; its 64-wide experts are one quantization group, so they stay whole.
# tiny-e2b: in memory, 2 KV heads (E4B-like): split K/V next to KV-shared layers, window 8.
# Pipeline parallel does not look inside layers; the e2b shape (K/V mirrored across stages) is
# the one that matters most there, and the 31B and 26B-A4B kinds run through it too.
KINDS = {"tensor": ["agree", "dense", "moe", "moe-mlx-4bit", "tiny-e2b"], "pipeline": ["agree", "dense", "moe"]}
FULL = "agree"  # also sampled, batched, adaptive-K and unseeded requests


def _run(mode: str, out: Path, *extra: str, timeout: float = TIMEOUT):
    out.mkdir(parents=True, exist_ok=True)
    # linger: how long the survivor of a failed rank may take to exit by itself (the worker's
    # watchdog allows 10 s of silence in its failure phase) before the harness kills it.
    return local_ring([sys.executable, WORKER, "--mode", mode, "--out", str(out), *extra], n=2, timeout=timeout,
                      linger=30)


def _records(mode, fixtures, tmp_path_factory):
    import mlx.core as mx

    if not mx.distributed.is_available():
        pytest.skip("this MLX build has no distributed backend")
    out = tmp_path_factory.mktemp(f"dist-{mode}")
    ranks = _run(mode, out, "--fixtures", str(fixtures), "--kinds", ",".join(KINDS[mode]), "--full", FULL,
                 "--then-die", "dense", "--stall-timeout", "90")
    assert all((out / f"rank{r}.json").exists() for r in range(2)), ranks
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    arrays = [{k: dict(np.load(out / f"rank{r}_{k}.npz")) for k in KINDS[mode]} for r in range(2)]
    return reports, arrays, ranks


@pytest.fixture(scope="module")
def tensor_run(fixtures, tmp_path_factory):
    return _records("tensor", fixtures, tmp_path_factory)


@pytest.fixture(scope="module")
def pipeline_run(fixtures, tmp_path_factory):
    return _records("pipeline", fixtures, tmp_path_factory)


def _get(request, mode):
    return request.getfixturevalue(f"{mode}_run")


CASES = [(m, k) for m in KINDS for k in KINDS[m]]


@pytest.mark.parametrize("mode,kind", CASES)
def test_logits_match_one_process(request, mode, kind):
    reports, arrays, _ = _get(request, mode)
    for rep in reports:
        rec = rep["kinds"][kind]
        # Tensor parallel reorders the sums of the split layers; pipeline moves whole arrays.
        # The in-memory tiny-e2b has logits up to the 30.0 softcap (the checkpoints' are small):
        # the same float32 rounding then allows 1e-5 relative to that scale.
        tol = 1e-5 * (max(1.0, rec["logit_scale"]) if kind == "tiny-e2b" else 1.0) if mode == "tensor" else 0.0
        assert rec["prefill_diff"] <= tol and rec["chunk_diff"] <= tol, rec
        assert rec["hidden_diff"] <= 10 * tol, rec  # the drafter input: a looser bound than the logits
    # Both ranks hold the very same logits (they drive identical accept decisions).
    for name in ("prefill", "chunk", "hidden"):
        assert np.array_equal(arrays[0][kind][name], arrays[1][kind][name]), name


def test_tensor_parallel_layouts(request):
    reports, _, _ = _get(request, "tensor")
    kinds = reports[0]["kinds"]
    # agree (e2b shape): one KV head, so every K/V is replicated; layers 5-7 are KV-shared.
    assert set(kinds["agree"]["plan"].values()) == {"replicated", "shared"}
    # dense: sliding and full K/V heads split, except the drafter's producers 4 and 5.
    assert kinds["dense"]["plan"] == {"0": "split", "1": "split", "2": "split", "3": "split",
                                      "4": "replicated", "5": "replicated"}
    assert kinds["dense"]["whole"] == []
    assert kinds["moe-mlx-4bit"]["whole"] == [f"layers.{i}.experts" for i in range(8)]
    # tiny-e2b: layers 0-2 split, the producers 3 (full) and 4 (sliding) replicated, 5-7 shared.
    assert kinds["tiny-e2b"]["plan"] == {"0": "split", "1": "split", "2": "split", "3": "replicated",
                                         "4": "replicated", "5": "shared", "6": "shared", "7": "shared"}


@pytest.mark.parametrize("mode,kind", CASES)
def test_greedy_speculative_equals_plain_across_window_wraps(request, mode, kind, fixtures):
    reports, _, _ = _get(request, mode)
    rec = reports[0]["kinds"][kind]
    plain, spec = rec["plain"], rec["spec"]
    assert len(plain["tokens"]) == worker.GEN
    assert spec["tokens"] == plain["tokens"]
    if kind == "tiny-e2b":
        window = 8
    else:
        cfg = json.loads((fixtures / kind / "target" / "config.json").read_text())
        window = cfg.get("text_config", cfg)["sliding_window"]
    assert worker.PROMPT_LEN + worker.GEN > window + 8  # the ring (window + max-draft slack) wrapped
    if kind == "agree":
        assert 0 < spec["accepted"] < 3 * spec["rounds"]  # accepted and rejected drafts: rollbacks
    if mode == "pipeline":  # no reordered sums: same tokens as one process
        assert plain["tokens"] == rec["ref_plain"]["tokens"]


@pytest.mark.parametrize("mode", list(KINDS))
def test_both_ranks_emit_identical_tokens(request, mode):
    reports, _, _ = _get(request, mode)
    for kind in KINDS[mode]:
        a, b = (dict(r["kinds"][kind]) for r in reports)
        a.pop("seconds")
        b.pop("seconds")
        assert a == b, kind


@pytest.mark.parametrize("mode", list(KINDS))
def test_seeded_sampling_identical_and_reproducible(request, mode):
    reports, _, _ = _get(request, mode)
    runs = [r["kinds"][FULL]["sampled"] for r in reports]
    assert runs[0][0]["tokens"] == runs[0][1]["tokens"]  # reproducible
    assert runs[0] == runs[1]  # identical on both ranks
    assert runs[0][0]["tokens"] != reports[0]["kinds"][FULL]["plain"]["tokens"]  # really sampled
    unseeded = [r["kinds"][FULL]["unseeded"] for r in reports]
    assert unseeded[0] == unseeded[1] and len(unseeded[0]["tokens"]) == worker.GEN


@pytest.mark.parametrize("mode", list(KINDS))
def test_batch_with_adaptive_draft_length(request, mode):
    reports, _, _ = _get(request, mode)
    rec = reports[0]["kinds"][FULL]
    first, second = rec["batch"]
    assert first["tokens"] == rec["plain"]["tokens"]  # a row's greedy output does not depend on the batch
    assert len(second["tokens"]) == worker.GEN
    assert reports[1]["kinds"][FULL]["batch"] == rec["batch"]  # same K per round on both ranks
    # Rank 1's own policy would have drafted from the first round (``worker.policy_for``); rank
    # 0's measured plain rounds first, then drafted, and both ranks ran its rounds.
    assert any(k > 0 for k in first["ks"])


@pytest.mark.parametrize("mode", list(KINDS))
def test_a_failed_rank_stops_the_other_with_an_error(request, mode):
    *_, ranks = _get(request, mode)  # after its records, rank 1 exits in the middle of a generation
    assert ranks[1].returncode == 7, ranks[1]
    # The survivor exits by itself (not killed by the harness) with a one-line reason: MLX's
    # error for a lost connection (status 2), or the watchdog when a collective just waits
    # (status 3; pipeline sends whose peer is gone do that).
    assert ranks[0].returncode in (2, 3), ranks[0]
    assert "a peer rank stopped" in ranks[0].stderr or "a peer rank is stalled or gone" in ranks[0].stderr


@pytest.mark.parametrize("mode", list(KINDS))
def test_server_lockstep(request, mode):
    reports, _, _ = _get(request, mode)
    served = [r["kinds"][FULL]["served"] for r in reports]
    assert served[0] == served[1]  # rank 1 had no requests of its own, yet ran the same rounds
    assert served[0]["reasons"] == {"0": "cancelled", "1": "length"}
    assert served[0]["tokens"]["1"] == reports[0]["kinds"][FULL]["plain"]["tokens"]  # joined mid-run


@pytest.mark.parametrize("mode", list(KINDS))
def test_prefix_cache_hits_on_every_rank(request, mode):
    reports, _, _ = _get(request, mode)
    rec = reports[0]["kinds"][FULL]
    assert rec["prefix"]["hits"] == 1
    # The engine's load-time exactness check (many forwards in one evaluation) ran on the split
    # model; its verdict is the same on both ranks (compared with everything else above).
    assert rec["wide_exact"] in (True, False)
    assert rec["prefix"]["tokens"][1] == rec["plain"]["tokens"][5:]
    assert reports[1]["kinds"][FULL]["prefix"] == rec["prefix"]


# ---- single process: the checks that need no second rank --------------------------------------
class _Group:
    def __init__(self, size, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def test_shard_refuses_heads_that_do_not_divide():
    from mtp_mlx.distributed.tensor import check_tensor_parallel, kv_slice, shard_target
    from tests.tiny import target_config, tiny_target

    with pytest.raises(MtpError, match="query heads"):
        check_tensor_parallel(target_config("e2b"), 3)  # 4 query heads over 3 ranks
    with pytest.raises(MtpError, match="whole head groups"):
        kv_slice(12, 3, 2, 0)  # 3 KV heads over 2 ranks: a group would straddle the ranks
    assert kv_slice(4, 1, 2, 1) == (0, 1)  # one KV head: replicated, every rank reads it
    assert kv_slice(32, 16, 2, 1) == (8, 16)  # 31B sliding layers at TP=2
    assert kv_slice(32, 4, 4, 3) == (3, 4)  # 31B full layers at TP=4
    model = tiny_target("e2b")
    with pytest.raises(MtpError):
        shard_target(model, _Group(3))
    assert shard_target(model, _Group(1)).kv == {}  # a group of one leaves the model alone


def _shaped(layers, q, kv, kv_full, shared=0, k_eq_v=True):
    from mtp_mlx.models.config import TextConfig

    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    types[-1] = "full_attention"
    return TextConfig(vocab_size=8, hidden_size=8, num_hidden_layers=layers, num_attention_heads=q,
                      num_key_value_heads=kv, num_global_key_value_heads=kv_full, attention_k_eq_v=k_eq_v,
                      head_dim=256, global_head_dim=512, intermediate_size=64, layer_types=types,
                      sliding_window=512, num_kv_shared_layers=shared)


@pytest.mark.parametrize("name,cfg,sizes", [
    ("31B", _shaped(60, 32, 16, 4), (2, 4, 8)),
    ("26B-A4B", _shaped(30, 16, 8, 2), (2, 4, 8)),
    ("E2B", _shaped(35, 8, 1, 1, shared=20, k_eq_v=False), (2, 4, 8)),
])
def test_real_geometries(name, cfg, sizes):
    from mtp_mlx.distributed.tensor import check_tensor_parallel, kv_layout

    producers = {cfg.producer("sliding_attention"), cfg.producer("full_attention")}
    for n in sizes:
        check_tensor_parallel(cfg, n)
        layout = kv_layout(cfg, n)
        assert all(layout[p] == "replicated" for p in producers)
        for i, how in layout.items():
            if how == "split":
                assert cfg.layer_kv_heads(i) % n == 0 and i not in producers
    with pytest.raises(MtpError, match="query heads"):
        check_tensor_parallel(cfg, 3)
    assert kv_layout(_shaped(60, 32, 16, 4), 2)[0] == "split"  # 31B TP=2: 8 sliding KV heads per rank


def test_pipeline_stages_and_mirrors():
    from mtp_mlx.distributed.pipeline import PipelineTarget, stage_bounds
    from tests.tiny import tiny_target

    assert stage_bounds(8, 2) == [(0, 4), (4, 8)]
    assert stage_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(MtpError, match="only 2 layers"):
        stage_bounds(2, 3)
    # tiny e2b: layers 5-7 read the K/V of producers 4 (sliding) and 3 (full)
    pt = PipelineTarget(tiny_target("e2b"), _Group(2, 1), bounds=[(0, 4), (4, 8)])
    assert pt.mirrors == [3]  # the full producer sits on rank 0; its new rows travel with h
    assert pt.carry == [[3], []]
    cache = pt.make_cache()
    assert sorted(cache.layers) == [3, 4] and cache.producers == {"sliding_attention": 4, "full_attention": 3}
    assert PipelineTarget(tiny_target("e2b"), _Group(2, 0), bounds=[(0, 6), (6, 8)]).carry == [[3, 4], []]
    first = PipelineTarget(tiny_target("e2b"), _Group(2, 0), bounds=[(0, 4), (4, 8)])
    assert sorted(first.make_cache().layers) == [0, 1, 2, 3] and first.make_cache().producers == {}


def test_lone_process_cannot_split():
    from mtp_mlx.distributed import init_distributed

    with pytest.raises(MtpError, match="at least 2 ranks"):
        init_distributed("tensor")

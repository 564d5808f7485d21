"""The load-time exactness verdict kept in the tuning store: a second start-up of the same
checkpoint on the same machine and software skips the check, anything the verdict depends on
invalidates it, a stored fail still declines greedy speculation, a broken store never breaks
start-up, and in-memory pairs, injected forwards and split targets are never stored."""

import json
import os
import shutil

import mlx.core as mx
import pytest

import mtp_mlx.checks as checks
from mtp_mlx import load, tuning
from mtp_mlx.decoding import engine as engine_mod
from mtp_mlx.decoding.engine import Engine, Request, bare_pair, exactness

ATTENTION = "reference"  # the backend every start-up here uses, so the key is known on any device


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private tuning store: nothing here reads or writes the real home."""
    monkeypatch.setenv("MTP_MLX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def checks_run(monkeypatch):
    """How many times the wide-verify comparison actually ran."""
    calls = []
    real = checks.wide_verify_exact

    def counted(*args, **kwargs):
        calls.append(kwargs.get("attn_backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checks, "wide_verify_exact", counted)
    return calls


@pytest.fixture
def target_copy(fixtures, tmp_path):
    """The `agree` target in a folder of its own, so its files can be touched."""
    dst = tmp_path / "target"
    shutil.copytree(fixtures / "agree" / "target", dst)
    return dst


def _load(target, fixtures, **kw):
    return load(str(target), str(fixtures / "agree" / "assistant"), **kw)


def _start(pair, attention=ATTENTION, **kw):
    return Engine(pair, attention=attention, **kw)


def _entries(home):
    return json.loads((home / "tuning.json").read_text()).get("exactness", {})


def _forget(pair):
    """Drop this process's cached verdict, as a new process would not have it."""
    engine_mod._EXACT.pop(id(pair.target), None)


def test_second_start_up_uses_the_stored_verdict(home, checks_run, target_copy, fixtures):
    first = _load(target_copy, fixtures)
    assert _start(first).greedy_exact and len(checks_run) == 1
    (key, entry), = _entries(home).items()
    assert key == tuning.exactness_key(first.target, first.target_path, ATTENTION)
    assert entry["exact"] is True and "bit for bit" in entry["message"]

    _forget(first)  # the same pair, per-process cache cleared
    assert _start(first).greedy_exact and len(checks_run) == 1
    second = _load(target_copy, fixtures)  # a fresh load, as in a new process
    engine = _start(second)
    assert engine.greedy_exact and engine.notices == [] and len(checks_run) == 1
    exact, line = exactness(second.target, ATTENTION, None, second.target_path)
    assert exact and line.startswith("exactness check passed (stored ") and entry["stored"] in line
    assert len(checks_run) == 1


def test_what_the_verdict_depends_on_invalidates_it(home, checks_run, target_copy, fixtures, monkeypatch):
    pair = _load(target_copy, fixtures)
    _start(pair)
    assert len(checks_run) == 1

    with monkeypatch.context() as m:
        m.setattr(mx, "__version__", "0.0.0-other")  # another MLX
        _forget(pair)
        _start(pair)
    assert len(checks_run) == 2

    weights = target_copy / "model.safetensors"  # the checkpoint re-downloaded or re-converted
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _forget(pair)
    _start(pair)
    assert len(checks_run) == 3

    cast = _load(target_copy, fixtures, dtype="bfloat16")  # the same files, another dtype at load
    _start(cast)
    assert len(checks_run) == 4
    assert _start(pair, attention="auto") is not None and len(checks_run) == 5  # another backend
    assert len(_entries(home)) == 5

    again = _load(target_copy, fixtures, dtype="bfloat16")  # nothing changed: stored
    _start(again)
    assert len(checks_run) == 5


def test_a_stored_fail_declines_greedy_speculation(home, checks_run, target_copy, fixtures):
    pair = _load(target_copy, fixtures)
    assert tuning.save_exactness(pair.target, pair.target_path, ATTENTION, False,
                                 "float32: 9-wide verify differs from one-token steps (max |logit diff| 1e-06)")
    engine = _start(pair)
    assert checks_run == [] and not engine.greedy_exact and len(engine.notices) == 1
    line = engine.notices[0]
    assert line.startswith("greedy speculation declined (stored ") and "9-wide verify differs" in line
    assert "mtp-mlx check" in line and "\n" not in line
    uid = engine.submit(Request(list(range(3, 33)), 12, num_draft=3))
    events = [ev for ev in engine.run() if ev.uid == uid]
    assert events and all(ev.drafted == 0 for ev in events)


@pytest.mark.parametrize("content", ["{not json", '{"exactness": [1, 2]}', "[]", "[" * 100000,
                                     b"\xff\xfe\x00garbage"])
def test_a_corrupt_store_falls_back_to_running_the_check(home, checks_run, target_copy, fixtures, content):
    home.mkdir()
    store = home / "tuning.json"
    store.write_bytes(content if isinstance(content, bytes) else content.encode())
    pair = _load(target_copy, fixtures)
    assert _start(pair).greedy_exact and len(checks_run) == 1
    assert list(_entries(home).values())[0]["exact"] is True  # the store is whole again


def test_a_garbled_entry_falls_back_to_running_the_check(home, checks_run, target_copy, fixtures):
    pair = _load(target_copy, fixtures)
    key = tuning.exactness_key(pair.target, pair.target_path, ATTENTION)
    home.mkdir()
    (home / "tuning.json").write_text(json.dumps({"exactness": {key: {"exact": "yes"}}, "policy": {"p": 1}}))
    assert _start(pair).greedy_exact and len(checks_run) == 1
    data = json.loads((home / "tuning.json").read_text())
    assert data["exactness"][key]["exact"] is True and data["policy"] == {"p": 1}  # stored costs kept


def test_an_unwritable_home_only_means_the_check_runs(tmp_path, monkeypatch, checks_run, target_copy, fixtures):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MTP_MLX_HOME", str(blocker / "home"))  # its parent is a file: mkdir fails
    pair = _load(target_copy, fixtures)
    assert _start(pair).greedy_exact and len(checks_run) == 1
    assert not tuning.save_exactness(pair.target, pair.target_path, ATTENTION, True, "x")
    assert list(tmp_path.glob("**/*.tmp")) == []


def test_in_memory_pairs_and_injected_forwards_never_store(home, checks_run, target_copy, fixtures):
    from tests.test_checks import WideRoundsDifferently

    pair = _load(target_copy, fixtures)
    assert _start(bare_pair(pair.target, pair.drafter, pair.tokenizer)).greedy_exact
    _forget(pair)
    assert not _start(pair, exactness_forward=WideRoundsDifferently(pair.target)).greedy_exact
    assert len(checks_run) == 2 and not (home / "tuning.json").exists()


def test_the_check_command_runs_afresh_and_refreshes_the_store(home, checks_run, target_copy, fixtures):
    pair = _load(target_copy, fixtures)
    tuning.save_exactness(pair.target, pair.target_path, ATTENTION, False, "an old verdict")
    report = checks.run_checks(pair, attn_backend=ATTENTION)
    assert len(checks_run) == 1 and report["exactness"][0]["status"] == "pass"
    assert report["exactness_stored"] == str(home / "tuning.json")
    assert "engine start-ups reuse it" in checks.format_report(report)
    entry = tuning.load_exactness(pair.target, pair.target_path, ATTENTION)
    assert entry["exact"] is True and "bit for bit" in entry["message"]
    engine = _start(_load(target_copy, fixtures))
    assert engine.greedy_exact and len(checks_run) == 1

"""CLI smoke tests with typer's runner: generate (single, stdin, batch, sampled), tune, and
one-line errors for bad input."""

import json

import pytest
from typer.testing import CliRunner

from mtp_mlx.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_stored_tuning(tmp_path, monkeypatch):
    """Keep a tuning file on this machine from changing the default K under test."""
    monkeypatch.setenv("MTP_MLX_HOME", str(tmp_path / "mtp-home"))


@pytest.fixture(scope="module")
def pair_args(fixtures):
    return ["--model", str(fixtures / "agree" / "target"), "--drafter", str(fixtures / "agree" / "assistant")]


def _run(args, **kw):
    return runner.invoke(app, args, catch_exceptions=False, **kw)


def test_generate_streams_text_and_prints_stats(pair_args):
    r = _run(["generate", *pair_args, "--prompt", "def f(x):", "-m", "24", "--raw"])
    assert r.exit_code == 0, r.output
    assert "Generation: 24 tokens" in r.stderr
    assert "tokens per target forward" in r.stderr and "Acceptance:" in r.stderr
    assert "Peak memory" in r.stderr
    assert "Generation:" not in r.stdout  # statistics stay off standard output


def test_generate_reads_standard_input(pair_args):
    r = _run(["generate", *pair_args, "--prompt", "-", "-m", "8"], input="import os\n")
    assert r.exit_code == 0, r.output
    assert "Generation: 8 tokens" in r.stderr


def test_no_drafter_equals_drafter_greedy(pair_args):
    a = _run(["generate", *pair_args, "-p", "class A:", "-m", "30", "--raw"])
    b = _run(["generate", *pair_args, "-p", "class A:", "-m", "30", "--raw", "--no-drafter"])
    assert a.stdout == b.stdout and "Drafting: off" in b.stderr


def test_sampled_generation_is_reproducible(pair_args):
    args = ["generate", *pair_args, "-p", "x = ", "-m", "20", "--temp", "1.0", "--top-p", "0.95",
            "--top-k", "64", "--seed", "7"]
    assert _run(args).stdout == _run(args).stdout


def test_batch_file(pair_args, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("def a():\nclass B:\nimport sys\n")
    r = _run(["generate", *pair_args, "--prompts-file", str(f), "-m", "6"])
    assert r.exit_code == 0, r.output
    assert [line for line in r.stdout.splitlines() if line.startswith("====")] == [
        "==== [1/3] ====", "==== [2/3] ====", "==== [3/3] ===="]
    assert "(all rows)" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--num-draft-tokens", "9"], "--num-draft-tokens 9 is out of range"),
    (["--num-draft-tokens", "many"], "is not a number"),
    (["-m", "0"], "--max-tokens 0 is out of range"),
    (["--prompt", "   "], "prompt is empty"),
    (["--temp", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--attention-backend", "cuda"], "unknown attention backend"),
])
def test_bad_generate_arguments_one_line(pair_args, args, needle):
    r = runner.invoke(app, ["generate", *pair_args, "-p", "hi", *args])
    assert r.exit_code == 1
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output


def test_wrong_model_path_one_line(tmp_path):
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "-p", "hi"])
    assert r.exit_code == 1 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_too_long_prompt_one_line(pair_args, fixtures):
    cfg = json.loads((fixtures / "agree" / "target" / "config.json").read_text())
    limit = cfg.get("text_config", cfg)["max_position_embeddings"]
    r = runner.invoke(app, ["generate", *pair_args, "-p", "a", "-m", str(limit + 1)])
    assert r.exit_code == 1 and "exceeds the model's" in r.stderr


def test_tune_writes_reports_and_generate_starts_from_its_measurements(pair_args, tmp_path):
    out = tmp_path / "tune"
    r = _run(["tune", *pair_args, "-m", "12", "--runs", "1", "--warmup", "0", "--batch-size", "1",
              "--batch-size", "2", "--num-draft", "0", "--num-draft", "2", "--num-draft", "auto", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "tuning.json").read_text())
    assert {(x["batch"], x["num_draft"]) for x in report["results"]} == {
        (b, k) for b in (1, 2) for k in (0, 2, "auto")}
    assert (out / "tuning.csv").read_text().startswith("batch,num_draft")
    assert set(report["recommendation"]) == {"1", "2"}
    stored = json.loads((tmp_path / "mtp-home" / "tuning.json").read_text())["policy"]
    (state,) = stored.values()
    assert state["costs"] and any(t > 0 for _, t, _ in state["acceptance"])
    g = _run(["generate", *pair_args, "-p", "x", "-m", "4"])
    assert "draft lengths start from the round costs and acceptance stored" in g.stderr


def test_generate_auto_reports_the_draft_lengths(pair_args):
    r = _run(["generate", *pair_args, "-p", "def f(x):", "-m", "40", "--raw"])
    assert r.exit_code == 0, r.output
    assert "K per round" in r.stderr and "parked at K=0" in r.stderr and "Draft length:" in r.stderr


def test_input_that_is_not_text_gets_one_line(pair_args, tmp_path):
    r = runner.invoke(app, ["generate", *pair_args, "--prompt", "-"], input=b"def f():\n\xff\xfe\n")
    assert r.exit_code == 1 and "standard input is not UTF-8 text" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"def a():\n\xc3\x28 class B:\n")
    r = runner.invoke(app, ["generate", *pair_args, "--prompts-file", str(f)])
    assert r.exit_code == 1 and "is not UTF-8 text" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output

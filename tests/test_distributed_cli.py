"""``mtp-mlx generate`` / ``mtp-mlx serve`` with ``--pipeline`` / ``--tensor-parallel``: two ranks
on 127.0.0.1 (ring backend, MLX_RANK + a generated MLX_HOSTFILE, free ports; what ``mlx.launch``
sets up), each running the real command line. Rank 0 prints and serves; rank 1 stays silent.

The reference is the same command in one process without drafting (``--num-draft-tokens 0``),
run in this process. Every rank is bounded in time and killed in ``finally``.
"""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from mtp_mlx.cli import app
from mtp_mlx.distributed.launch import free_ports, local_ring, write_ring_hostfile

PROMPT = "def f(x):"
TIMEOUT = 240  # seconds per two-rank run (about 15-25 s on an idle 2-core CPU)
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No stored tuning, and this process is not a rank of any group."""
    monkeypatch.setenv("MTP_MLX_HOME", str(tmp_path / "mtp-home"))
    for name in ("MLX_RANK", "MLX_HOSTFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pair_args(fixtures):
    import mlx.core as mx

    if not mx.distributed.is_available():
        pytest.skip("this MLX build has no distributed backend")
    agree = fixtures / "agree"  # the e2b shape; its drafts are often accepted
    return ["--model", str(agree / "target"), "--drafter", str(agree / "assistant"), "--dtype", "float32"]


def command(*args):
    return [sys.executable, "-m", "mtp_mlx", *args]


def one_process(pair_args, max_tokens: int) -> str:
    """Standard output of the single-process command, without drafting."""
    r = runner.invoke(app, ["generate", *pair_args, "--raw", "-p", PROMPT, "-m", str(max_tokens),
                            "--num-draft-tokens", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def one_line_error(stderr: str) -> str:
    """The command's own lines (MLX's ring backend adds its own '[ring] ...' notes)."""
    ours = [line for line in stderr.strip().splitlines() if line.startswith("mtp-mlx:")]
    assert len(ours) == 1, stderr
    return ours[0]


# Pipeline with the adaptive draft length; tensor parallel (an all_sum per block: slow over a
# loopback ring) with a fixed draft length and fewer tokens.
@pytest.mark.parametrize("flag,draft,max_tokens", [("--pipeline", "auto", 24), ("--tensor-parallel", "2", 10)])
def test_generate_on_two_ranks_equals_one_process(pair_args, tmp_path, flag, draft, max_tokens):
    ranks = local_ring(command("generate", *pair_args, "--raw", "-p", PROMPT, "-m", str(max_tokens),
                               "--num-draft-tokens", draft, flag), n=2, timeout=TIMEOUT,
                       env={"MTP_MLX_HOME": str(tmp_path)})
    assert [r.returncode for r in ranks] == [0, 0], ranks
    assert ranks[0].stdout == one_process(pair_args, max_tokens)  # greedy: drafting changes nothing
    assert f"Generation: {max_tokens} tokens" in ranks[0].stderr
    assert "Acceptance:" in ranks[0].stderr, ranks[0].stderr  # it drafted on the split model
    assert ranks[1].stdout == "" and "Generation:" not in ranks[1].stderr  # only rank 0 prints


@pytest.mark.parametrize("cmd", ["generate", "serve"])
def test_pipeline_and_tensor_parallel_exclude_each_other(pair_args, cmd):
    extra = ["-p", PROMPT] if cmd == "generate" else []
    r = runner.invoke(app, [cmd, *pair_args, *extra, "--pipeline", "--tensor-parallel"])
    assert r.exit_code == 1
    assert "exclude each other" in one_line_error(r.stderr) and "Traceback" not in r.output


@pytest.mark.parametrize("cmd,flag", [("generate", "--pipeline"), ("serve", "--tensor-parallel")])
def test_split_without_mlx_launch_says_how_to_start(pair_args, cmd, flag):
    extra = ["-p", PROMPT] if cmd == "generate" else ["--port", "0"]
    r = runner.invoke(app, [cmd, *pair_args, *extra, flag])
    assert r.exit_code == 1
    line = one_line_error(r.stderr)
    assert f"{flag} needs at least 2 ranks" in line and f"mlx.launch --hostfile hosts.json --backend ring -- " \
        f"mtp-mlx {cmd}" in line, line


class Ranks:
    """n ranks of one command on a loopback ring, started now; outputs go to files."""

    def __init__(self, argv, tmp_path, n=2, env=None):
        hostfile = write_ring_hostfile(str(tmp_path / "hosts.json"), n)
        self.out = [tmp_path / f"out{r}" for r in range(n)]
        self.err = [tmp_path / f"err{r}" for r in range(n)]
        self.procs = []
        for r in range(n):
            e = dict(os.environ, **(env or {}), MLX_RANK=str(r), MLX_HOSTFILE=hostfile)
            with open(self.out[r], "w") as out, open(self.err[r], "w") as err:
                self.procs.append(subprocess.Popen(argv, stdout=out, stderr=err, env=e))

    def stdout(self, r):
        return self.out[r].read_text()

    def stderr(self, r):
        return self.err[r].read_text()

    def wait_for(self, cond, timeout, what):
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                pytest.fail(f"{what}: not within {timeout} s or a rank exited; rank 0: {self.stderr(0)[-2000:]}"
                            f" rank 1: {self.stderr(1)[-2000:]}")
            time.sleep(0.1)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()


def test_serve_on_two_ranks(pair_args, tmp_path):
    port = free_ports(1)[0]
    ranks = Ranks(command("serve", *pair_args, "--port", str(port), "--log-level", "warning", "--pipeline"),
                  tmp_path, env={"MTP_MLX_HOME": str(tmp_path)})
    try:
        ranks.wait_for(lambda: "serving on" in ranks.stderr(0), TIMEOUT, "rank 0 serving")
        assert re.search(rf"serving on http://127\.0\.0\.1:{port}/v1", ranks.stderr(0))
        url = f"http://127.0.0.1:{port}/v1/completions"
        # Refused by the engine's own checks on every rank: a 400, and rank 1 goes on following.
        r = httpx.post(url, timeout=120, json={"model": pair_args[1], "prompt": PROMPT, "max_tokens": 10 ** 6})
        assert r.status_code == 400 and "positions" in r.text, r.text
        r = httpx.post(url, timeout=120,
                       json={"model": pair_args[1], "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 24
        assert body["choices"][0]["text"] + "\n" == one_process(pair_args, 24)
        assert body["speculative"]["drafted"] > 0
        ranks.procs[0].send_signal(signal.SIGTERM)  # rank 0 stops; the stop reaches rank 1
        codes = [p.wait(60) for p in ranks.procs]
        assert codes == [0, 0], (ranks.stderr(0), ranks.stderr(1))
        assert ranks.stdout(1) == "" and ranks.stderr(1) == ""  # the follower never served or printed
    finally:
        ranks.close()


def test_a_lost_rank_ends_the_other_with_one_line(pair_args, tmp_path):
    ranks = Ranks(command("generate", *pair_args, "--raw", "-p", PROMPT, "-m", "4000", "--pipeline"), tmp_path,
                  env={"MTP_MLX_HOME": str(tmp_path), "MTP_MLX_STALL_TIMEOUT": "15"})
    try:
        ranks.wait_for(lambda: ranks.stdout(0) != "", TIMEOUT, "rank 0 streaming")  # mid-generation
        ranks.procs[1].kill()
        # MLX raises on the closed connection (status 1); a silent stall would meet the
        # watchdog instead (status 3).
        assert ranks.procs[0].wait(60) in (1, 3)
        line = one_line_error(ranks.stderr(0))
        assert "a peer rank stopped" in line or "a peer rank is stalled or gone" in line, line
    finally:
        ranks.close()

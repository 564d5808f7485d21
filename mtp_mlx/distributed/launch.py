"""Starting ranks and joining a group: ``init_distributed``, ``is_rank0``, ``distribute``,
``local_ring`` (N ranks on this machine over loopback, for tests and the benchmark) and the
watchdog that turns a lost or stalled peer into a clear error instead of a hang.

Under ``mlx.launch`` the environment names the backend, the rank and the hosts; without it a
process is a group of one and every function here is a no-op.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import mlx.core as mx

from ..errors import MtpError

MODES = ("tensor", "pipeline")
_GROUP = None


def init_distributed(mode: Optional[str] = None, backend: str = "any"):
    """Join the group this process was launched into (``mlx.launch`` or ``MLX_RANK`` +
    ``MLX_HOSTFILE``) and return it; a lone process gets a group of one.

    ``mode`` ("tensor" | "pipeline" | None) only checks the request: asking for a split with
    one process raises MtpError (it would silently run unsplit otherwise).
    """
    global _GROUP
    if mode is not None and mode not in MODES:
        raise MtpError(f"unknown distributed mode {mode!r}: use one of {', '.join(MODES)}")
    if _GROUP is None:
        launched = any(k in os.environ for k in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_RANK",
                                                  "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES"))
        try:
            _GROUP = mx.distributed.init(backend=backend, strict=launched)
        except RuntimeError as e:
            raise MtpError(f"could not join the distributed group ({e}): check MLX_HOSTFILE / "
                           f"the mlx.launch hostfile and that every rank is started") from e
    if mode is not None and _GROUP.size() == 1:
        raise MtpError(f"--{'tensor-parallel' if mode == 'tensor' else 'pipeline'} needs at least 2 ranks: "
                       f"start the command with mlx.launch (see README, 'More than one Mac')")
    return _GROUP


def group():
    """The group joined by ``init_distributed`` (a group of one before that)."""
    return _GROUP if _GROUP is not None else mx.distributed.init()


def is_rank0() -> bool:
    """Whether this process prints and serves (rank 0, or not distributed at all)."""
    return group().rank() == 0


def distribute(pair, mode: str, grp=None):
    """Split a loaded pair (``mtp_mlx.load``'s result) across the group, in place.

    "tensor": shards the target (``shard_target``); the drafter is unchanged and runs on
    every rank. "pipeline": wraps the target in a ``PipelineTarget`` (layers split across
    ranks) and the drafter in a ``PipelineDrafter`` (it runs on the last rank, which
    broadcasts each step's result). Returns the pair; generation then runs the same code on
    every rank and every rank emits the same tokens.
    """
    grp = grp or init_distributed(mode)
    if mode == "tensor":
        from .tensor import shard_target

        shard_target(pair.target, grp)
    elif mode == "pipeline":
        from .pipeline import PipelineDrafter, PipelineTarget

        pair.target = PipelineTarget(pair.target, grp)
        if pair.drafter is not None:
            pair.drafter = PipelineDrafter(pair.drafter, pair.target)
    else:
        raise MtpError(f"unknown distributed mode {mode!r}: use one of {', '.join(MODES)}")
    return pair


def load_distributed(model: str, drafter: Optional[str] = None, *, mode: str, dtype=None, grp=None):
    """``mtp_mlx.load`` for a split run: the target is split before its weights are read, so a
    rank never holds the whole model. Pipeline: a rank reads only its own layers (plus the
    embedding, which is also the tied head). Tensor: each weight is read, sliced, and the rest
    freed. Returns the pair, already split (see ``distribute``)."""
    import mlx.core as mx

    from ..loading import Pair, check_configs, hub, load_tokenizer, weights

    grp = grp or init_distributed(mode)
    weights.parse_dtype(dtype)
    target_path = hub.resolve(model, "model")
    drafter_path = hub.resolve(drafter, "drafter") if drafter is not None else None
    target_config, drafter_config = check_configs(target_path, drafter_path, target_name=model,
                                                  drafter_name=drafter)
    target, target_config = weights.load_target(target_path, dtype, lazy=True)
    drafter_model = None
    if drafter_path is not None:
        drafter_model, drafter_config = weights.load_drafter(drafter_path, dtype)
    pair = Pair(target=target, target_config=target_config, drafter=drafter_model, drafter_config=drafter_config,
                tokenizer=load_tokenizer(target_path), target_path=target_path, drafter_path=drafter_path)
    distribute(pair, mode, grp)  # evaluates only what this rank keeps
    mx.eval(pair.target.parameters())
    return pair


def peer_lost(err: BaseException) -> bool:
    """Whether an exception is MLX reporting that a peer rank went away."""
    return isinstance(err, RuntimeError) and ("peer" in str(err) or "connection" in str(err))


def lost_peer_error(err: BaseException, rank: int) -> MtpError:
    return MtpError(f"rank {rank}: a peer rank stopped ({err}): the run is aborted on every rank; "
                    f"see the failed rank's own error")


class Watchdog:
    """Ends this process with a clear message when no ``beat()`` came for ``timeout`` seconds
    (a peer that hangs without closing its connection would otherwise block every collective
    forever). A lost connection already raises in MLX; this covers the silent stall."""

    def __init__(self, timeout: float, rank: int = 0, what: str = "round"):
        self.timeout = timeout
        self.rank = rank
        self.what = what
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                sys.stderr.write(
                    f"mtp-mlx: rank {self.rank}: no {self.what} finished for {idle:.0f} s: a peer rank is stalled "
                    f"or gone; aborting (raise the timeout for very slow links)\n")
                sys.stderr.flush()
                os._exit(3)


# ---- N ranks on this machine (tests, benchmark) --------------------------------------------
def free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_ring_hostfile(path: str, n: int) -> str:
    """A ring-backend hostfile for ``MLX_HOSTFILE``: one ``["127.0.0.1:PORT"]`` per rank."""
    with open(path, "w") as f:
        json.dump([[f"127.0.0.1:{p}"] for p in free_ports(n)], f)
    return path


class RankResult:
    def __init__(self, rank: int, returncode: Optional[int], stdout: str, stderr: str):
        self.rank, self.returncode, self.stdout, self.stderr = rank, returncode, stdout, stderr

    def __repr__(self):
        return f"RankResult(rank={self.rank}, rc={self.returncode}, stderr={self.stderr[-2000:]!r})"


def local_ring(argv: Sequence[str], n: int = 2, timeout: float = 120.0, workdir: Optional[str] = None,
               env: Optional[Dict[str, str]] = None, linger: float = 15.0) -> List[RankResult]:
    """Run ``argv`` as ``n`` ranks of a ring group on 127.0.0.1 (free ports, no ssh) and wait.

    Every rank is killed after ``timeout`` seconds; once one rank has exited non-zero the
    others get ``linger`` seconds to exit on their own before they are killed (rc None marks
    a killed rank). Output is captured per rank."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        hostfile = write_ring_hostfile(os.path.join(tmp, "hosts.json"), n)
        procs, files = [], []
        try:
            for r in range(n):
                out = open(os.path.join(tmp, f"out{r}"), "w+")
                err = open(os.path.join(tmp, f"err{r}"), "w+")
                files.append((out, err))
                e = dict(os.environ, **(env or {}), MLX_RANK=str(r), MLX_HOSTFILE=hostfile)
                procs.append(subprocess.Popen(list(argv), stdout=out, stderr=err, env=e))
            deadline = time.monotonic() + timeout
            failed_at = None
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                if failed_at is None and any(c not in (None, 0) for c in codes):
                    failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() - failed_at > linger:
                    break
                time.sleep(0.05)
        finally:
            killed = set()
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    killed.add(r)
            for p in procs:
                p.wait()
        results = []
        for r, (p, (out, err)) in enumerate(zip(procs, files)):
            out.seek(0)
            err.seek(0)
            results.append(RankResult(r, None if r in killed else p.returncode, out.read(), err.read()))
            out.close()
            err.close()
        return results

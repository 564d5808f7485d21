"""``mtp-mlx generate`` and ``mtp-mlx serve`` with ``--pipeline`` / ``--tensor-parallel``: the
command runs on every rank (started by ``mlx.launch``); every rank loads its part of the target
and runs the same engine rounds; only rank 0 reads the prompt, prints, and serves HTTP.

A rank whose peer goes away exits with one line instead of hanging: MLX raises on a lost
connection, and a watchdog (``MTP_MLX_STALL_TIMEOUT`` seconds without a finished round, default
120) ends a silent stall.
"""

import os
import signal
import sys
from contextlib import contextmanager
from typing import List, Optional

import typer

from ..errors import MtpError
from ..server.worker import _STOP, Accepted, EngineWorker, Failed
from .engine import DistributedEngine, LockstepEngine, broadcast_json, follow
from .launch import Watchdog, init_distributed, is_rank0, load_distributed, lost_peer_error, peer_lost

STALL_ENV = "MTP_MLX_STALL_TIMEOUT"
DEFAULT_STALL_TIMEOUT = 120.0  # seconds without a finished round (a 512-token prefill slice counts as one)
IDLE_POLL = 0.25  # an idle server's rank 0 still syncs this often, so stop reaches the followers
CLOSE_TIMEOUT = 30.0  # a stopping server waits this long for the round in flight and the stop message


def parallel_mode(pipeline: bool, tensor_parallel: bool) -> Optional[str]:
    """``--pipeline`` / ``--tensor-parallel`` as a mode for ``load_distributed`` (None: one process)."""
    if pipeline and tensor_parallel:
        raise MtpError("--pipeline and --tensor-parallel exclude each other: pass one of them")
    return "pipeline" if pipeline else "tensor" if tensor_parallel else None


def join(mode: str, command: str):
    """Join the group ``mlx.launch`` started this process in; at least two ranks."""
    grp = init_distributed(None)
    if grp.size() < 2:
        flag = "--pipeline" if mode == "pipeline" else "--tensor-parallel"
        raise MtpError(f"{flag} needs at least 2 ranks, and this process was started alone: launch it on every "
                       f"Mac with mlx.launch, e.g. `mlx.launch --hostfile hosts.json --backend ring -- mtp-mlx "
                       f"{command} ... {flag}` (`mlx.launch -n 2 --backend ring -- ...` on one machine)")
    return grp


def say(message: str) -> None:
    """A notice on standard error, from rank 0 only (every rank runs the same command)."""
    if is_rank0():
        typer.echo(message, err=True)


def stall_timeout() -> float:
    value = os.environ.get(STALL_ENV)
    if not value:
        return DEFAULT_STALL_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise MtpError(f"{STALL_ENV}={value!r} is not a positive number of seconds: unset it or pass e.g. 300")
    return seconds


@contextmanager
def peer_errors(rank: int):
    """MLX's error for a lost peer as one ``MtpError`` line naming this rank."""
    try:
        yield
    except RuntimeError as err:
        if peer_lost(err):
            raise lost_peer_error(err, rank) from None
        raise


def from_rank0(grp, produce):
    """``produce()`` run on rank 0 only; its result (JSON data) on every rank. An ``MtpError``
    there is raised on every rank, so no rank waits for the others."""
    mine, err = None, None
    if grp.rank() == 0:
        try:
            mine = {"value": produce()}
        except MtpError as e:
            err, mine = e, {"error": str(e)}
    got = broadcast_json(mine, grp)
    if err is not None:
        raise err
    if "error" in got:
        raise MtpError(f"rank {grp.rank()}: rank 0 stopped: {got['error']}")
    return got["value"]


# ---- generate ------------------------------------------------------------------------------
def generate_distributed(mode: str, *, model: Optional[str], drafter: Optional[str], prompt: Optional[str],
                         prompts_file: Optional[str], max_tokens: int, num_draft, no_drafter: bool, sampling,
                         stop: List[str], raw: bool, system_prompt: Optional[str], draft_position: str,
                         attention: str, dtype: Optional[str]) -> None:
    """``mtp-mlx generate`` on every rank: same prompts (read on rank 0), same rounds; rank 0 prints."""
    from .. import cli

    if draft_position == "hf":
        raise MtpError("--draft-position hf (reference parity) runs in one process only: drop it, or drop "
                       "--pipeline / --tensor-parallel")
    timeout = stall_timeout()
    grp = join(mode, "generate")
    rank = grp.rank()
    texts = from_rank0(grp, lambda: cli._read_prompts_file(prompts_file) if prompts_file
                       else [cli._read_prompt(prompt)])
    if model is None:
        demo = cli._demo_paths()
        if demo is None:
            raise MtpError("no --model given and this install has no bundled demo pair: pass --model and --drafter")
        model, drafter = str(demo[0]), str(demo[1])
        from ..demo import DEMO_NOTICE

        say(f"mtp-mlx: {DEMO_NOTICE}")
    with peer_errors(rank):
        pair = load_distributed(model, None if no_drafter else drafter, mode=mode, dtype=dtype, grp=grp)
        with Watchdog(timeout, rank) as wd:
            _decode(pair, texts, grp, wd, prompts_file is not None, max_tokens=max_tokens, num_draft=num_draft,
                    sampling=sampling, stop=stop, raw=raw, system=system_prompt, position=draft_position,
                    attention=attention)


def _decode(pair, texts, grp, wd, batch: bool, *, max_tokens, num_draft, sampling, stop, raw, system, position,
            attention) -> None:
    import mlx.core as mx

    from .. import api, cli
    from ..decoding.engine import Request

    show = grp.rank() == 0
    ids = [api.format_prompt(pair.tokenizer, t, raw=raw, system=system) for t in texts]
    use_drafter = pair.drafter is not None and num_draft != 0
    engine = DistributedEngine(pair, group=grp, use_drafter=use_drafter, attention=attention, position=position,
                               max_batch=len(ids))
    wd.beat()
    mx.reset_peak_memory()
    uids = [engine.submit(Request(p, max_tokens, sampling, tuple(stop), num_draft if use_drafter else 0,
                                  request_index=i if batch else 0)) for i, p in enumerate(ids)]
    notices = list(engine.notices)
    if show:
        for line in notices:
            typer.echo(f"mtp-mlx: {line}", err=True)
    rows = {u: api.BatchResult("", [], [], None, None) for u in uids}
    for ev in engine.run():
        wd.beat()
        r = rows[ev.uid]
        r.text += ev.text
        r.tokens.extend(ev.tokens)
        r.from_draft.extend(ev.from_draft)
        r.finish_reason, r.stats = ev.finish_reason, ev.stats
        if show and not batch:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    if not show:
        return
    peak = mx.get_peak_memory() / 1e9
    if batch:
        cli._print_batch(api.BatchResponse([rows[u] for u in uids], engine.totals, peak, notices))
        return
    sys.stdout.write("\n")
    r = rows[uids[0]]
    if r.stats is not None:
        auto = use_drafter and num_draft == "auto" and engine.policy is not None
        why = f"Draft length: {engine.policy.summary()['reason']}" if auto else ""
        cli._print_stats(api.GenerationResponse(r.text, r.tokens, r.from_draft, r.stats, peak, r.finish_reason),
                         why)


# ---- serve ---------------------------------------------------------------------------------
class _Stopped(BaseException):
    """SIGTERM on rank 0: leave uvicorn and stop the followers, then exit 0."""


class LockstepWorker(EngineWorker):
    """Rank 0's engine thread for a split model: before every step, also while idle (every
    ``IDLE_POLL`` seconds), the requests accepted, cancels and a stop go to every rank through
    ``LockstepEngine.sync``. A fault cannot be healed by a fresh engine on one rank (the others
    would not follow), so it stops the server with one line (``fatal``)."""

    idle_poll = IDLE_POLL

    def __init__(self, load, make_engine):
        super().__init__(load, make_engine)
        self.fatal: Optional[BaseException] = None
        self.watchdog: Optional[Watchdog] = None

    def _apply(self, engine, commands: list) -> bool:
        jobs, cancels, stop = [], [], False
        for cmd in commands:
            if cmd is _STOP:
                stop = True
                continue
            kind, job = cmd
            if kind == "submit":
                if job.request.processors:  # code cannot travel to the other ranks
                    job.post(Failed(MtpError("logits processors cannot run on a split model"), user_error=True))
                else:
                    jobs.append(job)
            elif kind == "cancel" and job.uid in self._jobs:
                cancels.append(job.uid)
        try:
            uids, stop = engine.sync([job.request for job in jobs], cancels, stop)
        except Exception as err:
            for job in jobs:
                job.post(Failed(err, user_error=False))
            if stop:  # stopping anyway (a follower may be gone already, e.g. after Ctrl-C on every rank)
                self._fail_all(RuntimeError("the server is shutting down"))
                return False
            return self._stop_on(err)
        for job, uid in zip(jobs, uids):
            if isinstance(uid, MtpError):
                job.post(Failed(uid, user_error=True))
            else:
                job.uid = uid
                self._jobs[uid] = job
                job.post(Accepted(uid))
        if self.watchdog is not None:
            self.watchdog.beat()
        if stop:
            self._fail_all(RuntimeError("the server is shutting down"))
            return False
        return True

    def _fault(self, engine, err: BaseException):
        self._stop_on(err)
        return None

    def _stop_on(self, err: BaseException) -> bool:
        """Fail every request, keep the reason, and make the server stop (SIGTERM to itself)."""
        import logging
        import traceback

        if peer_lost(err):
            self.fatal = lost_peer_error(err, 0)
        else:
            logging.getLogger("mtp_mlx.server").error("engine fault on a split model\n%s", traceback.format_exc())
            self.fatal = MtpError(f"rank 0: the engine failed ({type(err).__name__}: {err}); a split model cannot "
                                  f"go on with one rank restarted: restart every rank")
        self.faults += 1
        self._fail_all(self.fatal)
        os.kill(os.getpid(), signal.SIGTERM)
        return False


def serve_distributed(mode: str, *, model: str, drafter: Optional[str], config, host: str, port: int,
                      prompt_cache_bytes: int, attention: str, dtype: Optional[str], log_level: str) -> None:
    """``mtp-mlx serve`` on every rank (after ``join``): rank 0 serves HTTP, the others follow."""
    grp = init_distributed(None)
    rank = grp.rank()

    def load():
        return load_distributed(model, drafter, mode=mode, dtype=dtype, grp=grp)

    def make_engine(pair):
        return LockstepEngine(pair, group=grp, max_batch=config.max_batch, use_drafter=pair.drafter is not None,
                              attention=attention, prefix_cache_bytes=prompt_cache_bytes)

    timeout = stall_timeout()
    if rank != 0:
        with peer_errors(rank):
            engine = make_engine(load())
            with Watchdog(timeout, rank) as wd:
                follow(engine, on_events=lambda events: wd.beat())
        return
    from ..server.app import create_app
    from ..server.cli import run

    say(f"mtp-mlx: loading {config.model_id} split over {grp.size()} ranks ({mode})"
        + (f" with drafter {drafter}" if drafter else ""))

    closing = []

    def terminate(signum, frame):
        if not closing:  # a second signal while the followers are being stopped changes nothing
            raise _Stopped()

    # uvicorn stops gracefully on SIGTERM and then raises it again; without a handler of ours
    # that would end the process before the followers are told to stop.
    worker = LockstepWorker(load, make_engine)
    previous = signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        worker.start()
        with peer_errors(rank):
            worker.wait_ready()
        for line in worker.notices:
            say(f"mtp-mlx: {line}")
        with Watchdog(timeout, 0) as wd:
            worker.watchdog = wd
            run(create_app(worker, config), host=host, port=port, log_level=log_level)
    except _Stopped:
        pass
    except MtpError as err:  # e.g. the port is taken, the model does not load
        typer.echo(f"mtp-mlx: error: {err}", err=True)
        code = 1
    except KeyboardInterrupt:
        typer.echo("mtp-mlx: interrupted", err=True)
        code = 130
    finally:
        closing.append(True)
        worker.close(timeout=CLOSE_TIMEOUT)  # the stop message reaches the followers
        signal.signal(signal.SIGTERM, previous)
    if worker.fatal is not None:
        typer.echo(f"mtp-mlx: error: {worker.fatal}", err=True)
        code = 1
    # Everything is closed and flushed. Leave without the interpreter's teardown: after MLX
    # work on a second thread (the engine thread) MLX can abort in its destructors at exit
    # ("terminate called without an active exception", status -6), which would hide this status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

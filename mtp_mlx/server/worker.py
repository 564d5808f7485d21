"""The engine thread: the one thread that makes MLX calls (model loading included).

MLX binds streams per thread and the ``Engine`` is not thread-safe, so the asyncio side never
touches either: it sends commands (submit, cancel) through a thread-safe queue, and the engine
thread loops ``drain commands -> engine.step() -> hand each Event to its request`` where the
hand-over is a callback the request supplied (``loop.call_soon_threadsafe`` into its
``asyncio.Queue``).
"""

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from ..errors import MtpError

log = logging.getLogger("mtp_mlx.server")


@dataclass
class Accepted:
    """The engine took the request: its uid."""

    uid: int


@dataclass
class Failed:
    """The request ended without (more) events: a bad request (``MtpError``) or an engine fault."""

    error: BaseException
    user_error: bool


@dataclass(eq=False)
class Job:
    """One request on its way through the engine thread.

    ``post`` is called on the engine thread with ``Accepted``, then each ``Event``, or ``Failed``;
    it must not block (it schedules the item onto the request's event loop).
    """

    request: Any
    post: Callable[[Any], None]
    uid: Optional[int] = None
    submitted_at: float = field(default_factory=time.perf_counter)


_STOP = object()


class EngineWorker:
    """Runs ``make_engine(load())`` and then the engine loop on its own daemon thread.

    Args:
        load: builds the pair (``mtp_mlx.load(...)``); called on the engine thread.
        make_engine: ``pair -> Engine``; called on the engine thread, and again to start afresh
            after an engine fault (the faulted requests get an error, the server lives on).

    A split model's server (``mtp_mlx.distributed.cli.LockstepWorker``) overrides ``_apply``,
    ``_fault`` and ``idle_poll`` to hand every round's commands to the other ranks.
    """

    idle_poll: Optional[float] = None  # seconds an idle loop waits for a command (None: until one comes)

    def __init__(self, load: Callable[[], Any], make_engine: Callable[[Any], Any]):
        self._load, self._make_engine = load, make_engine
        self._commands: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="mtp-mlx-engine", daemon=True)
        self._ready = threading.Event()
        self._jobs: Dict[int, Job] = {}
        self.pair = None
        self.load_error: Optional[BaseException] = None
        self.snapshot: Dict[str, float] = {}   # replaced whole after every step: safe to read from any thread
        self.faults = 0
        self.notices: List[str] = []          # the engine's load-time decisions, one line each

    # ---- called from any thread ----------------------------------------------------------------
    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Block until the pair is loaded (True) or ``timeout`` passes (False); re-raise a load error."""
        if not self._ready.wait(timeout):
            return False
        if self.load_error is not None:
            raise self.load_error
        return True

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._commands.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self._commands.put(("cancel", job))

    def close(self, timeout: float = 10.0) -> None:
        self._commands.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        finally:
            if self.pair is not None:  # before this thread ends (see models.layers.release_fused)
                from ..models.layers import release_fused

                release_fused(self.pair.target, self.pair.drafter)

    def _loop(self) -> None:
        try:
            self.pair = self._load()
            engine = self._make_engine(self.pair)
        except BaseException as err:  # reported by wait_ready / health, not swallowed
            self.load_error = err
            self._ready.set()
            return
        self.notices = list(engine.notices)
        self._publish(engine)
        self._ready.set()
        while True:
            idle = engine.running == 0 and engine.queued == 0
            commands = []
            try:
                # Nothing to decode: sleep until a command arrives (or idle_poll passes) instead of spinning.
                commands.append(self._commands.get(timeout=self.idle_poll) if idle else self._commands.get_nowait())
                while True:
                    commands.append(self._commands.get_nowait())
            except queue.Empty:
                pass
            if not self._apply(engine, commands):
                return
            try:
                events = engine.step()
            except Exception as err:
                engine = self._fault(engine, err)
                if engine is None:
                    return
                events = []
            for ev in events:
                job = self._jobs.get(ev.uid)
                if job is None:
                    continue
                if ev.finish_reason is not None:
                    del self._jobs[ev.uid]
                job.post(ev)
            self._publish(engine)

    def _apply(self, engine, commands: list) -> bool:
        """Hand the commands to the engine; False ends the loop (the server is stopping)."""
        for cmd in commands:
            if cmd is _STOP:
                self._fail_all(RuntimeError("the server is shutting down"))
                return False
            self._command(engine, *cmd)
        return True

    def _fault(self, engine, err: BaseException):
        """``engine.step`` raised: fail its requests and return the engine to go on with (None ends the loop)."""
        log.error("engine fault; failing %d request(s) and starting afresh\n%s", len(self._jobs),
                  traceback.format_exc())
        self.faults += 1
        self._fail_all(err)
        return self._make_engine(self.pair)

    def _command(self, engine, kind: str, job: Job) -> None:
        if kind == "submit":
            try:
                job.uid = engine.submit(job.request)
            except MtpError as err:
                job.post(Failed(err, user_error=True))
                return
            except Exception as err:
                log.error("engine.submit failed\n%s", traceback.format_exc())
                job.post(Failed(err, user_error=False))
                return
            self._jobs[job.uid] = job
            job.post(Accepted(job.uid))
        elif kind == "cancel" and job.uid in self._jobs:
            engine.cancel(job.uid)  # the row leaves at the next round boundary

    def _fail_all(self, err: BaseException) -> None:
        for job in self._jobs.values():
            job.post(Failed(err, user_error=False))
        self._jobs.clear()

    def _publish(self, engine) -> None:
        snap = {"running": engine.running, "queued": engine.queued, "faults": self.faults}
        for k, v in (engine.metrics() or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                snap[k] = v
        self.snapshot = snap

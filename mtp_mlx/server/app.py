"""The ASGI application of ``mtp-mlx serve``: OpenAI-compatible endpoints over one engine thread.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``. Every request becomes one engine
``Request``; its Events come back through an ``asyncio.Queue`` fed from the engine thread. A
streamed request whose client goes away is cancelled in the engine (its row leaves at the next
round boundary); so is a non-streamed one, checked about once a second while it waits.
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, List, Optional, Union

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import metrics as prom
from . import responses as out
from .protocol import ApiError, Parsed, bad, num_draft_for, parse_chat, parse_completion, sampling_defaults
from .worker import Accepted, EngineWorker, Failed, Job

log = logging.getLogger("mtp_mlx.server")

DISCONNECT_POLL_S = 1.0   # how often a waiting non-streamed request checks that its client is still there
RETRY_AFTER_S = 1         # the Retry-After of a 503 (queue full, model loading)


@dataclass
class ServerConfig:
    """What the app needs to know besides the worker.

    num_draft: the default ``Request.num_draft`` ("auto" or a fixed K; 0 without a drafter).
    max_queue: requests admitted beyond the ``max_batch`` running rows; more get 503.
    """

    model_id: str
    max_batch: int
    max_queue: int
    num_draft: Union[int, str]
    has_drafter: bool
    default_max_tokens: int


class _Session:
    """One admitted request: its engine Job, the queue its Events arrive on, and its clean-up."""

    def __init__(self, server: "Server", request):
        self.server = server
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def post(item):  # engine thread -> this request's event loop
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:
                pass  # the loop is closed: the server is shutting down

        self.job = Job(request, post)
        self.finished = self.closed = False
        self.checked = time.monotonic()
        server.metrics.in_flight += 1

    async def start(self) -> None:
        """Submit; raise ApiError if the engine refuses the request (prompt too long, ...)."""
        self.server.worker.submit(self.job)
        item = await self.queue.get()
        if isinstance(item, Failed):
            self.finished = True
            raise _api_error(item)
        assert isinstance(item, Accepted)

    async def next(self, http: Optional[HttpRequest] = None):
        """The next Event; with ``http``, check about once a DISCONNECT_POLL_S that the client is still there."""
        while True:
            try:
                item = await (asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S) if http else self.queue.get())
            except asyncio.TimeoutError:
                item = None
            if http is not None and time.monotonic() - self.checked >= DISCONNECT_POLL_S:
                self.checked = time.monotonic()
                if await http.is_disconnected():
                    raise _ClientGone()
            if item is None:
                continue
            if isinstance(item, Failed):
                self.finished = True
                raise _api_error(item)
            if item.finish_reason is not None:
                self.finished = True
            return item

    def close(self) -> None:
        """Idempotent: cancel in the engine if still running; free the admission slot."""
        if self.closed:
            return
        self.closed = True
        self.server.metrics.in_flight -= 1
        if not self.finished:
            self.server.worker.cancel(self.job)


class _ClientGone(Exception):
    pass


def _api_error(f: Failed) -> ApiError:
    if f.user_error:
        return bad(str(f.error), None, "invalid_request")
    return ApiError(500, f"the engine failed on this request: {type(f.error).__name__}: {f.error}",
                    type="server_error", code="engine_error")


class _SSE(StreamingResponse):
    """A server-sent-events response that always closes its session, even if never iterated."""

    def __init__(self, body: AsyncIterator[str], session: _Session):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._session = session

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._session.close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class Server:
    """The state behind the routes: config, engine worker, counters."""

    def __init__(self, worker: EngineWorker, config: ServerConfig):
        self.worker, self.config = worker, config
        self.metrics = prom.ServerMetrics()
        self.created = int(time.time())
        self._defaults = None
        self._token_text = None

    # ---- helpers ---------------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self.worker.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.worker.load_error}", type="server_error",
                           code="model_load_failed")
        if not self.worker.ready:
            raise ApiError(503, "the model is still loading: retry shortly", type="server_error", code="loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if not self.worker.alive:
            raise ApiError(503, "the engine thread has stopped: restart the server", type="server_error",
                           code="engine_stopped")

    @property
    def tokenizer(self):
        return self.worker.pair.tokenizer

    @property
    def defaults(self) -> dict:
        if self._defaults is None:
            path = getattr(self.worker.pair, "target_path", None)
            gen = {}
            if path is not None and (path / "generation_config.json").is_file():
                try:
                    gen = json.loads((path / "generation_config.json").read_text())
                except (OSError, ValueError):
                    gen = {}
            self._defaults = sampling_defaults(gen if isinstance(gen, dict) else {})
        return self._defaults

    @property
    def token_text(self) -> out.TokenText:
        if self._token_text is None:
            self._token_text = out.TokenText(self.tokenizer)
        return self._token_text

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.config.model_id:
            raise ApiError(404, f"The model '{model}' does not exist: this server serves "
                           f"'{self.config.model_id}' (GET /v1/models)", param="model", code="model_not_found")

    def _admit(self) -> None:
        limit = self.config.max_batch + self.config.max_queue
        if self.metrics.in_flight >= limit:
            raise ApiError(503, f"the server is at capacity ({self.config.max_batch} running + "
                           f"{self.config.max_queue} queued requests): retry later", type="server_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    def _tokenize(self, p: Parsed) -> List[int]:
        """Prompt token ids (runs in a worker thread: tokenizers never touch MLX)."""
        tok = self.tokenizer
        if p.endpoint == "completion":
            if p.prompt is not None:
                vocab = self.worker.pair.target_config.text.vocab_size
                badid = next((t for t in p.prompt if not 0 <= t < vocab), None)
                if badid is not None:
                    raise bad(f"'prompt' holds token id {badid}, outside this model's vocabulary (0..{vocab - 1})",
                              "prompt")
                return list(p.prompt)
            return list(tok.encode(p.text))
        if not getattr(tok, "chat_template", None):
            raise bad("this model has no chat template: use /v1/completions with a plain prompt", "messages",
                      "unsupported_parameter")
        try:
            ids = tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True,
                                          **p.chat_template_kwargs)
        except Exception as err:  # the template's own checks (e.g. roles must alternate)
            raise bad(f"the chat template rejected these messages: {err}", "messages") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _engine_request(self, p: Parsed, ids: List[int]):
        from ..decoding.engine import Request

        max_tokens = p.max_tokens
        if max_tokens is None:  # the default never pushes a prompt past the model's positions
            room = self.worker.pair.target_config.text.max_position_embeddings - len(ids)
            max_tokens = max(1, min(self.config.default_max_tokens, room))
        return Request(
            prompt=ids,
            max_tokens=max_tokens,
            sampling=p.sampling,
            stop=tuple(p.stop),
            num_draft=num_draft_for(p, self.config.num_draft, self.config.has_drafter),
            logprobs=p.logprobs,
            request_index=0,  # each request is its own random stream: (seed, 0, position)
        )

    @staticmethod
    def _error(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    # ---- completions -----------------------------------------------------------------------------
    async def completions(self, http: HttpRequest, endpoint: str) -> Response:
        session = None
        try:
            body = await _json_body(http)
            self._check_ready()
            p = (parse_chat if endpoint == "chat" else parse_completion)(body, self.defaults)
            self._check_model(p.model)
            ids = await run_in_threadpool(self._tokenize, p)
            request = self._engine_request(p, ids)
            self._admit()
            session = _Session(self, request)
            await session.start()
        except ApiError as err:
            if session is not None:
                session.close()
            self.metrics.count(endpoint, err.status)
            return self._error(err)
        except BaseException:
            if session is not None:
                session.close()
            raise
        self.metrics.count(endpoint, 200)
        shape = (_ChatShape if endpoint == "chat" else _CompletionShape)(self, p, request.num_draft)
        if p.stream:
            return _SSE(self._stream(session, shape, p), session)
        try:
            return await self._whole(http, session, shape)
        except _ClientGone:
            return Response(status_code=499)
        except ApiError as err:
            return self._error(err)
        finally:
            session.close()

    async def _whole(self, http: HttpRequest, session: _Session, shape) -> JSONResponse:
        while True:
            ev = await session.next(http)
            shape.add(ev)
            if ev.finish_reason is not None:
                return JSONResponse(shape.whole(ev))

    async def _stream(self, session: _Session, shape, p: Parsed) -> AsyncIterator[str]:
        try:
            first = shape.opening()
            if first is not None:
                yield _sse(first)
            while True:
                ev = await session.next()
                for chunk in shape.chunks(ev):
                    yield _sse(chunk)
                if ev.finish_reason is not None:
                    if p.include_usage:
                        yield _sse(shape.usage_chunk(ev))
                    yield "data: [DONE]\n\n"
                    return
        except ApiError as err:  # an engine fault mid-stream: the openai client raises on an error event
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            session.close()

    # ---- small endpoints -------------------------------------------------------------------------
    def model_card(self) -> dict:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "mtp-mlx"}

    async def models(self, http: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, http: HttpRequest) -> Response:
        try:
            self._check_model(http.path_params["model_id"])
        except ApiError as err:
            return self._error(err)
        return JSONResponse(self.model_card())

    async def health(self, http: HttpRequest) -> Response:
        snap = self.worker.snapshot
        if self.worker.load_error is not None:
            return JSONResponse({"status": "error", "error": str(self.worker.load_error)}, status_code=503)
        if not self.worker.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not self.worker.alive:
            return JSONResponse({"status": "error", "error": "the engine thread has stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.config.model_id, "running": snap.get("running", 0),
                             "queued": snap.get("queued", 0), "in_flight": self.metrics.in_flight,
                             "notices": self.worker.notices})

    async def prometheus(self, http: HttpRequest) -> Response:
        text = prom.render(self.worker.snapshot, self.metrics, ready=self.worker.ready)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


class _Shape:
    """Builds one endpoint's response objects from Events (shared by streamed and whole answers)."""

    object_whole = object_chunk = ""

    def __init__(self, server: Server, p: Parsed, num_draft):
        self.server, self.p, self.num_draft = server, p, num_draft
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.text: List[str] = []
        self.logprobs: List[Any] = []

    prefix = ""

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.config.model_id}

    def add(self, ev) -> None:
        self.text.append(ev.text)
        if self.p.logprobs is not None and ev.logprobs:
            self.logprobs.extend(ev.logprobs)

    def extras(self, ev) -> dict:
        """The per-request extension fields every final answer carries."""
        return {"speculative": out.speculative(ev.stats, self.p.spec_mode, self.num_draft),
                "timings": out.timings(ev.stats)}

    def usage_chunk(self, ev) -> dict:
        return {**self._head(self.object_chunk), "choices": [], "usage": out.usage(ev.stats), **self.extras(ev)}

    def _usage_field(self) -> dict:
        # OpenAI sends "usage": null on every chunk but the last when include_usage is on.
        return {"usage": None} if self.p.include_usage else {}


class _ChatShape(_Shape):
    prefix, object_whole, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _lp(self, lps) -> Optional[dict]:
        if self.p.logprobs is None:
            return None
        return {"content": out.chat_logprobs(self.server.token_text, lps or [])}

    def whole(self, ev) -> dict:
        return {**self._head(self.object_whole),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.text)},
                             "logprobs": self._lp(self.logprobs), "finish_reason": out.finish_reason(ev.finish_reason)}],
                "usage": out.usage(ev.stats), **self.extras(ev)}

    def opening(self) -> dict:
        return {**self._head(self.object_chunk), **self._usage_field(),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def chunks(self, ev) -> List[dict]:
        chunks = []
        lps = ev.logprobs if self.p.logprobs is not None else None
        if ev.text or lps:
            chunks.append({**self._head(self.object_chunk), **self._usage_field(),
                           "choices": [{"index": 0, "delta": {"content": ev.text}, "logprobs": self._lp(lps),
                                        "finish_reason": None}]})
        if ev.finish_reason is not None:
            chunks.append({**self._head(self.object_chunk), **self._usage_field(),
                           "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": out.finish_reason(ev.finish_reason)}], **self.extras(ev)})
        return chunks


class _CompletionShape(_Shape):
    prefix, object_whole, object_chunk = "cmpl", "text_completion", "text_completion"

    def __init__(self, server: Server, p: Parsed, num_draft):
        super().__init__(server, p, num_draft)
        self.offset = 0

    def _lp(self, lps) -> Optional[dict]:
        if self.p.logprobs is None:
            return None
        block, self.offset = out.completion_logprobs(self.server.token_text, lps or [], self.offset)
        return block

    def whole(self, ev) -> dict:
        return {**self._head(self.object_whole),
                "choices": [{"index": 0, "text": "".join(self.text), "logprobs": self._lp(self.logprobs),
                             "finish_reason": out.finish_reason(ev.finish_reason)}],
                "usage": out.usage(ev.stats), **self.extras(ev)}

    def opening(self) -> None:
        return None

    def chunks(self, ev) -> List[dict]:
        lps = ev.logprobs if self.p.logprobs is not None else None
        final = ev.finish_reason is not None
        if not (ev.text or lps or final):
            return []
        chunk = {**self._head(self.object_chunk), **self._usage_field(),
                 "choices": [{"index": 0, "text": ev.text, "logprobs": self._lp(lps),
                              "finish_reason": out.finish_reason(ev.finish_reason)}]}
        return [{**chunk, **self.extras(ev)} if final else chunk]


async def _json_body(http: HttpRequest) -> dict:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"the request body is not valid JSON: {err}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    return body


def create_app(worker: EngineWorker, config: ServerConfig) -> Starlette:
    """The Starlette app serving ``worker``'s engine under ``config``."""
    server = Server(worker, config)

    async def chat(http):
        return await server.completions(http, "chat")

    async def completions(http):
        return await server.completions(http, "completion")

    async def http_error(http, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, f"{http.method} {http.url.path}: {exc.detail}",
                                     code=code).body(), status_code=exc.status_code)

    async def internal_error(http, exc: Exception):
        log.exception("unhandled error on %s", http.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                                     code="internal_error").body(), status_code=500)

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.model, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    return app


class BackgroundServer:
    """uvicorn serving ``app`` on a thread of this process, on an already-bound socket.

    For tests and embedding: ``with BackgroundServer(app) as s: ... s.url ...``; port 0 picks a
    free port. ``stop()`` shuts uvicorn down (it does not stop the engine worker).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="mtp-mlx-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


"""``mtp-mlx serve``: the typer command (registered in ``mtp_mlx.cli``; also ``python -m mtp_mlx.server``)."""

from enum import Enum
from typing import Optional

import typer

from ..errors import MtpError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 64
DEMO_MODEL_ID = "mtp-mlx-demo"


class Dtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


def serve(
    model: Optional[str] = typer.Option(
        None, "--model", help="Gemma 4 target: local folder or HF repo id (default: the bundled demo pair)."
    ),
    drafter: Optional[str] = typer.Option(
        None, "--drafter", "--draft-model", help="Its MTP '-assistant' drafter: folder or repo id."
    ),
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to bind (127.0.0.1 = this machine only)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port (0 = any free port)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Rows decoded together, 1..8."),
    max_queue: int = typer.Option(
        DEFAULT_MAX_QUEUE, "--max-queue", help="Requests waiting beyond the running batch; more get HTTP 503."
    ),
    prompt_cache_bytes: int = typer.Option(
        0, "--prompt-cache-bytes", help="Prefix-cache budget in bytes across requests (0 = off)."
    ),
    no_drafter: bool = typer.Option(False, "--no-drafter", help="Decode with the target alone."),
    num_draft_tokens: Optional[int] = typer.Option(
        None, "--num-draft-tokens", help="Draft tokens per round, 1..8 (default: auto, the adaptive controller)."
    ),
    attention_backend: str = typer.Option(
        "auto", "--attention-backend", help="Verify attention: auto (Metal kernel where available), reference, metal."
    ),
    dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="Cast floating-point weights to this type."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (debug, info, warning, error)."),
    pipeline: bool = typer.Option(False, "--pipeline", help="Split the target's layers across the ranks "
                                  "started by mlx.launch; rank 0 serves (README: 'More than one Mac')."),
    tensor_parallel: bool = typer.Option(False, "--tensor-parallel", help="Split every layer across the ranks "
                                         "started by mlx.launch; rank 0 serves (needs a fast link: JACCL)."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, models, health, metrics)."""
    from ..limits import DEFAULT_MAX_TOKENS, MAX_BATCH, MAX_DRAFT

    if not 1 <= max_batch <= MAX_BATCH:
        raise MtpError(f"--max-batch {max_batch} is out of range: use 1..{MAX_BATCH}")
    if max_queue < 0:
        raise MtpError(f"--max-queue {max_queue} is negative: use >= 0 (0 = no waiting requests)")
    if prompt_cache_bytes < 0:
        raise MtpError(f"--prompt-cache-bytes {prompt_cache_bytes} is negative: use >= 0 (0 = off)")
    if num_draft_tokens is not None and not 1 <= num_draft_tokens <= MAX_DRAFT:
        raise MtpError(f"--num-draft-tokens {num_draft_tokens} is out of range: use 1..{MAX_DRAFT} (or --no-drafter)")
    if not 0 <= port <= 65535:
        raise MtpError(f"--port {port} is out of range: use 0..65535")
    echo = typer.echo
    mode = None
    if pipeline or tensor_parallel:
        from ..distributed.cli import join, parallel_mode, say

        mode = parallel_mode(pipeline, tensor_parallel)
        join(mode, "serve")
        echo = lambda line, err: say(line)  # noqa: E731  (every rank runs this; rank 0 speaks)
    model_id = model
    if model is None:
        from ..cli import _demo_paths
        from ..demo import DEMO_NOTICE

        demo = _demo_paths()
        if demo is None:
            raise MtpError("no --model given and this install has no bundled demo pair: pass --model and --drafter")
        model, drafter, model_id = str(demo[0]), str(demo[1]), DEMO_MODEL_ID
        echo(f"mtp-mlx: {DEMO_NOTICE}", err=True)
    if drafter is None and not no_drafter:
        echo("mtp-mlx: no --drafter given: decoding with the target alone", err=True)
    use_drafter = drafter is not None and not no_drafter
    from .app import ServerConfig, create_app

    config = ServerConfig(model_id=model_id, max_batch=max_batch, max_queue=max_queue,
                          num_draft=(num_draft_tokens or "auto") if use_drafter else 0,
                          has_drafter=use_drafter, default_max_tokens=DEFAULT_MAX_TOKENS)
    if mode is not None:
        from ..distributed.cli import serve_distributed

        return serve_distributed(mode, model=model, drafter=drafter if use_drafter else None, config=config,
                                 host=host, port=port, prompt_cache_bytes=prompt_cache_bytes,
                                 attention=attention_backend, dtype=dtype.value if dtype else None,
                                 log_level=log_level)

    worker = build_worker(model, drafter if use_drafter else None, max_batch=max_batch,
                          prompt_cache_bytes=prompt_cache_bytes, attention=attention_backend,
                          dtype=dtype.value if dtype else None)
    typer.echo(f"mtp-mlx: loading {model_id}" + (f" with drafter {drafter}" if use_drafter else ""), err=True)
    worker.start()
    worker.wait_ready()
    for line in worker.notices:
        typer.echo(f"mtp-mlx: {line}", err=True)
    try:
        run(create_app(worker, config), host=host, port=port, log_level=log_level)
    finally:
        worker.close(timeout=2.0)  # the engine thread is a daemon: a step still running is abandoned


def build_worker(model: str, drafter: Optional[str], *, max_batch: int, prompt_cache_bytes: int = 0,
                 attention: str = "auto", dtype: Optional[str] = None):
    """An EngineWorker (not started) that loads the pair and builds the Engine on its own thread."""
    from .worker import EngineWorker

    def load():
        from ..loading import load as load_pair

        return load_pair(model, drafter, dtype=dtype)

    def make_engine(pair):
        from ..decoding.engine import Engine

        return Engine(pair, max_batch=max_batch, use_drafter=pair.drafter is not None, attention=attention,
                      prefix_cache_bytes=prompt_cache_bytes)

    return EngineWorker(load, make_engine)


def run(app, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until Ctrl-C; says where, in one line, once listening."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise MtpError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port or --host") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    typer.echo(f"mtp-mlx: serving on http://{shown}:{bound}/v1 (OpenAI API; /health, /metrics); Ctrl-C stops",
               err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def main() -> None:
    """``python -m mtp_mlx.server``: the serve command on its own."""
    from ..cli import user_errors

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(user_errors(serve))
    app()

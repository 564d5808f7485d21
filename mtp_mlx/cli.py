"""The ``mtp-mlx`` command line: thin typer commands over the Python API.

Expected errors (``MtpError``: bad paths, incompatible checkpoints, bad flags) print one
line on stderr and exit 1, without a traceback; Ctrl-C exits 130.
"""

import functools
import sys
from enum import Enum
from typing import Optional

import typer

from .errors import MtpError

DEFAULT_MLX_PATH = "mlx_model"
DEFAULT_Q_BITS = 4
DEFAULT_Q_GROUP_SIZE = 64

app = typer.Typer(
    name="mtp-mlx",
    help="Faster Gemma 4 generation on MLX with Google's MTP assistant drafters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Faster Gemma 4 generation on MLX with Google's MTP assistant drafters."""


def user_errors(command):
    """Run a command so that ``MtpError`` -> one line + exit 1 and Ctrl-C -> exit 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MtpError as err:
            typer.echo(f"mtp-mlx: error: {err}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("mtp-mlx: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


class Dtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


# ---- generate / bench -------------------------------------------------------------------
DEFAULT_MAX_TOKENS = 256
DEFAULT_NUM_DRAFT = 4


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise MtpError("no prompt: pass --prompt TEXT, or --prompt - to read standard input")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise MtpError("the prompt is empty: pass some text with --prompt or on standard input")
    return prompt


def _print_stats(r) -> None:
    err = functools.partial(typer.echo, err=True)
    err("==========")
    err(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec")
    err(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec")
    if r.drafted:
        err(f"Acceptance: {100 * r.acceptance_rate:.1f}% ({r.accepted}/{r.drafted} drafted tokens), "
            f"{r.tokens_per_forward:.2f} tokens per target forward")
    else:
        err(f"Drafting: off, {r.tokens_per_forward:.2f} tokens per target forward")
    err(f"Peak memory: {r.peak_memory:.3f} GB")


@app.command()
@user_errors
def generate(
    model: str = typer.Option(..., "--model", help="Gemma 4 target: local folder or HF repo id."),
    drafter: Optional[str] = typer.Option(
        None, "--drafter", "--draft-model", help="Its MTP '-assistant' drafter: folder or repo id."
    ),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Prompt text; '-' (or omitted with piped input) reads standard input."
    ),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-m", help="Tokens to generate at most."),
    num_draft_tokens: int = typer.Option(
        DEFAULT_NUM_DRAFT, "--num-draft-tokens", help="Draft tokens per round, 1..8."
    ),
    no_drafter: bool = typer.Option(False, "--no-drafter", help="Decode with the target alone."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: tokenize the prompt as the checkpoint does."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System prompt for the chat template."),
    draft_position: str = typer.Option(
        "B", "--draft-position", help="Drafter query position: B (P_b-1, default), A (P_b), hf (reference parity)."
    ),
    dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="Cast floating-point weights to this type."),
) -> None:
    """Generate text, streaming it to standard output; statistics go to standard error."""
    from . import api
    from .loading import load

    text = _read_prompt(prompt)
    if not 1 <= num_draft_tokens <= 8:
        raise MtpError(f"--num-draft-tokens {num_draft_tokens} is out of range: use 1..8 (or --no-drafter)")
    if max_tokens < 1:
        raise MtpError(f"--max-tokens {max_tokens} is out of range: use a value >= 1")
    pair = load(model, None if no_drafter else drafter, dtype=dtype.value if dtype else None)
    ids = api.format_prompt(pair.tokenizer, text, raw=raw, system=system_prompt)
    last = None
    for last in api.stream_generate(
        pair, ids, max_tokens=max_tokens, num_draft_tokens=num_draft_tokens,
        use_drafter=not no_drafter, draft_position=draft_position,
    ):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if last is not None:
        _print_stats(last)


# ---- convert ------------------------------------------------------------------------------
@app.command()
@user_errors
def convert(
    model: str = typer.Option(
        ..., "--model", "--hf-path", "-m", help="Gemma 4 target: local folder or HF repo id."
    ),
    drafter: Optional[str] = typer.Option(
        None, "--drafter", "--draft-model", help="Its MTP '-assistant' drafter: folder or repo id."
    ),
    mlx_path: str = typer.Option(
        DEFAULT_MLX_PATH, "--mlx-path", "--out", "-o", help="Output folder for the target."
    ),
    drafter_out: Optional[str] = typer.Option(
        None, "--drafter-out", help="Output folder for the drafter (default: MLX_PATH/assistant)."
    ),
    dtype: Dtype = typer.Option(Dtype.bfloat16, "--dtype", help="Type of the unquantized weights."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the target."),
    q_bits: Optional[int] = typer.Option(
        None, "--q-bits", help=f"Target bits per weight (implies -q; default {DEFAULT_Q_BITS})."
    ),
    q_group_size: int = typer.Option(DEFAULT_Q_GROUP_SIZE, "--q-group-size", help="Target group size."),
    drafter_q_bits: Optional[int] = typer.Option(
        None, "--drafter-q-bits", help="Quantize the drafter to this many bits (default: none)."
    ),
    drafter_q_group_size: int = typer.Option(
        DEFAULT_Q_GROUP_SIZE, "--drafter-q-group-size", help="Drafter group size."
    ),
    force: bool = typer.Option(False, "--force", help="Replace non-empty output folders."),
) -> None:
    """Convert a Gemma 4 model (and its drafter) to MLX, optionally quantized."""
    from .loading.convert import convert as run_convert

    if quantize and q_bits is None:
        q_bits = DEFAULT_Q_BITS
    done = run_convert(
        model,
        mlx_path,
        drafter=drafter,
        drafter_out=drafter_out,
        dtype=dtype.value,
        q_bits=q_bits,
        q_group_size=q_group_size,
        drafter_q_bits=drafter_q_bits,
        drafter_q_group_size=drafter_q_group_size,
        force=force,
    )
    typer.echo(f"wrote {done.target_path}")
    if done.drafter_path is not None:
        typer.echo(f"wrote {done.drafter_path}")


def main() -> None:
    """Console entry point (``mtp-mlx``, ``python -m mtp_mlx``)."""
    try:
        app()
    except MtpError as err:  # raised outside a command (e.g. while parsing)
        print(f"mtp-mlx: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("mtp-mlx: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

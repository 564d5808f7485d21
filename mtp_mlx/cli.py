"""The ``mtp-mlx`` command line: thin typer commands over the Python API.

Expected errors (``MtpError``: bad paths, incompatible checkpoints, bad flags) print one
line on stderr and exit 1, without a traceback; Ctrl-C exits 130.
"""

import functools
import sys
from enum import Enum
from typing import List, Optional

import typer

from .errors import MtpError
from .limits import DEFAULT_MAX_TOKENS, MAX_BATCH, MAX_DRAFT

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
def _read_prompt(prompt: Optional[str]) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise MtpError("no prompt: pass --prompt TEXT, or --prompt - to read standard input")
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MtpError(f"standard input is not UTF-8 text (byte {e.start}): pass the prompt as UTF-8 text") from None
    if not prompt.strip():
        raise MtpError("the prompt is empty: pass some text with --prompt or on standard input")
    return prompt


def _k_summary(ks) -> str:
    """How the draft length went: the K used per round, compressed into runs."""
    if not ks:
        return ""
    runs, prev, count = [], ks[0], 0
    for k in ks:
        if k == prev:
            count += 1
        else:
            runs.append(f"{prev}x{count}")
            prev, count = k, 1
    runs.append(f"{prev}x{count}")
    shown = " ".join(runs[:12]) + (" ..." if len(runs) > 12 else "")
    parked = sum(1 for k in ks if k == 0) / len(ks)
    return f"K per round (K x rounds): {shown}; parked at K=0 in {100 * parked:.0f}% of rounds"


def _print_stats(r, why: str = "") -> None:
    err = functools.partial(typer.echo, err=True)
    s = r.stats
    err("==========")
    err(f"Prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.3f} tokens-per-sec")
    err(f"Generation: {s.generation_tokens} tokens, {s.generation_tps:.3f} tokens-per-sec")
    if s.drafted:
        err(f"Acceptance: {100 * s.acceptance_rate:.1f}% ({s.accepted}/{s.drafted} drafted tokens), "
            f"{s.tokens_per_forward:.2f} tokens per target forward")
    elif s.rounds == 0:
        err(f"Stopped after the prefill ({r.finish_reason or 'done'}): no decode steps")
    else:
        err(f"Drafting: off, {s.tokens_per_forward:.2f} tokens per target forward")
    if s.ks and any(s.ks):
        err(_k_summary(s.ks))
    if why:
        err(why)
    err(f"Peak memory: {r.peak_memory:.3f} GB")


def _demo_paths():
    """The bundled demonstration pair, if this install has one."""
    from . import demo

    return (demo.DEMO_TARGET, demo.DEMO_DRAFTER) if demo.available() else None


@app.command()
@user_errors
def generate(
    model: Optional[str] = typer.Option(
        None, "--model", help="Gemma 4 target: local folder or HF repo id (default: the bundled demo pair)."
    ),
    drafter: Optional[str] = typer.Option(
        None, "--drafter", "--draft-model", help="Its MTP '-assistant' drafter: folder or repo id."
    ),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Prompt text; '-' (or omitted with piped input) reads standard input."
    ),
    prompts_file: Optional[str] = typer.Option(
        None, "--prompts-file", help=f"Batch: one prompt per line (1..{MAX_BATCH} lines); outputs in input order."
    ),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-m", help="Tokens to generate at most."),
    num_draft_tokens: str = typer.Option(
        "auto", "--num-draft-tokens", help="Draft tokens per round: auto (chosen each round from measured "
        f"costs; never slower than plain decoding by more than a bounded amount) or 1..{MAX_DRAFT} fixed."
    ),
    no_drafter: bool = typer.Option(False, "--no-drafter", help="Decode with the target alone."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set of mass top_p."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Penalty for recent tokens (1 = off)."),
    repetition_context_size: int = typer.Option(20, "--repetition-context-size", help="Tokens the penalty looks at."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (sampled runs are reproducible)."),
    stop: List[str] = typer.Option([], "--stop", help="Stop string (repeatable); never shown in the output."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: tokenize the prompt as the checkpoint does."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System prompt for the chat template."),
    draft_position: str = typer.Option(
        "B", "--draft-position", help="Drafter query position: B (P_b-1, default), A (P_b), hf (reference parity)."
    ),
    attention_backend: str = typer.Option(
        "auto", "--attention-backend", help="Attention: auto (the Metal kernel where available), reference, metal."
    ),
    dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="Cast floating-point weights to this type."),
    pipeline: bool = typer.Option(False, "--pipeline", help="Split the target's layers across the ranks "
                                  "started by mlx.launch (README: 'More than one Mac')."),
    tensor_parallel: bool = typer.Option(False, "--tensor-parallel", help="Split every layer across the ranks "
                                         "started by mlx.launch (needs a fast link: JACCL)."),
) -> None:
    """Generate text, streaming it to standard output; statistics go to standard error."""
    from . import api
    from .loading import load
    from .ops import check_backend
    from .sampling import SamplingConfig

    check_backend(attention_backend)
    sampling = SamplingConfig(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty,
                              repetition_context_size=repetition_context_size, seed=seed)
    if max_tokens < 1:
        raise MtpError(f"--max-tokens {max_tokens} is out of range: use a value >= 1")
    k = parse_num_draft(num_draft_tokens)
    if pipeline or tensor_parallel:
        from .distributed.cli import generate_distributed, parallel_mode

        return generate_distributed(
            parallel_mode(pipeline, tensor_parallel), model=model, drafter=drafter, prompt=prompt,
            prompts_file=prompts_file, max_tokens=max_tokens, num_draft=k, no_drafter=no_drafter, sampling=sampling,
            stop=stop, raw=raw, system_prompt=system_prompt, draft_position=draft_position,
            attention=attention_backend, dtype=dtype.value if dtype else None)
    texts = _read_prompts_file(prompts_file) if prompts_file else [_read_prompt(prompt)]
    if model is None:
        demo = _demo_paths()
        if demo is None:
            raise MtpError("no --model given and this install has no bundled demo pair: pass --model and --drafter")
        model, drafter = str(demo[0]), (None if no_drafter else str(demo[1]))
        from .demo import DEMO_NOTICE

        typer.echo(f"mtp-mlx: {DEMO_NOTICE}", err=True)
    pair = load(model, None if no_drafter else drafter, dtype=dtype.value if dtype else None)
    ids = [api.format_prompt(pair.tokenizer, t, raw=raw, system=system_prompt) for t in texts]
    policy = _policy(pair) if k == "auto" and pair.drafter is not None else None
    kw = dict(max_tokens=max_tokens, num_draft_tokens=k, use_drafter=not no_drafter and k != 0,
              sampling=sampling, stop=stop, attention=attention_backend, policy=policy)
    if prompts_file:
        resp = api.batch_generate(pair, ids, **kw)
        for line in resp.notices:
            typer.echo(f"mtp-mlx: {line}", err=True)
        _print_batch(resp)
    else:
        last = None
        for last in api.stream_generate(pair, ids[0], draft_position=draft_position, **kw):
            for line in last.notices:
                typer.echo(f"mtp-mlx: {line}", err=True)
            sys.stdout.write(last.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if last is not None:
            _print_stats(last, f"Draft length: {policy.summary()['reason']}" if policy is not None else "")
    if policy is not None:
        from .tuning import save_policy_prior

        save_policy_prior(pair, policy.state())


def _policy(pair):
    """The draft-length policy, started from what earlier runs measured for this pair here."""
    from .decoding.policy import DraftPolicy
    from .tuning import load_policy_prior, tuning_file

    prior = load_policy_prior(pair)
    if prior is not None:
        typer.echo(f"mtp-mlx: draft lengths start from the round costs and acceptance stored in {tuning_file()} "
                   "for this pair and machine", err=True)
    return DraftPolicy(prior=prior)


def parse_num_draft(value: str):
    """``--num-draft-tokens``: "auto" or an int 0..MAX_DRAFT."""
    from .limits import check_num_draft

    if value.strip().lower() == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise MtpError(f"--num-draft-tokens {value!r} is not a number: use auto or 1..{MAX_DRAFT}") from None
    return check_num_draft(k, "--num-draft-tokens")


def _read_prompts_file(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise MtpError(f"cannot read --prompts-file {path}: {e.strerror}: pass a text file, one prompt per line")
    except UnicodeDecodeError as e:
        raise MtpError(f"--prompts-file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if not 1 <= len(lines) <= MAX_BATCH:
        raise MtpError(f"--prompts-file {path} has {len(lines)} prompts: batches take 1..{MAX_BATCH} (one per line)")
    return [line.replace("\\n", "\n") for line in lines]


def _print_batch(resp) -> None:
    for i, r in enumerate(resp.results):
        sys.stdout.write(f"==== [{i + 1}/{len(resp.results)}] ====\n{r.text}\n")
    err = functools.partial(typer.echo, err=True)
    err("==========")
    err(f"Prompt: {sum(r.prompt_tokens for r in resp.results)} tokens, {resp.prompt_tps:.3f} tokens-per-sec")
    err(f"Generation: {sum(len(r.tokens) for r in resp.results)} tokens, "
        f"{resp.generation_tps:.3f} tokens-per-sec (all rows)")
    for i, r in enumerate(resp.results):
        s = r.stats
        acc = f", acceptance {100 * s.acceptance_rate:.1f}%" if s.drafted else ""
        err(f"  [{i + 1}] {len(r.tokens)} tokens, {s.generation_tps:.3f} tokens-per-sec{acc}, "
            f"{s.tokens_per_forward:.2f} tokens per target forward")
    err(f"Peak memory: {resp.peak_memory:.3f} GB")


@app.command()
@user_errors
def tune(
    model: Optional[str] = typer.Option(None, "--model", help="Target (default: the bundled demo pair)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "--draft-model", help="Its drafter."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="Prompts to cycle through (one per line)."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-m", help="Tokens per row per run."),
    runs: int = typer.Option(3, "--runs", help="Timed runs per cell (median reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs per cell first."),
    batch_sizes: List[int] = typer.Option(list((1, 2, 4, 8)), "--batch-size", help="Batch sizes to sweep (repeatable)."),
    num_draft: List[str] = typer.Option([*map(str, range(7)), "auto"], "--num-draft",
                                        help=f"K values to sweep: 0 = no drafter, 1..{MAX_DRAFT}, auto (repeatable)."),
    out: str = typer.Option("tuning", "--out", help="Folder for the table, CSV, PNG and JSON."),
    save: bool = typer.Option(True, "--save/--no-save", help="Store the recommendation that generate uses."),
) -> None:
    """Sweep batch size x draft length; write table, CSV, PNG plot and the JSON recommendation."""
    from .tuning import run_tuning

    if model is None:
        demo = _demo_paths()
        if demo is None:
            raise MtpError("no --model given and this install has no bundled demo pair: pass --model and --drafter")
        model, drafter = str(demo[0]), str(demo[1])
    texts = _read_prompts_file(prompts_file) if prompts_file else None
    run_tuning(model, drafter, texts, max_tokens=max_tokens, runs=runs, warmup=warmup,
               batch_sizes=batch_sizes, draft_lengths=[parse_num_draft(k) for k in num_draft], out=out, save=save,
               echo=functools.partial(typer.echo, err=True))


@app.command()
@user_errors
def check(
    model: Optional[str] = typer.Option(None, "--model", help="Target (default: the bundled demo pair, every variant)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "--draft-model", help="Its drafter."),
    variant: List[str] = typer.Option([], "--variant", help="Also check the target cast or quantized: float32, "
                                      "float16, bfloat16, 8bit, 4bit (repeatable)."),
    attention_backend: str = typer.Option("auto", "--attention-backend", help="auto, reference or metal."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """What this machine does: MLX version and device, the Metal kernel's self-test, whether a
    K+1-wide verify rounds exactly like one-token decoding, and the stored draft-length costs."""
    from . import checks
    from .ops import check_backend

    check_backend(attention_backend)
    costs = None
    if model is not None:
        from .loading import load
        from .tuning import load_policy_prior

        costs = load_policy_prior(load(model, drafter))
    checks.check(model, drafter, variant or None, attention_backend, as_json, costs, echo=typer.echo)


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


from .server.cli import serve as _serve  # noqa: E402  (the command's heavy imports happen when it runs)

app.command(name="serve")(user_errors(_serve))


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

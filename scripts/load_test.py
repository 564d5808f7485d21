"""Load test for ``mtp-mlx serve`` through the official ``openai`` client.

For each concurrency level (default 1/2/4/8) it sends a fixed number of streamed chat requests
(greedy, ``--max-tokens`` each) with the drafter on (``speculative.mode`` auto) and off, and
optionally the same load against ``mlx_lm.server`` on the same target (plain decoding, its own
batching). Per cell: aggregate tokens/s (all completion tokens / wall time), per-request decode
tokens/s ((n - 1) / (last token - first token), mean), time to first token p50/p95, acceptance
(accepted / drafted, summed over the cell's requests). Then two latency probes on our server:
the time to first token of a request joining a busy batch (vs an idle server), and of a second
chat turn whose history is in the prefix cache (vs an unseen prompt of the same length).

Prints a table and JSON (``--json FILE`` writes it too). Not a test: nothing here asserts a speed.

    python scripts/load_test.py                                   # starts mtp-mlx serve on the demo pair
    python scripts/load_test.py --model M --drafter D --mlx-lm-model M
    python scripts/load_test.py --url http://127.0.0.1:8080 --mlx-lm-url http://127.0.0.1:8081
"""

import argparse
import concurrent.futures as cf
import contextlib
import inspect
import json
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import openai

PROMPTS = [
    "Write a function that parses a URL.",
    "class Stack:",
    "def fibonacci(n):",
    "Write a function that merges two sorted lists.",
    "def read_config(path):",
    "Write a class for a binary tree.",
    "def parse_args(argv):",
    "Write a function that reads a CSV file.",
]
ENDLESS = "class Parser:\n    def __init__(self, text):\n"  # a raw prefix the demo target keeps continuing


# ---- servers -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no answer from {url} after {timeout:.0f} s")


@contextlib.contextmanager
def _process(cmd, ready_url: str, timeout: float = 300):
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(ready_url, proc, timeout)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def ours_cmd(args, port: int):
    busy = max(args.concurrency) - 1 if args.busy_rows is None else args.busy_rows
    rows = min(8, max(max(args.concurrency), busy + 1))  # the join probe's joiner must find a free row
    cmd = [sys.executable, "-m", "mtp_mlx.server", "--port", str(port), "--max-batch", str(rows),
           "--max-queue", str(max(args.requests, 64)), "--prompt-cache-bytes", str(args.prompt_cache_bytes),
           "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model] + (["--drafter", args.drafter] if args.drafter else [])
    return cmd


def model_id(base: str) -> str:
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


# ---- one request, one cell ---------------------------------------------------------------------------

def one_request(client, model, prompt, max_tokens, extra, messages=None, completion=False):
    """Stream one request; return timings, token count and (ours) the speculative counters."""
    t0 = time.perf_counter()
    first = last = None
    chunks = tokens = 0
    spec = None
    kw = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True,
              stream_options={"include_usage": True}, extra_body=extra or None)
    if completion:
        stream = client.completions.create(prompt=prompt, **kw)
    else:
        stream = client.chat.completions.create(messages=messages or [{"role": "user", "content": prompt}], **kw)
    cached, timings = 0, None
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            c = chunk.choices[0]
            piece = c.text if completion else c.delta.content
            if piece:
                first = first or now
                last = now
                chunks += 1
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details else 0
        extra_fields = chunk.model_extra or {}
        spec = extra_fields.get("speculative", spec)
        timings = extra_fields.get("timings", timings)
    tokens = tokens or chunks  # a server without include_usage: count text chunks
    first = first or time.perf_counter()
    last = last or first
    return {"start": t0, "ttft": first - t0, "end": last, "tokens": tokens, "cached": cached,
            "server_ttft": timings["ttft_ms"] / 1000 if timings else None,
            "decode_tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else None,
            "drafted": spec["drafted"] if spec else None, "accepted": spec["accepted"] if spec else None}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def run_cell(client, model, concurrency, n_requests, max_tokens, extra):
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
    with cf.ThreadPoolExecutor(concurrency) as pool:
        rs = list(pool.map(lambda p: one_request(client, model, p, max_tokens, extra), jobs))
    wall = max(r["end"] for r in rs) - min(r["start"] for r in rs)
    drafted = [r["drafted"] for r in rs if r["drafted"] is not None]
    accepted = [r["accepted"] for r in rs if r["accepted"] is not None]
    per = [r["decode_tps"] for r in rs if r["decode_tps"]]
    ttft = [r["ttft"] for r in rs]
    return {
        "requests": n_requests, "tokens": sum(r["tokens"] for r in rs), "wall_s": round(wall, 3),
        "aggregate_tps": round(sum(r["tokens"] for r in rs) / wall, 2) if wall > 0 else None,
        "per_request_tps": round(statistics.mean(per), 2) if per else None,
        "ttft_p50_ms": round(1000 * _pct(ttft, 0.5), 1), "ttft_p95_ms": round(1000 * _pct(ttft, 0.95), 1),
        "acceptance": round(sum(accepted) / sum(drafted), 4) if drafted and sum(drafted) else None,
    }


# ---- latency probes on our server --------------------------------------------------------------------

def join_probe(client, model, busy: int, max_tokens: int):
    """TTFT of a request on an idle server, and joining ``busy`` rows that are mid-generation."""
    idle = [one_request(client, model, PROMPTS[1], 4, None) for _ in range(3)]
    streams, stop = [], threading.Event()

    def hold():  # a long row that keeps generating until told to stop
        s = client.completions.create(model=model, prompt=ENDLESS, max_tokens=2000, temperature=0, stream=True)
        streams.append(s)
        for _ in s:
            if stop.is_set():
                break
        s.close()

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(busy)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # let every busy row finish its prefill and decode for a while
    joined = [one_request(client, model, PROMPTS[1], 4, None) for _ in range(3)]
    stop.set()
    for t in threads:
        t.join(30)
    def med(rs, key):
        xs = [r[key] for r in rs if r[key] is not None]
        return round(1000 * statistics.median(xs), 1) if xs else None

    # ttft: to the first text the client sees; server_ttft: the engine's, submission to first token.
    return {"busy_rows": busy, "idle_ttft_ms": med(idle, "ttft"), "joining_ttft_ms": med(joined, "ttft"),
            "idle_server_ttft_ms": med(idle, "server_ttft"), "joining_server_ttft_ms": med(joined, "server_ttft")}


def prefix_probe(client, model, max_tokens: int):
    """TTFT of a second chat turn whose history is cached vs the same-length prompt never seen."""
    code = textwrap.dedent(inspect.getsource(textwrap))[:6000]
    first = [{"role": "user", "content": "Here is a module:\n" + code + "\nWrite a function that uses it."}]
    reply = one_request(client, model, None, max_tokens, None, messages=first)
    # A fixed assistant turn (not the reply) keeps the probe the same across servers and runs.
    second = first + [{"role": "assistant", "content": "def wrap_all(texts):\n    return texts"},
                      {"role": "user", "content": "class Stack:"}]
    warm = one_request(client, model, None, max_tokens, None, messages=second)
    cold_msgs = [dict(m) for m in second]
    cold_msgs[0]["content"] = "Here is another module:\n" + code + "\nWrite a function that uses it."
    cold = one_request(client, model, None, max_tokens, None, messages=cold_msgs)
    return {"first_turn_ttft_ms": round(1000 * reply["ttft"], 1),
            "second_turn_cached_tokens": warm["cached"], "second_turn_ttft_ms": round(1000 * warm["ttft"], 1),
            "unseen_prompt_cached_tokens": cold["cached"], "unseen_prompt_ttft_ms": round(1000 * cold["ttft"], 1)}


# ---- main --------------------------------------------------------------------------------------------

def sweep(label, base, args, modes, model=None):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=args.timeout)
    model = model or model_id(base)
    one_request(client, model, PROMPTS[0], 8, None)  # warm-up: compile and load everything once
    rows = []
    for mode in modes:
        extra = {"speculative": {"mode": mode}} if mode else None
        for c in args.concurrency:
            cell = run_cell(client, model, c, args.requests, args.max_tokens, extra)
            row = {"server": label, "drafter": {"auto": "on", "off": "off", None: "-"}[mode], "concurrency": c,
                   **cell}
            print(_fmt(row), file=sys.stderr)
            rows.append(row)
    return rows, client, model


COLUMNS = ["server", "drafter", "concurrency", "requests", "tokens", "aggregate_tps", "per_request_tps",
           "ttft_p50_ms", "ttft_p95_ms", "acceptance"]


def _fmt(row):
    return " | ".join(str(row.get(k, "")) for k in COLUMNS)


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + _fmt(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running mtp-mlx serve (default: start one on --model or the demo pair)")
    ap.add_argument("--model", help="target for the server this script starts (default: the bundled demo pair)")
    ap.add_argument("--drafter", help="its drafter")
    ap.add_argument("--mlx-lm-url", help="a running mlx_lm.server on the same target, for comparison")
    ap.add_argument("--mlx-lm-model", help="start mlx_lm.server on this target for comparison")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=16, help="requests per cell")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["auto", "off"], choices=["auto", "on", "off"],
                    help="speculative.mode values to sweep on our server")
    ap.add_argument("--prompt-cache-bytes", type=int, default=256 << 20, help="for the server this script starts")
    ap.add_argument("--no-probes", action="store_true", help="skip the join and prefix-cache latency probes")
    ap.add_argument("--busy-rows", type=int, help="rows running while the join probe joins (default: max concurrency - 1)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    result = {"config": {k: v for k, v in vars(args).items()}, "rows": [], "probes": {}}
    with contextlib.ExitStack() as stack:
        base = args.url
        if base is None:
            port = _free_port()
            base = f"http://127.0.0.1:{port}"
            stack.enter_context(_process(ours_cmd(args, port), base + "/health"))
        rows, client, model = sweep("mtp-mlx", base.rstrip("/"), args, args.modes)
        result["rows"] += rows
        if not args.no_probes:
            busy = max(args.concurrency) - 1 if args.busy_rows is None else args.busy_rows
            result["probes"]["join"] = join_probe(client, model, busy, args.max_tokens)
            result["probes"]["prefix_cache"] = prefix_probe(client, model, 8)
            print(json.dumps(result["probes"]), file=sys.stderr)
        lm = args.mlx_lm_url
        if lm is None and args.mlx_lm_model:
            port = _free_port()
            lm = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", args.mlx_lm_model, "--port", str(port),
                   "--log-level", "WARNING"]
            stack.enter_context(_process(cmd, lm + "/v1/models"))
        if lm:
            # mlx_lm.server names the model it was started with "default_model".
            rows, _, _ = sweep("mlx_lm.server", lm.rstrip("/"), args, [None], model="default_model")
            result["rows"] += rows
    print(table(result["rows"]))
    for name, probe in result["probes"].items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in probe.items()))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

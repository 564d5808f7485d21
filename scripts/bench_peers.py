#!/usr/bin/env python
"""Peers benchmark: our decoding against mlx-vlm's MTP speculative decoding and mlx-lm's plain
decoding, on the same checkpoint files and the same prompt ids.

Cases (``--cases``, default all):

=========== =================================================================================
ours-plain  our Engine with the target alone
ours-spec   our Engine, speculative, fixed K (``--num-draft``)
lm-plain    ``mlx_lm.generate.generate_step`` (greedy), the target alone
vlm-plain   ``mlx_vlm.generate.ar.generate_step`` (greedy), the target alone
vlm-mtp     the same with the drafter (``draft_kind="mtp"``, block = K + 1, K held fixed)
=========== =================================================================================

Each case runs in its own process (ours in this interpreter's environment, the peers in
``--peers-python``, a separate venv with mlx-vlm and mlx-lm that is never part of our
dependencies). By default each process loads the pair, warms up, runs ``--runs-per-process``
timed generations and exits, so no two models are in memory at once and real-size
checkpoints fit; with ``--resident`` (small models) every case's process stays loaded and
single runs alternate. Either way round r runs every case before round r + 1 starts, so a
slow spell of a shared machine lands on all cases alike. Medians over all timed runs. Load
time excludes the imports (reported apart).

The peers read a checkpoint whose config.json they cannot read as written through
:func:`peer_view`: the same weight files, a config completed with values it implies.

Greedy, no EOS (every run decodes exactly ``--max-tokens``). Decode speed is
(N - 1) / (t_N - t_1), t_i = when the i-th token reached the host (prefill excluded); a
speculative round's tokens arrive together. Also reported: load seconds (our Engine's start-up,
which may run checks, apart), time to first token,
peak memory (MLX's counter and the process's maximum resident set), weight bytes, acceptance,
and whether each case's tokens equal ours-plain's.

    python scripts/bench_peers.py --model DIR/target --drafter DIR/assistant --num-draft 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEERS_PYTHON = "/work/peers-venv/bin/python"
CASES = ("ours-plain", "ours-spec", "lm-plain", "vlm-plain", "vlm-mtp")
PEER_CASES = ("lm-plain", "vlm-plain", "vlm-mtp")
DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


# ----------------------------------------------------------------------------------------------
# worker side (runs inside one process per case; imports only what that case needs)
# ----------------------------------------------------------------------------------------------


def _weights_bytes(*models) -> int:
    from mlx.utils import tree_flatten

    return sum(a.nbytes for m in models if m is not None for _, a in tree_flatten(m.parameters()))


class _Ours:
    def __init__(self, model: str, drafter: Optional[str], spec: bool):
        from mtp_mlx import load
        from mtp_mlx.decoding.engine import Engine

        self.pair = load(model, drafter if spec else None)
        t0 = time.perf_counter()
        self.engine = Engine(self.pair, max_batch=1, use_drafter=spec)
        self.init_s = time.perf_counter() - t0  # with a drafter: the engine's start-up checks
        self.engine.eos = frozenset()  # decode exactly max_tokens: equal work in every run
        self.engine.tokenizer = None  # ids only, as the peers' generate_step loops (no detokenizer)
        self.models = (self.pair.target, self.pair.drafter)
        self.spec = spec

    def run(self, ids: List[int], max_tokens: int, k: int):
        from mtp_mlx.decoding.engine import Request

        self.engine.submit(Request(list(ids), max_tokens=max_tokens, num_draft=k if self.spec else 0))
        stamps, toks, drafted, accepted = [], [], 0, 0
        for ev in self.engine.run():
            now = time.perf_counter()
            stamps += [now] * len(ev.tokens)
            toks += ev.tokens
            drafted += ev.drafted
            accepted += ev.accepted
        return toks, stamps, drafted, accepted


class _LmPlain:
    def __init__(self, model: str, drafter: Optional[str], spec: bool):
        from mlx_lm import load

        self.model, _ = load(model)
        self.models = (self.model,)

    def run(self, ids, max_tokens, k):
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        stamps, toks = [], []
        for tok, _ in generate_step(mx.array(ids), self.model, max_tokens=max_tokens,
                                    sampler=lambda x: mx.argmax(x, axis=-1)):
            stamps.append(time.perf_counter())
            toks.append(int(tok))
        return toks, stamps, 0, 0


class _Vlm:
    def __init__(self, model: str, drafter: Optional[str], spec: bool):
        from mlx_vlm.speculative.drafters import load_drafter
        from mlx_vlm.utils import get_model_path, load_model

        self.model = load_model(get_model_path(model))
        self.drafter = None
        if spec:
            self.drafter, kind = load_drafter(drafter, kind="mtp")
            assert kind == "mtp", kind
        self.models = (self.model, self.drafter)

    def run(self, ids, max_tokens, k):
        import mlx.core as mx
        from mlx_vlm.generate.ar import generate_step

        kw = {}
        if self.drafter is not None:
            # mlx-vlm raises a requested block above the drafter's configured one only while
            # acceptance stays high; hold K fixed like ours
            self.drafter.prefer_requested_block_size = True
            kw = dict(draft_model=self.drafter, draft_kind="mtp", draft_block_size=k + 1)
            before = _vlm_counters(self.drafter)
        stamps, toks = [], []
        for tok, _ in generate_step(mx.array([ids]), self.model, None, None, max_tokens=max_tokens,
                                    temperature=0.0, **kw):
            stamps.append(time.perf_counter())
            toks.append(int(tok if isinstance(tok, int) else mx.array(tok).reshape(-1)[0].item()))
        drafted = accepted = 0
        if self.drafter is not None:
            after = _vlm_counters(self.drafter)
            accepted, drafted = int(after[1] - before[1]), int(after[2] - before[2])
        return toks, stamps, drafted, accepted


def _vlm_counters(drafter):
    return (getattr(drafter, "speculative_total_rounds", 0), getattr(drafter, "speculative_total_accepted", 0.0),
            getattr(drafter, "speculative_total_drafted", 0))


RUNNERS = {"ours-plain": (_Ours, False), "ours-spec": (_Ours, True), "lm-plain": (_LmPlain, False),
           "vlm-plain": (_Vlm, False), "vlm-mtp": (_Vlm, True)}


IMPORTS = {
    "ours-plain": ("mtp_mlx", "mtp_mlx.decoding.engine"), "ours-spec": ("mtp_mlx", "mtp_mlx.decoding.engine"),
    "lm-plain": ("mlx_lm", "mlx_lm.generate"),
    "vlm-plain": ("mlx_vlm.utils", "mlx_vlm.generate.ar", "mlx_vlm.speculative.drafters"),
    "vlm-mtp": ("mlx_vlm.utils", "mlx_vlm.generate.ar", "mlx_vlm.speculative.drafters"),
}


def _timed_run(runner, job) -> dict:
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    t_start = time.perf_counter()
    toks, stamps, drafted, accepted = runner.run(job["ids"], job["max_tokens"], job["num_draft"])
    dt = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {
        "tokens": len(toks),
        "decode_tps": (len(stamps) - 1) / dt if dt > 0 else 0.0,
        "ttft_s": stamps[0] - t_start if stamps else None,
        "total_s": stamps[-1] - t_start if stamps else None,
        "drafted": drafted, "accepted": accepted,
        "peak_mlx_bytes": mx.get_peak_memory(),
        "ids": toks,
    }


def worker(args) -> None:
    """One case in this process: import, load, warm up; then timed runs, either
    ``job["runs"]`` at once (one JSON line) or one per "run" line on stdin (resident mode)."""
    import importlib

    import mlx.core as mx

    job = json.loads(Path(args.job).read_text())
    t0 = time.perf_counter()
    for m in IMPORTS[job["case"]]:
        importlib.import_module(m)
    import_s = time.perf_counter() - t0
    cls, spec = RUNNERS[job["case"]]
    t0 = time.perf_counter()
    peer = job["case"] in PEER_CASES  # the peers read the checkpoint through peer_view
    runner = cls(job["peer_model"] if peer else job["model"], job["peer_drafter"] if peer else job["drafter"], spec)
    mx.eval([m.parameters() for m in runner.models if m is not None])
    init_s = getattr(runner, "init_s", 0.0)
    load_s = time.perf_counter() - t0 - init_s
    head = {"case": job["case"], "import_s": import_s, "load_s": load_s, "engine_init_s": init_s,
            "weights_bytes": _weights_bytes(*runner.models)}
    for _ in range(job["warmup"]):
        runner.run(job["ids"], job["warmup_tokens"], job["num_draft"])

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    if not job.get("resident"):
        runs = [_timed_run(runner, job) for _ in range(job["runs"])]
        print("RESULT " + json.dumps(dict(head, max_rss_bytes=rss(), runs=runs)), flush=True)
        return
    print("READY " + json.dumps(head), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print("RESULT " + json.dumps(dict(head, max_rss_bytes=rss(), runs=[_timed_run(runner, job)])), flush=True)


# ----------------------------------------------------------------------------------------------
# the peers' view of a checkpoint
# ----------------------------------------------------------------------------------------------


def peer_config(config: dict) -> Optional[dict]:
    """The same checkpoint's config.json completed with the keys mlx-lm and mlx-vlm read, or
    None when nothing is missing. Only values the config already implies are written:

    - transformers 5.23 saves full-attention head geometry as a derived ``per_layer_config``
      map; released files (and the peers, which read only these) carry ``global_head_dim`` and
      ``num_global_key_value_heads``. Without them the peers fall back to 512-wide heads.
    - 12B "unified": its text stack has no per-layer inputs (``hidden_size_per_layer_input``
      0; mlx-lm assumes E2B's 256 when the key is absent), and mlx-vlm sizes the patch
      embedder from ``model_patch_size`` (patch size x pooling kernel) and the audio projection
      from ``audio_samples_per_token`` / ``hidden_size`` / ``output_proj_dims`` (the frame
      width, ``audio_embed_dim`` in the config), defaulting to the released 12B's sizes.
    """
    cfg = json.loads(json.dumps(config))
    text = cfg.get("text_config", cfg)
    plc = text.get("per_layer_config") or {}
    types = text.get("layer_types") or []

    def fill(d: dict, key: str, value) -> None:
        if d.get(key) is None and value is not None:
            d[key] = value

    for idx, over in plc.items():
        if int(idx) < len(types) and types[int(idx)] == "full_attention":
            fill(text, "global_head_dim", over.get("head_dim"))
            if text.get("attention_k_eq_v"):  # full layers use their own KV head count only then
                fill(text, "num_global_key_value_heads", over.get("num_key_value_heads"))
    text.pop("per_layer_config", None)
    if text.get("model_type") == "gemma4_unified_text":
        fill(text, "hidden_size_per_layer_input", 0)
        vision = cfg.get("vision_config") or {}
        if "patch_size" in vision and "pooling_kernel_size" in vision:
            fill(vision, "model_patch_size", vision["patch_size"] * vision["pooling_kernel_size"])
        audio = cfg.get("audio_config") or {}
        if "audio_embed_dim" in audio:
            for key in ("audio_samples_per_token", "hidden_size", "output_proj_dims"):
                fill(audio, key, audio["audio_embed_dim"])
    return None if cfg == config else cfg


def peer_view(model: str, into: str) -> Optional[str]:
    """A folder under ``into`` that links every file of ``model`` except config.json, which is
    :func:`peer_config`'s; None when the peers read ``model`` as it is. The weights are the same
    files, and the report's "same ids" column shows the peers decode what we decode."""
    src = Path(model)
    cfg = peer_config(json.loads((src / "config.json").read_text()))
    if cfg is None:
        return None
    view = Path(into) / src.name
    view.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    (view / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return str(view)


# ----------------------------------------------------------------------------------------------
# orchestrator
# ----------------------------------------------------------------------------------------------


def prompt_ids(model: str, prompt: str, raw: bool, length: Optional[int]) -> List[int]:
    """Token ids of the prompt (chat template unless ``raw``); ``length`` repeats or cuts
    the text's ids to exactly that many tokens (the first id kept as BOS)."""
    from mtp_mlx import format_prompt
    from mtp_mlx.loading import hub, load_tokenizer

    tok = load_tokenizer(hub.resolve(model, "model"))
    ids = list(format_prompt(tok, prompt, raw=raw))
    if length:
        body = ids[1:] or ids
        ids = (ids[:1] + body * (length // max(1, len(body)) + 1))[:length]
    return ids


class Resident:
    """A worker process kept alive across rounds (small models: all cases stay loaded, so
    runs alternate one by one and load time is paid once)."""

    def __init__(self, case: str, job: dict, python: str):
        self.case = case
        f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(dict(job, case=case, resident=True), f)
        f.close()
        self.path = f.name
        env = dict(os.environ, PYTHONPATH=str(ROOT) if case not in PEER_CASES else "")
        self.p = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", "--job", self.path],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        self.head = self._read("READY ")

    def _read(self, tag: str) -> dict:
        for line in self.p.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
        err = self.p.stderr.read().strip().splitlines()[-5:]
        raise RuntimeError(f"{self.case} failed (exit {self.p.wait()}): " + " | ".join(err))

    def run(self) -> dict:
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        return self._read("RESULT ")

    def close(self) -> None:
        try:
            if self.p.poll() is None:
                self.p.stdin.write("quit\n")
                self.p.stdin.flush()
                self.p.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
        finally:
            os.unlink(self.path)


def run_case(case: str, job: dict, python: str, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(dict(job, case=case), f)
        path = f.name
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT) if case not in PEER_CASES else "")
        p = subprocess.run([python, str(Path(__file__).resolve()), "--worker", "--job", path],
                           capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        os.unlink(path)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"{case} failed (exit {p.returncode}): " + " | ".join(tail))


def summarize(results: Dict[str, List[dict]], reference: Optional[List[int]]) -> Dict[str, dict]:
    out = {}
    for case, procs in results.items():
        runs = [r for p in procs for r in p["runs"]]
        med = lambda key: statistics.median([r[key] for r in runs]) if runs else None  # noqa: E731
        drafted = sum(r["drafted"] for r in runs)
        out[case] = {
            "decode_tps": med("decode_tps"),
            "decode_tps_runs": [round(r["decode_tps"], 3) for r in runs],
            "ttft_s": med("ttft_s"),
            "load_s": statistics.median([p["load_s"] for p in procs]),
            "import_s": statistics.median([p["import_s"] for p in procs]),
            "engine_init_s": statistics.median([p.get("engine_init_s", 0.0) for p in procs]),
            "weights_bytes": procs[0]["weights_bytes"],
            "peak_mlx_bytes": max(r["peak_mlx_bytes"] for r in runs),
            "max_rss_bytes": max(p["max_rss_bytes"] for p in procs),
            "acceptance": sum(r["accepted"] for r in runs) / drafted if drafted else None,
            "same_ids_as_ours_plain": (all(r["ids"] == reference for r in runs) if reference is not None else None),
        }
        if out[case]["same_ids_as_ours_plain"] is False:
            ref = reference or []
            first = next((i for i, (a, b) in enumerate(zip(runs[0]["ids"], ref)) if a != b), min(len(ref), len(runs[0]["ids"])))
            out[case]["first_difference_at"] = first
    return out


RATIOS = (
    ("ours-spec", "vlm-mtp", "speculative: ours / mlx-vlm MTP"),
    ("ours-plain", "lm-plain", "plain: ours / mlx-lm"),
    ("ours-plain", "vlm-plain", "plain: ours / mlx-vlm"),
    ("ours-spec", "ours-plain", "ours: speculative / plain"),
    ("vlm-mtp", "vlm-plain", "mlx-vlm: MTP / plain"),
)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="target folder")
    ap.add_argument("--drafter", help="drafter folder")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--raw", action="store_true", help="no chat template")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="repeat/cut the prompt to this many ids")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-draft", type=int, default=3, help="K (mlx-vlm block size K + 1)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one process per case each)")
    ap.add_argument("--runs-per-process", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up generations per process")
    ap.add_argument("--warmup-tokens", type=int, default=None, help="tokens per warm-up (default --max-tokens)")
    ap.add_argument("--resident", action="store_true",
                    help="keep one process per case loaded and alternate single runs (small models)")
    ap.add_argument("--peers-python", default=DEFAULT_PEERS_PYTHON)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.model:
        ap.error("--model is required")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}: use {', '.join(CASES)}")
    if any(c in ("ours-spec", "vlm-mtp") for c in cases) and not args.drafter:
        ap.error("--drafter is required for ours-spec and vlm-mtp")
    ids = prompt_ids(args.model, args.prompt, args.raw, args.prompt_tokens)
    job = dict(model=str(Path(args.model).resolve()), drafter=str(Path(args.drafter).resolve()) if args.drafter else None,
               ids=ids, max_tokens=args.max_tokens, num_draft=args.num_draft, runs=args.runs_per_process,
               warmup=args.warmup, warmup_tokens=args.warmup_tokens or args.max_tokens)
    views = tempfile.TemporaryDirectory(prefix="mtp-mlx-peer-view-")
    peers = any(c in PEER_CASES for c in cases)
    for role in ("model", "drafter"):
        job[f"peer_{role}"] = job[role]
        view = peer_view(job[role], os.path.join(views.name, role)) if job[role] and peers else None
        if view is not None:
            job[f"peer_{role}"] = view
            print(f"the peers read {job[role]} through a view with a completed config.json: "
                  "the same weight files", file=sys.stderr)
    results: Dict[str, List[dict]] = {c: [] for c in cases}
    python = {c: args.peers_python if c in PEER_CASES else sys.executable for c in cases}
    residents: Dict[str, Resident] = {}
    failed: Dict[str, str] = {}  # a peer that cannot load this checkpoint is reported, not fatal
    try:
        if args.resident:
            for case in cases:
                try:
                    residents[case] = Resident(case, job, python[case])
                except RuntimeError as err:
                    failed[case] = str(err)
        for r in range(args.rounds):
            for case in cases:
                if case in failed:
                    continue
                t0 = time.perf_counter()
                try:
                    res = residents[case].run() if args.resident else run_case(case, job, python[case], args.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    failed[case] = str(err)
                    continue
                results[case].append(res)
                tps = ", ".join(f"{x['decode_tps']:.2f}" for x in res["runs"])
                print(f"[round {r + 1}/{args.rounds}] {case:<10} load {res['load_s']:.1f}s  decode tok/s {tps}  "
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    finally:
        for w in residents.values():
            w.close()
        views.cleanup()
    for case, err in failed.items():
        print(f"{case}: {err}", file=sys.stderr)
    results = {c: v for c, v in results.items() if v}
    reference = results["ours-plain"][0]["runs"][0]["ids"] if "ours-plain" in results else None
    summary = summarize(results, reference)

    for case in failed:
        print(f"{case}: failed ({failed[case][:160]})")
    print(f"\n{'case':<11} {'tok/s':>8} {'ttft s':>7} {'load s':>7} {'accept':>7} {'peak GB':>8} "
          f"{'RSS GB':>7} {'weights GB':>10} {'same ids':>8}")
    for case, s in summary.items():
        acc = f"{100 * s['acceptance']:.1f}%" if s["acceptance"] is not None else "-"
        same = {True: "yes", False: f"no@{s.get('first_difference_at')}", None: "-"}[s["same_ids_as_ours_plain"]]
        print(f"{case:<11} {s['decode_tps']:>8.2f} {s['ttft_s']:>7.2f} {s['load_s']:>7.1f} {acc:>7} "
              f"{s['peak_mlx_bytes'] / 1e9:>8.2f} {s['max_rss_bytes'] / 1e9:>7.2f} {s['weights_bytes'] / 1e9:>10.2f} {same:>8}")
    ratios = {}
    for a, b, label in RATIOS:
        if a in summary and b in summary and summary[b]["decode_tps"]:
            ratios[label] = summary[a]["decode_tps"] / summary[b]["decode_tps"]
            print(f"{label:<34} {ratios[label]:.3f}x")
    for case, s in summary.items():
        s["peak_over_weights"] = s["peak_mlx_bytes"] / s["weights_bytes"] if s["weights_bytes"] else None
    report = {
        "model": args.model, "drafter": args.drafter, "prompt_tokens": len(ids), "max_tokens": args.max_tokens,
        "num_draft": args.num_draft, "rounds": args.rounds, "runs_per_process": args.runs_per_process,
        "warmup": args.warmup, "peer_view": job["peer_model"] != job["model"] or job["peer_drafter"] != job["drafter"],
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "results": summary, "ratios": ratios, "failed": failed,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

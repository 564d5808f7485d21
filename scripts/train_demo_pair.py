#!/usr/bin/env python
"""Train the bundled demonstration pair: a tiny Gemma-4-architecture target and its MTP drafter.

Everything comes from text every Python installation has: the standard library's own source
files (code, comments, docstrings). Stages, all under ``--out`` (default ``build/demo/``):

1. corpus      stdlib ``*.py`` (no test suites, no codec tables), split into train / held-out
               files by a hash of their relative path.
2. tokenizer   sentencepiece BPE (4096 pieces, byte fallback, Gemma's special-token layout:
               0 <pad>, 1 <eos>, 2 <bos>, 105 <|turn>, 106 <turn|>) trained on the train files,
               converted to the ``tokenizer.json`` form the loader reads, with a Gemma-4-style
               chat template.
3. target      ``gemma4_text`` (Gemma4ForCausalLM) with the E2B features the drafter depends on:
               sliding + full layers (4:1, last full), a 64-token sliding window, KV-shared layers
               of both types, per-layer embeddings, double-wide MLP on shared layers. Trained with
               torch (bf16 autocast) on raw files and on chat-formatted "write this function"
               examples (answers: the function's code without its docstring), for a fixed
               number of steps with early stopping on held-out loss.
4. drafter     ``gemma4_assistant`` (4 layers s,s,s,f, centroid head), distilled from the frozen
               target exactly the way it is used at inference (convention B, ``mtp_mlx.decoding.draft``):
               every step of a round queries the single position P_b - 1 against the target's own
               K/V of tokens 0..P_b-1 (sliding layers: the last W), step 0's input is
               [target scaled embedding of the bonus token, target final-normed hidden at P_b - 1],
               later steps feed back ``post_projection`` of the drafter's normed hidden and the
               embedding of the previous token; the loss (cross-entropy to the target's greedy
               token plus a cluster loss for the centroid head) covers ``--draft-steps`` steps
               ahead. Three quarters of the data are the target's own greedy continuations (what
               it has to predict at inference), the rest corpus windows.
5. ship        both saved as HF folders (``target/``, ``assistant/``), converted to MLX float16 by
               ``mtp_mlx.loading.convert`` into ``mtp_mlx/demo/{target,assistant}``.
6. evaluate    with our runtime on held-out prompts: greedy acceptance and tokens per target
               forward at K = 1..6, plain vs speculative decode speed; the reference's acceptance
               (transformers' assisted generation) on the same prompts; all written to
               ``mtp_mlx/demo/TRAINING.json``.

Usage: ``python scripts/train_demo_pair.py [--out build/demo] [--seed 0] [--target-steps 1200]
[--drafter-steps 320]``: about 30 + 18 minutes of training on 2 shared CPU cores, about an hour
with the evaluation. ``make demo-pair`` runs it. ``--smoke`` runs every stage in a few minutes
(into ``build/demo-smoke`` and ``build/demo-smoke/mlx``, never the package).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import hashlib
import io
import json
import math
import platform
import random
import statistics
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

# Shared with the test fixtures: chat template and the Gemma turn markers / EOS ids.
from make_fixtures import (  # noqa: E402
    EOS_IDS,
    TOKENIZER_SPECIALS,
    copy_tokenizer,
    save_gemma_tokenizer,
)

S, F = "sliding_attention", "full_attention"
PAD, EOS, BOS, TURN, TURN_END = 0, 1, 2, 105, 106

VOCAB = 4096
SEQ_LEN = 256
HELDOUT_MOD = 10  # a file is held out when md5(relative path) % HELDOUT_MOD == 0
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "encodings", "pydoc_data"}

TARGET = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=8,
    layer_types=[S, S, S, S, F, S, S, F],
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    global_head_dim=64,
    attention_k_eq_v=False,
    hidden_size_per_layer_input=16,
    vocab_size_per_layer_input=VOCAB,
    num_kv_shared_layers=3,  # layers 5, 6, 7 (sliding, sliding, full): producers are 3 and 4
    use_double_wide_mlp=True,
    enable_moe_block=False,
    final_logit_softcapping=30.0,
    sliding_window=64,
    max_position_embeddings=8192,
)
DRAFTER = dict(
    hidden_size=64,
    intermediate_size=256,
    num_attention_heads=4,
    num_centroids=64,
    centroid_intermediate_top_k=8,
)
NUM_ASSISTANT_TOKENS = 3


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# 1. corpus
# ----------------------------------------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append(f)
    return root, files


def is_heldout(rel: str) -> bool:
    return int(hashlib.md5(rel.encode()).hexdigest(), 16) % HELDOUT_MOD == 0


def read_corpus() -> dict:
    """{"train": [(rel, text)], "heldout": [(rel, text)], "root": str}"""
    root, files = stdlib_files()
    out = {"train": [], "heldout": [], "root": str(root)}
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n").replace("\t", "    ")
        if not text.strip():
            continue
        rel = f.relative_to(root).as_posix()
        out["heldout" if is_heldout(rel) else "train"].append((rel, text))
    return out


def functions(text: str) -> list[tuple[str, str, str]]:
    """(signature line(s), first docstring line or "", dedented source without its docstring) of
    every function in a file whose source has 3..40 lines and whose body is more than a docstring.

    The answers of the chat examples are code only: with the docstrings kept, a model this small
    answers "write this function" with a docstring and then repeats one phrase in it under greedy
    decoding (measured on the first bundled pair); without them it answers with code."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
            continue
        start, end = node.lineno - 1, node.end_lineno
        if not 3 <= end - start <= 40:
            continue
        body0 = node.body[0].lineno - 1
        doc = ast.get_docstring(node) or ""
        keep = range(start, end)
        if doc:
            if len(node.body) == 1:
                continue
            d0, d1 = body0, node.body[0].end_lineno
            keep = [i for i in keep if not d0 <= i < d1]
        src = textwrap.dedent("\n".join(lines[i] for i in keep))
        sig = textwrap.dedent("\n".join(lines[start:body0])).strip()
        if not sig.endswith(":") or len(sig) > 200:
            sig = src.splitlines()[0].strip()
            if not sig.endswith(":"):
                continue
        doc = doc.strip().splitlines()[0].strip() if doc.strip() else ""
        out.append((sig, doc, src))
    return out


# ----------------------------------------------------------------------------------------------
# 2. tokenizer
# ----------------------------------------------------------------------------------------------


def build_tokenizer(corpus: dict, dst: Path, seed: int) -> None:
    """sentencepiece BPE on the train files, saved as tokenizer.json (GemmaTokenizer layout)."""
    import sentencepiece as spm

    dst.mkdir(parents=True, exist_ok=True)
    chunks = []
    for _, text in corpus["train"]:
        lines = text.splitlines()
        chunks += ["\n".join(lines[i : i + 8]) for i in range(0, len(lines), 8)]
    chunks = [c for c in chunks if c.strip() and len(c.encode()) < 4000]
    random.Random(seed).shuffle(chunks)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=model,
        vocab_size=VOCAB,
        model_type="bpe",
        pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=TOKENIZER_SPECIALS,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=0.9999,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        input_sentence_size=200000,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=200000,
        num_threads=2,
        minloglevel=2,
    )
    check = save_gemma_tokenizer(model.getvalue(), dst, VOCAB)
    sample = "def f(x):\n    \"\"\"Doc.\"\"\"\n\treturn x  # é ü 💡\n"
    ids = check(sample).input_ids
    assert ids[0] == BOS and check.decode(ids[1:]) == sample, check.decode(ids[1:])


def load_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


# ----------------------------------------------------------------------------------------------
# encoding: raw file stream + chat examples
# ----------------------------------------------------------------------------------------------


def chat_ids(tok, user: str, answer: str | None) -> list[int]:
    """Token ids of one chat exchange exactly as the chat template + tokenizer produce them
    (``answer=None``: the generation prompt only)."""
    ids = [BOS, TURN] + tok.encode("user\n" + user.strip(), add_special_tokens=False)
    ids += [TURN_END] + tok.encode("\n", add_special_tokens=False) + [TURN]
    ids += tok.encode("model\n", add_special_tokens=False)
    if answer is not None:
        ids += tok.encode(answer, add_special_tokens=False) + [TURN_END]
        ids += tok.encode("\n", add_special_tokens=False)
    return ids


def chat_examples(files: list, rng: random.Random) -> list[tuple[str, str]]:
    """(user prompt, answer) pairs: a function's signature (or its docstring's first line)
    -> the function's source."""
    out = []
    for _, text in files:
        for sig, doc, src in functions(text):
            user = doc if doc and rng.random() < 0.3 else sig
            out.append((user, src))
    rng.shuffle(out)
    return out


def encode_split(tok, files: list, rng: random.Random) -> dict:
    """{"raw": flat ids of <bos> file <eos> ..., "chat": flat ids of packed chat examples,
    "chat_prompts": [(user, answer)]}"""
    import numpy as np

    order = list(files)
    rng.shuffle(order)
    texts = [t for _, t in order]
    enc = tok(texts, add_special_tokens=False).input_ids
    raw = []
    for ids in enc:
        raw += [BOS] + ids + [EOS]
    pairs = chat_examples(order, rng)
    chat = []
    for user, answer in pairs:
        chat += chat_ids(tok, user, answer)
    return {"raw": np.asarray(raw, np.int32), "chat": np.asarray(chat, np.int32), "chat_pairs": pairs}


# ----------------------------------------------------------------------------------------------
# HF models and folders
# ----------------------------------------------------------------------------------------------


def target_config():
    import transformers as tf

    return tf.Gemma4TextConfig(
        **TARGET,
        vocab_size=VOCAB,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=list(EOS_IDS),
        attention_bias=False,
        use_bidirectional_attention=None,
        attn_implementation="sdpa",
    )


def drafter_config():
    import transformers as tf

    t, d = TARGET, DRAFTER
    text = tf.Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        global_head_dim=t["global_head_dim"],
        attention_k_eq_v=False,
        num_kv_shared_layers=4,
        use_double_wide_mlp=False,
        final_logit_softcapping=None,
        sliding_window=t["sliding_window"],
        max_position_embeddings=t["max_position_embeddings"],
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        use_bidirectional_attention=None,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        enable_moe_block=False,
    )
    return tf.Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=t["hidden_size"],
        use_ordered_embeddings=True,
        num_centroids=d["num_centroids"],
        centroid_intermediate_top_k=d["centroid_intermediate_top_k"],
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def _released_text_config(tc: dict, global_kv_heads=None) -> dict:
    """transformers 5.23 saves a derived ``per_layer_config``; released files carry the keys."""
    tc = dict(tc)
    tc.pop("per_layer_config", None)
    tc["global_head_dim"] = TARGET["global_head_dim"]
    tc["num_global_key_value_heads"] = global_kv_heads
    tc["sliding_window"] = TARGET["sliding_window"]
    return dict(sorted(tc.items()))


def save_target(model, folder: Path, tok_dir: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    cfg = _released_text_config(json.loads((folder / "config.json").read_text()))
    cfg["eos_token_id"] = list(EOS_IDS)
    cfg["transformers_version"] = "5.23.0"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gc = {"bos_token_id": BOS, "do_sample": False, "eos_token_id": list(EOS_IDS), "pad_token_id": PAD,
          "transformers_version": "5.23.0"}
    (folder / "generation_config.json").write_text(json.dumps(gc, indent=2) + "\n")
    copy_tokenizer(tok_dir, folder)


def save_drafter(model, folder: Path, num_assistant_tokens: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"] = _released_text_config(cfg["text_config"])
    (folder / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    # transformers' assisted generation reads num_assistant_tokens from here
    gc = {"bos_token_id": BOS, "eos_token_id": list(EOS_IDS), "pad_token_id": PAD,
          "num_assistant_tokens": int(num_assistant_tokens), "num_assistant_tokens_schedule": "constant",
          "transformers_version": "5.23.0"}
    (folder / "generation_config.json").write_text(json.dumps(gc, indent=2) + "\n")


def n_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------


def random_windows(stream, n: int, length: int, rng):
    import numpy as np

    starts = rng.integers(0, len(stream) - length, size=n)
    return np.stack([stream[s : s + length] for s in starts])


def fixed_windows(stream, n: int, length: int):
    import numpy as np

    step = (len(stream) - length) // max(1, n)
    return np.stack([stream[i * step : i * step + length] for i in range(n)])


def mixed_batch(data: dict, batch: int, rng, length: int = SEQ_LEN + 1):
    """Half raw-file windows, half chat-example windows, [batch, length] int64."""
    import numpy as np
    import torch

    half = batch // 2
    x = np.concatenate([random_windows(data["raw"], batch - half, length, rng),
                        random_windows(data["chat"], half, length, rng)])
    return torch.as_tensor(x.astype(np.int64))


class Budget:
    """A fixed number of optimizer steps (reproducible: the LR schedule follows the step count),
    with a wall-clock cap as a safety stop on slow machines; steps 0 = time budget only, the
    schedule then follows elapsed time."""

    def __init__(self, minutes: float, steps: int):
        self.seconds, self.steps, self.t0, self.step = minutes * 60.0, steps, time.time(), 0
        self.capped = False

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    @property
    def frac(self) -> float:
        if self.steps:
            return min(1.0, self.step / self.steps)
        return min(1.0, self.elapsed / self.seconds)

    def done(self) -> bool:
        if self.elapsed >= self.seconds:
            self.capped = bool(self.steps) and self.step < self.steps
            return True
        return bool(self.steps) and self.step >= self.steps

    def why(self, early: bool) -> str:
        if early:
            return "early stop: held-out loss stopped improving"
        if self.capped:
            return f"wall-clock cap ({self.seconds / 60:g} min) before {self.steps} steps"
        return f"step budget ({self.steps} steps)" if self.steps else f"time budget ({self.seconds / 60:g} min)"


class EarlyStop:
    """Keeps a copy of the weights at the best held-out evaluation; training stops after
    ``patience`` evaluations in a row without an improvement of at least ``min_delta``."""

    def __init__(self, patience: int, min_delta: float = 1e-3):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.state, self.row, self.bad = float("inf"), None, None, 0

    def update(self, loss: float, model, row: dict) -> bool:
        """Record one evaluation (its held-out loss and log row); True: stop training."""
        if loss < self.best - self.min_delta:
            self.best, self.state, self.row, self.bad = loss, copy.deepcopy(model.state_dict()), row, 0
        else:
            self.bad += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.bad >= self.patience


def lr_at(budget: Budget, peak: float, warmup: int) -> float:
    if budget.step < warmup:
        return peak * (budget.step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * budget.frac)))


def autocast():
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# 3. target
# ----------------------------------------------------------------------------------------------


def lm_loss(model, x):
    import torch.nn.functional as Fn

    with autocast():
        logits = model(input_ids=x[:, :-1]).logits
    return Fn.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def heldout_set(heldout: dict, n_raw: int, n_chat: int):
    import numpy as np
    import torch

    x = np.concatenate([fixed_windows(heldout["raw"], n_raw, SEQ_LEN + 1),
                        fixed_windows(heldout["chat"], n_chat, SEQ_LEN + 1)])
    return torch.as_tensor(x.astype(np.int64))


def evaluate_target(model, xs, n_raw: int) -> dict:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(xs), 8):
            x = xs[i : i + 8]
            with autocast():
                logits = model(input_ids=x[:, :-1]).logits.float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
            losses.append(-lp.mean(-1))
    model.train()
    per_seq = torch.cat(losses)
    return {"loss": per_seq.mean().item(), "raw": per_seq[:n_raw].mean().item(), "chat": per_seq[n_raw:].mean().item()}


def train_target(args, train: dict, heldout: dict, log_rows: list):
    import numpy as np
    import torch
    import transformers as tf

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = tf.Gemma4ForCausalLM(target_config()).to(torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.target_lr, betas=(0.9, 0.95), eps=1e-8)
    n_raw, n_chat = (6, 2) if args.smoke else (24, 8)
    xs_ho = heldout_set(heldout, n_raw, n_chat)
    budget = Budget(args.target_minutes, args.target_steps)
    stop, evals = EarlyStop(args.patience), 0
    tokens, t_log, recent = 0, time.time(), []
    log(f"target: {n_params(model) / 1e6:.2f} M parameters; {args.target_steps} steps, cap {args.target_minutes} min")
    while True:
        last = budget.done()
        if budget.step % args.eval_every == 0 or last:
            ev = evaluate_target(model, xs_ho, n_raw)
            evals += 1
            row = dict(stage="target", step=budget.step, minutes=round(budget.elapsed / 60, 2), tokens=tokens,
                       train_loss=round(float(np.mean(recent)), 4) if recent else None,
                       heldout_loss=round(ev["loss"], 4), heldout_raw=round(ev["raw"], 4),
                       heldout_chat=round(ev["chat"], 4))
            log_rows.append(row)
            log(f"target step {row['step']} {row['minutes']} min: train {row['train_loss']} held-out "
                f"{row['heldout_loss']} (raw {row['heldout_raw']}, chat {row['heldout_chat']})")
            recent = []
            if stop.update(ev["loss"], model, row):
                log(f"target: held-out loss stopped improving ({args.patience} evaluations); stopping")
                break
        if last:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(budget, args.target_lr, 30)
        x = mixed_batch(train, args.target_batch, rng)
        loss = lm_loss(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        budget.step += 1
        tokens += x[:, 1:].numel()
        recent.append(loss.item())
        if time.time() - t_log > 60:
            log(f"target step {budget.step}: loss {np.mean(recent):.3f}, {tokens / budget.elapsed:.0f} tok/s")
            t_log = time.time()
    model.load_state_dict(stop.state)
    model.eval()
    best_row = stop.row
    info = dict(params=n_params(model), steps=budget.step, tokens=tokens, minutes=round(budget.elapsed / 60, 2),
                best_step=best_row["step"], heldout_loss=best_row["heldout_loss"],
                heldout_loss_raw=best_row["heldout_raw"], heldout_loss_chat=best_row["heldout_chat"],
                stopped=budget.why(stop.stopped), batch=args.target_batch, seq_len=SEQ_LEN, peak_lr=args.target_lr, evaluations=evals)
    return model, info


# ----------------------------------------------------------------------------------------------
# 4. drafter
# ----------------------------------------------------------------------------------------------


def cluster_tokens(emb, n_clusters: int, seed: int, iters: int = 25):
    """Balanced k-means over the target's (tied input/output) token embeddings.

    Returns ``token_ordering`` (cluster c = ordering[c*m:(c+1)*m]). Tokens whose output rows
    are close get similar logits from any hidden state, so the target's likely next tokens
    fall into few clusters; that is what the centroid head's top-k cluster pick needs.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    V = emb.shape[0]
    m = V // n_clusters
    x = torch.nn.functional.normalize(emb.float(), dim=-1)
    cent = x[torch.randperm(V, generator=g)[:n_clusters]].clone()
    for it in range(iters + 1):
        sim = x @ cent.T  # [V, C]
        if it < iters:  # plain spherical k-means first
            assign = sim.argmax(-1)
        else:  # then one balanced pass: best (token, cluster) pairs first, capacity m per cluster
            order = torch.argsort(sim.reshape(-1), descending=True).tolist()
            assign = [-1] * V
            room = [m] * n_clusters
            left = V
            for flat in order:
                t, c = divmod(flat, n_clusters)
                if assign[t] < 0 and room[c] > 0:
                    assign[t] = c
                    room[c] -= 1
                    left -= 1
                    if left == 0:
                        break
            assign = torch.tensor(assign, dtype=torch.long)
        new = torch.zeros(n_clusters, x.shape[1]).index_add_(0, assign, x)
        empty = new.norm(dim=-1) == 0
        new[empty] = x[torch.randint(0, V, (int(empty.sum()),), generator=g)]
        cent = torch.nn.functional.normalize(new, dim=-1)
    return torch.argsort(assign, stable=True), assign


def init_drafter(drafter, target, ordering, assign, seed: int) -> None:
    """Start the drafter head from the target's embedding: its table is the target's rows in
    their top principal directions, its centroids the cluster means of that table."""
    import torch

    torch.manual_seed(seed)
    E = target.model.embed_tokens.weight.detach().float()  # [V, H]
    Hd = drafter.model.embed_tokens.weight.shape[1]
    _, _, Vt = torch.linalg.svd(E - E.mean(0), full_matrices=False)
    Ed = E @ Vt[:Hd].T
    Ed = Ed * (E.norm(dim=-1).mean() / Ed.norm(dim=-1).mean())
    C = drafter.masked_embedding.num_centroids
    with torch.no_grad():
        drafter.model.embed_tokens.weight.copy_(Ed)
        cent = torch.zeros(C, Hd).index_add_(0, assign, Ed) / (len(assign) // C)
        drafter.masked_embedding.centroids.weight.copy_(cent)
        drafter.masked_embedding.token_ordering.copy_(ordering)


def target_features(target, x):
    """What the target hands the drafter for a whole sequence x [B, T]: scaled token
    embeddings, final-normed hidden states, producer K/V, and its greedy next-token choices."""
    import torch

    with torch.no_grad(), autocast():
        out = target.model(input_ids=x, return_shared_kv_states=True, use_cache=False)
        hidden = out.last_hidden_state.float()
        greedy = target.lm_head(out.last_hidden_state).argmax(-1)  # the softcap is monotonic
        emb = target.model.embed_tokens(x).float()
        kv = {t: (k.float(), v.float()) for t, (k, v) in out.shared_kv_states.items()}
    return emb, hidden, kv, greedy


def draft_masks(T: int, window: int):
    """Convention B for every position at once: the query at position p (the last committed
    token) sees keys 0..p; sliding layers only p - window < s <= p."""
    import torch

    i = torch.arange(T)
    causal = i[None, :] <= i[:, None]
    sliding = causal & (i[:, None] - i[None, :] < window)
    return {F: causal[None, None], S: sliding[None, None]}


def drafter_rollout(drafter, emb, hidden, kv, x, steps: int, masks):
    """Unrolled training forward: for every position p and step i the drafter gets the token
    at p + 1 + i (step 0: target hidden at p; later: its own fed-back projection) and predicts
    the target's distribution for position p + 2 + i. Returns per-step (hd, cluster logits)."""
    import torch

    B, T, _ = hidden.shape
    pos = torch.arange(T)[None].expand(B, T)
    g = hidden
    outs = []
    for i in range(steps):
        e = torch.zeros_like(emb)
        e[:, : T - 1 - i] = emb[:, 1 + i :]
        h = drafter.pre_projection(torch.cat([e, g], -1))
        h = drafter.model(inputs_embeds=h, attention_mask=masks, position_ids=pos,
                          shared_kv_states=kv, use_cache=False,
                          output_hidden_states=True).last_hidden_state  # (no KV-shared slicing: no PLE)
        g = drafter.post_projection(h)
        outs.append((h, drafter.masked_embedding.centroids(h)))
    return outs


def drafter_loss(drafter, outs, greedy, assign, ordering, cluster_weight: float = 0.5, metrics: bool = False):
    """Mean over steps of the cross-entropy to the target's greedy token (dense head over the
    full vocabulary) plus a cross-entropy to that token's cluster for the centroid head.
    With ``metrics``: also per-step top-1 agreement of the dense head and of the masked
    (centroid top-k) head, i.e. the greedy acceptance of each step given the previous ones."""
    import torch
    import torch.nn.functional as Fn

    T = greedy.shape[1]
    E = drafter.model.embed_tokens.weight
    C = drafter.masked_embedding.num_centroids
    k = drafter.masked_embedding.centroid_intermediate_top_k
    total, agree, agree_masked = 0.0, [], []
    for i, (h, cl) in enumerate(outs):
        n = T - 1 - i  # query positions p = 0..T-2-i; the label is the target's choice at p + 1 + i
        tgt = greedy[:, 1 + i : 1 + i + n]
        logits = h[:, :n] @ E.T
        loss = Fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss = loss + cluster_weight * Fn.cross_entropy(cl[:, :n].reshape(-1, C), assign[tgt].reshape(-1))
        total = total + loss / len(outs)
        if metrics:
            with torch.no_grad():
                agree.append((logits.argmax(-1) == tgt).float().mean().item())
                top = cl[:, :n].topk(k, -1).indices  # [B, n, k]
                cand = ordering.view(C, -1)[top].flatten(-2)  # [B, n, k*m] tokens the masked head scores
                pick = cand.gather(-1, logits.gather(-1, cand).argmax(-1, keepdim=True))[..., 0]
                agree_masked.append((pick == tgt).float().mean().item())
    return total, agree, agree_masked


def greedy_continuations(target, prompts, new_tokens: int, batch: int = 64):
    """The target's own greedy continuations (transformers generate, no EOS stop)."""
    import numpy as np
    import torch

    outs = []
    with torch.no_grad(), autocast():
        for i in range(0, len(prompts), batch):
            x = torch.as_tensor(prompts[i : i + batch].astype(np.int64))
            y = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=[-1], pad_token_id=PAD)
            outs.append(y.numpy())
    return np.concatenate(outs)


def chat_prompt_windows(chat_stream, model_turn: list, n: int, length: int, rng):
    """``n`` windows [n, length] of the packed chat stream ending right after ``<|turn>model\\n``
    (``model_turn`` = the ids of ``model\\n``): generation prompts in the chat format."""
    import numpy as np

    m = len(model_turn)
    starts = np.nonzero(chat_stream[: len(chat_stream) - m] == TURN)[0]
    ok = np.ones(len(starts), bool)
    for j, t in enumerate(model_turn):
        ok &= chat_stream[starts + 1 + j] == t
    ends = starts[ok] + 1 + m
    ends = ends[ends >= length]
    ends = rng.choice(ends, size=n, replace=len(ends) < n)
    return np.stack([chat_stream[e - length : e] for e in ends])


PROMPT_LEN = 64


def drafter_heldout(target, heldout: dict, model_turn: list, rng, n: int):
    """Fixed held-out drafter batch: n/2 corpus windows + n/2 greedy continuations of held-out
    prompts (half raw, half chat)."""
    import numpy as np
    import torch

    corpus = np.concatenate([fixed_windows(heldout["raw"], n // 4, SEQ_LEN + 1),
                             fixed_windows(heldout["chat"], n // 4, SEQ_LEN + 1)])
    prompts = np.concatenate([fixed_windows(heldout["raw"], n // 4, PROMPT_LEN),
                              chat_prompt_windows(heldout["chat"], model_turn, n // 4, PROMPT_LEN, rng)])
    gen = greedy_continuations(target, prompts, SEQ_LEN + 1 - PROMPT_LEN)
    return torch.as_tensor(np.concatenate([corpus, gen]).astype(np.int64))


def train_drafter(args, target, train: dict, heldout: dict, tok, log_rows: list):
    import numpy as np
    import torch
    import transformers as tf

    torch.manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    C = DRAFTER["num_centroids"]
    ordering, assign = cluster_tokens(target.model.embed_tokens.weight.detach(), C, args.seed)
    log(f"drafter: token clusters ready in {time.time() - t0:.1f}s")
    drafter = tf.Gemma4AssistantForCausalLM(drafter_config()).to(torch.float32)
    init_drafter(drafter, target, ordering, assign, args.seed + 2)
    drafter.train()

    # The target's own greedy continuations: the text the drafter has to predict at inference.
    model_turn = tok.encode("model\n", add_special_tokens=False)
    t0 = time.time()
    n = args.gen_sequences
    prompts = np.concatenate([random_windows(train["raw"], n // 2, PROMPT_LEN, rng),
                              chat_prompt_windows(train["chat"], model_turn, n - n // 2, PROMPT_LEN, rng)])
    generated = greedy_continuations(target, prompts, SEQ_LEN + 1 - PROMPT_LEN)
    xs_ho = drafter_heldout(target, heldout, model_turn, rng, 8 if args.smoke else 32)
    gen_minutes = (time.time() - t0) / 60
    log(f"drafter: {len(generated)} greedy continuations + held-out set in {gen_minutes:.1f} min")

    opt = torch.optim.AdamW(drafter.parameters(), lr=args.drafter_lr, betas=(0.9, 0.95), weight_decay=0.01)
    masks = draft_masks(SEQ_LEN + 1, TARGET["sliding_window"])
    steps = args.draft_steps
    budget = Budget(args.drafter_minutes, args.drafter_steps)
    stop, tokens, recent, t_log = EarlyStop(args.patience), 0, [], time.time()
    log(f"drafter: {n_params(drafter) / 1e6:.2f} M parameters; {steps} draft steps per round; "
        f"{args.drafter_steps} optimizer steps, cap {args.drafter_minutes} min")
    while True:
        last = budget.done()
        if budget.step % args.eval_every == 0 or last:
            drafter.eval()
            with torch.no_grad():
                ev_loss, ev_agree, ev_masked = [], [], []
                for i in range(0, len(xs_ho), 8):
                    feats = target_features(target, xs_ho[i : i + 8])
                    outs = drafter_rollout(drafter, *feats[:3], xs_ho[i : i + 8], steps, masks)
                    loss, agree, agree_m = drafter_loss(drafter, outs, feats[3], assign, ordering, metrics=True)
                    ev_loss.append(loss.item())
                    ev_agree.append(agree)
                    ev_masked.append(agree_m)
            drafter.train()
            ev = float(np.mean(ev_loss))
            row = dict(stage="drafter", step=budget.step, minutes=round(budget.elapsed / 60, 2), tokens=tokens,
                       train_loss=round(float(np.mean(recent)), 4) if recent else None, heldout_loss=round(ev, 4),
                       heldout_top1_agreement=[round(float(a), 3) for a in np.mean(ev_agree, 0)],
                       heldout_top1_agreement_masked_head=[round(float(a), 3) for a in np.mean(ev_masked, 0)])
            log_rows.append(row)
            log(f"drafter step {row['step']} {row['minutes']} min: train {row['train_loss']} held-out {ev:.4f} "
                f"agreement per step {row['heldout_top1_agreement_masked_head']}")
            recent = []
            if stop.update(ev, drafter, row):
                log(f"drafter: held-out loss stopped improving ({args.patience} evaluations); stopping")
                break
        if last:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(budget, args.drafter_lr, 20)
        half = int(round(args.drafter_batch * args.generated_fraction))
        rows = rng.integers(0, len(generated), size=half)
        x = torch.cat([torch.as_tensor(generated[rows].astype(np.int64)),
                       mixed_batch(train, args.drafter_batch - half, rng)])
        feats = target_features(target, x)
        outs = drafter_rollout(drafter, *feats[:3], x, steps, masks)
        loss, _, _ = drafter_loss(drafter, outs, feats[3], assign, ordering)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        budget.step += 1
        tokens += x.numel()
        recent.append(loss.item())
        if time.time() - t_log > 60:
            log(f"drafter step {budget.step}: loss {np.mean(recent):.3f}, {tokens / budget.elapsed:.0f} tok/s")
            t_log = time.time()
    drafter.load_state_dict(stop.state)
    best_row = stop.row
    drafter.eval()
    info = dict(params=n_params(drafter), steps=budget.step, tokens=tokens, minutes=round(budget.elapsed / 60, 2),
                data_generation_minutes=round(gen_minutes, 2), generated_sequences=len(generated),
                best_step=best_row["step"], heldout_loss=best_row["heldout_loss"],
                heldout_top1_agreement=best_row["heldout_top1_agreement"],
                heldout_top1_agreement_masked_head=best_row["heldout_top1_agreement_masked_head"],
                stopped=budget.why(stop.stopped), draft_steps=steps, batch=args.drafter_batch, peak_lr=args.drafter_lr,
                token_clusters="balanced k-means (cosine) over the target's tied embedding rows")
    return drafter, info


# ----------------------------------------------------------------------------------------------
# 6. evaluation (our runtime) and the reference
# ----------------------------------------------------------------------------------------------


def eval_prompts(tok, files: list, n_raw: int, n_chat: int, seed: int) -> list[dict]:
    """Held-out prompts: raw code prefixes (<bos> + up to 96 tokens ending at a line break) and
    chat prompts asking for a held-out function from its signature or docstring."""
    rng = random.Random(seed)
    out = []
    pool = [(rel, t) for rel, t in files if len(t) > 2000]
    for rel, text in rng.sample(pool, n_raw):
        breaks = [i + 1 for i, c in enumerate(text) if c == "\n" and 600 < i < len(text) - 600]
        cut = rng.choice(breaks)
        ids = tok.encode(text[:cut], add_special_tokens=False)[-96:]
        out.append({"kind": "raw", "source": rel, "prompt": tok.decode(ids), "ids": [BOS] + ids})
    funcs = [(rel, f) for rel, t in files for f in functions(t)]
    for rel, (sig, doc, _) in rng.sample(funcs, n_chat):
        user = doc if doc and rng.random() < 0.3 else sig
        out.append({"kind": "chat", "source": rel, "prompt": user, "ids": chat_ids(tok, user, None)})
    return out


def run_ours(pair, ids: list, k: int, max_tokens: int) -> dict:
    from mtp_mlx.decoding.engine import Engine, bare_pair, generate_ids

    engine = Engine(bare_pair(pair.target, pair.drafter if k else None, eos_ids=EOS_IDS), max_batch=1)
    ((tokens, st),) = generate_ids(engine, [ids], max_tokens=max_tokens, num_draft=k)
    return {"tokens": tokens, "rounds": st.rounds, "round_tokens": max(0, st.generation_tokens - 1),
            "drafted": st.drafted, "accepted": st.accepted}


def evaluate_ours(pair, prompts: list, ks, max_tokens: int) -> dict:
    plain = [run_ours(pair, p["ids"], 0, max_tokens)["tokens"] for p in prompts]
    res = {}
    for k in ks:
        runs = [run_ours(pair, p["ids"], k, max_tokens) for p in prompts]
        drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
        res[str(k)] = {
            "acceptance": round(accepted / max(1, drafted), 4),
            "tokens_per_forward": round(sum(r["round_tokens"] for r in runs) / max(1, sum(r["rounds"] for r in runs)), 3),
            "accepted": accepted,
            "drafted": drafted,
            "acceptance_raw": _rate([r for r, p in zip(runs, prompts) if p["kind"] == "raw"]),
            "acceptance_chat": _rate([r for r, p in zip(runs, prompts) if p["kind"] == "chat"]),
            "identical_to_plain_greedy": all(r["tokens"] == t for r, t in zip(runs, plain)),
        }
        log(f"ours K={k}: acceptance {res[str(k)]['acceptance']:.3f}, "
            f"{res[str(k)]['tokens_per_forward']:.2f} tokens/forward, lossless {res[str(k)]['identical_to_plain_greedy']}")
    return {"per_k": res, "generated_tokens": sum(len(t) for t in plain)}


def _rate(runs: list) -> float:
    return round(sum(r["accepted"] for r in runs) / max(1, sum(r["drafted"] for r in runs)), 4)


def evaluate_reference(target_dir: Path, drafter_dir: Path, prompts: list, ks, max_tokens: int) -> dict:
    from tests import reference

    res = {}
    for k in ks:
        t0 = time.time()
        runs = [reference.hf_assisted_greedy(target_dir, drafter_dir, p["ids"], max_tokens, k) for p in prompts]
        drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
        res[str(k)] = {"acceptance": round(accepted / max(1, drafted), 4), "accepted": accepted, "drafted": drafted,
                       "tokens_per_forward": round(sum(len(r["tokens"]) - 1 for r in runs) / max(1, sum(len(r["rounds"]) for r in runs)), 3),
                       "minutes": round((time.time() - t0) / 60, 2)}
        log(f"reference K={k}: acceptance {res[str(k)]['acceptance']:.3f}")
    return res


def measure_speed(pair, prompts: list, ks, max_tokens: int, repeats: int) -> dict:
    """Decode tokens/s (prefill excluded), median over prompts x repeats, plain and speculative."""
    from mtp_mlx import api

    def tps(k):
        vals = []
        for _ in range(repeats):
            for p in prompts:
                last = None
                for last in api.stream_generate(pair, p["ids"], max_tokens=max_tokens, num_draft_tokens=max(k, 1),
                                                use_drafter=k > 0):
                    pass
                vals.append(last.generation_tps)
        return round(statistics.median(vals), 1)

    tps(0)  # warm-up
    out = {"plain": tps(0)}
    for k in ks:
        out[f"speculative_k{k}"] = tps(k)
    log(f"decode speed (tokens/s, median): {out}")
    return out


def check_training_matches_runtime(target_dir: Path, drafter_dir: Path, seq: list, positions) -> dict:
    """The drafter's training forward (torch, ``drafter_rollout``) against our MLX runtime's
    drafting (``mtp_mlx.decoding.draft``, convention B) on the float32 HF folders: same drafts and
    the same head hidden states, for query positions before and past the sliding window."""
    import mlx.core as mx
    import numpy as np
    import torch
    import transformers as tf

    from mtp_mlx import load
    from mtp_mlx.decoding.draft import draft_context

    pair = load(str(target_dir), str(drafter_dir))
    T, D = pair.target, pair.drafter
    tt = tf.Gemma4ForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    dd = tf.Gemma4AssistantForCausalLM.from_pretrained(str(drafter_dir), dtype=torch.float32,
                                                       attn_implementation="sdpa").eval()
    worst, same = 0.0, True
    for p in positions:
        cache = T.make_cache(max_draft=4)
        out = T(mx.array([seq[: p + 1]]), cache)  # committed tokens 0..p: P_b = p + 1
        ctx = draft_context(cache, T.cfg.sliding_window, "B")
        tok, hidden, hds, drafts = mx.array([[seq[p + 1]]]), out.hidden[:, -1:], [], []
        for _ in range(3):
            hd, hidden = D(T.embed(tok), hidden, ctx.kv, ctx.q_pos, ctx.masks)
            tok = D.argmax(hd)
            hds.append(np.array(hd[0, 0]))
            drafts.append(tok.item())
        x = torch.tensor([seq[: p + 2] + drafts[:2]])
        with torch.no_grad():
            o = tt.model(input_ids=x, return_shared_kv_states=True, use_cache=False)
            outs = drafter_rollout(dd, tt.model.embed_tokens(x), o.last_hidden_state, dict(o.shared_kv_states), x, 3,
                                   draft_masks(x.shape[1], TARGET["sliding_window"]))
            me = dd.masked_embedding
            for i, (h, cl) in enumerate(outs):
                worst = max(worst, float(np.abs(h[0, p].numpy() - hds[i]).max()))
                cand = me.token_ordering.view(me.num_centroids, -1)[cl[0, p].topk(me.centroid_intermediate_top_k).indices]
                cand = cand.reshape(-1)
                pick = int(cand[(dd.model.embed_tokens.weight[cand] @ h[0, p]).argmax()])
                same &= pick == drafts[i]
    return {"positions": list(positions), "max_abs_diff_head_hidden": worst, "same_drafts": bool(same)}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="work folder (default build/demo, --smoke: build/demo-smoke)")
    ap.add_argument("--package-dir", default=None,
                    help="where the MLX pair + TRAINING.json go (default mtp_mlx/demo, --smoke: OUT/mlx)")
    ap.add_argument("--seed", type=int, default=0)
    # One thread: on a CPU shared with other work, two OpenMP threads wait on each other and
    # run several times slower than one (measured: 6x on this project's 2-core machine).
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    # Step budgets (about 30 and 15 minutes on this project's shared 2-core CPU) keep a run
    # reproducible: same seed + same steps = same weights. The minutes only cap slow machines.
    ap.add_argument("--target-steps", type=int, default=1200, help="target optimizer steps (0: time budget only)")
    ap.add_argument("--target-minutes", type=float, default=50.0, help="target wall-clock cap")
    ap.add_argument("--target-batch", type=int, default=16)
    ap.add_argument("--target-lr", type=float, default=3e-3)
    ap.add_argument("--drafter-steps", type=int, default=320, help="drafter optimizer steps (0: time budget only)")
    ap.add_argument("--drafter-minutes", type=float, default=35.0, help="drafter wall-clock cap")
    ap.add_argument("--drafter-batch", type=int, default=16)
    ap.add_argument("--drafter-lr", type=float, default=3e-3)
    ap.add_argument("--draft-steps", type=int, default=4, help="draft steps per round covered by the loss")
    ap.add_argument("--generated-fraction", type=float, default=0.75,
                    help="share of each drafter batch taken from the target's own greedy continuations")
    ap.add_argument("--gen-sequences", type=int, default=2048, help="target greedy continuations for the drafter")
    ap.add_argument("--eval-every", type=int, default=40, help="steps between held-out evaluations")
    ap.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts (half raw, half chat)")
    ap.add_argument("--eval-max-tokens", type=int, default=256)
    ap.add_argument("--reuse-target", action="store_true", help="keep OUT/target (and its tokenizer) if present")
    ap.add_argument("--eval-ks", default="1,2,3,4,5,6", help="draft lengths K to evaluate")
    ap.add_argument("--skip-speed", action="store_true", help="do not measure decode speed")
    ap.add_argument("--skip-reference", action="store_true", help="do not run transformers' assisted generation")
    ap.add_argument("--smoke", action="store_true", help="every stage in about two minutes, outside the package")
    args = ap.parse_args(argv)
    if args.smoke:
        args.target_steps, args.target_minutes = min(args.target_steps, 30), min(args.target_minutes, 1.0)
        args.drafter_steps, args.drafter_minutes = min(args.drafter_steps, 8), min(args.drafter_minutes, 0.5)
        args.gen_sequences = min(args.gen_sequences, 16)
        args.eval_every = min(args.eval_every, 10)
        args.eval_prompts = min(args.eval_prompts, 4)
        args.eval_max_tokens = min(args.eval_max_tokens, 96)
    args.out = Path(args.out or ("build/demo-smoke" if args.smoke else "build/demo"))
    args.package_dir = Path(args.package_dir or (args.out / "mlx" if args.smoke else REPO / "mtp_mlx" / "demo"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    import transformers as tf
    from make_fixtures import patch_kv_sharing_modes_for_build

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    tf.logging.set_verbosity_error()
    patch_kv_sharing_modes_for_build()  # transformers raises for an all-shared assistant config
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings, curves = {}, []

    # 1-2. corpus and tokenizer
    t0 = time.time()
    corpus = read_corpus()
    tok_dir = out / "tokenizer"
    target_dir, drafter_dir = out / "target", out / "assistant"
    reuse = args.reuse_target and (target_dir / "model.safetensors").exists()
    if reuse:
        tok_dir = target_dir
    else:
        build_tokenizer(corpus, tok_dir, args.seed)
    tok = load_tokenizer(tok_dir)
    train = encode_split(tok, corpus["train"], random.Random(args.seed))
    heldout = encode_split(tok, corpus["heldout"], random.Random(args.seed + 1))
    corpus_info = {
        "source": "Python standard library *.py (no test suites, encodings/, pydoc_data/)",
        "python": platform.python_version(),
        "stdlib": corpus["root"],
        "train_files": len(corpus["train"]), "heldout_files": len(corpus["heldout"]),
        "train_chars": sum(len(t) for _, t in corpus["train"]),
        "heldout_chars": sum(len(t) for _, t in corpus["heldout"]),
        "train_tokens_raw": int(len(train["raw"])), "train_tokens_chat": int(len(train["chat"])),
        "heldout_tokens_raw": int(len(heldout["raw"])), "heldout_tokens_chat": int(len(heldout["chat"])),
        "chat_examples_train": len(train["chat_pairs"]), "vocab_size": VOCAB,
        "split": f"held out iff md5(path relative to stdlib) % {HELDOUT_MOD} == 0",
    }
    timings["corpus_tokenizer_minutes"] = round((time.time() - t0) / 60, 2)
    log(f"corpus: {corpus_info['train_files']} train / {corpus_info['heldout_files']} held-out files, "
        f"{corpus_info['train_tokens_raw'] + corpus_info['train_tokens_chat']} train tokens")

    # 3. target
    if reuse:
        target = tf.Gemma4ForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32,
                                                      attn_implementation="sdpa").eval()
        target_info = json.loads((out / "target_info.json").read_text())
        curves += target_info.pop("curve", [])
        log(f"target: reusing {target_dir}")
    else:
        target, target_info = train_target(args, train, heldout, curves)
        save_target(target, target_dir, tok_dir)
        (out / "target_info.json").write_text(json.dumps(
            dict(target_info, curve=[r for r in curves if r["stage"] == "target"]), indent=2) + "\n")
    timings["target_minutes"] = target_info["minutes"]

    # 4. drafter
    drafter, drafter_info = train_drafter(args, target, train, heldout, tok, curves)
    save_drafter(drafter, drafter_dir, NUM_ASSISTANT_TOKENS)
    timings["drafter_minutes"] = round(drafter_info["minutes"] + drafter_info["data_generation_minutes"], 2)
    seq = [int(t) for t in heldout["raw"][1000 : 1000 + 3 * SEQ_LEN // 2]]
    consistency = check_training_matches_runtime(target_dir, drafter_dir, seq, [10, 63, 64, 65, 300])
    log(f"training forward vs runtime drafting: {consistency}")

    # 5. MLX pair
    from mtp_mlx import load
    from mtp_mlx.loading.convert import convert

    pkg: Path = args.package_dir
    pkg.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(target_dir), str(pkg / "target"), drafter=str(drafter_dir), drafter_out=str(pkg / "assistant"),
                dtype="float16", force=True, progress=False)
    sizes = {"target_bytes": folder_bytes(pkg / "target"), "assistant_bytes": folder_bytes(pkg / "assistant")}
    log(f"MLX pair in {pkg}: {sizes}")

    # 6. evaluation
    t0 = time.time()
    pair = load(str(pkg / "target"), str(pkg / "assistant"))
    n_raw = args.eval_prompts // 2
    prompts = eval_prompts(tok, corpus["heldout"], n_raw, args.eval_prompts - n_raw, args.seed + 3)
    ks = [int(k) for k in args.eval_ks.split(",")]
    ours = evaluate_ours(pair, prompts, ks, args.eval_max_tokens)
    speed = None if args.skip_speed else measure_speed(pair, [prompts[0], prompts[n_raw]], [1, 2, 3, 4],
                                                       args.eval_max_tokens, 1 if args.smoke else 3)
    timings["evaluation_minutes"] = round((time.time() - t0) / 60, 2)
    reference = None
    if not args.skip_reference:
        t0 = time.time()
        reference = evaluate_reference(target_dir, drafter_dir, prompts, [3] if args.smoke else ks,
                                       args.eval_max_tokens)
        timings["reference_minutes"] = round((time.time() - t0) / 60, 2)
    timings["total_minutes"] = round((time.time() - t_start) / 60, 2)

    report = {
        "what": "demonstration pair: tiny Gemma-4-architecture target + MTP drafter trained on the Python "
                "standard library; not Gemma, not useful beyond showing speculative decoding offline",
        "recipe": "scripts/train_demo_pair.py" + (" --smoke" if args.smoke else ""),
        "seed": args.seed,
        "torch_threads": args.threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": tf.__version__},
        "corpus": corpus_info,
        "target": dict(target_info, config={k: v for k, v in TARGET.items()}),
        "drafter": dict(drafter_info, config=dict(DRAFTER, num_assistant_tokens=NUM_ASSISTANT_TOKENS)),
        "training_forward_vs_runtime": consistency,
        "mlx": dict(sizes, dtype="float16", converter="mtp_mlx.loading.convert"),
        "evaluation": {
            "prompts": [{k: p[k] for k in ("kind", "source", "prompt")} | {"tokens": len(p["ids"])} for p in prompts],
            "max_tokens": args.eval_max_tokens,
            "eos_ids": list(EOS_IDS),
            "greedy": True,
            "draft_position": "B",
            "ours": ours,
            "reference_hf_assisted": reference,
            "decode_tokens_per_second": speed,
        },
        "timings": timings,
        "curves": curves,
    }
    (pkg / "TRAINING.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {pkg / 'TRAINING.json'}; total {timings['total_minutes']} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

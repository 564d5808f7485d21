"""HF transformers 5.23 reference harness for the Gemma 4 target + MTP assistant (float32, CPU).

Import this module freely: torch / transformers are imported lazily. Callers that need them should
do ``reference.require_torch()`` (or ``pytest.importorskip("torch")``) first; it calls
``pytest.skip`` with a reason when torch or transformers is missing.

All functions take fixture *folders* (``<fixtures>/<kind>/target``, ``.../assistant``) and return
numpy arrays; loaded models are cached per folder.

Shapes (batch 1 is kept everywhere, as HF returns it):
* logits ``[1, L, V]`` (target: after the final softcap), hidden ``[1, L, H]``
* shared K/V ``[1, nKV_type, L_type, hd_type]`` for ``"sliding_attention"`` / ``"full_attention"``
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

LAYER_TYPES = ("sliding_attention", "full_attention")


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def require_torch() -> None:
    """``pytest.skip`` (with a reason) when the reference stack is not installed."""
    if not torch_available():
        import pytest

        pytest.skip("reference needs CPU torch + transformers>=5.23 (pip install torch==2.13.0 transformers)")


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------------------------
# transformers 5.23 raises in kv_sharing_modes for an all-KV-shared config
# ----------------------------------------------------------------------------------------------


def patch_kv_sharing_modes() -> None:
    """Replace ``kv_sharing_modes`` on Gemma4TextConfig and Gemma4UnifiedTextConfig (idempotent):
    layers ``i >= N - S`` reuse; the last layer of each type below ``N - S`` stores its K/V.

    transformers 5.23 raises for an all-shared assistant (``N - S == 0``) and marks no producer
    at all for ``S == 0`` targets (so ``return_shared_kv_states`` returns an empty dict). The rule
    lives in scripts/make_fixtures.py, which builds the checkpoints with it. Must run before any
    model is constructed (the attention layers read it in ``__init__``)."""
    _make_fixtures().patch_kv_sharing_modes_for_build()


@functools.lru_cache(maxsize=None)
def _make_fixtures():
    from tests.conftest import load_make_fixtures

    return load_make_fixtures()


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def _setup() -> None:
    torch = _torch()
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    torch.set_num_threads(min(2, torch.get_num_threads()))
    patch_kv_sharing_modes()


@functools.lru_cache(maxsize=16)
def load_model(folder: str | Path):
    """Load any fixture folder (target or assistant) in float32, eval mode, with the patch applied."""
    _setup()
    torch = _torch()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


def load_target(folder: str | Path):
    return load_model(str(Path(folder).resolve()))


def load_drafter(folder: str | Path):
    return load_model(str(Path(folder).resolve()))


def text_config(model):
    return model.config.get_text_config()


def producer_layers(model) -> dict[str, int]:
    """Index of the layer that stores the shared K/V of each type (after the patch)."""
    modes = text_config(model).kv_sharing_modes
    types = text_config(model).layer_types
    return {types[i]: i for i, m in enumerate(modes) if m == "store"}


def input_embeddings(model):
    """The target's scaled token embedding module (``E[ids] * bf16-or-fp32(sqrt(H))``)."""
    return model.get_input_embeddings()


def embed(target_folder: str | Path, ids) -> np.ndarray:
    """Scaled target embeddings ``[1, L, H]`` of token ids (what the drafter consumes)."""
    torch = _torch()
    model = load_target(target_folder)
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
    with torch.no_grad():
        return input_embeddings(model)(ids_t).numpy()


def _np(x):
    return x.detach().to(_torch().float32).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# target forward
# ----------------------------------------------------------------------------------------------


def _step_result(out, total_len: int) -> dict[str, Any]:
    shared = out.shared_kv_states or {}
    kv = {t: (_np(k), _np(v)) for t, (k, v) in shared.items()}
    pos = {t: np.arange(total_len - k.shape[2], total_len) for t, (k, _) in kv.items()}
    return {
        "logits": _np(out.logits),
        "hidden": _np(out.hidden_states[-1]),
        "shared_kv": kv,
        "kv_positions": pos,
    }


def hf_target_forward(folder: str | Path, prefill_ids, verify_ids=None) -> dict[str, Any]:
    """Prefill ``prefill_ids`` then (optionally) a second cached forward on ``verify_ids``.

    Returns ``{"prefill": step, "verify": step}`` (``"verify"`` absent when ``verify_ids`` is None),
    each step a dict with

    * ``logits`` ``[1, L, V]`` float32, after the final logit softcap;
    * ``hidden`` ``[1, L, H]`` final-normed hidden states (``hidden_states[-1]``, which HF ties to the
      post-norm ``last_hidden_state``);
    * ``shared_kv`` ``{"sliding_attention": (K, V), "full_attention": (K, V)}`` as HF returns them with
      ``return_shared_kv_states=True`` from the producer layers, ``[1, nKV, L_kv, hd]``;
    * ``kv_positions`` ``{type: int array [L_kv]}``: absolute sequence position of every returned K/V
      entry (sliding layers return their cached tail plus the new tokens, full layers everything).

    Positions are absolute: the prefill covers ``0..P-1``, the verify chunk ``P..P+len(verify)-1``.
    """
    torch = _torch()
    model = load_target(folder)
    pre = torch.as_tensor(np.asarray(prefill_ids, dtype=np.int64)).reshape(1, -1)
    kw = dict(use_cache=True, output_hidden_states=True, return_shared_kv_states=True)
    with torch.no_grad():
        out = model(input_ids=pre, **kw)
        result = {"prefill": _step_result(out, pre.shape[1])}
        if verify_ids is not None:
            ver = torch.as_tensor(np.asarray(verify_ids, dtype=np.int64)).reshape(1, -1)
            out2 = model(input_ids=ver, past_key_values=out.past_key_values, **kw)
            result["verify"] = _step_result(out2, pre.shape[1] + ver.shape[1])
    return result


# ----------------------------------------------------------------------------------------------
# drafter step
# ----------------------------------------------------------------------------------------------


def hf_drafter_step(
    folder: str | Path,
    inputs_embeds,
    shared_kv: dict,
    position: int,
    attention_mask=None,
) -> dict[str, Any]:
    """One assistant forward, exactly as HF's candidate generator calls it.

    ``inputs_embeds``: ``[1, 1, 2*H_t]`` = concat(scaled target embedding of the token, target or
    previous-step hidden) (a ``[2*H_t]`` or ``[1, 2*H_t]`` array is reshaped);
    ``shared_kv``: ``{type: (K, V)}`` numpy ``[1, nKV, L, hd]``; ``position``: the query position
    (HF uses ``len(input_ids) - 1``). ``attention_mask``: the 2-D padding mask HF passes (generation
    passes ones of ``len(input_ids)``); default: ones over the full-attention K/V length, which
    gives the same masks.

    Returns ``logits`` ``[1, 1, V]`` (masked-head fill included, no softcap), ``hidden`` ``[1, 1, H_d]``
    (drafter hidden after its final norm, before the head), ``projected`` ``[1, 1, H_t]``
    (``post_projection`` output, fed back as the next step's hidden), ``pre_projection``
    ``[1, 1, H_d]`` and ``layer_hidden`` (list of per-decoder-layer outputs, last one post-norm)."""
    torch = _torch()
    model = load_drafter(folder)
    x = np.asarray(inputs_embeds, dtype=np.float32)
    x = torch.as_tensor(x.reshape(1, 1, -1))
    kv = {t: (torch.as_tensor(np.asarray(k, np.float32)), torch.as_tensor(np.asarray(v, np.float32))) for t, (k, v) in shared_kv.items()}
    if attention_mask is None:
        attention_mask = np.ones((1, kv["full_attention"][0].shape[2]), dtype=np.int64)
    mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64)).reshape(1, -1)
    captured = {}
    hook = model.pre_projection.register_forward_hook(lambda m, i, o: captured.__setitem__("pre", o))
    try:
        with torch.no_grad():
            out = model(
                inputs_embeds=x,
                attention_mask=mask,
                position_ids=torch.tensor([[int(position)]]),
                shared_kv_states=kv,
                use_cache=False,
                output_hidden_states=True,
            )
    finally:
        hook.remove()
    layer_hidden = [_np(h) for h in out.hidden_states]
    return {
        "logits": _np(out.logits),
        "hidden": layer_hidden[-1],
        "projected": _np(out.last_hidden_state),
        "pre_projection": _np(captured["pre"]),
        "layer_hidden": layer_hidden,
    }


def masked_head_candidates(folder: str | Path, hidden) -> np.ndarray:
    """Token ids the centroid head scores for a drafter hidden ``[..., H_d]`` (sorted), or all ids
    for a dense head."""
    torch = _torch()
    model = load_drafter(folder)
    me = model.masked_embedding
    if me is None:
        return np.arange(model.vocab_size)
    h = torch.as_tensor(np.asarray(hidden, np.float32)).reshape(-1)
    with torch.no_grad():
        top = torch.topk(me.centroids(h), k=me.centroid_intermediate_top_k).indices
    ids = me.token_ordering.long().view(me.num_centroids, -1)[top].reshape(-1)
    return np.sort(ids.numpy())


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------


def _gen_kwargs(model, max_new_tokens: int, eos_token_id):
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=int(max_new_tokens),
        bos_token_id=2,
        pad_token_id=0,
    )
    if isinstance(eos_token_id, str) and eos_token_id == "checkpoint":
        eos_token_id = model.generation_config.eos_token_id
    # generate() fills an unset eos_token_id from the model's generation_config, so "never stop"
    # needs an id that cannot be produced
    gc.eos_token_id = [-1] if eos_token_id is None else eos_token_id
    return gc


def hf_greedy(target_folder: str | Path, prompt_ids, max_new_tokens: int, eos_token_id="checkpoint") -> np.ndarray:
    """Plain greedy decoding of the target (the ground truth for lossless speculative decoding).

    ``eos_token_id``: ``"checkpoint"`` (default: the folder's generation_config, ``[1, 106]``),
    ``None`` (never stop early) or an int / list. Returns the new token ids (prompt excluded)."""
    torch = _torch()
    model = load_target(target_folder)
    ids = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64)).reshape(1, -1)
    gc = _gen_kwargs(model, max_new_tokens, eos_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[0, ids.shape[1] :].numpy()


def hf_assisted_greedy(
    target_folder: str | Path,
    drafter_folder: str | Path,
    prompt_ids,
    max_new_tokens: int,
    num_assistant_tokens: int,
    eos_token_id="checkpoint",
) -> dict[str, Any]:
    """transformers' assisted greedy generation with the MTP assistant.

    Returns ``{"tokens": new ids (prompt excluded), "rounds": [...], "accepted": int,
    "drafted": int}``; each round is ``{"input_len": len(input_ids) when drafting (= P_b + 1),
    "position": drafter query position, "drafts": [d_1..d_K], "accepted": n, "emitted": [...]}``
    where ``n`` is HF's ``n_matches`` after its EOS/length crop, and ``emitted`` the tokens it
    appended (``d_1..d_n`` + bonus). The prefill round is not listed; a round where HF drafts
    nothing (one token of budget left: ``min(K, max_length - len - 1) == 0``) is listed with
    ``drafts == []``.
    ``eos_token_id`` as in :func:`hf_greedy`."""
    torch = _torch()
    from transformers.generation import candidate_generator as cg

    target = load_target(target_folder)
    drafter = load_drafter(drafter_folder)
    drafter.generation_config.num_assistant_tokens = int(num_assistant_tokens)
    drafter.generation_config.num_assistant_tokens_schedule = "constant"

    rounds: list[dict] = []
    pending: dict = {}
    cls = cg.SinglePositionMultiTokenCandidateGenerator
    orig_get, orig_update = cls.get_candidates, cls.update_candidate_strategy
    saved = {k: cls.__dict__[k] for k in ("get_candidates", "update_candidate_strategy") if k in cls.__dict__}

    def is_first(args, kwargs) -> bool:
        return bool(kwargs["is_first_iteration"] if "is_first_iteration" in kwargs else args[2])

    def get_candidates(self, input_ids, *args, **kwargs):
        cand, logits = orig_get(self, input_ids, *args, **kwargs)
        n_in = input_ids.shape[1]
        pending.clear()
        if not is_first(args, kwargs):
            pending.update(input_len=n_in, position=n_in - 1, drafts=cand[0, n_in:].tolist())
        return cand, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        if pending:
            n = int(num_matches)
            rounds.append(dict(pending, accepted=n, emitted=input_ids[0, pending["input_len"] :].tolist()))
            pending.clear()
        return orig_update(self, input_ids, scores, num_matches)

    ids = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64)).reshape(1, -1)
    gc = _gen_kwargs(target, max_new_tokens, eos_token_id)
    cls.get_candidates, cls.update_candidate_strategy = get_candidates, update_candidate_strategy
    try:
        with torch.no_grad():
            out = target.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc, assistant_model=drafter
            )
    finally:
        for k in ("get_candidates", "update_candidate_strategy"):
            if k in saved:
                setattr(cls, k, saved[k])
            else:
                delattr(cls, k)
    accepted = sum(r["accepted"] for r in rounds)
    drafted = sum(len(r["drafts"]) for r in rounds)
    return {"tokens": out[0, ids.shape[1] :].numpy(), "rounds": rounds, "accepted": accepted, "drafted": drafted}


def acceptance_summary(result: dict) -> dict[str, Any]:
    """Counts of full / partial / zero acceptance rounds and the acceptance rate of a
    :func:`hf_assisted_greedy` result."""
    rounds = [r for r in result["rounds"] if r["drafts"]]
    full = sum(1 for r in rounds if r["accepted"] == len(r["drafts"]))
    zero = sum(1 for r in rounds if r["accepted"] == 0)
    n = len(rounds)
    return {
        "rounds": n,
        "full": full,
        "partial": n - full - zero,
        "zero": zero,
        "rate": result["accepted"] / max(1, result["drafted"]),
    }

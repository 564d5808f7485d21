"""Public generation API: ``stream_generate`` yields responses, ``generate`` collects them,
``batch_generate`` runs 1..8 prompts together. All three run on the decoding engine
(``mtp_mlx.decoding.engine``), which owns tokens, stop strings and statistics.

Never prints. Tokenizing and chat formatting live here.
"""

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .decoding.engine import Engine, Request
from .decoding.reference import hf_parity_rounds
from .decoding.stats import RequestStats, RunStats
from .errors import MtpError
from .limits import DEFAULT_MAX_TOKENS, DEFAULT_NUM_DRAFT, check_batch_size
from .sampling import SamplingConfig

Prompt = Union[str, Sequence[int]]


class _StatsView:
    """The request's figures as properties (one definition: ``decoding.stats.RequestStats``)."""

    stats: RequestStats
    prompt_tokens = property(lambda self: self.stats.prompt_tokens)
    prompt_tps = property(lambda self: self.stats.prompt_tps)
    generation_tokens = property(lambda self: self.stats.generation_tokens)
    generation_tps = property(lambda self: self.stats.generation_tps)
    drafted = property(lambda self: self.stats.drafted)
    accepted = property(lambda self: self.stats.accepted)
    target_forwards = property(lambda self: self.stats.rounds)
    acceptance_rate = property(lambda self: self.stats.acceptance_rate)
    tokens_per_forward = property(lambda self: self.stats.tokens_per_forward)


@dataclass
class GenerationResponse(_StatsView):
    """One round's output (the first response: the prefill's token) plus running statistics.

    text: the new text segment; tokens: ids emitted by this round; from_draft: per token,
    whether the drafter proposed it (and the target accepted it); logprobs: per token, the
    target's log-probability and top alternatives (when asked for); stats: the request's
    ``RequestStats`` after this round.
    """

    text: str
    tokens: List[int]
    from_draft: List[bool]
    stats: RequestStats
    peak_memory: float
    finish_reason: Optional[str] = None
    logprobs: Optional[list] = None
    notices: List[str] = field(default_factory=list)  # first response: what the load-time checks decided


@dataclass
class BatchResult(_StatsView):
    """One prompt's result in a batch, in input order."""

    text: str
    tokens: List[int]
    from_draft: List[bool]
    finish_reason: Optional[str]
    stats: RequestStats


@dataclass
class BatchResponse:
    results: List[BatchResult]
    totals: RunStats
    peak_memory: float
    notices: List[str] = field(default_factory=list)

    generation_tps = property(lambda self: self.totals.generation_tps)  # all rows' tokens after their first
    prompt_tps = property(lambda self: self.totals.prompt_tps)


def format_prompt(tokenizer, prompt: str, *, raw: bool = False, system: Optional[str] = None) -> List[int]:
    """Token ids for ``prompt``: the chat template (if the tokenizer has one) unless ``raw``;
    ``raw`` tokenizes exactly as the checkpoint's tokenizer does by default (BOS included)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer.encode(prompt))


def _sampling(sampling: Optional[SamplingConfig], kwargs: dict) -> SamplingConfig:
    if sampling is not None and kwargs:
        raise MtpError("pass either sampling=SamplingConfig(...) or individual settings, not both")
    return sampling or SamplingConfig(**kwargs)


def _ids(tokenizer, prompt: Prompt) -> List[int]:
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    return list(prompt)


def stream_generate(
    pair,
    prompt: Prompt,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    num_draft_tokens: Union[int, str] = DEFAULT_NUM_DRAFT,
    use_drafter: bool = True,
    draft_position: str = "B",
    attention: str = "auto",
    sampling: Optional[SamplingConfig] = None,
    processors: Sequence = (),
    stop: Sequence[str] = (),
    logprobs: Optional[int] = None,
    policy=None,
    **sampling_kwargs,
) -> Iterator[GenerationResponse]:
    """Generate from ``pair`` (``mtp_mlx.load``'s result), one response per round.

    prompt: text (tokenized as is; use ``format_prompt`` for the chat template) or token ids.
    num_draft_tokens: "auto" (the default: a draft length per round from measured costs and
    acceptance), 1..8 fixed, or 0 / ``use_drafter=False`` for the target alone.
    Sampling: ``sampling=SamplingConfig(...)`` or its fields as keywords (``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``seed``); greedy by default.
    processors: extra logits processors ``(history, logits) -> logits``. stop: strings that
    end generation; the text never shows anything from the first stop string on.
    logprobs: None, or n >= 0 for each token's log-probability and the top n alternatives.
    draft_position: "B" (default), "A", or "hf" (reference parity: one greedy row).
    policy: a ``DraftPolicy`` to choose K under "auto" (e.g. one seeded from the tuning store,
    or shared across calls so what it measured carries over); default a fresh one.
    """
    cfg = _sampling(sampling, sampling_kwargs)
    ids = _ids(pair.tokenizer, prompt)
    mx.reset_peak_memory()
    if draft_position == "hf":
        yield from _hf_parity(pair, ids, max_tokens, num_draft_tokens, cfg, attention)
        return
    engine = Engine(pair, use_drafter=use_drafter and num_draft_tokens != 0, attention=attention,
                    position=draft_position, max_batch=1, policy=policy)
    engine.submit(Request(ids, max_tokens, cfg, stop, num_draft_tokens if use_drafter else 0, logprobs,
                          processors=processors))
    notices = list(engine.notices)
    for ev in engine.run():
        yield GenerationResponse(ev.text, ev.tokens, ev.from_draft, ev.stats, mx.get_peak_memory() / 1e9,
                                 ev.finish_reason, ev.logprobs, notices)
        notices = []


def _hf_parity(pair, ids, max_tokens, num_draft, cfg, attention):
    """Reference-parity mode through its own driver (greedy, no stop strings)."""
    if not cfg.greedy:
        raise MtpError("draft position 'hf' (reference parity) is greedy only: drop the sampling settings")
    if pair.drafter is None or not isinstance(num_draft, int) or num_draft < 1:
        raise MtpError("draft position 'hf' needs a drafter and a fixed --num-draft-tokens 1..8")
    import time

    stats = RequestStats(prompt_tokens=len(ids), submitted=time.perf_counter())
    eos = set(pair.target_config.eos_token_id) | set(getattr(pair.tokenizer, "eos_token_ids", None) or ())
    detok = pair.tokenizer.detokenizer
    for i, r in enumerate(hf_parity_rounds(pair.target, pair.drafter, ids, max_tokens=max_tokens,
                                           num_draft=num_draft, attention=attention)):
        toks = r.tokens
        cut = next((j for j, t in enumerate(toks) if t in eos), None)
        reason = "stop" if cut is not None else ("length" if stats.generation_tokens + len(toks) >= max_tokens else None)
        toks = toks[:cut] if cut is not None else toks
        now = time.perf_counter()
        if i == 0:
            stats.add_tokens(len(toks), now)
        else:
            stats.add_round(len(r.drafts), r.accepted, len(toks), now)
        for t in toks:
            detok.add_token(t)
        if reason:
            detok.finalize()
        n = min(r.accepted, len(toks))
        yield GenerationResponse(detok.last_segment, toks, [True] * n + [False] * (len(toks) - n), stats.snapshot(),
                                 mx.get_peak_memory() / 1e9, reason)
        if reason:
            return


def generate(pair, prompt: Prompt, **kwargs) -> str:
    """The whole generated text (see ``stream_generate`` for the arguments)."""
    return "".join(r.text for r in stream_generate(pair, prompt, **kwargs))


def batch_generate(
    pair,
    prompts: Sequence[Prompt],
    *,
    max_tokens: Union[int, Sequence[int]] = DEFAULT_MAX_TOKENS,
    num_draft_tokens: Union[int, str] = DEFAULT_NUM_DRAFT,
    use_drafter: bool = True,
    attention: str = "auto",
    sampling: Optional[SamplingConfig] = None,
    processors: Sequence = (),
    stop: Sequence[str] = (),
    policy=None,
    **sampling_kwargs,
) -> BatchResponse:
    """Generate for 1..8 prompts at once (results in input order).

    Each row keeps its own acceptance, EOS, budget and stop strings and leaves the batch when
    done; with greedy decoding every row's output equals generating that prompt alone. With a
    seed, row i draws from the stream (seed, i).
    """
    check_batch_size(len(prompts))
    cfg = _sampling(sampling, sampling_kwargs)
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    engine = Engine(pair, use_drafter=use_drafter and num_draft_tokens != 0, attention=attention,
                    max_batch=len(prompts), policy=policy)
    mx.reset_peak_memory()
    uids = [engine.submit(Request(_ids(pair.tokenizer, p), m, cfg, stop, num_draft_tokens if use_drafter else 0,
                                  request_index=i, processors=processors))
            for i, (p, m) in enumerate(zip(prompts, budgets))]
    rows = {u: BatchResult("", [], [], None, None) for u in uids}
    for ev in engine.run():
        r = rows[ev.uid]
        r.text += ev.text
        r.tokens.extend(ev.tokens)
        r.from_draft.extend(ev.from_draft)
        r.finish_reason, r.stats = ev.finish_reason, ev.stats
    return BatchResponse([rows[u] for u in uids], engine.totals, mx.get_peak_memory() / 1e9, list(engine.notices))

"""Public generation API: ``stream_generate`` yields responses, ``generate`` collects them,
``batch_generate`` runs 1..8 prompts together.

Never prints. Tokenizing, chat formatting, detokenizing, stop strings and statistics live
here; the loops (``mtp_mlx.decoding.loop``) deal in token ids only.
"""

import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .errors import MtpError
from .sampling import SamplingConfig
from .decoding.loop import generate_batch, speculative_generate_batch

DEFAULT_MAX_TOKENS = 256
DEFAULT_NUM_DRAFT = 4
MAX_BATCH = 8

Prompt = Union[str, Sequence[int]]


@dataclass
class GenerationResponse:
    """One target forward's worth of output plus running statistics.

    text: the new text segment; tokens: ids emitted by this step; from_draft: per token,
    whether the drafter proposed it (and the target accepted it).
    """

    text: str
    tokens: List[int]
    from_draft: List[bool]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    drafted: int
    accepted: int
    target_forwards: int
    peak_memory: float
    finish_reason: Optional[str] = None

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per target forward after the prefill (1.0 for plain decoding)."""
        return (self.generation_tokens - 1) / self.target_forwards if self.target_forwards else 0.0


@dataclass
class BatchResult:
    """One prompt's result in a batch, in input order."""

    text: str
    tokens: List[int]
    from_draft: List[bool]
    prompt_tokens: int
    drafted: int
    accepted: int
    target_forwards: int
    generation_tps: float
    finish_reason: Optional[str]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return (len(self.tokens) - 1) / self.target_forwards if self.target_forwards else 0.0


@dataclass
class BatchResponse:
    results: List[BatchResult]
    generation_tps: float  # all rows' tokens after their first / decode wall time
    prompt_tps: float
    peak_memory: float
    extra: dict = field(default_factory=dict)


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


def _steps(pair, prompts, max_tokens, num_draft_tokens, use_drafter, draft_position, sampling, processors):
    tokenizer = pair.tokenizer
    ids = [list(tokenizer.encode(p)) if isinstance(p, str) else list(p) for p in prompts]
    eos = set(pair.target_config.eos_token_id) | set(getattr(tokenizer, "eos_token_ids", ()) or ())
    if use_drafter and pair.drafter is not None and num_draft_tokens > 0:
        steps = speculative_generate_batch(
            pair.target, pair.drafter, ids, max_tokens=max_tokens, num_draft=num_draft_tokens,
            eos_ids=eos, position=draft_position, sampling=sampling, processors=processors,
        )
    else:
        steps = generate_batch(pair.target, ids, max_tokens=max_tokens, eos_ids=eos,
                               sampling=sampling, processors=processors)
    return ids, steps


class _StopFilter:
    """Holds back text that could be the start of a stop string (which may span tokens and
    rounds) and cuts at the first complete one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str, final: bool) -> tuple:
        """(text safe to show, whether a stop string was hit)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        if final or not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False


def stream_generate(
    pair,
    prompt: Prompt,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT,
    use_drafter: bool = True,
    draft_position: str = "B",
    sampling: Optional[SamplingConfig] = None,
    processors: Sequence = (),
    stop: Sequence[str] = (),
    **sampling_kwargs,
) -> Iterator[GenerationResponse]:
    """Generate from ``pair`` (``mtp_mlx.load``'s result), one response per target forward.

    prompt: text (tokenized as is; use ``format_prompt`` for the chat template) or token ids.
    Sampling: ``sampling=SamplingConfig(...)`` or its fields as keywords (``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``seed``); greedy by default.
    processors: extra logits processors ``(history, logits) -> logits``. stop: strings that
    end generation; the text never shows anything from the first stop string on.
    use_drafter=False (or a pair without a drafter) decodes with the target alone.
    """
    cfg = _sampling(sampling, sampling_kwargs)
    (ids,), steps = _steps(pair, [prompt], max_tokens, num_draft_tokens, use_drafter, draft_position, cfg,
                           processors)
    detok = pair.tokenizer.detokenizer
    detok.reset()
    stops = _StopFilter(stop)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    n_gen = drafted = accepted = forwards = 0
    prompt_tps = gen_tps = 0.0
    for i, batch_step in enumerate(steps):
        step = batch_step[0]
        now = time.perf_counter()
        if i == 0:
            prompt_tps = len(ids) / (now - tic)
            t_first = now
        else:
            forwards += 1
        n_gen += len(step.tokens)
        drafted += step.drafted
        accepted += step.accepted
        if n_gen > 1:
            gen_tps = (n_gen - 1) / max(now - t_first, 1e-9)
        for t in step.tokens:
            detok.add_token(t)
        if step.finish_reason:
            detok.finalize()
        text, hit = stops.feed(detok.last_segment, final=step.finish_reason is not None)
        yield GenerationResponse(
            text=text, tokens=step.tokens, from_draft=step.from_draft,
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n_gen,
            generation_tps=gen_tps, drafted=drafted, accepted=accepted, target_forwards=forwards,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason="stop" if hit else step.finish_reason,
        )
        if hit:
            return


def generate(pair, prompt: Prompt, **kwargs) -> str:
    """The whole generated text (see ``stream_generate`` for the arguments)."""
    return "".join(r.text for r in stream_generate(pair, prompt, **kwargs))


def batch_generate(
    pair,
    prompts: Sequence[Prompt],
    *,
    max_tokens: Union[int, Sequence[int]] = DEFAULT_MAX_TOKENS,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT,
    use_drafter: bool = True,
    sampling: Optional[SamplingConfig] = None,
    processors: Sequence = (),
    stop: Sequence[str] = (),
    **sampling_kwargs,
) -> BatchResponse:
    """Generate for 1..8 prompts at once (results in input order).

    Each row keeps its own acceptance, EOS, budget and stop strings and leaves the batch when
    done (a stop string ends its row at the step that completes it); with greedy decoding
    every row's output equals generating that prompt alone.
    """
    if not 1 <= len(prompts) <= MAX_BATCH:
        raise MtpError(f"batch of {len(prompts)} prompts is out of range: pass 1..{MAX_BATCH} prompts")
    cfg = _sampling(sampling, sampling_kwargs)
    ids, steps = _steps(pair, prompts, max_tokens, num_draft_tokens, use_drafter, "B", cfg, processors)
    n = len(ids)
    toks = [[] for _ in range(n)]
    flags = [[] for _ in range(n)]
    stats = [[0, 0, 0] for _ in range(n)]  # drafted, accepted, forwards
    finish = [None] * n
    first, last = [0.0] * n, [0.0] * n
    mx.reset_peak_memory()
    tic = time.perf_counter()
    t_first = None
    stop = [x for x in stop if x]
    ended: set = set()  # rows a stop string ended: sent back so they leave the batch at once
    i = 0
    while True:
        try:
            step = steps.send(ended or None)
        except StopIteration:
            break
        ended = set()
        now = time.perf_counter()
        t_first = t_first or now
        for r, s in step.items():
            toks[r].extend(s.tokens)
            flags[r].extend(s.from_draft)
            stats[r][0] += s.drafted
            stats[r][1] += s.accepted
            stats[r][2] += i > 0
            finish[r] = s.finish_reason or finish[r]
            first[r] = first[r] or now
            last[r] = now
            # The row's whole text, decoded again each step: exact for stop strings that span
            # tokens and rounds and for multi-byte characters; rows are at most a few K tokens.
            if stop and s.finish_reason is None and any(x in pair.tokenizer.decode(toks[r]) for x in stop):
                ended.add(r)
        i += 1
    results = []
    for r in range(n):
        text, hit = _StopFilter(stop).feed(pair.tokenizer.decode(toks[r]), final=True)
        tps = (len(toks[r]) - 1) / (last[r] - first[r]) if last[r] > first[r] else 0.0
        results.append(BatchResult(text, toks[r], flags[r], len(ids[r]), *stats[r], tps,
                                   "stop" if hit else finish[r]))
    decode_time = max(last) - t_first
    total = sum(len(t) - 1 for t in toks)
    return BatchResponse(
        results=results,
        generation_tps=total / decode_time if decode_time > 0 else 0.0,
        prompt_tps=sum(len(i) for i in ids) / (t_first - tic),
        peak_memory=mx.get_peak_memory() / 1e9,
    )

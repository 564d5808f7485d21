"""Public generation API: ``stream_generate`` yields responses, ``generate`` collects them.

Never prints. Tokenizing, chat formatting, detokenizing and statistics live here; the
loops (``mtp_mlx.spec.loop``) deal in token ids only.
"""

import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .spec.loop import generate_step, speculative_generate_step

DEFAULT_MAX_TOKENS = 256
DEFAULT_NUM_DRAFT = 4


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
        decode = self.generation_tokens - 1
        return decode / self.target_forwards if self.target_forwards else 0.0


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


def stream_generate(
    pair,
    prompt: Union[str, Sequence[int]],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT,
    use_drafter: bool = True,
    draft_position: str = "B",
) -> Iterator[GenerationResponse]:
    """Generate greedily from ``pair`` (``mtp_mlx.load``'s result), one response per step.

    prompt: text (tokenized as is; use ``format_prompt`` for the chat template) or token ids.
    use_drafter=False (or a pair without a drafter) decodes with the target alone.
    """
    tokenizer = pair.tokenizer
    ids = list(tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
    eos = set(pair.target_config.eos_token_id) | set(getattr(tokenizer, "eos_token_ids", ()) or ())
    if use_drafter and pair.drafter is not None and num_draft_tokens > 0:
        steps = speculative_generate_step(
            pair.target, pair.drafter, ids, max_tokens=max_tokens, num_draft=num_draft_tokens,
            eos_ids=eos, position=draft_position,
        )
    else:
        steps = generate_step(pair.target, ids, max_tokens=max_tokens, eos_ids=eos)
    detok = tokenizer.detokenizer
    detok.reset()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    n_gen = drafted = accepted = forwards = 0
    prompt_tps = gen_tps = 0.0
    for i, step in enumerate(steps):
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
        yield GenerationResponse(
            text=detok.last_segment, tokens=step.tokens, from_draft=step.from_draft,
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n_gen,
            generation_tps=gen_tps, drafted=drafted, accepted=accepted, target_forwards=forwards,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=step.finish_reason,
        )


def generate(pair, prompt: Union[str, Sequence[int]], **kwargs) -> str:
    """The whole generated text (see ``stream_generate`` for the arguments)."""
    return "".join(r.text for r in stream_generate(pair, prompt, **kwargs))

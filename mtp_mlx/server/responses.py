"""Response shaping for ``mtp-mlx serve``: OpenAI objects from the engine's Events and RequestStats.

Every statistic here is the request's own (``RequestStats`` is per row), never a batch total.
"""

import math
import re
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPACE_MARK = "\u2581"   # sentencepiece's word-boundary marker in Gemma's vocabulary
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI-compatible servers send a large negative number


class TokenText:
    """Token id -> (display string, UTF-8 bytes), as OpenAI's logprobs show tokens.

    Bytes come from the vocabulary piece (byte-fallback pieces ``<0xE2>`` are one raw byte), so a
    character split over tokens is rebuilt exactly by joining ``bytes``; a piece that is not whole
    UTF-8 shows as ``bytes:\\xe2\\x80`` like OpenAI's.
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.lookup = lru_cache(maxsize=1 << 16)(self._lookup)

    def _lookup(self, token_id: int) -> Tuple[str, List[int]]:
        piece = self._tok.convert_ids_to_tokens(int(token_id))
        if piece is None:
            raw = self._tok.decode([int(token_id)]).encode("utf-8")
        else:
            m = _BYTE_PIECE.match(piece)
            raw = bytes([int(m.group(1), 16)]) if m else piece.replace(_SPACE_MARK, " ").encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)


def _lp(x: float) -> float:
    return float(x) if math.isfinite(x) else _LOGPROB_FLOOR


def chat_logprobs(tt: TokenText, logprobs) -> List[dict]:
    """``choices[].logprobs.content`` entries for a list of ``TokenLogprob``."""
    out = []
    for lp in logprobs:
        text, raw = tt.lookup(lp.token)
        top = []
        for tid, v in lp.top:
            t, b = tt.lookup(tid)
            top.append({"token": t, "logprob": _lp(v), "bytes": b})
        out.append({"token": text, "logprob": _lp(lp.logprob), "bytes": raw, "top_logprobs": top})
    return out


def completion_logprobs(tt: TokenText, logprobs, offset: int) -> Tuple[dict, int]:
    """The legacy ``{tokens, token_logprobs, top_logprobs, text_offset}`` block, and the next offset.

    ``text_offset`` counts characters of the completion text (the prompt is never echoed).
    """
    block: Dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        text, _ = tt.lookup(lp.token)
        block["tokens"].append(text)
        block["token_logprobs"].append(_lp(lp.logprob))
        block["top_logprobs"].append({tt.lookup(tid)[0]: _lp(v) for tid, v in lp.top})
        block["text_offset"].append(offset)
        offset += len(text)
    return block, offset


def usage(stats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generation_tokens,
        "total_tokens": stats.prompt_tokens + stats.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def speculative(stats, mode: str, num_draft: Any) -> dict:
    """This request's drafting counters (AIPerf's engine-neutral names where they exist)."""
    hist = {str(n): c for n, c in enumerate(stats.histogram or []) if c}
    ks: Dict[str, int] = {}
    for k in stats.ks or []:
        ks[str(k)] = ks.get(str(k), 0) + 1
    return {
        "mode": mode,
        "num_draft_tokens": num_draft,
        "rounds": stats.rounds,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": round(stats.acceptance_rate, 6),
        "mean_acceptance_length": round(1 + stats.accepted / stats.rounds, 6) if stats.rounds else 0.0,
        "tokens_per_forward": round(stats.tokens_per_forward, 6),
        "acceptance_histogram": hist,
        "draft_length_histogram": ks,
    }


def timings(stats) -> dict:
    """llama.cpp's ``timings`` names (``draft_n`` / ``draft_n_accepted`` are what tools read)."""
    prompt_n = stats.prompt_tokens - stats.cached_tokens
    predicted_n = stats.generation_tokens
    # The prompt phase is submission -> first token (waiting for a row and the prefill); the
    # generation phase is first token -> last token, as RequestStats defines its rates.
    prompt_ms = 1000 * stats.ttft
    predicted_ms = 1000 * (predicted_n - 1) / stats.generation_tps if stats.generation_tps else 0.0
    return {
        "cache_n": stats.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_second": round(prompt_n / stats.ttft, 3) if stats.ttft > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_second": round(stats.generation_tps, 3),
        "ttft_ms": round(1000 * stats.ttft, 3),
        "draft_n": stats.drafted,
        "draft_n_accepted": stats.accepted,
    }


def finish_reason(reason: Optional[str]) -> Optional[str]:
    """OpenAI's values: an end-of-turn token and a stop string are both "stop"."""
    return None if reason is None else ("length" if reason == "length" else "stop")

"""Limits and defaults, in one place.

Every module that checks a draft length, a batch size or a token budget imports them from
here; the CLI, the Python API and the server share the defaults.
"""

from .errors import MtpError

MAX_DRAFT = 8
"""Most draft tokens per round. Sliding-window rings hold ``window + MAX_DRAFT`` slots whatever
K a run uses, so every position lands in the same slot in plain and speculative runs and
attention sums the same keys in the same order (half-precision results then stay bitwise
equal: near-tied logits cannot flip between the two)."""

MAX_BATCH = 8
"""Most rows decoded together (the fused attention kernel's batch range)."""

DEFAULT_MAX_TOKENS = 256

DEFAULT_NUM_DRAFT = "auto"
"""The draft length when none is given: chosen per row and round by ``decoding.policy``."""

PREFILL_STEP = 512
"""Prompt tokens per prefill slice; a running batch waits for at most one slice per round."""


def check_num_draft(k, what: str = "num_draft_tokens"):
    """``"auto"`` or an int in 0..MAX_DRAFT (0 = no drafting); else a one-line ``MtpError``."""
    if k == "auto":
        return k
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_DRAFT:
        raise MtpError(f"{what} {k!r} is out of range: use 'auto', or 1..{MAX_DRAFT} (0 disables drafting)")
    return k


def check_batch_size(n: int, what: str = "batch") -> int:
    if not 1 <= n <= MAX_BATCH:
        raise MtpError(f"{what} of {n} prompts is out of range: pass 1..{MAX_BATCH} prompts")
    return n

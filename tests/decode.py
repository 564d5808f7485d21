"""Test helpers: run token ids through the engine and collect tokens and rounds."""

from typing import List, Sequence

from mtp_mlx.decoding.engine import Engine, Request, bare_pair


def run(target, drafter, prompts: Sequence[Sequence[int]], max_tokens, num_draft=3, eos_ids=(), position="B",
        max_batch=8, **request):
    """Decode every prompt together; returns (tokens per row, events per row)."""
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    engine = Engine(bare_pair(target, drafter, eos_ids=eos_ids), use_drafter=drafter is not None,
                    position=position, max_batch=max_batch)
    uids = [engine.submit(Request(list(p), m, num_draft=num_draft if drafter is not None else 0, request_index=i,
                                  **request)) for i, (p, m) in enumerate(zip(prompts, budgets))]
    events = {u: [] for u in uids}
    for ev in engine.run():
        events[ev.uid].append(ev)
    return [[t for e in events[u] for t in e.tokens] for u in uids], [events[u] for u in uids]


def plain(target, prompt, max_tokens, **kw) -> List[int]:
    return run(target, None, [prompt], max_tokens, **kw)[0][0]


def spec(target, drafter, prompt, max_tokens, num_draft=3, **kw) -> List[int]:
    return run(target, drafter, [prompt], max_tokens, num_draft, **kw)[0][0]


def rounds(events) -> list:
    """(drafted, accepted) of each round after the prefill."""
    return [(e.drafted, e.accepted) for e in events[1:]]

"""Prometheus text exposition for ``GET /metrics``.

Engine figures come from the engine thread's snapshot (the engine itself is never read from the
event loop); request counters are kept here, on the event loop.
"""

import re
from collections import Counter
from typing import Dict, Tuple

PREFIX = "mtp_mlx_"

# Engine snapshot key -> (metric name, type, help). Keys the engine adds later are exported too,
# as untyped gauges named after the key, so a new counter never silently goes missing.
ENGINE_METRICS: Dict[str, Tuple[str, str, str]] = {
    "running": ("running_rows", "gauge", "Rows in the running batch (prefilling included)."),
    "queued": ("queued_rows", "gauge", "Requests submitted to the engine and waiting for a slot."),
    "rounds": ("rounds_total", "counter", "Batch rounds (one target forward each) after the prefills."),
    "requests_finished": ("engine_requests_finished_total", "counter", "Requests the engine finished."),
    "prompt_tokens": ("prompt_tokens_total", "counter", "Prompt tokens submitted, all requests."),
    "generation_tokens": ("generated_tokens_total", "counter", "Tokens generated, all requests."),
    "drafted": ("drafted_tokens_total", "counter", "Draft tokens proposed by the drafter."),
    "accepted": ("accepted_tokens_total", "counter", "Draft tokens the target accepted."),
    "prefix_cache_hits": ("prefix_cache_hits_total", "counter", "Requests that reused a cached prompt prefix."),
    "prefix_cache_misses": ("prefix_cache_misses_total", "counter", "Requests that found no reusable prefix."),
    "prefix_cache_hit_tokens": ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache."),
    "prefix_cache_bytes": ("prefix_cache_bytes", "gauge", "Bytes held by the prefix cache."),
    "prefix_cache_entries": ("prefix_cache_entries", "gauge", "Snapshots held by the prefix cache."),
    "faults": ("engine_faults_total", "counter", "Engine errors that failed the running requests."),
}


class ServerMetrics:
    """Request counters kept on the event loop."""

    def __init__(self):
        self.requests: Counter = Counter()   # (endpoint, status code) -> count
        self.in_flight = 0                   # admitted, not yet finished

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1


def render(snapshot: Dict[str, float], server: ServerMetrics, *, ready: bool) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, samples):
        lines.append(f"# HELP {PREFIX}{name} {help_}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for labels, value in samples:
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"{PREFIX}{name}{lab} {_num(value)}")

    metric("ready", "gauge", "1 once the model is loaded and the engine thread runs.", [({}, int(ready))])
    metric("requests_in_flight", "gauge", "Requests admitted by the server and not yet finished.",
           [({}, server.in_flight)])
    metric("requests_total", "counter", "Completion requests answered, by endpoint and status code (a stream counts when it starts).",
           [({"endpoint": e, "code": str(c)}, n) for (e, c), n in sorted(server.requests.items())])
    for key, value in snapshot.items():
        name, kind, help_ = ENGINE_METRICS.get(key, (_safe(key), "gauge", f"Engine figure '{key}'."))
        metric(name, kind, help_, [({}, value)])
    return "\n".join(lines) + "\n"


def _safe(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))

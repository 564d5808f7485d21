"""OpenAI request parsing for ``mtp-mlx serve``: JSON bodies -> ``Parsed`` settings, or ``ApiError``.

Unknown fields are ignored (clients send vendor extensions), but a recognised OpenAI field that
this server does not implement (``n > 1``, ``tools``, ``response_format``, ...) is a 400 error,
never silently dropped: a client that relies on it must learn that it had no effect.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..errors import MtpError
from ..sampling import SamplingConfig

MAX_STOP_STRINGS = 4      # OpenAI's limit
MAX_TOP_LOGPROBS = 20     # OpenAI's limit for chat; the legacy endpoint gets the same
SPECULATIVE_MODES = ("auto", "on", "off")
CHAT_ROLES = ("system", "developer", "user", "assistant")
SAMPLING_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)  # OpenAI's


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Parsed:
    """What one request asks for, validated; ``prompt`` is filled in by the caller after tokenizing."""

    endpoint: str                       # "chat" | "completion"
    model: Optional[str]
    messages: Optional[List[dict]] = None
    text: Optional[str] = None          # completions: prompt text
    prompt: Optional[List[int]] = None  # completions: token ids given directly (else tokenized later)
    max_tokens: Optional[int] = None    # None = the server default
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None      # None = off; n = the chosen token's logprob + n alternatives
    spec_mode: str = "auto"
    num_draft: Optional[int] = None     # speculative.num_draft_tokens, None = server default
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)


# ---- field readers: each returns the value or None when absent/null, raising 400 otherwise ----

def _get(body: dict, name: str):
    return body.get(name)


def _bool(body: dict, key: str, prefix: str = "") -> Optional[bool]:
    v, name = _get(body, key), prefix + key
    if v is not None and not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {_json_type(v)}", name, "invalid_type")
    return v


def _int(body: dict, key: str, lo: Optional[int] = None, hi: Optional[int] = None, prefix: str = "") -> Optional[int]:
    v, name = _get(body, key), prefix + key
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {_json_type(v)}", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"'{name}' is {v}: it must be {rng}", name)
    return v


def _num(body: dict, name: str) -> Optional[float]:
    v = _get(body, name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a finite number, got {_json_type(v)}", name, "invalid_type")
    return float(v)


def _json_type(v) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


# ---- unsupported OpenAI fields ------------------------------------------------------------------

def _reject_unsupported(body: dict, endpoint: str) -> None:
    """400 for recognised OpenAI fields whose requested behaviour this server does not provide."""
    def no(name: str, why: str):
        raise bad(f"'{name}' is not supported by this server: {why}", name, "unsupported_parameter")

    n = _int(body, "n", 1)
    if n is not None and n != 1:
        no("n", "it returns one choice per request; send n separate requests (they are batched)")
    for name in ("tools", "functions"):
        if body.get(name):
            no(name, "there is no tool or function calling; describe the tools in the prompt instead")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            no(name, "there is no tool or function calling")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        no("response_format", "structured output (JSON mode, JSON schema) is not implemented; omit it")
    if body.get("logit_bias"):
        no("logit_bias", "per-token biases are not implemented; omit it")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _num(body, name)
        if v not in (None, 0.0):
            no(name, "use 'repetition_penalty' (1.0 = off) instead")
    for name in ("audio", "prediction", "web_search_options"):
        if body.get(name) is not None:
            no(name, "this is a text-only server")
    mod = body.get("modalities")
    if mod is not None and mod != ["text"]:
        no("modalities", "only [\"text\"] output is available")
    if body.get("reasoning_effort") is not None:
        no("reasoning_effort", "pass the chat template's own switch in 'chat_template_kwargs' instead")
    if endpoint == "completion":
        best_of = _int(body, "best_of", 1)
        if best_of not in (None, 1):
            no("best_of", "it returns one choice per request")
        if _bool(body, "echo"):
            no("echo", "the prompt is not echoed; prepend it yourself")
        if body.get("suffix"):
            no("suffix", "fill-in-the-middle is not implemented")


# ---- the shared part of both endpoints ----------------------------------------------------------

def _common(body: dict, endpoint: str, defaults: Dict[str, float]) -> Parsed:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    _reject_unsupported(body, endpoint)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    p = Parsed(endpoint=endpoint, model=model)

    mt, mct = _int(body, "max_tokens", 1), _int(body, "max_completion_tokens", 1)
    if mt is not None and mct is not None and mt != mct:
        raise bad("'max_tokens' and 'max_completion_tokens' disagree: send one of them", "max_tokens")
    p.max_tokens = mct if mct is not None else mt

    temperature = _num(body, "temperature")
    top_p = _num(body, "top_p")
    top_k = _int(body, "top_k", -1)
    min_p = _num(body, "min_p")
    rep = _num(body, "repetition_penalty")
    rep_ctx = _int(body, "repetition_context_size", 1)
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    checks = [
        ("temperature", temperature is None or temperature >= 0, "must be >= 0 (0 = greedy)"),
        ("top_p", top_p is None or 0 < top_p <= 1, "must be in (0, 1]"),
        ("min_p", min_p is None or 0 <= min_p < 1, "must be in [0, 1)"),
        ("repetition_penalty", rep is None or rep > 0, "must be > 0 (1.0 = off)"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise bad(f"'{name}' is {body[name]}: it {rule}", name)
    given = dict(temperature=temperature, top_p=top_p, top_k=None if top_k == -1 else top_k, min_p=min_p,
                 repetition_penalty=rep, repetition_context_size=rep_ctx)
    try:
        # Unset fields take the checkpoint's generation_config.json values, else OpenAI's (T = 1).
        p.sampling = SamplingConfig(**{**SAMPLING_DEFAULTS, **defaults, **{k: v for k, v in given.items() if v is not None}},
                                    seed=None if seed is None else seed % 2**63)
    except MtpError as err:
        raise bad(str(err)) from None

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
        if len(stop) > MAX_STOP_STRINGS:
            raise bad(f"'stop' has {len(stop)} strings: at most {MAX_STOP_STRINGS}", "stop")
        p.stop = [s for s in stop if s]

    p.stream = bool(_bool(body, "stream"))
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not p.stream:
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        p.include_usage = bool(_bool(so, "include_usage", "stream_options."))

    _speculative(body, p)
    ctk = body.get("chat_template_kwargs")
    if ctk is not None:
        if not isinstance(ctk, dict):
            raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
        p.chat_template_kwargs = dict(ctk)
    return p


def _speculative(body: dict, p: Parsed) -> None:
    """The extension ``speculative: {"mode": "auto"|"on"|"off", "num_draft_tokens": K}``."""
    spec = body.get("speculative")
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise bad("'speculative' must be an object {\"mode\", \"num_draft_tokens\"}", "speculative", "invalid_type")
    mode = spec.get("mode", "auto")
    if mode not in SPECULATIVE_MODES:
        raise bad(f"'speculative.mode' is {mode!r}: use one of {', '.join(SPECULATIVE_MODES)}", "speculative.mode")
    from ..limits import MAX_DRAFT

    k = _int(spec, "num_draft_tokens", 1, MAX_DRAFT, "speculative.")
    if mode == "off" and k is not None:
        raise bad("'speculative.num_draft_tokens' conflicts with mode 'off': omit one", "speculative.num_draft_tokens")
    p.spec_mode, p.num_draft = mode, k


def parse_chat(body: dict, defaults: Optional[Dict[str, float]] = None) -> Parsed:
    """A /v1/chat/completions body; ``defaults``: sampling values for unset fields (see sampling_defaults)."""
    p = _common(body, "chat", defaults or {})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages",
                  "invalid_type" if msgs is not None else "missing_required_parameter")
    p.messages = [_message(m, i) for i, m in enumerate(msgs)]

    lp, top = _bool(body, "logprobs"), _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not lp:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    p.logprobs = (top or 0) if lp else None
    return p


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
    role = m.get("role")
    if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
        raise bad(f"'{where}': tool and function messages are not supported by this server", where,
                  "unsupported_parameter")
    if role not in CHAT_ROLES:
        raise bad(f"'{where}.role' is {role!r}: use one of {', '.join(CHAT_ROLES)}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"'{where}.content[{j}]': only text parts are supported by this text-only server",
                          f"{where}.content", "unsupported_parameter")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"'{where}.content' must be a string or an array of text parts", f"{where}.content",
                  "invalid_type")
    # The checkpoint's template knows system/user/assistant; OpenAI's newer 'developer' is a system turn.
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_completion(body: dict, defaults: Optional[Dict[str, float]] = None) -> Parsed:
    """A /v1/completions body (prompt text or token ids)."""
    p = _common(body, "completion", defaults or {})
    prompt = body.get("prompt")
    # A one-element batch is the same as its element; larger batches would need n choices.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' is empty: send some text or token ids", "prompt")
        p.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        p.prompt = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("'prompt' holds several prompts: send one prompt per request (they are batched)", "prompt",
                  "unsupported_parameter")
    else:
        raise bad("'prompt' must be a string or an array of token ids", "prompt",
                  "invalid_type" if prompt is not None else "missing_required_parameter")
    lp = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    p.logprobs = lp
    return p


def num_draft_for(p: Parsed, default: Union[int, str], has_drafter: bool) -> Union[int, str]:
    """``Request.num_draft`` for a request: mode off -> 0; an explicit K -> K; else the server's default.

    ``mode: "on"`` insists on drafting, so it needs a drafter and never gets the adaptive
    controller's choice of zero: without an explicit K it takes the server's fixed K, else 4.
    """
    if p.spec_mode == "off":
        return 0
    if not has_drafter:
        if p.spec_mode == "on" or p.num_draft is not None:
            raise bad("this server runs without a drafter (--no-drafter): omit 'speculative' or use mode 'off'",
                      "speculative", "unsupported_parameter")
        return 0
    if p.num_draft is not None:
        return p.num_draft
    if p.spec_mode == "on" and not isinstance(default, int):
        return ON_MODE_NUM_DRAFT
    return default


ON_MODE_NUM_DRAFT = 4   # K for mode "on" when neither the request nor the server fixes one


def sampling_defaults(generation_config: dict) -> Dict[str, float]:
    """The sampling values a checkpoint recommends (generation_config.json), for fields a request leaves unset."""
    out = {}
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float),
                       ("repetition_penalty", float)):
        v = generation_config.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = kind(v)
    return out

"""Does a checkpoint play the role it was given, and does a drafter fit its target?

The drafter attends to the target's K/V and reads its embedding rows and hidden states
(the drafter attends over the target's own K/V and takes its hidden state), so their geometry must agree exactly; ``check_pair`` lists every
difference in one message instead of failing later on a shape error.
"""

from pathlib import Path
from typing import Optional

from ..errors import MtpError
from ..models.config import DRAFTER_MODEL_TYPES, TARGET_MODEL_TYPES, DrafterConfig, TargetConfig

FIT_HINT = "use the '-assistant' checkpoint made for this target"


def check_role(raw: dict, role: str, path) -> None:
    """Refuse a drafter given as the model, a target given as the drafter, or a non-Gemma-4."""
    model_type = raw.get("model_type")
    if role == "model" and model_type in DRAFTER_MODEL_TYPES:
        raise MtpError(
            f"{path} is a Gemma 4 drafter ({model_type}), not a target model: pass it as the "
            "drafter, and a Gemma 4 model (e.g. google/gemma-4-E2B-it) as the model"
        )
    if role == "drafter" and model_type in TARGET_MODEL_TYPES:
        raise MtpError(
            f"{path} is a Gemma 4 target model ({model_type}), not a drafter: pass it as the "
            f"model, and its '-assistant' checkpoint as the drafter"
        )
    known = DRAFTER_MODEL_TYPES if role == "drafter" else TARGET_MODEL_TYPES
    if model_type not in known:
        what = "Gemma 4 '-assistant' drafter" if role == "drafter" else "Gemma 4 model"
        raise MtpError(
            f"{path}/config.json has model_type {model_type!r}, which is not a {what}: "
            f"pass a checkpoint with model_type {' or '.join(known)}"
        )


def parse_target(raw: dict, path: Path) -> TargetConfig:
    """``TargetConfig.from_dict`` with a missing or malformed field named in one line."""
    try:
        return TargetConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise MtpError(_bad_field(path, err)) from None


def parse_drafter(raw: dict, path: Path) -> DrafterConfig:
    """``DrafterConfig.from_dict`` with a missing or malformed field named in one line."""
    try:
        return DrafterConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise MtpError(_bad_field(path, err)) from None


def _bad_field(path: Path, err: Exception) -> str:
    what = f"lacks {err}" if isinstance(err, KeyError) else f"has a malformed field ({err})"
    return f"{path}/config.json {what}: re-download or re-convert the checkpoint"


def check_pair(
    target: TargetConfig,
    drafter: DrafterConfig,
    *,
    target_name: str = "the target",
    drafter_name: str = "the drafter",
) -> None:
    """Raise one ``MtpError`` listing every way ``drafter`` does not fit ``target``."""
    problems = mismatches(target, drafter)
    if problems:
        raise MtpError(
            f"drafter {drafter_name} does not fit target {target_name}: "
            f"{'; '.join(problems)}: {FIT_HINT}"
        )


def mismatches(target: TargetConfig, drafter: DrafterConfig) -> list:
    """Human-readable differences that would break drafting (empty when the pair fits)."""
    t, d = target.text, drafter.text
    out = []

    def differ(what: str, dv, tv, target_what: Optional[str] = None):
        if dv != tv:
            out.append(f"{what} {dv} != target {target_what or what} {tv}")

    differ("backbone_hidden_size", drafter.backbone_hidden_size, t.hidden_size, "hidden_size")
    for layer_type, label, dim in (
        ("sliding_attention", "sliding-layer", "head_dim"),
        ("full_attention", "full-layer", "global_head_dim"),
    ):
        ti, di = _first(t, layer_type), _first(d, layer_type)
        if ti is None or di is None:
            if di is not None:
                out.append(f"the drafter has {layer_type} layers but the target has none")
            continue
        differ(f"{label} KV heads", d.layer_kv_heads(di), t.layer_kv_heads(ti))
        differ(dim, d.layer_head_dim(di), t.layer_head_dim(ti))
        tr, dr = _rope(t.rope_parameters, layer_type), _rope(d.rope_parameters, layer_type)
        if tr != dr:
            out.append(f"{layer_type} rope_parameters {dr} != target {tr}")
    differ("sliding_window", d.sliding_window, t.sliding_window)
    differ("vocab_size", d.vocab_size, t.vocab_size)
    return out


def _first(cfg, layer_type: str) -> Optional[int]:
    return next((i for i, lt in enumerate(cfg.layer_types) if lt == layer_type), None)


def _rope(rope_parameters: dict, layer_type: str) -> dict:
    """One layer type's RoPE settings with library defaults filled in, for comparison."""
    rope = dict((rope_parameters or {}).get(layer_type) or {})
    rope.setdefault("rope_type", "default")
    rope.setdefault("partial_rotary_factor", 1.0)
    return {
        k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        for k, v in sorted(rope.items())
        if v is not None
    }

"""Loading a Gemma 4 target and its MTP drafter: ``load(model, drafter)``.

Stages, one module each: ``hub`` (folder or Hub repo id -> local folder), ``weights``
(safetensors -> model), ``pair_fit`` (roles and pair fit), ``tokenizer``, ``convert``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..errors import MtpError
from ..models.config import DRAFTER_MODEL_TYPES, TARGET_MODEL_TYPES, DrafterConfig, TargetConfig
from ..ops.matmul import shard_matmuls
from . import hub, pair_fit, weights
from .tokenizer import load_tokenizer


@dataclass
class Pair:
    """A loaded target, its drafter (None when loaded without one) and the tokenizer."""

    target: nn.Module
    target_config: TargetConfig
    drafter: Optional[nn.Module]
    drafter_config: Optional[DrafterConfig]
    tokenizer: TokenizerWrapper
    target_path: Path
    drafter_path: Optional[Path]


def load(model: str, drafter: Optional[str] = None, *, dtype=None, matmul_threads: Optional[int] = None) -> Pair:
    """Load a Gemma 4 target, optionally its MTP drafter, and the target's tokenizer.

    Args:
        model (str): local folder or Hugging Face repo id of the target (HF original,
            text-only, or an mlx-lm conversion, possibly quantized).
        drafter (str, optional): the same for the matching ``-assistant`` checkpoint.
        dtype (str, optional): ``"float32"``, ``"bfloat16"`` or ``"float16"`` to cast the
            floating-point weights to. Default: keep the checkpoints' dtypes.
        matmul_threads (int, optional): CPU threads each large matrix product is split
            across (``mtp_mlx.ops.matmul``; bit-identical results). Default: the machine's
            cores when MLX computes on the CPU, 1 (no split) on a GPU.

    Raises:
        MtpError: a bad path, a failed download, a corrupt checkpoint, swapped roles, or a
            drafter that does not fit the target (checked before any weight is read).
    """
    weights.parse_dtype(dtype)
    if matmul_threads is not None and (isinstance(matmul_threads, bool) or not isinstance(matmul_threads, int)
                                       or matmul_threads < 1):
        raise MtpError(f"matmul_threads {matmul_threads!r} is out of range: use 1 or more (1 = no split)")
    target_path = hub.resolve(model, "model")
    drafter_path = hub.resolve(drafter, "drafter") if drafter is not None else None
    target_config, drafter_config = check_configs(
        target_path, drafter_path, target_name=model, drafter_name=drafter
    )
    target, target_config = weights.load_target(target_path, dtype)
    drafter_model = None
    if drafter_path is not None:
        drafter_model, drafter_config = weights.load_drafter(drafter_path, dtype)
    for m in (target, drafter_model):
        shard_matmuls(m, matmul_threads)
    return Pair(
        target=target,
        target_config=target_config,
        drafter=drafter_model,
        drafter_config=drafter_config,
        tokenizer=load_tokenizer(target_path),
        target_path=target_path,
        drafter_path=drafter_path,
    )


def check_configs(
    target_path: Path,
    drafter_path: Optional[Path],
    *,
    target_name: Optional[str] = None,
    drafter_name: Optional[str] = None,
):
    """Read both config.json files and check roles and fit, before loading any weights.

    Returns ``(TargetConfig, DrafterConfig or None)``; the names (what the user typed,
    default the paths) are used in error messages.
    """
    target_name = target_name or str(target_path)
    drafter_name = drafter_name or str(drafter_path)
    raw_t = weights.read_config(target_path)
    raw_d = weights.read_config(drafter_path) if drafter_path is not None else None
    if raw_d is not None and _swapped(raw_t, raw_d):
        raise MtpError(
            f"model and drafter are swapped: {target_name} is a drafter and {drafter_name} "
            "is a target model: pass them the other way round"
        )
    pair_fit.check_role(raw_t, "model", target_name)
    target_config = pair_fit.parse_target(raw_t, target_path)
    if raw_d is None:
        return target_config, None
    pair_fit.check_role(raw_d, "drafter", drafter_name)
    drafter_config = pair_fit.parse_drafter(raw_d, drafter_path)
    pair_fit.check_pair(
        target_config, drafter_config, target_name=target_name, drafter_name=drafter_name
    )
    return target_config, drafter_config


def _swapped(raw_t: dict, raw_d: dict) -> bool:
    return (
        raw_t.get("model_type") in DRAFTER_MODEL_TYPES
        and raw_d.get("model_type") in TARGET_MODEL_TYPES
    )


__all__ = ["Pair", "load", "check_configs", "load_tokenizer"]

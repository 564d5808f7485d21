"""Convert a Gemma 4 target (and its drafter) to MLX folders: cast, optionally quantize.

The target is written in mlx-lm's own layout for Gemma 4 (``language_model.model.*`` for
the multimodal ``gemma4`` checkpoints, ``model.*`` for text-only ``gemma4_text``), with an
mlx-lm ``quantization`` block, so ``mlx_lm.load`` and mlx-community tools read it too. The
drafter keeps the HF assistant layout. Writing is atomic: everything goes to a temporary
folder beside the destination and is moved into place only when complete; any error or
Ctrl-C removes it.

Not here: reading checkpoints (``weights``), the command line (``mtp_mlx.cli``).
"""

import dataclasses
import json
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.utils import make_shards
from tqdm import tqdm

from ..errors import MtpError
from . import check_configs, hub, weights

QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
# mlx-lm keeps the MoE router at 8 bits, group 64, whatever the rest gets (gemma4_text.py).
ROUTER_QUANT = {"group_size": 64, "bits": 8, "mode": "affine"}
# Copied from the target's folder: tokenizer, chat template, EOS ids.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "generation_config.json",
)
_CONDGEN_TYPES = ("gemma4", "gemma4_unified")
_DROPPED_CONFIG_KEYS = ("vision_config", "audio_config", "quantization_config", "auto_map",
                        "per_layer_config")


@dataclasses.dataclass
class Converted:
    """Where ``convert`` wrote the target and (when given) the drafter."""

    target_path: Path
    drafter_path: Optional[Path]


def convert(
    model: str,
    out: str,
    *,
    drafter: Optional[str] = None,
    drafter_out: Optional[str] = None,
    dtype: Optional[str] = "bfloat16",
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
    drafter_q_bits: Optional[int] = None,
    drafter_q_group_size: int = 64,
    force: bool = False,
    progress: bool = True,
) -> Converted:
    """Write ``model`` (and ``drafter``) as MLX folders.

    Args:
        model (str): local folder or Hub repo id of the Gemma 4 target.
        out (str): output folder for the target.
        drafter (str, optional): local folder or Hub repo id of its ``-assistant`` drafter.
        drafter_out (str, optional): output folder for the drafter. Default: ``out/assistant``.
        dtype (str, optional): ``float32``, ``bfloat16`` or ``float16``; None keeps the
            checkpoint's. Default: ``bfloat16``.
        q_bits (int, optional): quantize the target to this many bits. Default: no.
        q_group_size (int): the target's quantization group size. Default: 64.
        drafter_q_bits (int, optional): quantize the drafter to this many bits. Default: no.
        drafter_q_group_size (int): the drafter's quantization group size. Default: 64.
        force (bool): replace non-empty output folders. Default: ``False``.
        progress (bool): show a progress bar while writing tensors. Default: ``True``.

    Raises:
        MtpError: bad arguments or input checkpoints, or an output folder in the way.
    """
    weights.parse_dtype(dtype)
    _check_quant_args("", q_bits, q_group_size)
    _check_quant_args("drafter ", drafter_q_bits, drafter_q_group_size)
    if drafter is None and (drafter_q_bits is not None or drafter_out is not None):
        raise MtpError("drafter options were given without a drafter: pass the drafter too")
    src = hub.resolve(model, "model")
    dsrc = hub.resolve(drafter, "drafter") if drafter is not None else None
    tcfg, dcfg = check_configs(src, dsrc, target_name=model, drafter_name=drafter)
    dest = Path(out).expanduser()
    ddest = Path(drafter_out).expanduser() if drafter_out else dest / "assistant"
    _check_destinations(src, dest, dsrc, ddest if dsrc else None, force)
    _check_source(src, tcfg.quantization, q_bits, "model")
    if dsrc is not None:
        _check_source(dsrc, dcfg.quantization, drafter_q_bits, "drafter")

    staging = _Staging()
    try:
        tmp = staging.folder(dest)
        target, tcfg = weights.load_target(src, dtype, lazy=True)
        if q_bits:
            _quantize(target, q_bits, q_group_size, router=tcfg.text.enable_moe_block)
        prefix = "language_model.model." if tcfg.model_type in _CONDGEN_TYPES else "model."
        _write_weights(tmp, target, prefix, progress)
        _write_json(tmp / "config.json", _target_config(tcfg, target, prefix, dtype))
        _copy_files(src, tmp, TOKENIZER_FILES, pattern="*.jinja")
        if dsrc is not None:
            dtmp = staging.folder(ddest, inside=(dest, tmp))
            dmodel, dcfg = weights.load_drafter(dsrc, dtype, lazy=True)
            if drafter_q_bits:
                _quantize(dmodel, drafter_q_bits, drafter_q_group_size, router=False)
            _write_weights(dtmp, dmodel, "", progress)
            _write_json(dtmp / "config.json", _drafter_config(dcfg, dmodel, dtype))
            _copy_files(dsrc, dtmp, ("generation_config.json",))
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    return Converted(dest, ddest if dsrc is not None else None)


# ---- checks before any work ---------------------------------------------------------------
def _check_quant_args(who: str, bits: Optional[int], group_size: int) -> None:
    if bits is not None and bits not in QUANT_BITS:
        raise MtpError(f"{who}quantization bits {bits} is not supported: use one of {QUANT_BITS}")
    if group_size not in QUANT_GROUP_SIZES:
        raise MtpError(
            f"{who}quantization group size {group_size} is not supported: "
            f"use one of {QUANT_GROUP_SIZES}"
        )


def _check_source(path: Path, quantization: Optional[dict], bits: Optional[int], role: str):
    if bits and quantization:
        raise MtpError(
            f"{role} {path} is already quantized: convert from its bf16 original to quantize"
        )
    if role == "model" and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise MtpError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer "
            "files from the original checkpoint into it"
        )


def _check_destinations(src, dest, dsrc, ddest, force: bool) -> None:
    sources = [src] + ([dsrc] if dsrc is not None else [])
    dests = [dest] + ([ddest] if ddest is not None else [])
    if ddest is not None and ddest.resolve() == dest.resolve():
        raise MtpError(f"the drafter output folder {ddest} is the model output folder: choose another")
    for target in dests:
        r_dst = target.resolve()
        for source in sources:
            r_src = source.resolve()
            if r_src == r_dst or r_dst in r_src.parents:
                raise MtpError(
                    f"output folder {target} would replace the input checkpoint {source}: "
                    "choose another output folder"
                )
        if target.is_file():
            raise MtpError(f"output folder {target} is a file: choose another output folder")
        if target.is_dir() and any(target.iterdir()) and not force:
            raise MtpError(
                f"output folder {target} already exists and is not empty: choose another "
                "folder, or overwrite it with --force"
            )


# ---- quantization ---------------------------------------------------------------------------
def _quantize(model: nn.Module, bits: int, group_size: int, *, router: bool) -> None:
    nn.quantize(
        model, group_size=group_size, bits=bits, class_predicate=_predicate(group_size, router)
    )


def _predicate(group_size: int, router: bool) -> Callable:
    """Quantize every Linear/Embedding/SwitchLinear whose input size fits the group size.

    Embeddings are quantized too (as mlx-lm does): the drafter reads target embedding rows
    through the embedding module, which dequantizes them (a plain gather would return packed integers).
    """

    def predicate(path: str, m: nn.Module):
        if not hasattr(m, "to_quantized"):
            return False
        if router and path.endswith("router.proj"):
            return dict(ROUTER_QUANT) if m.weight.shape[-1] % ROUTER_QUANT["group_size"] == 0 else False
        return m.weight.shape[-1] % group_size == 0

    return predicate


def _quantization_block(model: nn.Module, prefix: str) -> Optional[dict]:
    """mlx-lm's ``quantization`` config: the common setting plus per-path exceptions."""
    quantized = {
        prefix + name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
    }
    if not quantized:
        return None
    common = Counter(tuple(sorted(q.items())) for q in quantized.values()).most_common(1)[0][0]
    block = dict(common)
    block.update({path: q for path, q in sorted(quantized.items()) if q != block})
    return block


# ---- writing --------------------------------------------------------------------------------
def _write_weights(folder: Path, model: nn.Module, prefix: str, progress: bool) -> None:
    """Evaluate and save every tensor; shards and index as mlx-lm writes them."""
    tensors = {prefix + k: v for k, v in tree_flatten(model.parameters())}
    shards = make_shards(tensors)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    with tqdm(total=len(tensors), desc=f"writing {folder.name}", unit="tensor",
              disable=not progress) as bar:
        for name, shard in zip(names, shards):
            for key, value in shard.items():
                mx.eval(value)  # reads, casts and quantizes this tensor only
                weight_map[key] = name
                bar.update(1)
            mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
    total = sum(v.nbytes for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(folder / "model.safetensors.index.json", index)


def _target_config(cfg, model: nn.Module, prefix: str, dtype) -> dict:
    """The source config with explicit text fields (mlx-lm's defaults differ from HF's,
    the released configs nest the text model there), vision/audio configs dropped and the quantization block added."""
    raw = {k: v for k, v in cfg.raw.items() if k not in _DROPPED_CONFIG_KEYS}
    text = dataclasses.asdict(cfg.text)
    if "text_config" in raw:
        base = {k: v for k, v in raw["text_config"].items() if k not in _DROPPED_CONFIG_KEYS}
        raw["text_config"] = {**base, **text, "model_type": cfg.text.model_type}
        # mlx-lm's gemma4 wrapper overwrites text_config.vocab_size with this, so it must be the text vocabulary.
        raw["vocab_size"] = cfg.text.vocab_size
    else:
        raw.update(text)
        raw["model_type"] = cfg.model_type
    return _finish_config(raw, model, prefix, dtype)


def _drafter_config(cfg, model: nn.Module, dtype) -> dict:
    raw = {k: v for k, v in cfg.raw.items() if k not in _DROPPED_CONFIG_KEYS}
    text = dict(raw["text_config"])
    text.pop("per_layer_config", None)
    text["global_head_dim"] = cfg.text.global_head_dim
    text["num_global_key_value_heads"] = cfg.text.num_global_key_value_heads
    raw["text_config"] = text
    return _finish_config(raw, model, "", dtype)


def _finish_config(raw: dict, model: nn.Module, prefix: str, dtype) -> dict:
    if dtype is not None:
        for section in (raw, raw.get("text_config") or {}):
            for key in ("dtype", "torch_dtype"):
                if key in section:
                    section[key] = str(dtype)
    block = _quantization_block(model, prefix)
    if block is not None:
        raw["quantization"] = block
        raw["quantization_config"] = block  # mlx-lm writes both (HF tools read the second)
    return dict(sorted(raw.items()))


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n")


def _copy_files(src: Path, dst: Path, names: Tuple[str, ...], pattern: Optional[str] = None):
    files = [src / n for n in names if (src / n).is_file()]
    files += sorted(src.glob(pattern)) if pattern else []
    for f in files:
        shutil.copy2(f, dst / f.name)


class _Staging:
    """Temporary folders beside their destinations, moved into place only on ``commit``."""

    def __init__(self):
        self.pairs: List[Tuple[Path, Path]] = []  # (temporary folder, destination)
        self.made_parents: List[Path] = []

    def folder(self, dest: Path, inside: Optional[Tuple[Path, Path]] = None) -> Path:
        """A fresh folder to fill for ``dest``; inside a staged ``(dest, tmp)`` when under it."""
        if inside is not None:
            outer, outer_tmp = inside
            try:
                rel = dest.resolve().relative_to(outer.resolve())
            except ValueError:
                rel = None
            if rel is not None:
                (outer_tmp / rel).mkdir(parents=True)
                return outer_tmp / rel
        missing = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.made_parents.extend(missing)  # deepest first, so rmdir in this order works
        tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        self.pairs.append((tmp, dest))
        return tmp

    def commit(self) -> None:
        """Move every staged folder into place; on failure put back what was there."""
        done: List[Tuple[Path, Optional[Path]]] = []  # (destination, backup of the old one)
        try:
            for tmp, dest in self.pairs:
                backup = None
                if dest.exists():
                    backup = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
                    os.replace(dest, backup)
                try:
                    os.replace(tmp, dest)
                except BaseException:
                    if backup is not None:
                        os.replace(backup, dest)
                    raise
                done.append((dest, backup))
        except BaseException:
            for dest, backup in reversed(done):
                shutil.rmtree(dest, ignore_errors=True)
                if backup is not None:
                    os.replace(backup, dest)
            raise
        for _, backup in done:
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)

    def abort(self) -> None:
        for tmp, _ in self.pairs:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in self.made_parents:
            try:
                parent.rmdir()
            except OSError:
                pass

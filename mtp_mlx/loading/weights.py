"""Read a checkpoint folder into a model: config.json -> safetensors -> sanitize -> strict load.

Reads HF originals (``Gemma4ForConditionalGeneration``, ``Gemma4ForCausalLM``,
``Gemma4AssistantForCausalLM``) and mlx-lm conversions, plain or quantized. Safetensors
only: pickle files (``*.bin``, ``*.pt``) are refused, and nothing from the folder is ever
imported or executed (``auto_map`` / remote code in config.json is ignored).

Not here: finding or downloading the folder (``hub``), pair checks (``pair_fit``).
"""

import json
import math
import struct
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import infer_quant_config

from ..errors import MtpError
from ..models import gemma4_assistant, gemma4_text
from ..models.config import DrafterConfig, TargetConfig
from . import pair_fit

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Bytes per element of every safetensors dtype, to check data offsets against shapes.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024


def parse_dtype(dtype: Union[str, mx.Dtype, None]) -> Optional[mx.Dtype]:
    """``"bfloat16"`` (or an ``mx.Dtype``, or None for "keep the checkpoint's") to a dtype."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise MtpError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(path: Path) -> dict:
    """The folder's config.json as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise MtpError(
            f"{path} has no config.json: pass a checkpoint folder (config.json and "
            "*.safetensors), or re-download it"
        )
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MtpError(f"{file} is not valid JSON ({err}): re-download or re-convert it") from None
    if not isinstance(config, dict):
        raise MtpError(f"{file} is not a JSON object: re-download or re-convert it")
    return config


def weight_files(path: Path) -> List[Path]:
    """The folder's safetensors files (from the index when there is one)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise MtpError(f"{index} is corrupt: re-download or re-convert the checkpoint") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise MtpError(
                f"{path} lacks {missing[0]}"
                + (f" and {len(missing) - 1} more shard(s)" if len(missing) > 1 else "")
                + " listed in model.safetensors.index.json: re-download or re-convert it"
            )
        return [path / n for n in names]
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise MtpError(
            f"{path} has only PyTorch pickle weights ({pickles[0]}): mtp-mlx reads safetensors "
            "only and never unpickles; use a safetensors copy of this checkpoint"
        )
    raise MtpError(f"{path} has no *.safetensors weights: re-download or re-convert the checkpoint")


def safetensors_header(file: Path) -> Dict[str, dict]:
    """Parse and check one file's header; return ``{tensor name: {dtype, shape, data_offsets}}``.

    A truncated or corrupt file fails here with its name, before any tensor is read.
    """
    file = Path(file)

    def bad(detail: str) -> MtpError:
        return MtpError(f"{file} is truncated or corrupt ({detail}): re-download or re-convert it")

    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"header of {n} bytes in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"bad entry for {name!r}") from None
        if not 0 <= start <= end <= data_size:
            raise bad(f"{name!r} ends at byte {end} of {data_size} data bytes")
        if dtype in _ITEMSIZE and end - start != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"{name!r} has {end - start} bytes for shape {shape} {dtype}")
    return header


def read_weights(path: Path, keep: Callable[[str], bool] = lambda name: True) -> Dict[str, mx.array]:
    """Lazy arrays for the tensors whose names pass ``keep``, from every safetensors file.

    Every header is checked first. ``mx.load`` maps safetensors lazily: an array is read
    from disk only when evaluated, so the tensors we drop here (vision and audio towers)
    are never read into memory; ``test_loading`` checks this with the peak memory counter.
    Files holding no wanted tensor are not opened at all.
    """
    files = weight_files(path)
    wanted = []
    for file in files:
        names = [k for k in safetensors_header(file) if keep(k)]
        if names:
            wanted.append((file, names))
    weights = {}
    for file, names in wanted:
        try:
            arrays = mx.load(str(file))
        except (RuntimeError, ValueError) as err:
            raise MtpError(f"{file} cannot be read ({err}): re-download or re-convert it") from None
        weights.update({k: arrays[k] for k in names})
    return weights


def load_target(path: Path, dtype=None, *, lazy: bool = False) -> Tuple[nn.Module, TargetConfig]:
    """Build the Gemma 4 target from a checkpoint folder.

    Args:
        path (Path): a local checkpoint folder (see ``hub.resolve`` for repo ids).
        dtype (str or mx.Dtype, optional): cast floating-point weights to this dtype.
            Default: keep the checkpoint's.
        lazy (bool): leave the weights unevaluated (``convert`` evaluates them one by one).
            Default: ``False``.

    Returns:
        (model, config): a ``gemma4_text.Model`` and its ``TargetConfig``.
    """
    path = Path(path)
    raw = read_config(path)
    pair_fit.check_role(raw, "model", path)
    config = pair_fit.parse_target(raw, path)
    model = gemma4_text.Model(config.text)
    weights = read_weights(path, keep=gemma4_text.is_text_weight)
    _finish(model, model.sanitize(weights), config.quantization, path, dtype, lazy)
    return model, config


def load_drafter(path: Path, dtype=None, *, lazy: bool = False) -> Tuple[nn.Module, DrafterConfig]:
    """Build the Gemma 4 MTP assistant (drafter) from a checkpoint folder; see ``load_target``."""
    path = Path(path)
    raw = read_config(path)
    pair_fit.check_role(raw, "drafter", path)
    config = pair_fit.parse_drafter(raw, path)
    model = gemma4_assistant.Model(config)
    weights = read_weights(path)
    _finish(model, model.sanitize(weights), config.quantization, path, dtype, lazy)
    return model, config


def _finish(model, weights, quantization, path, dtype, lazy) -> None:
    """Quantize to match the checkpoint, load strictly, cast, evaluate."""
    dtype = parse_dtype(dtype)
    if quantization:
        _quantize_like_checkpoint(model, weights, quantization, path)
    _check_names_and_shapes(model, weights, path)
    model.load_weights(list(weights.items()), strict=True)
    if dtype is not None:
        model.set_dtype(dtype)  # floating-point parameters only; packed ints stay as they are
    model.eval()
    if not lazy:
        mx.eval(model.parameters())


def _quantize_like_checkpoint(model, weights, quantization: dict, path: Path) -> None:
    """Swap in quantized layers wherever the checkpoint stores ``.scales``.

    Bits, group size and mode are read from each layer's own tensor shapes
    (``mlx_lm.utils.infer_quant_config``) rather than from the config's per-path overrides,
    whose keys use the saving library's module paths (mlx-lm's ``language_model.model.``
    prefix), not ours; the shapes cannot disagree with the data.
    """
    if "bits" not in quantization or "group_size" not in quantization:
        method = quantization.get("quant_method", "unknown")
        raise MtpError(
            f"{path} is quantized with {method!r}, which mtp-mlx cannot read: use an MLX "
            "conversion (mlx-community, or `mtp-mlx convert -q`) or the bf16 original"
        )

    def predicate(p: str, m: nn.Module):
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        try:
            return infer_quant_config(p, m, weights)
        except ValueError as err:
            raise MtpError(f"{path}: layer {p} has unreadable quantization ({err}): re-convert it") from None

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _check_names_and_shapes(model: nn.Module, weights: dict, path: Path) -> None:
    """Turn what ``load_weights(strict=True)`` would reject into one readable line."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [
        f"{k} {tuple(weights[k].shape)} (config.json implies {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weight(s): {_few(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected weight(s): {_few(extra)}")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape: {_few(wrong)}")
    if problems:
        raise MtpError(
            f"{path} does not match its config.json: {'; '.join(problems)}: "
            "re-download or re-convert the checkpoint"
        )


def _few(names: list, n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more

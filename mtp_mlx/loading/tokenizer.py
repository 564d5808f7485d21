"""The target's tokenizer, as mlx-lm's ``TokenizerWrapper`` (streaming detokenizer, chat
template), with every end-of-sequence id the checkpoint declares.

Gemma 4 -it models end a turn with ``<turn|>`` (106) as well as ``<eos>`` (1); the ids are
spread over config.json, its ``text_config`` and generation_config.json, so all are merged.
"""

import json
from pathlib import Path
from typing import List

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer as _mlx_lm_load_tokenizer

from ..errors import MtpError


def eos_token_ids(path: Path) -> List[int]:
    """All EOS ids from config.json (top level and ``text_config``) and generation_config.json."""
    path = Path(path)
    ids: List[int] = []
    for name in ("config.json", "generation_config.json"):
        data = _read_json(path / name)
        for source in (data, data.get("text_config") or {}):
            eos = source.get("eos_token_id")
            for i in [eos] if isinstance(eos, int) else list(eos or []):
                if int(i) not in ids:
                    ids.append(int(i))
    return ids


def load_tokenizer(path: Path) -> TokenizerWrapper:
    """Load the tokenizer of the checkpoint folder ``path`` (never remote code)."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise MtpError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer "
            "files from the original checkpoint into it"
        )
    try:
        return _mlx_lm_load_tokenizer(path, eos_token_ids=eos_token_ids(path) or None)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise MtpError(
            f"{path} has an unreadable tokenizer ({type(err).__name__}: {first}): copy the "
            "tokenizer files from the original checkpoint into it"
        ) from None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # generation_config.json is optional; config.json was checked by the loader
    return data if isinstance(data, dict) else {}

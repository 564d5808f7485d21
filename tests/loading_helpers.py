"""Fixture checkpoints for the loading/convert tests (built once by scripts/make_fixtures.py)."""

import functools
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["e2b", "e2b-text", "moe", "dense", "unified", "e2b-mlx", "moe-mlx", "moe-mlx-4bit",
         "e2b-mlx-4bit"]


@functools.lru_cache(maxsize=1)
def fixture_root() -> Path:
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(ROOT / "fixtures", KINDS)

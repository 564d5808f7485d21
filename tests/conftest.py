"""Shared pytest fixtures.

``fixtures`` (alias ``fixtures_dir``): a session-scoped Path to the tiny random checkpoints built by
``scripts/make_fixtures.py`` (all kinds: ``<dir>/<kind>/{target,assistant}``). Default location
``<repo>/fixtures`` (gitignored, reused across runs; the build is skipped for kinds already
there); override with the environment variable ``MTP_MLX_FIXTURES``. Building needs CPU torch +
transformers; without them the fixture skips the test with a reason unless every kind is already
built there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_make_fixtures():
    """Import ``scripts/make_fixtures.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixtures_path() -> Path:
    return Path(os.environ.get("MTP_MLX_FIXTURES") or ROOT / "fixtures")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    out = fixtures_path()
    mf = load_make_fixtures()
    have_torch = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
    if not have_torch and not all(mf._is_complete(out / kind) for kind in mf.ALL_KINDS):
        pytest.skip("building the fixture checkpoints needs CPU torch + transformers (pip install torch==2.13.0)")
    rc = mf.main(["--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def fixtures_dir(fixtures) -> Path:
    return fixtures


@pytest.fixture(scope="session", autouse=True)
def private_tuning_store(tmp_path_factory):
    """The suite never reads or writes the user's tuning store (``~/.cache/mtp-mlx``): stored
    exactness verdicts and policy costs from earlier runs would make a run depend on what ran
    before it. One store per session (processes the tests start inherit it); tests that need
    their own set ``MTP_MLX_HOME`` themselves."""
    old = os.environ.get("MTP_MLX_HOME")
    os.environ["MTP_MLX_HOME"] = str(tmp_path_factory.mktemp("mtp-mlx-home"))
    yield
    if old is None:
        os.environ.pop("MTP_MLX_HOME", None)
    else:
        os.environ["MTP_MLX_HOME"] = old

"""The bundled demonstration pair: a tiny Gemma-4-architecture target and its MTP drafter.

Both were trained from scratch on the Python standard library's own source files by
``scripts/train_demo_pair.py`` (``make demo-pair``) and converted to MLX float16 by
``mtp_mlx.loading.convert``; ``TRAINING.json`` records the recipe, held-out loss, acceptance and
speed. They let ``mtp-mlx generate`` run offline with real acceptance. They are not Gemma and know
nothing but Python-flavoured text.

    import mtp_mlx
    from mtp_mlx.demo import DEMO_DRAFTER, DEMO_TARGET
    pair = mtp_mlx.load(str(DEMO_TARGET), str(DEMO_DRAFTER))
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_TARGET = DEMO_DIR / "target"
DEMO_DRAFTER = DEMO_DIR / "assistant"
DEMO_TRAINING = DEMO_DIR / "TRAINING.json"
DEMO_NOTICE = (
    "no --model given: using the bundled demonstration pair (tiny Gemma-4-architecture models "
    "trained on Python's standard library, not Gemma)"
)


def available() -> bool:
    """Whether the bundled pair is installed (both configs and weights present)."""
    return all((d / f).is_file() for d in (DEMO_TARGET, DEMO_DRAFTER) for f in ("config.json", "model.safetensors"))


__all__ = ["DEMO_DIR", "DEMO_DRAFTER", "DEMO_NOTICE", "DEMO_TARGET", "DEMO_TRAINING", "available"]

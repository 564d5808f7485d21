"""mtp-mlx: lossless Multi-Token-Prediction speculative decoding for Gemma 4 on MLX.

    import mtp_mlx
    pair = mtp_mlx.load("google/gemma-4-E2B-it", drafter="google/gemma-4-E2B-it-assistant")
    for r in mtp_mlx.stream_generate(pair, "Hello", max_tokens=64):
        print(r.text, end="", flush=True)
"""

from .api import (
    BatchResponse,
    BatchResult,
    GenerationResponse,
    batch_generate,
    format_prompt,
    generate,
    stream_generate,
)
from .errors import MtpError
from .loading import Pair, load
from .sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = [
    "BatchResponse",
    "BatchResult",
    "GenerationResponse",
    "SamplingConfig",
    "batch_generate",
    "MtpError",
    "Pair",
    "format_prompt",
    "generate",
    "load",
    "stream_generate",
]

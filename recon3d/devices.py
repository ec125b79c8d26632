"""The front ends' device policy (CLI flags, app start): the GPU when there is one, half precision on it.

The library itself never guesses: models and pipelines load on CPU in float32 unless told otherwise.
"""

from __future__ import annotations

import torch

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def choose_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """``device`` or CUDA when available (else CPU); ``dtype`` or float16 on CUDA (else float32).
    Raises RuntimeError for an unknown device name, ValueError for an unknown dtype."""
    chosen = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        return chosen, torch.float16 if chosen.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    return chosen, DTYPE_NAMES[dtype]

"""What the user is told when a job fails: one line, the same in the app, the CLI and the API.

Errors of the input or the setup (a bad image, a value out of range, a checkpoint that cannot be had, a field
with no surface) and the out-of-memory of a too-large job become a sentence for people; anything else is a bug,
and :func:`user_message` answers None so the front end logs the traceback and says "unexpected error".
"""

from __future__ import annotations

import gc

import torch

from .cancel import Cancelled
from .hub import CheckpointError
from .images import ImageError
from .mesh import EmptyMeshError

USER_ERRORS = (CheckpointError, ImageError, EmptyMeshError, ValueError)
OUT_OF_MEMORY = ("Out of memory: try a lower resolution, fewer samples, a smaller checkpoint or half precision "
                 "(--dtype float16)")
CANCELLED = "The job was cancelled"


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError))


def free_device_memory() -> None:
    """After an out-of-memory error: give cached GPU blocks back so the next job can start."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sentence(text: str) -> str:
    """The first line of ``text``, starting with a capital unless it starts with a name (a file, a repo id)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    first = line.split(" ", 1)[0]
    if any(mark in first for mark in "./:'\"") or not line:
        return line
    return line[:1].upper() + line[1:]


def user_message(error: BaseException) -> str | None:
    """One line for people, or None when ``error`` is unexpected (a bug: the caller logs its traceback).
    An out-of-memory error also frees the device's cached memory, so the next job can run."""
    if isinstance(error, Cancelled):
        return CANCELLED
    if is_out_of_memory(error):
        free_device_memory()
        return OUT_OF_MEMORY
    if isinstance(error, USER_ERRORS):
        return sentence(str(error)) or f"The input was refused ({type(error).__name__})"
    return None


__all__ = ["USER_ERRORS", "free_device_memory", "is_out_of_memory", "sentence", "user_message"]

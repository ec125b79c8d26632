"""Progress events: long jobs are generators of these; the CLI and the app turn them into bars and UI updates."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class Progress:
    stage: str  # short machine name, e.g. "encoder"
    fraction: float  # 0..1 of the whole job
    message: str  # for people
    result: Any = None  # set on the final event only


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so stage timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def timed(timings: dict, stage: str, device: torch.device) -> Iterator[None]:
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def run_to_end(events: Iterator[Progress]) -> Any:
    """Drain a job and return its result."""
    result = None
    for event in events:
        if event.result is not None:
            result = event.result
    return result

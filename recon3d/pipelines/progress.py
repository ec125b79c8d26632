"""Progress events: long jobs are generators of these; the CLI and the app turn them into bars and UI updates."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from ..cancel import CancelToken


@dataclass
class Progress:
    stage: str  # short machine name, e.g. "encoder"
    fraction: float  # 0..1 of the whole job
    message: str  # for people
    result: Any = None  # set on the final event only (sampling: on each finished sample)
    preview: Any = None  # an intermediate state to show (sampling: the current x0 views)
    metrics: dict | None = None  # numbers for plots and bars (SDS: step, loss, t range, elapsed, ETA)


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


@contextmanager
def check_before_each(modules: Iterable[torch.nn.Module], cancel: CancelToken) -> Iterator[None]:
    """Check ``cancel`` before each of ``modules`` runs, so a long forward pass stops between layers."""
    handles = [module.register_forward_pre_hook(lambda module, args: cancel.check()) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

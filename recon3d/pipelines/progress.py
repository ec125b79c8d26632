"""Helpers of long jobs: honest stage timings on any device, and cancellation checks between layers.

The events the jobs yield are in :mod:`recon3d.pipelines.events`."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from ..cancel import CancelToken


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


@contextmanager
def check_before_each(modules: Iterable[torch.nn.Module], cancel: CancelToken) -> Iterator[None]:
    """Check ``cancel`` before each of ``modules`` runs, so a long forward pass stops between layers."""
    handles = [module.register_forward_pre_hook(lambda module, args: cancel.check()) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class StepClock:
    """Seconds left in a loop of ``steps`` equal steps, from the mean of those done so far."""

    def __init__(self, steps: int):
        self.steps, self.start, self.done = steps, time.perf_counter(), 0

    def tick(self) -> float:
        """One step done; the estimated seconds for the rest."""
        self.done += 1
        return (time.perf_counter() - self.start) / self.done * (self.steps - self.done)

    @staticmethod
    def text(seconds: float) -> str:
        """"about 40 s left" (minutes from 2 minutes on; "finishing" under a second)."""
        if seconds < 1:
            return "finishing"
        return f"about {seconds:.0f} s left" if seconds < 120 else f"about {seconds / 60:.0f} min left"

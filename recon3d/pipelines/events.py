"""Typed progress events: every long job is a generator of these; the CLI and the app dispatch on their type.

Every event says how far the whole job is (``fraction``, 0..1) and what is happening, for people (``message``).
The kinds:

- :class:`Queued`: the job waits for the device (its place in line and an estimate of the wait);
- :class:`Stage`: the job entered a named stage (loading, encoding, meshing, ...);
- :class:`Note`: something the user should know, nothing wrong (a prompt was cut, the background was not removed);
- :class:`Preview`: images of the current state, ``views`` (B, V, 3, H, W) in [0, 1] on the CPU;
- :class:`StepReport`: one optimisation step's numbers (score distillation);
- :class:`SampleReady`: one finished sample of several (its result);
- :class:`Exported`: a result made while the job goes on (Export now);
- :class:`Finished`: the job's result, always the last event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

import torch

R = TypeVar("R")


@dataclass(kw_only=True)
class Event:
    fraction: float  # 0..1 of the whole job
    message: str  # for people


@dataclass(kw_only=True)
class Queued(Event):
    position: int  # 1: next in line
    wait_s: float | None  # seconds until it starts, from the server's measured job times (None: not timed yet)


@dataclass(kw_only=True)
class Stage(Event):
    name: str  # short machine name, e.g. "encoder"


@dataclass(kw_only=True)
class Note(Event):
    pass


@dataclass(kw_only=True)
class Preview(Event):
    views: torch.Tensor  # (B, V, 3, H, W) in [0, 1], on the CPU: B objects (samples), V views each
    step: int  # steps done (0 when the job has no steps)
    steps: int


@dataclass(kw_only=True)
class StepReport(Event):
    step: int  # steps done
    steps: int
    loss: float
    t: int  # the diffusion timestep drawn
    t_range: tuple[float, float]  # (min, max) fraction of the schedule t was drawn from
    resolution: int  # render size (px)
    elapsed: float  # seconds since the run started
    eta: float  # seconds left, estimated
    skipped: int = 0  # steps so far whose loss or gradient was not finite (no update; loss is NaN for this one)
    paused: float = 0.0  # seconds so far the run gave the device up to other jobs (recon3d.sharing)


@dataclass(kw_only=True)
class SampleReady(Event, Generic[R]):
    sample: R


@dataclass(kw_only=True)
class Exported(Event, Generic[R]):
    result: R


@dataclass(kw_only=True)
class Finished(Event, Generic[R]):
    result: R


def run_to_end(events: Iterable[Event]) -> object:
    """Drain a job and return its result (the :class:`Finished` event's)."""
    result = None
    for event in events:
        if isinstance(event, Finished):
            result = event.result
    return result


__all__ = ["Event", "Exported", "Finished", "Note", "Preview", "SampleReady", "Stage", "StepReport", "run_to_end"]

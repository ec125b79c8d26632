"""One device shared fairly by short jobs and long runs.

A public server serves jobs of seconds (Image to 3D, samples, a quick look, an export) beside runs of many
minutes (score distillation). If the long run held the device to its end, every short job would wait for it. So a
long run holds the device one step at a time (:meth:`DeviceLease.step`) and does not take the next step while a
short job waits; a short job holds it for its whole job (:meth:`DeviceLease.short`). A short job therefore waits
at most for the step in progress, and the long run is paused for as long as short jobs keep coming, which it
reports (:attr:`DeviceLease.waited` per step) so that its ETA can say so.

The lease is a plain lock with a priority rule, for threads of one process; it knows no method and no UI.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .cancel import NEVER, CancelToken

POLL_S = 0.05  # how often a waiting job checks its cancel token


class DeviceLease:
    """Who may use the device now: one short job, or one step of a long run; short jobs first."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._busy = False
        self._short_waiting = 0

    @property
    def short_jobs_waiting(self) -> int:
        with self._condition:
            return self._short_waiting

    def _wait_until_free(self, may_go, cancel: CancelToken) -> float:
        """Block (checking ``cancel``) until ``may_go()`` holds, then take the device; the seconds waited."""
        start = time.perf_counter()
        while not may_go():
            self._condition.wait(POLL_S)
            cancel.check()
        self._busy = True
        return time.perf_counter() - start

    def _release(self) -> None:
        with self._condition:
            self._busy = False
            self._condition.notify_all()

    @contextmanager
    def short(self, cancel: CancelToken = NEVER) -> Iterator[float]:
        """Hold the device for a whole short job; yields the seconds it waited (at most a long run's step, plus
        the short jobs ahead of it)."""
        with self._condition:
            self._short_waiting += 1
            try:
                waited = self._wait_until_free(lambda: not self._busy, cancel)
            finally:
                self._short_waiting -= 1
        try:
            yield waited
        finally:
            self._release()

    @contextmanager
    def step(self, cancel: CancelToken = NEVER) -> Iterator[float]:
        """Hold the device for one step of a long run, once no short job waits; yields the seconds it waited
        (the run's pause for other jobs)."""
        with self._condition:
            waited = self._wait_until_free(lambda: not self._busy and self._short_waiting == 0, cancel)
        try:
            yield waited
        finally:
            self._release()


__all__ = ["DeviceLease"]

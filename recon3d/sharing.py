"""One device shared fairly by short jobs and long runs, with queues that say where a job stands.

A public server serves jobs of seconds (Image to 3D, samples, a quick look) beside runs of many minutes (score
distillation). If the long run held the device to its end, every short job would wait for it. So a long run holds
the device one step at a time (:meth:`Ticket.step`) and does not take the next step while a short job waits; a
short job holds it for its whole job. A short job therefore waits at most for the step in progress (and the short
jobs ahead of it), and the long run is paused for as long as short jobs keep coming, which it reports (the seconds
each step waited) so that its ETA can say so.

Jobs queue first come, first served: short jobs in one line, long runs in another (one runs at a time, for
memory). A :class:`Ticket` is a job's place; while it waits it reports a :class:`QueuePlace`: its position and the
seconds until it starts, estimated from the device times this lease measured (:class:`JobTimes`), not guessed.
The operator's limits (jobs waiting at most, long runs per owner) refuse a job at once with a one-line reason.

The lease is a lock with a priority rule, for threads of one process; it knows no method and no UI: a job's
``kind`` is a name for people ("Image to 3D") under which its times are kept.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .cancel import NEVER, CancelToken

POLL_S = 0.05  # how often a waiting job checks its cancel token and its turn
TIMES_KEPT = 20  # a kind's typical time is the median of its last this many jobs


class QueueRefused(ValueError):
    """A job the queues cannot take now: too many are waiting, or its owner has a long run already."""


def ordinal(position: int) -> str:
    suffix = "th" if 10 <= position % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(position % 10, "th")
    return f"{position}{suffix}"


def duration_text(seconds: float) -> str:
    """"12 s", "4 min", "2.5 h": what people read in a queue line."""
    if seconds < 120:
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class QueuePlace:
    """Where a waiting job stands: ``position`` 1 is next; ``wait_s`` the seconds until it starts, from the
    lease's measured job times (None while a job ahead is of a kind not timed here yet)."""

    position: int
    wait_s: float | None

    def text(self) -> str:
        where = "next in line" if self.position == 1 else f"{ordinal(self.position)} in line"
        if self.wait_s is None:
            return f"{where} (no estimate yet: this server has not timed every job ahead)"
        return f"{where}, starts in about {duration_text(self.wait_s)} (from this server's recent job times)"


class JobTimes:
    """How long each kind of job held the device here lately, per unit of its work (e.g. samples x steps): the
    median of the last ``kept``, so one odd job does not move the estimate much."""

    def __init__(self, kept: int = TIMES_KEPT):
        self._kept, self._seconds, self._lock = kept, {}, threading.Lock()

    def record(self, kind: str, seconds: float, work: float = 1.0) -> None:
        with self._lock:
            runs = self._seconds.setdefault(kind, deque(maxlen=self._kept))
            runs.append(float(seconds) / max(work, 1e-9))

    def typical(self, kind: str, work: float = 1.0) -> float | None:
        """The seconds a ``kind`` job of ``work`` units typically takes here (None: never timed)."""
        with self._lock:
            runs = self._seconds.get(kind)
            return statistics.median(runs) * work if runs else None


class Ticket:
    """A job's place in one of the lease's lines: a short job's (``steps`` 0), holding the device once its turn
    comes, or a long run's (``steps`` > 0), which then holds it step by step. ``work`` is the short job's size in
    the units its kind is timed in (e.g. samples x steps). Use it as a context manager: leaving it (done, failed or
    cancelled) frees the place and the device."""

    def __init__(self, lease: "DeviceLease", kind: str, owner: str, steps: int, work: float = 1.0):
        self.lease, self.kind, self.owner, self.steps_left, self.work = lease, kind, owner, steps, work
        self.started: float | None = None  # when its turn came (perf_counter)
        self.succeeded = False  # the job ended without an error: its time is kept

    @property
    def step_kind(self) -> str:
        return f"{self.kind} step"

    def places(self, cancel: CancelToken = NEVER, every_s: float = 1.0) -> Iterator[QueuePlace]:
        """Wait for this job's turn, yielding its place at once when it has to wait, then every ``every_s``
        seconds; returns when its turn has come (a short job then holds the device)."""
        last = -float("inf")
        while not self.lease._take_turn(self):
            if time.perf_counter() - last >= every_s:
                last = time.perf_counter()
                yield self.lease._place(self)
            with self.lease._condition:
                self.lease._condition.wait(POLL_S)
            cancel.check()
        self.started = time.perf_counter()

    @contextmanager
    def step(self, cancel: CancelToken = NEVER) -> Iterator[float]:
        """One step of a long run (its turn come): hold the device once no short job waits; yields the seconds
        it waited (the run's pause for other jobs). Its time is kept for the line's estimates."""
        with self.lease.step(cancel, kind=self.step_kind) as waited:
            yield waited
        self.steps_left = max(0, self.steps_left - 1)

    def hold(self, cancel: CancelToken, what: str) -> Iterator[float]:
        """Device work of the run that is not one of its steps (``what``: "load", "export"), held as a step is
        and timed under its own name."""
        return self.lease.hold(cancel, f"{self.kind} {what}")

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.succeeded = error_type is None
        self.lease._leave(self)


class DeviceLease:
    """Who may use the device now: one short job, or one step of a long run; short jobs first, each line in
    order. ``max_waiting`` and ``max_long_waiting`` bound the lines (None: no bound); ``long_runs_per_owner``
    is how many long runs one owner (a visitor) may have going or waiting."""

    def __init__(self, max_waiting: int | None = None, max_long_waiting: int | None = None,
                 long_runs_per_owner: int | None = None) -> None:
        self.max_waiting, self.max_long_waiting = max_waiting, max_long_waiting
        self.long_runs_per_owner = long_runs_per_owner
        self.times = JobTimes()
        self._condition = threading.Condition()
        self._holder: tuple[str, float, float] | None = None  # (kind, work, since) of the job or step on the device
        self._short: deque[Ticket] = deque()  # short jobs waiting, in order
        self._long: deque[Ticket] = deque()  # long runs: the one running first, then those waiting

    # -- joining a line --------------------------------------------------------------------------------------------

    def short_job(self, kind: str, owner: str = "", work: float = 1.0) -> Ticket:
        """A place in the short jobs' line for a job of ``work`` units, or :class:`QueueRefused` when it is full."""
        with self._condition:
            if self.max_waiting is not None and len(self._short) >= self.max_waiting:
                raise QueueRefused(f"the queue is full ({len(self._short)} jobs waiting): try again in a few "
                                   f"minutes")
            ticket = Ticket(self, kind, owner, steps=0, work=work)
            self._short.append(ticket)
            return ticket

    def long_run(self, kind: str, owner: str, steps: int) -> Ticket:
        """A place in the long runs' line for a run of ``steps`` steps, or :class:`QueueRefused` when the owner
        has as many runs as allowed or the line is full."""
        with self._condition:
            mine = sum(ticket.owner == owner for ticket in self._long)
            if self.long_runs_per_owner is not None and mine >= self.long_runs_per_owner:
                raise QueueRefused(f"you already have a {kind} run going or waiting ({self.long_runs_per_owner} "
                                   f"per visitor on this server): stop it, or wait for its end")
            waiting = max(0, len(self._long) - 1)
            if self.max_long_waiting is not None and self._long and waiting >= self.max_long_waiting:
                raise QueueRefused(f"the {kind} queue is full ({waiting} runs waiting): try again later")
            ticket = Ticket(self, kind, owner, steps=max(1, int(steps)))
            self._long.append(ticket)
            return ticket

    # -- whole jobs and single steps (the simple forms) ------------------------------------------------------------

    @contextmanager
    def short(self, cancel: CancelToken = NEVER, kind: str = "short job") -> Iterator[float]:
        """Hold the device for a whole short job; yields the seconds it waited (at most a long run's step, plus
        the short jobs ahead of it)."""
        start = time.perf_counter()
        with self.short_job(kind) as ticket:
            for _ in ticket.places(cancel):
                pass
            yield time.perf_counter() - start

    @contextmanager
    def step(self, cancel: CancelToken = NEVER, kind: str = "step") -> Iterator[float]:
        """Hold the device for one step of a long run, once no short job waits; yields the seconds it waited
        (the run's pause for other jobs). A step that ends without an error is timed under ``kind``."""
        start = time.perf_counter()
        with self._condition:
            while self._holder is not None or self._short:
                self._condition.wait(POLL_S)
                cancel.check()
            self._holder = (kind, 1.0, time.perf_counter())
        took = time.perf_counter()
        try:
            yield took - start
            self.times.record(kind, time.perf_counter() - took)
        finally:
            self._release()

    def hold(self, cancel: CancelToken, what: str) -> Iterator[float]:
        """Work of a long run between its steps (loading, an export), held as a step and timed as ``what``."""
        return self.step(cancel, kind=what)

    # -- inside ----------------------------------------------------------------------------------------------------

    def _take_turn(self, ticket: Ticket) -> bool:
        """Whether ``ticket``'s turn has come (a short job then takes the device)."""
        with self._condition:
            if ticket in self._long:
                return self._long[0] is ticket
            if self._holder is None and self._short and self._short[0] is ticket:
                self._short.popleft()
                self._holder = (ticket.kind, ticket.work, time.perf_counter())
                return True
            return False

    def _leave(self, ticket: Ticket) -> None:
        with self._condition:
            if ticket in self._short:  # left before its turn (cancelled)
                self._short.remove(ticket)
            elif ticket in self._long:
                self._long.remove(ticket)
            elif ticket.started is not None:  # a short job on the device
                if ticket.succeeded:
                    self.times.record(ticket.kind, time.perf_counter() - ticket.started, ticket.work)
                self._holder = None
            self._condition.notify_all()

    def _release(self) -> None:
        with self._condition:
            self._holder = None
            self._condition.notify_all()

    def _remaining(self, kind: str, work: float = 1.0, since: float | None = None) -> float | None:
        """The typical seconds of a ``kind`` job of ``work`` units, less what has run already when it started at
        ``since``."""
        typical = self.times.typical(kind, work)
        if typical is None or since is None:
            return typical
        return max(0.0, typical - (time.perf_counter() - since))

    def _place(self, ticket: Ticket) -> QueuePlace:
        """Where ``ticket`` stands and the seconds until its turn: the rest of the job on the device plus the
        typical times of those ahead; for a long run, the steps left of the runs ahead (the running one first,
        which is not counted in the position: the next run is "next in line")."""
        with self._condition:
            if ticket in self._long:
                ahead = list(self._long)[:list(self._long).index(ticket)]
                parts = [self._remaining(run.step_kind, run.steps_left) for run in ahead]
                position = len(ahead)
            else:
                ahead = list(self._short)[:list(self._short).index(ticket)] if ticket in self._short else []
                parts = [self._remaining(job.kind, job.work) for job in ahead]
                if self._holder is not None:
                    parts.append(self._remaining(*self._holder))
                position = len(ahead) + 1
        wait = None if any(part is None for part in parts) else sum(parts)
        return QueuePlace(max(position, 1), wait)


__all__ = ["DeviceLease", "JobTimes", "QueuePlace", "QueueRefused", "Ticket", "duration_text", "ordinal"]

"""Cancellation of long jobs: a token the owner sets, checked by the work between small steps.

The library's long loops (grid slabs and chunks, transformer layers, turntable frames) call
``token.check()``, which raises :class:`Cancelled` once the owner (the app's Cancel button, a visitor who left,
Ctrl-C) called ``token.cancel()``. Checking is a flag read, so it is cheap enough for every chunk.
"""

from __future__ import annotations

import threading


class Cancelled(Exception):
    """The job was cancelled by its owner; nothing is wrong with the input."""


class CancelToken:
    """A thread-safe flag: ``cancel()`` from any thread, ``check()`` in the worker."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the job was cancelled."""
        if self._event.is_set():
            raise Cancelled("the job was cancelled")


class _NeverCancelled(CancelToken):
    def cancel(self) -> None:
        raise TypeError("NEVER cannot be cancelled: give the job a CancelToken of its own")


NEVER = _NeverCancelled()  # the default for callers that do not cancel

"""Per-visitor state of a long-running front end (the app): private output files and cancellable jobs.

Outputs: each visitor's files go into a folder with a random name, and every file name carries a 128-bit random
token, so a visitor can neither guess nor enumerate another's URLs. A visitor's folder is removed when the
visitor leaves (:meth:`Sessions.end`); every folder is also removed once it has been idle for ``ttl_s`` seconds,
which is what cleans up after callers without a browser session (gradio_client, REST), who never "leave".
Jobs: each job runs with a :class:`~recon3d.cancel.CancelToken` registered under its visitor, so leaving
cancels it. :func:`iterate_in_thread` runs a blocking pipeline in a worker thread for an async server and
cancels it when the server stops listening.
No UI code here: the app passes the folder (inside its web framework's cache) and the visitor ids.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, TypeVar

from .cancel import CancelToken, Cancelled

T = TypeVar("T")
TOKEN_BYTES = 16  # 128 bits


def safe_stem(text: str, limit: int = 40) -> str:
    """A file-name stem from user text: letters, digits, '-' and '_' only, at most ``limit`` characters."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:limit].strip("-") or "output"


class Sessions:
    """Output folders and running jobs per visitor (``session`` is the front end's id of a visitor)."""

    def __init__(self, root: str | Path, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self.root, self.ttl_s, self.clock = Path(root), float(ttl_s), clock
        self._folders: dict[str, Path] = {}
        self._last_used: dict[str, float] = {}
        self._jobs: dict[str, set[CancelToken]] = {}
        self._lock = threading.Lock()

    def output_path(self, session: str, stem: str, suffix: str) -> Path:
        """A new, unguessable path in the visitor's folder: ``<random folder>/<stem>-<128-bit token><suffix>``."""
        with self._lock:
            folder = self._folders.get(session)
            if folder is None:
                folder = self._folders[session] = self.root / secrets.token_hex(TOKEN_BYTES)
            folder.mkdir(parents=True, exist_ok=True)
            self._last_used[session] = self.clock()
        return folder / f"{safe_stem(stem)}-{secrets.token_hex(TOKEN_BYTES)}{suffix}"

    @contextmanager
    def job(self, session: str) -> Iterator[CancelToken]:
        """A cancel token for one job of ``session``, cancelled if the visitor leaves while it runs."""
        token = CancelToken()
        with self._lock:
            self._jobs.setdefault(session, set()).add(token)
        try:
            yield token
        finally:
            with self._lock:
                self._jobs.get(session, set()).discard(token)
                if session in self._last_used:
                    self._last_used[session] = self.clock()

    def running_jobs(self, session: str) -> int:
        with self._lock:
            return len(self._jobs.get(session, ()))

    def end(self, session: str) -> None:
        """The visitor left: cancel their jobs and delete their files."""
        with self._lock:
            for token in self._jobs.pop(session, ()):
                token.cancel()
            folder = self._folders.pop(session, None)
            self._last_used.pop(session, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def expire(self) -> list[str]:
        """Remove the folders of visitors idle for longer than ``ttl_s`` and with no job running; their ids."""
        now = self.clock()
        with self._lock:
            stale = [s for s, used in self._last_used.items() if now - used > self.ttl_s and not self._jobs.get(s)]
        for session in stale:
            self.end(session)
        return stale

    def start_janitor(self, every_s: float = 60.0) -> threading.Thread:
        """A daemon thread that calls :meth:`expire` every ``every_s`` seconds."""
        def loop() -> None:
            while True:
                time.sleep(every_s)
                self.expire()

        thread = threading.Thread(target=loop, name="recon3d-outputs-janitor", daemon=True)
        thread.start()
        return thread


async def iterate_in_thread(items: Iterator[T], cancel: CancelToken, join_timeout_s: float = 30.0) -> AsyncIterator[T]:
    """Advance a blocking generator in a worker thread and yield its items to async code.

    If the consumer stops early (the server cancelled the task, the generator was closed) the token is
    cancelled, and the consumer waits (up to ``join_timeout_s``) for the worker to stop at its next check, so
    that the next job does not start while this one still holds the device.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def send(kind: str, value=None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            cancel.cancel()

    def work() -> None:
        try:
            for item in items:
                send("item", item)
                cancel.check()
        except BaseException as exc:  # delivered to the consumer, which re-raises it
            send("error", exc)
        else:
            send("done")
        finally:  # a generator stopped between items runs its own clean-up here, in this thread
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="recon3d-job", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "error":
                finished = True
                raise value
            else:
                finished = True
                return
    finally:
        if not finished:
            cancel.cancel()
            await loop.run_in_executor(None, worker.join, join_timeout_s)


__all__ = ["Cancelled", "Sessions", "iterate_in_thread", "safe_stem"]

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
        self._adopted: dict[str, set[Path]] = {}  # files made elsewhere (uploads) that leave with the visitor
        self._ended: dict[str, float] = {}  # visitors who left (kept for ttl_s): nothing more is written for them
        self._kept: dict[str, dict[str, object]] = {}  # results kept in memory for a visitor (to export again)
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Remove everything under the root: leftovers of an earlier run that no session knows any more."""
        shutil.rmtree(self.root, ignore_errors=True)

    def output_path(self, session: str, stem: str, suffix: str) -> Path:
        """A new, unguessable path in the visitor's folder: ``<random folder>/<stem>-<128-bit token><suffix>``.
        Raises :class:`Cancelled` for a visitor who already left, so a late job writes nothing."""
        with self._lock:
            if session in self._ended:
                raise Cancelled("the visitor left")
            folder = self._folders.get(session)
            if folder is None:
                folder = self._folders[session] = self.root / secrets.token_hex(TOKEN_BYTES)
            folder.mkdir(parents=True, exist_ok=True)
            self._last_used[session] = self.clock()
        return folder / f"{safe_stem(stem)}-{secrets.token_hex(TOKEN_BYTES)}{suffix}"

    def adopt(self, session: str, path: str | Path) -> None:
        """Delete ``path`` (e.g. the visitor's upload) when the visitor leaves or expires."""
        with self._lock:
            self._adopted.setdefault(session, set()).add(Path(path))
            self._last_used[session] = self.clock()

    @contextmanager
    def job(self, session: str) -> Iterator[CancelToken]:
        """A cancel token for one job of ``session``, cancelled if the visitor leaves while it runs."""
        token = CancelToken()
        with self._lock:
            if session in self._ended:
                token.cancel()
            self._jobs.setdefault(session, set()).add(token)
        try:
            yield token
        finally:
            with self._lock:
                jobs = self._jobs.get(session, set())
                jobs.discard(token)
                if not jobs:
                    self._jobs.pop(session, None)
                if session in self._last_used:
                    self._last_used[session] = self.clock()

    def running_jobs(self, session: str) -> int:
        with self._lock:
            return len(self._jobs.get(session, ()))

    def end(self, session: str) -> None:
        """The visitor left: cancel their jobs, delete their files, write nothing more for them."""
        with self._lock:
            for token in self._jobs.get(session, ()):
                token.cancel()
            self._ended[session] = self.clock()
            removed = self._forget(session)
        _delete(removed)

    def expire(self) -> list[str]:
        """Delete the files of visitors idle for longer than ``ttl_s`` with no job running; their ids."""
        now, expired, removed = self.clock(), [], []
        with self._lock:  # decided and forgotten under the lock: a job starting now finds a fresh folder
            for session, used in list(self._last_used.items()):
                if now - used > self.ttl_s and not self._jobs.get(session):
                    expired.append(session)
                    removed += self._forget(session)
            self._ended = {s: when for s, when in self._ended.items() if now - when <= self.ttl_s}
        _delete(removed)
        return expired

    def keep(self, session: str, key: str, value: object) -> None:
        """Keep ``value`` (e.g. what an export needs of a result) for the visitor under ``key``, replacing what
        was kept there; it leaves with the visitor's files."""
        with self._lock:
            if session not in self._ended:
                self._kept.setdefault(session, {})[key] = value
                self._last_used[session] = self.clock()

    def kept(self, session: str, key: str) -> object | None:
        with self._lock:
            return self._kept.get(session, {}).get(key)

    def _forget(self, session: str) -> list[Path]:
        """Drop a visitor's records (under the lock); the paths to delete."""
        self._kept.pop(session, None)
        self._last_used.pop(session, None)
        folder = self._folders.pop(session, None)
        return ([folder] if folder is not None else []) + sorted(self._adopted.pop(session, ()))

    def start_janitor(self, every_s: float = 60.0) -> threading.Thread:
        """A daemon thread that calls :meth:`expire` every ``every_s`` seconds."""
        def loop() -> None:
            while True:
                time.sleep(every_s)
                self.expire()

        thread = threading.Thread(target=loop, name="recon3d-outputs-janitor", daemon=True)
        thread.start()
        return thread


def _delete(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
        outcome: tuple = ("done", None)
        try:
            for item in items:
                send("item", item)
                cancel.check()
        except BaseException as exc:  # delivered to the consumer, which re-raises it
            outcome = ("error", exc)
        finally:  # a generator stopped between items runs its own clean-up here, before the consumer hears
            close = getattr(items, "close", None)
            if close is not None:
                close()
        send(*outcome)

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
            await _wait_for(worker, join_timeout_s)


async def _wait_for(worker: threading.Thread, timeout_s: float) -> None:
    """Wait until ``worker`` ends (at most ``timeout_s``), through repeated cancellations of the waiting task: a
    second Cancel click must not free the device while the first job still runs."""
    loop, deadline = asyncio.get_running_loop(), time.monotonic() + timeout_s
    while worker.is_alive() and time.monotonic() < deadline:
        try:
            await loop.run_in_executor(None, worker.join, 0.2)
        except asyncio.CancelledError:
            continue


__all__ = ["Cancelled", "Sessions", "iterate_in_thread", "safe_stem"]

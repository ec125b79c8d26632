"""Private outputs and cancellable jobs of the app's visitors (recon3d.sessions, no UI)."""

import asyncio
import re
import threading
import time

import pytest

from recon3d.cancel import NEVER, Cancelled, CancelToken
from recon3d.sessions import Sessions, iterate_in_thread, safe_stem


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_output_paths_carry_random_tokens_and_share_nothing_between_visitors(tmp_path):
    sessions = Sessions(tmp_path)
    a1, a2 = sessions.output_path("alice", "duck", ".glb"), sessions.output_path("alice", "duck", ".glb")
    b = sessions.output_path("bob", "duck", ".glb")
    for path in (a1, a2, b):
        assert re.fullmatch(r"duck-[0-9a-f]{32}\.glb", path.name) and re.fullmatch(r"[0-9a-f]{32}", path.parent.name)
        assert path.parent.parent == tmp_path and path.parent.is_dir()
    assert a1.parent == a2.parent != b.parent  # one folder per visitor
    assert len({a1.name, a2.name, b.name}) == 3
    assert "alice" not in str(a1) and "bob" not in str(b)  # the visitor id never appears in a URL


def test_file_names_from_user_text_are_tame():
    assert safe_stem("../../etc/passwd") == "etc-passwd"
    assert safe_stem("photo 1 (copy).final") == "photo-1-copy-final"
    assert safe_stem("...") == "output" and len(safe_stem("x" * 300)) == 40


def test_leaving_cancels_the_visitors_jobs_and_deletes_their_files(tmp_path):
    sessions = Sessions(tmp_path)
    mine, theirs = sessions.output_path("alice", "a", ".glb"), sessions.output_path("bob", "b", ".glb")
    mine.write_bytes(b"glb")
    theirs.write_bytes(b"glb")
    with sessions.job("alice") as alice_job, sessions.job("bob") as bob_job:
        sessions.end("alice")
        assert alice_job.cancelled and not bob_job.cancelled
        with pytest.raises(Cancelled):
            alice_job.check()
    assert not mine.exists() and not mine.parent.exists() and theirs.exists()


def test_idle_folders_expire_but_not_while_a_job_runs(tmp_path):
    clock = Clock()
    sessions = Sessions(tmp_path, ttl_s=60, clock=clock)
    idle, busy = sessions.output_path("api-1", "a", ".glb"), sessions.output_path("api-2", "b", ".glb")
    clock.now += 30
    assert sessions.expire() == []
    with sessions.job("api-2"):
        clock.now += 31  # both idle for 61 s, but api-2 has a job running
        assert sessions.expire() == ["api-1"]
        assert not idle.parent.exists() and busy.parent.exists()
    assert sessions.expire() == []  # the job just ended: api-2 was used now
    clock.now += 61
    assert sessions.expire() == ["api-2"] and not busy.parent.exists()


def slow_items(cancel: CancelToken, stopped: threading.Event):
    """A blocking job: an item, then work that checks the token often, as the pipelines do."""
    try:
        yield "first"
        for _ in range(500):
            cancel.check()
            time.sleep(0.01)
        yield "never reached in the test"
    finally:
        stopped.set()


def test_a_consumer_that_stops_listening_cancels_the_worker():
    cancel, stopped = CancelToken(), threading.Event()

    async def consume_one():
        stream = iterate_in_thread(slow_items(cancel, stopped), cancel)
        first = await stream.__anext__()
        await stream.aclose()  # what the server does when the job is cancelled
        return first

    started = time.perf_counter()
    assert asyncio.run(consume_one()) == "first"
    assert cancel.cancelled and stopped.is_set()  # the worker stopped before aclose returned
    assert time.perf_counter() - started < 2.0  # not the 5 s the uncancelled work would take


def test_worker_errors_reach_the_consumer():
    def failing():
        yield 1
        raise ValueError("bad input")

    async def consume():
        return [item async for item in iterate_in_thread(failing(), CancelToken())]

    with pytest.raises(ValueError, match="bad input"):
        asyncio.run(consume())


def test_never_is_not_cancellable():
    NEVER.check()
    with pytest.raises(TypeError):
        NEVER.cancel()


def test_nothing_is_written_for_a_visitor_who_left_and_uploads_leave_with_them(tmp_path):
    sessions = Sessions(tmp_path / "outputs")
    upload = tmp_path / "upload.png"
    upload.write_bytes(b"png")
    sessions.adopt("alice", upload)
    sessions.output_path("alice", "duck", ".glb")
    sessions.end("alice")
    assert not upload.exists()
    with pytest.raises(Cancelled):  # a job finishing after its visitor left writes nothing
        sessions.output_path("alice", "duck", ".glb")
    with sessions.job("alice") as late:
        assert late.cancelled
    assert list((tmp_path / "outputs").iterdir()) == []


def test_expired_uploads_go_too_and_job_records_do_not_pile_up(tmp_path):
    clock = Clock()
    sessions = Sessions(tmp_path, ttl_s=10, clock=clock)
    upload = tmp_path / "api-upload.png"
    upload.write_bytes(b"png")
    sessions.adopt("api", upload)
    for _ in range(3):
        with sessions.job("api"):
            pass
    assert sessions.running_jobs("api") == 0 and sessions._jobs == {}
    clock.now += 11
    assert sessions.expire() == ["api"] and not upload.exists()


def test_a_second_cancel_does_not_free_the_slot_before_the_worker_stops():
    cancel, stopped = CancelToken(), threading.Event()

    def stubborn():  # ignores the token for 0.6 s, as a long chunk of work would
        try:
            yield "first"
            time.sleep(0.6)
            yield "second"
        finally:
            stopped.set()

    async def run_and_cancel_twice():
        async def consume():
            async for _ in iterate_in_thread(stubborn(), cancel):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # a double click on Cancel, or Cancel then closing the tab
        with pytest.raises(asyncio.CancelledError):
            await task
        return stopped.is_set()

    assert asyncio.run(run_and_cancel_twice())  # the task ended only after the worker had stopped


def test_clean_up_runs_before_the_consumer_hears_of_a_cancelled_token():
    cancel, stopped = CancelToken(), threading.Event()

    async def consume():
        async for item in iterate_in_thread(slow_items(cancel, stopped), cancel):
            cancel.cancel()  # the visitor left while the job ran
        return item

    with pytest.raises(Cancelled):
        asyncio.run(consume())
    assert stopped.is_set()


def test_what_is_kept_for_a_visitor_leaves_with_them_or_expires(tmp_path):
    clock = type("Clock", (), {"now": 0.0, "__call__": lambda self: self.now})()
    sessions = Sessions(tmp_path, ttl_s=10, clock=clock)
    sessions.keep("a", "image", ["result of a"])
    sessions.keep("b", "image", ["result of b"])
    assert sessions.kept("a", "image") == ["result of a"] and sessions.kept("a", "text") is None
    sessions.end("a")
    assert sessions.kept("a", "image") is None and sessions.kept("b", "image") == ["result of b"]
    sessions.keep("a", "image", ["late"])  # a job that ends after its visitor left keeps nothing
    assert sessions.kept("a", "image") is None
    clock.now = 11.0
    assert sessions.expire() == ["b"] and sessions.kept("b", "image") is None

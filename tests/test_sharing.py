"""A short job waits for at most one step of a long run, the run goes on after it, and says it was paused."""

import threading
import time

import pytest
import torch

from recon3d.cancel import NEVER, CancelToken, Cancelled
from recon3d.sharing import DeviceLease


def long_run(lease: DeviceLease, steps: int, step_s: float, log: list, waits: list) -> None:
    for step in range(steps):
        with lease.step() as waited:
            waits.append(waited)
            log.append(("step start", step, time.perf_counter()))
            time.sleep(step_s)
            log.append(("step end", step, time.perf_counter()))


def test_a_short_job_waits_for_at_most_the_current_step_and_the_run_pauses_for_it():
    lease, log, waits = DeviceLease(), [], []
    runner = threading.Thread(target=long_run, args=(lease, 60, 0.05, log, waits))  # a 3 s run
    runner.start()
    time.sleep(0.2)  # the run is under way
    asked = time.perf_counter()
    with lease.short() as waited:
        got = time.perf_counter()
        time.sleep(0.3)  # the short job's work
        released = time.perf_counter()
    runner.join()
    assert waited < 1.0 and got - asked < 1.0  # one 0.05 s step and scheduling slack, not the rest of the run
    overlapping = [t for kind, _, t in log if got < t < released]
    assert overlapping == []  # no step ran while the short job held the device
    assert max(waits) > 0.25  # the step after it waited out the short job: the run reports the pause
    assert len([entry for entry in log if entry[0] == "step end"]) == 60  # and then the run went on to its end


def test_short_jobs_go_before_the_next_step_and_one_at_a_time():
    lease, order = DeviceLease(), []

    def short(name):
        with lease.short():
            order.append((name, "in"))
            time.sleep(0.05)
            order.append((name, "out"))

    def step():
        with lease.step():
            order.append(("step", "in"))

    with lease.short():  # the device is busy while a step, then two short jobs, ask for it
        threads = [threading.Thread(target=step), threading.Thread(target=short, args=("a",)),
                   threading.Thread(target=short, args=("b",))]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
    for thread in threads:
        thread.join(5)
    assert order[-1] == ("step", "in")  # the step asked first but went last
    first = order[0][0]
    assert order[:2] == [(first, "in"), (first, "out")]  # short jobs one at a time


def test_waiting_for_the_device_can_be_cancelled():
    lease, token = DeviceLease(), CancelToken()
    with lease.short():
        threading.Timer(0.1, token.cancel).start()
        with pytest.raises(Cancelled):
            with lease.step(token):
                pass
    with lease.step():  # the device is free again
        pass


def test_score_distillation_steps_share_the_device_and_report_the_pause():
    """The real SDS loop with a control whose lease a short job takes mid-run."""
    from dataclasses import replace

    from recon3d.pipelines.events import StepReport
    from recon3d.pipelines.sds import SDSControl, optimise
    from test_text_to_3d import TINY, NaNAt

    control, reports, options = SDSControl(), [], replace(TINY, steps=6)
    holding = threading.Event()

    def short_job():
        with control.lease.short():
            holding.set()
            time.sleep(1.2)

    thread = threading.Thread(target=short_job)
    for event in optimise(NaNAt(), options, torch.Generator().manual_seed(0), "cpu", control):
        if isinstance(event, StepReport):
            reports.append(event)
            if event.step == 2:
                thread.start()
                assert holding.wait(10)  # the short job holds the device before step 3 begins
    thread.join()
    assert reports[1].paused < 0.01 and reports[2].paused > 0.9 and reports[-1].paused - reports[2].paused < 0.01
    assert f"(paused {reports[2].paused:.1f} s for other jobs)" in reports[2].message
    assert "paused" not in reports[1].message
    assert [r.step for r in reports] == list(range(1, options.steps + 1))  # every step ran, after the pause


# ---- the lines: order, places, estimates from measured times, the operator's limits ---------------------------------

def hold(lease, kind, seconds, started):
    """A short job of ``kind`` that takes the device for ``seconds`` (in a thread); ``started`` is set then."""
    def work():
        with lease.short_job(kind, owner=kind) as ticket:
            for _ in ticket.places():
                pass
            started.set()
            time.sleep(seconds)

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_short_jobs_run_in_order_and_each_knows_its_place_and_wait_from_measured_times():
    lease = DeviceLease()
    lease.times.record("Image to 3D", 10.0)
    lease.times.record("Quick look", 4.0)
    on_device = threading.Event()
    runner = hold(lease, "Image to 3D", 0.3, on_device)
    assert on_device.wait(5)
    first, second = lease.short_job("Quick look", "a"), lease.short_job("Image to 3D", "b")
    place = next(second.places())
    assert place.position == 2
    assert 13.0 < place.wait_s <= 14.0  # the running job's typical 10 s (less its time so far) + a 4 s quick look
    assert "2nd in line, starts in about 14 s" in place.text()
    runner.join()
    assert not lease._take_turn(second)  # the device is free, but the second may not go before the first
    with first:
        assert list(first.places()) == []  # the device is free and it is first: its turn, no waiting
    with second:
        assert list(second.places()) == []
    assert lease.times.typical("Quick look") < 2.1  # the median of (4, ~0): the job just timed counts
    assert 0.29 < lease.times.typical("Image to 3D") < 1.0  # the median of (10, 0.3, ~0)


def test_a_kind_never_timed_gives_no_estimate_and_says_so():
    lease, started = DeviceLease(), threading.Event()
    runner = hold(lease, "Stochastic samples", 0.2, started)
    assert started.wait(5)
    with lease.short_job("Image to 3D") as ticket:
        place = next(ticket.places())
        assert place.position == 1 and place.wait_s is None
        assert place.text().startswith("next in line (no estimate yet")
    runner.join()


def test_a_cancelled_job_leaves_its_place_to_the_next():
    lease, started, token = DeviceLease(), threading.Event(), CancelToken()
    runner = hold(lease, "Image to 3D", 0.5, started)
    assert started.wait(5)
    gone, stays = lease.short_job("Quick look"), lease.short_job("Image to 3D")
    token.cancel()
    with pytest.raises(Cancelled):
        with gone:
            list(gone.places(token))
    with stays:
        assert next(stays.places()).position == 1
    runner.join()


def test_the_operators_limits_refuse_at_once_in_one_line():
    from recon3d.sharing import QueueRefused

    lease, started = DeviceLease(max_waiting=1, max_long_waiting=1, long_runs_per_owner=1), threading.Event()
    runner = hold(lease, "Image to 3D", 0.3, started)
    assert started.wait(5)
    with lease.short_job("Image to 3D"):
        with pytest.raises(QueueRefused, match=r"^the queue is full \(1 jobs waiting\)"):
            lease.short_job("Quick look")
    runner.join()
    with lease.long_run("Text to 3D", "visitor-a", steps=100):
        with pytest.raises(QueueRefused, match="you already have a Text to 3D run going or waiting"):
            lease.long_run("Text to 3D", "visitor-a", steps=10)
        with lease.long_run("Text to 3D", "visitor-b", steps=10):  # one waiting is allowed
            with pytest.raises(QueueRefused, match=r"Text to 3D queue is full \(1 runs waiting\)"):
                lease.long_run("Text to 3D", "visitor-c", steps=10)
    with lease.long_run("Text to 3D", "visitor-a", steps=10):  # the first ended: the visitor may start again
        pass


def test_a_long_run_waits_for_the_run_ahead_with_an_estimate_from_its_steps_left():
    lease = DeviceLease()
    running = lease.long_run("Text to 3D", "a", steps=50)
    assert list(running.places()) == []  # first: its turn at once
    for _ in range(10):
        with running.step():
            time.sleep(0.01)
    typical = lease.times.typical("Text to 3D step")
    assert 0.009 < typical < 0.2 and running.steps_left == 40
    with running.hold(NEVER, "export"):  # device work between steps: timed apart, not a step
        time.sleep(0.05)
    assert running.steps_left == 40 and lease.times.typical("Text to 3D export") >= 0.05
    assert lease.times.typical("Text to 3D step") == typical
    waiting, last = lease.long_run("Text to 3D", "b", steps=10), lease.long_run("Text to 3D", "c", steps=5)
    place = next(waiting.places())
    assert place.position == 1 and place.wait_s == pytest.approx(40 * typical)  # the running one is not "ahead"
    assert place.text().startswith("next in line, starts in about")
    place = next(last.places())
    assert place.position == 2 and place.wait_s == pytest.approx(50 * typical)
    with running:
        pass  # the run ahead ends
    with waiting:
        assert list(waiting.places()) == []
    last.__exit__(None, None, None)


def test_a_long_runs_steps_wait_for_short_jobs_and_work_units_scale_the_estimates():
    lease = DeviceLease()
    run = lease.long_run("Text to 3D", "a", steps=100)
    assert list(run.places()) == []
    log = []

    def steps():
        for _ in range(20):
            with run.step():
                log.append(("step", time.perf_counter()))
                time.sleep(0.01)

    runner = threading.Thread(target=steps)
    runner.start()
    time.sleep(0.05)
    with lease.short_job("Stochastic samples", work=2 * 10) as job:  # 2 samples x 10 steps
        list(job.places())
        got = time.perf_counter()
        time.sleep(0.2)
        released = time.perf_counter()
    runner.join()
    assert not [t for kind, t in log if got < t < released]  # no step of the run while the short job held it
    per_unit = lease.times.typical("Stochastic samples")
    assert 0.2 / 20 <= per_unit < 0.5 / 20  # kept per unit of work ...
    assert lease.times.typical("Stochastic samples", work=8 * 50) == pytest.approx(per_unit * 400)  # ... scaled
    run.__exit__(None, None, None)

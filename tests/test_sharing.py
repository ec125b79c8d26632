"""A short job waits for at most one step of a long run, the run goes on after it, and says it was paused."""

import threading
import time

import pytest
import torch

from recon3d.cancel import CancelToken, Cancelled
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

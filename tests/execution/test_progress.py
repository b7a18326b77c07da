"""Live progress of `dr-gen run` and the run record it leaves in the manifest."""

import io

import pytest
from rich.console import Console

from dr_pipeline.execution import progress as progress_module
from dr_pipeline.execution.progress import ProgressDisplay, ProgressTally, ProgressTracker, RunProgress
from dr_pipeline.read.reader import open_dataset
from dr_pipeline.execution.runner import run_job


def test_progress_reaches_the_totals_and_never_goes_back(reinforced):
    reports = reinforced.progress
    assert reports  # at least the final snapshot; how many polls fit in the run depends on the machine
    assert all(a.samples <= b.samples and a.units_done <= b.units_done for a, b in zip(reports, reports[1:]))
    last = reports[-1]
    assert (last.units_planned, last.units_skipped, last.units_done, last.units_failed) == (3, 0, 3, 0)
    assert (last.samples, last.failures, last.eta_seconds) == (18, 2, 0.0)
    assert last.samples_per_second == pytest.approx(18 / last.seconds)


def test_the_manifest_records_the_run(reinforced):
    dataset = open_dataset(reinforced.arrow)
    (run,) = dataset.manifest["runs"]
    assert (run["units_written"], run["units_skipped"], run["samples"], run["failures"]) == (3, 0, 18, 2)
    assert run["wall_seconds"] >= run["startup_seconds"] > 0 and run["samples_per_second"] > 0
    stages = {}
    for unit in dataset.units:
        for stage, seconds in unit["seconds_by_stage"].items():
            stages[stage] = stages.get(stage, 0) + seconds
    assert run["seconds_by_stage"].keys() == stages.keys() >= {"read", "decode", "augment", "teacher_forward"}
    for stage, seconds in stages.items():
        assert run["seconds_by_stage"][stage] == pytest.approx(seconds, abs=2e-3)
    assert run["unit_seconds"] == pytest.approx(sum(u["seconds"] for u in dataset.units), abs=2e-3)
    rerun = run_job(reinforced.arrow_job)  # everything committed: nothing runs, the record stays alone
    assert rerun.units_done == 0 and open_dataset(reinforced.arrow).manifest["runs"] == [run]


def test_a_retried_unit_reports_from_zero_again():
    tally = ProgressTally()
    tally.report("a", 5, 1)
    tally.report("b", 3, 0)
    tally.report("a", 0, 0)  # the task of unit a was retried
    tally.report("a", 2, 0)
    assert tally.totals() == (5, 0)


def test_eta_extrapolates_finished_units_at_the_observed_rate(monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(progress_module.time, "time", lambda: next(clock))
    tracker = ProgressTracker(units_planned=10, units_skipped=2)
    tracker.unit_done({"input_samples": 100})
    tracker.unit_done({"input_samples": 100})
    # 250 input samples read in 10 s (25/s): 50 of them by units in progress; 6 units not finished
    # hold about 600, of which 50 are read: 550 left, 22 s
    snapshot = tracker.snapshot(samples=240, failures=10)
    assert snapshot.eta_seconds == pytest.approx(22.0)
    assert snapshot.samples_per_second == pytest.approx(24.0)


def test_without_a_terminal_progress_is_a_line_at_intervals(monkeypatch):
    clock = iter([1000.0, 1000.0, 1010.0, 1031.0, 1031.0])
    monkeypatch.setattr(progress_module.time, "time", lambda: next(clock))
    out = io.StringIO()
    snapshot = RunProgress(4, 1, 2, 0, 50, 3, 10.0, 75.0)
    with ProgressDisplay(Console(file=out, force_terminal=False, width=200), "job", log_seconds=30) as display:
        for _ in range(3):
            display.update(snapshot)
    assert out.getvalue().splitlines() == [
        "job: 3/4 units, 50 samples, 5.0 samples/s, 3 failures, ETA 0:01:15",
        "job: 3/4 units, 50 samples, 5.0 samples/s, 3 failures, ETA 0:01:15",
    ]


def test_unit_tasks_report_at_most_once_a_second_unless_forced(monkeypatch):
    sent = []

    class Tally:
        class report:
            @staticmethod
            def remote(*args):
                sent.append(args)

    clock = iter([100.0, 100.4, 101.2, 101.2, 101.3])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    report = progress_module.UnitReporter(Tally, "u")
    report(0, 0, force=True)  # sent (t=100.0)
    report(4, 0)  # t=100.4: too soon
    report(8, 1)  # sent (t=101.2)
    report(9, 1, force=True)  # sent though soon (t=101.3)
    assert sent == [("u", 0, 0), ("u", 8, 1), ("u", 9, 1)]

"""Least-progress-first ordering (pure)."""

from rf_notebook.scheduler import least_progress_first


def test_least_progress_first_keeps_runs_in_lockstep():
    done = {1: 0, 2: 0, 3: 0}
    order = []
    while (run := least_progress_first({k: v for k, v in done.items() if v < 2})) is not None:
        order.append(run)
        done[run] += 1
    assert order == [1, 2, 3, 1, 2, 3]


def test_a_late_run_catches_up_first():
    assert least_progress_first({1: 3, 2: 3, 7: 1}) == 7
    assert least_progress_first({}) is None

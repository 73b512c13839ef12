"""Chunk plans (pure)."""

from __future__ import annotations

import pytest

from rf_notebook.chunking import chunk_plan, steps_per_epoch


def test_even_split_of_one_epoch():
    plan = chunk_plan(1024, 16, 4, max_steps=64)
    assert [(r.epoch, r.chunk, r.step) for r in plan.rungs] == [(0, 1, 16), (0, 2, 32), (0, 3, 48), (0, 4, 64)]
    assert plan.next_rung(0).step == 16 and plan.next_rung(16).step == 32 and plan.next_rung(64) is None
    assert plan.rungs_done(31) == 1 and plan.rungs_done(32) == 2


def test_runs_with_different_batch_sizes_pause_at_the_same_samples():
    for batch in (4, 8, 16, 32):
        plan = chunk_plan(1024, batch, 4, num_train_epochs=1)
        assert [r.step * batch for r in plan.rungs] == [256, 512, 768, 1024]


def test_rungs_repeat_every_epoch_and_end_at_max_steps():
    plan = chunk_plan(1000, 12, 3, max_steps=200)
    assert plan.steps_per_epoch == 84
    assert [(r.epoch, r.chunk, r.step) for r in plan.rungs] == [
        (0, 1, 28),
        (0, 2, 56),
        (0, 3, 84),
        (1, 1, 112),
        (1, 2, 140),
        (1, 3, 168),
        (2, 1, 196),
        (2, 2, 200),
    ]


def test_fractional_epochs_and_accumulation_and_drop_last():
    assert steps_per_epoch(100, 8, grad_accum=2) == 7
    assert steps_per_epoch(100, 8, drop_last=True) == 12
    plan = chunk_plan(100, 8, 3, num_train_epochs=1.5)
    assert plan.total_steps == 20 and plan.rungs[-1].step == 20
    assert all(a.step < b.step for a, b in zip(plan.rungs, plan.rungs[1:]))


def test_every_chunk_has_at_least_one_step():
    plan = chunk_plan(9, 4, 3, num_train_epochs=1)  # 3 steps, 3 chunks
    assert [r.step for r in plan.rungs] == [1, 2, 3]


@pytest.mark.parametrize(
    "num_chunks, message",
    [(0, "`num_chunks` is 0, but must be >= 1"), (5, "`num_chunks` is 5, but a run with batch size 4")],
)
def test_bad_chunk_counts(num_chunks, message):
    with pytest.raises(ValueError, match=message):
        chunk_plan(16, 4, num_chunks)


def test_empty_training_set():
    with pytest.raises(ValueError, match="the training set has 0 rows"):
        chunk_plan(0, 4, 1)

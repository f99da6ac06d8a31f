"""The garbage collector around the processing loop: pauses recorded, tuning applied and undone."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest

from pipeline.gc_pauses import GC_BUCKETS_S, GcPauses, tuned_and_counted, tuned_for_streaming


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_real_collection_is_recorded_by_generation_while_tracking() -> None:
    pauses = GcPauses()
    with pauses.tracking():
        gc.collect(1)
        gc.collect(2)
    assert pauses.counts[1] >= 1
    assert pauses.counts[2] >= 1
    assert pauses.seconds[2] > 0
    assert pauses.longest_s[2] >= pauses.seconds[2] / pauses.counts[2] > 0
    assert sum(pauses.buckets[2]) == pauses.counts[2]
    collections, seconds = pauses.total()
    assert collections == sum(pauses.counts)
    assert seconds == pytest.approx(sum(pauses.seconds))
    # the callback is gone afterwards: later collections are not counted
    before = list(pauses.counts)
    gc.collect()
    assert pauses.counts == before
    assert pauses._on_gc not in gc.callbacks


def test_pauses_fall_into_their_buckets_and_the_window_restarts() -> None:
    pauses = GcPauses()
    pauses.record(0, 0.0004)  # under the first bound
    pauses.record(0, 0.003)  # between 2.5 and 5 ms
    pauses.record(2, 0.2)  # between 100 and 250 ms
    pauses.record(2, 7.0)  # past the last bound: +Inf
    assert pauses.buckets[0][0] == 1
    assert pauses.buckets[0][GC_BUCKETS_S.index(0.005)] == 1
    assert pauses.buckets[2][GC_BUCKETS_S.index(0.25)] == 1
    assert pauses.buckets[2][-1] == 1
    assert pauses.longest_s == [0.003, 0.0, 7.0]
    assert pauses.take_longest_s() == 7.0
    assert pauses.take_longest_s() == 0.0  # a new window
    pauses.record(1, 0.01)
    assert pauses.take_longest_s() == 0.01


def test_tuning_freezes_what_exists_raises_thresholds_and_undoes_both() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with tuned_for_streaming(10_000):
        assert gc.get_threshold() == (10_000, 20, 100)
        assert gc.get_freeze_count() > 0  # this test's own objects among them
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_tuning_collects_start_up_garbage_before_freezing_it() -> None:
    gc.disable()  # no automatic collection between making the garbage and the check
    try:
        made = _Cycle()
        ref = weakref.ref(made)
        del made  # unreachable, but a cycle: only the collector can free it
        assert ref() is not None
        with tuned_for_streaming(10_000):
            assert ref() is None  # collected, not frozen (frozen garbage is never freed)
    finally:
        gc.enable()


def test_overlapping_loops_share_the_tuning_and_the_last_one_restores_it() -> None:
    before = gc.get_threshold()
    with contextlib.ExitStack() as second_loop:  # (ends both, even if a check fails)
        with contextlib.ExitStack() as first_loop:
            first_loop.enter_context(tuned_for_streaming(10_000))
            frozen = gc.get_freeze_count()
            built_since = [_Cycle() for _ in range(100)]  # the second loop's long-lived objects
            second_loop.enter_context(tuned_for_streaming(5_000))
            assert gc.get_freeze_count() >= frozen + len(built_since)  # frozen too
            assert gc.get_threshold() == (10_000, 20, 100)  # the first loop's tuning stands
        # the first ended while the second still runs
        assert gc.get_threshold() == (10_000, 20, 100)
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_zero_leaves_the_collector_alone() -> None:
    before = gc.get_threshold()
    with tuned_for_streaming(0):
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0


def test_around_the_loop_the_start_up_collection_is_not_a_pause_of_it() -> None:
    pauses = GcPauses()
    with tuned_and_counted(pauses, 10_000):
        assert gc.get_threshold()[0] == 10_000
    # tuning collected everything once before tracking began: that full collection is not
    # the loop's; none ran inside the block
    assert pauses.counts[2] == 0
    assert gc.get_freeze_count() == 0

"""The in-order process map: same results as ``map``, input read only as results are taken, fresh workers."""

from __future__ import annotations

import os

import pytest

from cxr.parallel import CHUNKS_IN_FLIGHT_PER_WORKER, ordered_map


def _parent_pid(_: object) -> int:
    return os.getppid()


def _square(value: int) -> int:
    return value * value


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_input_order(workers):
    assert list(ordered_map(_square, iter(range(50)), workers, chunk=3)) == [v * v for v in range(50)]


def test_a_generator_is_read_only_as_far_as_the_chunks_in_flight():
    drawn = []

    def source():
        for value in range(10_000):
            drawn.append(value)
            yield value

    results = ordered_map(_square, source(), workers=2, chunk=4)
    assert next(results) == 0
    assert len(drawn) <= (CHUNKS_IN_FLIGHT_PER_WORKER * 2 + 1) * 4
    results.close()


def test_workers_are_not_forks_of_the_caller():
    """A fork would start each worker as a copy of everything the caller holds."""
    parents = set(ordered_map(_parent_pid, range(8), workers=2, chunk=1))
    assert os.getpid() not in parents


def _divide_by_zero(value: int) -> int:
    return value // 0


def test_an_error_in_a_worker_reaches_the_caller():
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(_divide_by_zero, [1, 2], workers=2, chunk=1))

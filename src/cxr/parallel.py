"""An in-order process map whose memory does not grow with the number of items.

``ProcessPoolExecutor.map`` submits every item before it yields the first result, and its
forked workers start as copies of the caller, so both the queue and each worker grow with
the caller's data: a decode over 100,000 paths held several times the path table. Here only
a few chunks are in flight at once, and workers come from a forkserver, a small process
started before the caller's data existed.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

CHUNKS_IN_FLIGHT_PER_WORKER = 2


def _apply(function: Callable[[Item], Result], chunk: list[Item]) -> list[Result]:
    return [function(item) for item in chunk]


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], workers: int,
                chunk: int = 64) -> Iterator[Result]:
    """``map(function, items)`` spread over ``workers`` processes, yielded in input order.

    ``items`` may be a generator: it is read ``chunk`` items at a time, only as results are
    taken, so at most ``2 * workers`` chunks exist at once. ``function`` must be picklable
    (a module-level function or a :func:`functools.partial` of one). One worker runs in
    this process, with no pool to start.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    source = iter(items)
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[Future[list[Result]]] = deque()

        def submit_next() -> None:
            part = list(islice(source, chunk))
            if part:
                pending.append(pool.submit(_apply, function, part))

        for _ in range(CHUNKS_IN_FLIGHT_PER_WORKER * workers):
            submit_next()
        while pending:
            results = pending.popleft().result()
            submit_next()
            yield from results

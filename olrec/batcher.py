"""Opportunistic request batching for a serving replica's event loop.

A replica ranks a request's candidates in one pass over all of them, whose
fixed cost (a few hundred numpy calls, one Triton call) is most of a small
request's. Requests that arrive while earlier ones are being ranked wait for
the next pass and share it, as Triton's dynamic batcher shares a model run;
an idle replica ranks a request at once, so batching adds no latency at low
load. Scoring a row never depends on its batch mates (frozen features, static
int8 scales), so a batch answers each request as it would alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Runs ``fn`` over batches of submitted items, at most ``max_inflight`` at a time.

    ``fn`` takes a list of items and returns one result per item, in order;
    its exception goes to every item of the batch. A batch takes the queued
    items in arrival order while their ``rows`` add up to at most ``max_rows``
    (one item at least, whatever its rows). A batch whose every caller has
    gone (cancelled, e.g. by a deadline) is cancelled, and with it whatever it
    awaits (the Triton call). Use it from one event loop.
    """

    def __init__(self, fn: Callable[[list[T]], Awaitable[list[R]]], rows: Callable[[T], int], max_rows: int,
                 max_inflight: int = 2) -> None:
        if max_rows < 1 or max_inflight < 1:
            raise ValueError(f"max_rows and max_inflight must be >= 1, got {max_rows} and {max_inflight}")
        self.fn, self.rows, self.max_rows, self.max_inflight = fn, rows, max_rows, max_inflight
        self._queue: deque[tuple[T, asyncio.Future]] = deque()
        self._inflight = 0
        self.batches = 0  # batches run: items / batches is the mean batch size

    async def submit(self, item: T) -> R:
        """``fn``'s result for ``item``, ranked with whatever else is queued."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._start()
        return await fut

    def _start(self) -> None:
        while self._queue and self._inflight < self.max_inflight:
            take: list[tuple[T, asyncio.Future]] = []
            rows = 0
            while self._queue and (not take or rows + self.rows(self._queue[0][0]) <= self.max_rows):
                item, fut = self._queue.popleft()
                if not fut.done():  # else cancelled while it queued
                    take.append((item, fut))
                    rows += self.rows(item)
            if take:
                self._inflight += 1
                self.batches += 1
                asyncio.get_running_loop().create_task(self._run(take))

    async def _run(self, take: list[tuple[T, asyncio.Future]]) -> None:
        futs = [f for _, f in take]
        task = asyncio.current_task()
        assert task is not None

        def gone(_: asyncio.Future) -> None:
            if all(f.cancelled() for f in futs):
                task.cancel()

        for f in futs:
            f.add_done_callback(gone)
        try:
            results = await self.fn([item for item, _ in take])
            for f, r in zip(futs, results, strict=True):
                if not f.done():
                    f.set_result(r)
        except asyncio.CancelledError:
            for f in futs:
                f.cancel()
        except Exception as e:
            for f in futs:
                if not f.done():
                    f.set_exception(e)
        finally:
            self._inflight -= 1
            self._start()

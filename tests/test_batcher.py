"""MicroBatcher: batching, results in order, errors and cancellation (plain asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from olrec.batcher import MicroBatcher


class Ranker:
    """A batch function that records its batches and waits on a gate (the Triton call)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.cancelled = 0
        self.fail: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]


def run(coro):
    return asyncio.run(coro)


def gated(max_rows: int = 8, rows=lambda i: 1) -> tuple[Ranker, MicroBatcher]:
    """A ranker whose batches wait until its gate opens, behind a one-batch-at-a-time batcher."""
    rank = Ranker()
    rank.gate.clear()
    return rank, MicroBatcher(rank, rows=rows, max_rows=max_rows, max_inflight=1)


def test_an_idle_batcher_runs_a_request_at_once_and_answers_it():
    async def main():
        rank = Ranker()
        b = MicroBatcher(rank, rows=lambda i: 1, max_rows=8)
        assert await b.submit(3) == 30
        assert rank.batches == [[3]]

    run(main())


def test_requests_arriving_while_batches_run_share_the_next_and_each_gets_its_own_result():
    async def main():
        rank, b = gated(max_rows=100)
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)  # the first batch starts and waits on the gate
        rest = [asyncio.create_task(b.submit(i)) for i in range(2, 7)]
        await asyncio.sleep(0)
        rank.gate.set()
        assert await first == 10
        assert [await t for t in rest] == [20, 30, 40, 50, 60]
        assert rank.batches == [[1], [2, 3, 4, 5, 6]]

    run(main())


def test_a_batch_takes_queued_requests_up_to_max_rows_but_always_one():
    async def main():
        rank, b = gated(max_rows=10, rows=lambda i: i)
        tasks = [asyncio.create_task(b.submit(i)) for i in (1, 4, 5, 3, 12, 2)]
        await asyncio.sleep(0)
        rank.gate.set()
        assert [await t for t in tasks] == [10, 40, 50, 30, 120, 20]
        # 1 alone (it started the first batch); then 4+5 (a 3 would pass 10); 3; 12 alone (over max_rows); 2
        assert rank.batches == [[1], [4, 5], [3], [12], [2]]

    run(main())


def test_an_error_goes_to_every_request_of_its_batch_and_the_batcher_goes_on():
    async def main():
        rank = Ranker()
        b = MicroBatcher(rank, rows=lambda i: 1, max_rows=8)
        rank.fail = RuntimeError("Triton down")
        results = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "Triton down" in str(r) for r in results)
        rank.fail = None
        assert await b.submit(4) == 40

    run(main())


def test_a_batch_whose_callers_all_left_is_cancelled_but_not_one_with_a_caller_left():
    async def main():
        rank, b = gated()
        alone = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)
        a, c = asyncio.create_task(b.submit(2)), asyncio.create_task(b.submit(3))
        await asyncio.sleep(0)
        alone.cancel()  # its batch had no one else: cancelled mid-wait, and the next batch starts
        for _ in range(3):
            await asyncio.sleep(0)
        assert rank.cancelled == 1 and rank.batches == [[1], [2, 3]]
        a.cancel()  # c still waits on that batch: it goes on
        await asyncio.sleep(0)
        rank.gate.set()
        assert await c == 30
        assert rank.cancelled == 1
        with pytest.raises(asyncio.CancelledError):
            await alone

    run(main())


def test_a_request_cancelled_while_queued_is_left_out_of_the_next_batch():
    async def main():
        rank, b = gated()
        tasks = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        await asyncio.sleep(0)
        rank.gate.set()
        assert await tasks[0] == 10 and await tasks[2] == 30
        assert rank.batches == [[1], [3]]

    run(main())


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_rows"):
        MicroBatcher(Ranker(), rows=len, max_rows=0)

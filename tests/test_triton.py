"""A real Triton (pytriton's bundled server, Python backend) serving the published tower."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc.aio")

from olrec.export import publish, session  # noqa: E402
from olrec.model import DenseTower  # noqa: E402
from olrec.triton import TritonRanker, TritonServer, TritonUnavailable  # noqa: E402

pytestmark = pytest.mark.slow
F, D, M = 7, 4, 13


def _tower(seed: int) -> DenseTower:
    torch.manual_seed(seed)
    t = DenseTower(F, D, M, hidden=(16,), prior=torch.randn(M))
    with torch.no_grad():
        t.norm.update(torch.randn(200, M) * 2)
    return t


def _publish(root: Path, version: int) -> None:
    publish(_tower(version), root, version=version, precision="int8", calibration=_inputs(256, seed=99))


def _inputs(b: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, F, D + 1)).astype(np.float32), rng.normal(size=(b, M)).astype(np.float32)


class Served:
    def __init__(self, root: Path, server: TritonServer) -> None:
        self.root, self.server = root, server

    def expected(self, version: str, emb: np.ndarray, num: np.ndarray) -> np.ndarray:
        """onnxruntime in this process on the file Triton serves as ``version``."""
        path = self.root / "local" / "olrec_ranker" / version / "model.onnx"
        return session(path).run(["logit"], {"emb": emb, "num": num})[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("triton")
    _publish(root, 1)
    with TritonServer(root / "local") as server:
        yield Served(root, server)
    assert not server.running


async def _eventually(call: Callable[[], Awaitable[tuple[np.ndarray, str]]],
                      timeout_s: float = 30.0) -> tuple[np.ndarray, str]:
    """``call()``'s first answer once Triton is back (it raises TritonUnavailable until then)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await call()
        except TritonUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_logits_match_onnxruntime_for_concurrent_batches(served: Served) -> None:
    """Concurrent requests of different sizes, batched together by Triton, each get their own rows."""
    sizes = [1, 5, 64, 3, 200, 17, 1, 40]
    batches = [_inputs(b, seed=i) for i, b in enumerate(sizes)]

    async def scenario() -> tuple[list[tuple[np.ndarray, str]], dict, dict]:
        async with TritonRanker(served.server.url, timeout_s=10.0) as ranker:
            before = await ranker.stats()
            out = await asyncio.gather(*(ranker.logits(e, n) for e, n in batches))
            return out, before, await ranker.stats()

    out, before, after = asyncio.run(scenario())
    for (emb, num), (logits, version) in zip(batches, out):
        assert logits.shape == (len(emb),) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, served.expected(version, emb, num), rtol=1e-5, atol=1e-5)
    version = out[0][1]
    count = before.get(version, {}).get("inference_count", 0)
    assert after[version]["inference_count"] - count == sum(sizes)
    assert after[version]["compute_infer_ns"] > before.get(version, {}).get("compute_infer_ns", 0)


def test_new_version_loads_under_traffic_without_failures(served: Served) -> None:
    emb, num = _inputs(32)

    async def scenario() -> tuple[str, str, list[str], np.ndarray]:
        async with TritonRanker(served.server.url, timeout_s=10.0) as ranker:
            _, old = await ranker.logits(emb, num)
            new = str(int(old) + 1)
            _publish(served.root, int(new))
            flowing, loaded = asyncio.Event(), asyncio.Event()
            seen: list[str] = []
            last: list[np.ndarray] = []

            async def traffic() -> None:  # any failure fails the test
                while not (loaded.is_set() and seen[-1] == new):
                    logits, version = await ranker.logits(emb, num)
                    seen.append(version)
                    last[:] = [logits]
                    flowing.set()

            async def load() -> None:
                await flowing.wait()  # requests are answered before the load begins and until it ends
                await asyncio.to_thread(served.server.load, "olrec_ranker")
                loaded.set()

            await asyncio.gather(load(), *(traffic() for _ in range(4)))
            return old, new, seen, last[0]

    old, new, seen, logits = asyncio.run(scenario())
    assert set(seen) <= {old, new} and seen[0] == old and seen[-1] == new, seen
    np.testing.assert_allclose(logits, served.expected(new, emb, num), rtol=1e-5, atol=1e-5)
    assert not np.allclose(served.expected(old, emb, num), logits)  # a different model answers now


def test_cancelling_a_call_leaves_the_ranker_working(served: Served) -> None:
    emb, num = _inputs(1000)

    async def scenario() -> np.ndarray:
        async with TritonRanker(served.server.url, timeout_s=10.0) as ranker:
            task = asyncio.ensure_future(ranker.logits(emb, num))
            await asyncio.sleep(0)  # the call is under way
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return (await ranker.logits(emb[:2], num[:2]))[0]

    assert asyncio.run(scenario()).shape == (2,)


def test_stopped_server_is_unavailable_and_restart_recovers(served: Served) -> None:
    server = served.server
    emb, num = _inputs(8)

    async def scenario() -> tuple[np.ndarray, str]:
        # One ranker throughout: a Serve replica keeps its channel across a Triton restart.
        async with TritonRanker(server.url, timeout_s=2.0) as ranker:
            await ranker.logits(emb, num)
            await asyncio.to_thread(server.stop)
            with pytest.raises(TritonUnavailable, match=re.escape(server.url)):
                await ranker.logits(emb, num)
            with pytest.raises(TritonUnavailable, match=re.escape(server.url)):
                await ranker.stats()
            await asyncio.to_thread(server.restart)
            return await _eventually(lambda: ranker.logits(emb, num))

    logits, version = asyncio.run(scenario())
    assert server.running
    np.testing.assert_allclose(logits, served.expected(version, emb, num), rtol=1e-5, atol=1e-5)


def test_ranker_rejects_mismatched_inputs(served: Served) -> None:
    emb, num = _inputs(4)

    async def scenario() -> None:
        async with TritonRanker(served.server.url) as ranker:
            with pytest.raises(ValueError, match=r"\(4, 7, 5\) and \(3, 13\)"):
                await ranker.logits(emb, num[:3])

    asyncio.run(scenario())


def test_server_start_failure_names_the_log(tmp_path: Path) -> None:
    (tmp_path / "olrec_ranker").mkdir()  # no config, no version: the model cannot load
    server = TritonServer(tmp_path, start_timeout_s=60)
    with pytest.raises(RuntimeError, match="tritonserver exited with code") as err:
        server.start()
    assert str(server.log_path) in str(err.value) and "olrec_ranker" in str(err.value)
    assert not server.running

"""bench.hotpath drives the real exit server and sessions in memory, and reports both sides."""

from __future__ import annotations

import asyncio

from bench.hotpath import measure
from tunnel import session


async def test_the_hot_path_bench_answers_every_request_and_times_both_sides() -> None:
    # Each visitor checks every answer it gets (status line, size), and a
    # round ends only when all its requests were answered.
    async with asyncio.timeout(60):
        results = await measure(3, 90, 2, access_log=True, profile=False)
    assert len(results) == 2
    # The compiled build's session cannot be timed apart (bench/hotpath.py).
    compiled = session.__file__ is not None and session.__file__.endswith(".so")
    for both, client in results:
        assert both > 0
        assert (client is None) if compiled else (client is not None and 0 < client < both)

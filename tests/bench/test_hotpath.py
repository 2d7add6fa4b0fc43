"""bench.hotpath drives the real exit server and sessions in memory, and reports both sides."""

from __future__ import annotations

import asyncio

from bench.hotpath import measure


async def test_the_hot_path_bench_answers_every_request_and_times_both_sides() -> None:
    # Each visitor checks every answer it gets (status line, size), and a
    # round ends only when all its requests were answered.
    async with asyncio.timeout(60):
        results = await measure(3, 90, 2, access_log=True, profile=False)
    assert len(results) == 2
    assert all(server > 0 and client > 0 for server, client in results)

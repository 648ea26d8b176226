"""Bridges between trio tests and the asyncio ``ocpp``-library peers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

from proxy.demo.peers import LoopThread, Recorder

T = TypeVar("T")


async def in_loop(loop: LoopThread, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run a coroutine on the peers' asyncio loop and wait for it without blocking trio."""
    return await trio.to_thread.run_sync(functools.partial(loop.run, coro, timeout),
                                         abandon_on_cancel=True)


async def wait_recorded(recorder: Recorder, predicate: Callable[[Recorder], bool],
                        timeout: float = 10.0) -> None:
    """Wait until a recorder satisfies ``predicate``; fail the test on timeout."""
    ok = await trio.to_thread.run_sync(functools.partial(recorder.wait_until, predicate, timeout),
                                       abandon_on_cancel=True)
    assert ok, f"timed out after {timeout} s; sent={recorder.sent[-3:]} received={recorder.received[-3:]}"

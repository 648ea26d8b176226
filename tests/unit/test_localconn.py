"""The in-process connection a virtual charge point uses instead of a socket."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from proxy.wire.errors import ConnectionClosed

from proxy.wire.local import local_pair


async def test_messages_in_order_then_the_close_both_ends_see() -> None:
    a, b = local_pair()
    await a.send_message("one")
    await a.send_message(b"two")
    await a.aclose(1001, "going away")
    assert [await b.get_message(), await b.get_message()] == ["one", "two"]
    for end in (a, b):
        with pytest.raises(ConnectionClosed) as closed:
            await end.get_message()
        assert closed.value.reason is not None and (closed.value.reason.code, closed.value.reason.reason) == (
            1001, "going away")
    with pytest.raises(ConnectionClosed):
        await b.send_message("late")
    with pytest.raises(ConnectionClosed):
        await b.ping()


async def test_a_close_wakes_a_waiting_reader_even_when_cancelled() -> None:
    a, b = local_pair()
    outcome: list[int] = []

    async def read() -> None:
        try:
            await a.get_message()
        except ConnectionClosed as exc:
            outcome.append(exc.reason.code if exc.reason else 0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()  # as relay._drop closes a dead peer
            await b.aclose(1006, "no pong")
    assert outcome == [1006]

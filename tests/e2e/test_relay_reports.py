"""A relayed frame is written before it is reported (issue 23: the round trip waits for the write only).

The proxy runs in this process with a listener that, when the relay reports
a frame (``frame_received``) or an answered CALL (``CallCompleted``), waits
up to 10 s on the receiving peer's real socket for the frame's bytes. The
peers are tasks of this same trio run, so while the listener runs nothing else
can write: the bytes are there only if the relay wrote them before it
reported. Forwarding stays byte for byte and every frame is still reported.
"""

from __future__ import annotations

import functools
import select
from pathlib import Path

import trio

from proxy.config import loads
from proxy.core.session import PRIMARY, WALLBOX, Action, CallCompleted
from proxy.messages.ocppj import Frame
from proxy.runtime.relay import Listener, PairedSession
from proxy.runtime.server import ProxyServer
from proxy.wire.connection import WsConnection, WsRequest, open_websocket_url, read_request
from proxy.core.session import Side

WAIT = 10.0


def _arrived(connection: WsConnection | None) -> bool:
    """Whether the peer's socket holds unread bytes (waits up to WAIT s: loopback delivery is immediate)."""
    assert connection is not None
    readable, _, _ = select.select([connection.stream.socket.fileno()], [], [], WAIT)  # type: ignore[attr-defined]
    return bool(readable)


class Peers:
    """The test's wallbox and backend connections, and what the listener saw."""

    def __init__(self) -> None:
        self.wallbox: WsConnection | None = None
        self.backend: WsConnection | None = None
        self.backend_got: list[str] = []
        #: (who reported, source or leg, whether the receiving peer already had the bytes)
        self.reports: list[tuple[str, Side, bool]] = []


class WrittenFirst(Listener):
    """At each report, checks the frame's bytes already reached the peer it was relayed to."""

    actions = frozenset({CallCompleted})

    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    def frame_received(self, paired: PairedSession, source: Side, frame: Frame, size: int) -> None:
        receiver = self.peers.backend if source == WALLBOX else self.peers.wallbox
        self.peers.reports.append(("frame_received", source, _arrived(receiver)))

    def action(self, paired: PairedSession, action: Action) -> None:
        assert isinstance(action, CallCompleted)  # the wallbox's CALL, answered by the backend
        self.peers.reports.append(("CallCompleted", action.leg, _arrived(self.peers.wallbox)))


async def _backend(stream: trio.SocketStream, peers: Peers) -> None:
    request = await read_request(stream)
    assert isinstance(request, WsRequest)
    peers.backend = connection = await request.accept(subprotocol="ocpp1.6")
    while True:
        text = await connection.get_message()
        assert isinstance(text, str)
        peers.backend_got.append(text)
        msg_id = text.split('"')[1]
        await connection.send_message(f'[3,"{msg_id}",{{"currentTime":"2026-11-27T12:00:00Z"}}]')


async def test_frames_are_written_before_the_listeners_hear_of_them(nursery: trio.Nursery, tmp_path: Path) -> None:
    peers = Peers()
    listeners = await nursery.start(functools.partial(trio.serve_tcp, lambda s: _backend(s, peers), 0,
                                                      host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    config = loads(f'[server]\nlisten = "127.0.0.1:0"\n[backend]\nurl = "ws://127.0.0.1:{port}/ocpp"\n'
                   f'[[chargers]]\nid = "CP1"\n[offline]\ndata_dir = "{tmp_path}/data"\n')
    server = ProxyServer(config, listeners=[WrittenFirst(peers)])
    await nursery.start(server.serve)
    sent = ['[2,"hb-1","Heartbeat",{}]', '[2, "dt-2", "DataTransfer", {"vendorId":"K\\u00f6ln","data":"\u00fc"}]']
    answers: list[str | bytes] = []
    async with open_websocket_url(f"ws://127.0.0.1:{server.ports[0]}/ocpp/CP1", subprotocols=["ocpp1.6"]) as wallbox:
        peers.wallbox = wallbox
        with trio.fail_after(30):
            for text in sent:
                await wallbox.send_message(text)
                answers.append(await wallbox.get_message())

    assert peers.backend_got == sent  # byte for byte, in order
    assert [a.split(",")[1] for a in answers if isinstance(a, str)] == ['"hb-1"', '"dt-2"']
    # Every frame and every answered CALL was reported, each after its bytes had reached the peer.
    assert peers.reports == [("frame_received", WALLBOX, True), ("frame_received", PRIMARY, True),
                             ("CallCompleted", PRIMARY, True)] * 2

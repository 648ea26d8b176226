"""The data-phase WebSocket framing (sans-IO), checked against wsproto as the reference.

Frames are built by wsproto (an independent RFC 6455 implementation) where it
can build them, and by hand for the violations it refuses to produce.
"""

from __future__ import annotations

import os
import struct

from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.events import Event as Event_

from proxy.wire.codec import (
    BinaryMessage,
    Close,
    Event,
    FrameParser,
    Opcode,
    Ping as PingEvent,
    TextMessage as Text,
    Violation,
    _xor,
    _xor_python,
    close_payload,
    encode,
    mask_key,
    too_big,
)

LIMIT = 1 << 20


def from_client(*events: Event_) -> bytes:
    """Bytes a wsproto client sends (masked)."""
    client = Connection(ConnectionType.CLIENT)
    return b"".join(client.send(e) for e in events)


def server_parser(limit: int = LIMIT) -> FrameParser:
    return FrameParser(from_client=True, max_message_size=limit)


def raw_frame(b0: int, payload: bytes, *, masked: bool = True, length: bytes | None = None) -> bytes:
    key = b"\x01\x02\x03\x04"
    head = bytes((b0,)) + (length if length is not None else bytes(((0x80 if masked else 0) | len(payload),)))
    return head + (key + _xor_python(payload, key) if masked else payload)


@given(st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=300)), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=64))
def test_any_split_of_the_byte_stream_gives_the_same_messages(messages: list[str | bytes], chunk: int) -> None:
    data = from_client(*(TextMessage(m) if isinstance(m, str) else BytesMessage(m) for m in messages))
    parser = server_parser()
    events: list[Event] = []
    for start in range(0, len(data), chunk):
        events += parser.feed(data[start:start + chunk])
    assert events == [Text(m) if isinstance(m, str) else BinaryMessage(m) for m in messages]


def test_fragmented_message_is_reassembled_with_control_frames_in_between() -> None:
    client = Connection(ConnectionType.CLIENT)
    data = (client.send(Message(data="[2,\"1\",", message_finished=False))
            + client.send(Ping(b"p1"))
            + client.send(Message(data="\"Heartbeat\",{}]", message_finished=True)))
    assert server_parser().feed(data) == [PingEvent(b"p1"), Text('[2,"1","Heartbeat",{}]')]


def test_multibyte_text_split_across_fragments() -> None:
    text = "Köln: 0,39 €/kWh"
    raw = text.encode()
    data = raw_frame(0x01, raw[:7]) + raw_frame(0x80, raw[7:])  # the split falls inside "ö"/"€" bytes
    assert server_parser().feed(data) == [Text(text)]


def test_large_frames_use_16_and_64_bit_lengths() -> None:
    for size in (125, 126, 65535, 65536, 200_000):
        text = "x" * size
        assert server_parser().feed(from_client(TextMessage(text))) == [Text(text)]


def test_close_frames_report_code_and_reason() -> None:
    assert server_parser().feed(from_client(CloseConnection(code=4001, reason="bye"))) == [Close(4001, "bye")]
    assert server_parser().feed(raw_frame(0x88, b"")) == [Close(1005, "")]
    parser = server_parser()
    assert parser.feed(raw_frame(0x88, b"\x03\xe8") + raw_frame(0x81, b"late")) == [Close(1000, "")]
    assert parser.feed(raw_frame(0x81, b"later")) == []  # nothing after a close


def test_violations_carry_the_close_code_wsproto_would_send() -> None:
    cases = [
        (raw_frame(0x81, b"hi", masked=False), 1002),                       # client frame not masked
        (raw_frame(0xC1, b"hi"), 1002),                                      # RSV1 without an extension
        (raw_frame(0x83, b"hi"), 1002),                                      # reserved opcode
        (raw_frame(0x09, b"x"), 1002),                                       # fragmented ping
        (raw_frame(0x89, b"x" * 126, length=bytes((0x80 | 126,)) + struct.pack("!H", 126)), 1002),
        (raw_frame(0x80, b"x"), 1002),                                       # continuation, no message
        (raw_frame(0x01, b"a") + raw_frame(0x81, b"b"), 1002),               # new message inside a fragmented one
        (raw_frame(0x81, b"x", length=bytes((0x80 | 126,)) + struct.pack("!H", 1)), 1002),  # not minimal
        (raw_frame(0x88, b"\x03"), 1002),                                    # 1-byte close payload
        (raw_frame(0x88, struct.pack("!H", 1005)), 1002),                    # local-only close code
        (raw_frame(0x88, struct.pack("!H", 1000) + b"\xff"), 1007),          # invalid UTF-8 reason
        (raw_frame(0x81, b"\xc3\x28"), 1007),                                # invalid UTF-8 text
    ]
    for data, code in cases:
        events = server_parser().feed(data)
        last = events[-1]
        assert isinstance(last, Violation) and last.code == code and not last.too_big, (data, events)


def test_frames_before_a_violation_are_delivered() -> None:
    data = from_client(TextMessage("ok")) + raw_frame(0x81, b"\xff")
    events = server_parser().feed(data)
    assert events[0] == Text("ok") and isinstance(events[1], Violation)


def test_oversized_message_is_refused_from_its_header_before_the_payload_arrives() -> None:
    parser = server_parser(limit=1000)
    header = from_client(TextMessage("x" * 2000))[:8]  # 2-byte head, 2-byte length, 4-byte key
    assert parser.feed(header) == [too_big(1000)]
    assert too_big(1000).code == 1009 and too_big(1000).too_big
    fragmented = server_parser(limit=100)  # the fragments add up past the limit
    events = fragmented.feed(raw_frame(0x01, b"x" * 60) + raw_frame(0x80, b"x" * 50))
    assert events == [too_big(100)]


def test_server_side_parser_refuses_masked_frames_from_the_server() -> None:
    parser = FrameParser(from_client=False, max_message_size=LIMIT)
    assert parser.feed(encode(Opcode.TEXT, b"hi", mask=False)) == [Text("hi")]
    assert isinstance(parser.feed(encode(Opcode.TEXT, b"hi", mask=True))[0], Violation)


@given(st.binary(max_size=70_000), st.booleans())
def test_encoded_frames_are_read_back_by_wsproto(payload: bytes, mask: bool) -> None:
    reader = Connection(ConnectionType.SERVER if mask else ConnectionType.CLIENT)
    reader.receive_data(encode(Opcode.BINARY, payload, mask=mask))
    received = b"".join(bytes(e.data) for e in reader.events() if isinstance(e, BytesMessage))
    assert received == payload


def test_control_frames_and_close_payloads() -> None:
    reader = Connection(ConnectionType.CLIENT)
    reader.receive_data(encode(Opcode.PONG, b"abc", mask=False)
                        + encode(Opcode.CLOSE, close_payload(1001, "going"), mask=False))
    pong, close = list(reader.events())
    assert isinstance(pong, Pong) and pong.payload == b"abc"
    assert isinstance(close, CloseConnection) and (close.code, close.reason) == (1001, "going")
    assert close_payload(1005) == b"" and close_payload(None) == b""
    assert len(close_payload(1000, "é" * 100)) == 2 + 123


def test_c_masker_matches_the_python_one() -> None:
    for size in (0, 1, 3, 4, 5, 1024, 4097):
        data, key = os.urandom(size), os.urandom(4)
        assert _xor(data, key) == _xor_python(data, key)


def test_a_big_frame_fed_byte_by_byte_and_in_odd_chunks_is_one_message() -> None:
    """The parser keeps a partial frame in its buffer; every split gives the same events."""
    big = "Köln " * 40_000  # 240 000 bytes of UTF-8: a 64-bit length
    data = from_client(TextMessage("a"), TextMessage(big), Ping(b"p"), TextMessage("b"))
    for chunk in (1, 7, 1000, 65_536, len(data)):
        parser = server_parser()
        events: list[Event] = []
        for start in range(0, len(data), chunk):
            events += parser.feed(data[start:start + chunk])
        assert events == [Text("a"), Text(big), PingEvent(b"p"), Text("b")], chunk


def test_an_oversized_header_fed_byte_by_byte_is_refused_before_its_payload() -> None:
    parser = server_parser(limit=1000)
    header = from_client(TextMessage("x" * 70_000))[:14]  # 2-byte head, 8-byte length, 4-byte key
    events: list[Event] = []
    for byte in header[:10]:
        events += parser.feed(bytes((byte,)))
    assert events == [too_big(1000)]
    assert parser.feed(b"more") == []  # nothing after a violation


def test_mask_keys_come_from_a_pool_and_differ() -> None:
    keys = [mask_key() for _ in range(3000)]  # crosses the 1024-key pool boundary twice
    assert all(len(k) == 4 for k in keys)
    assert len(set(keys)) > 2900  # 4-byte random keys: a few collisions at most
    frames = {encode(Opcode.TEXT, b"same payload", mask=True) for _ in range(100)}
    assert len(frames) == 100


def test_a_forked_child_does_not_reuse_the_parents_mask_keys() -> None:
    mask_key()  # the parent has a pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next keys, then exit without running pytest's teardown
        os.write(write, b"".join(mask_key() for _ in range(8)))
        os._exit(0)
    os.close(write)
    child = b""
    while len(child) < 32:
        chunk = os.read(read, 32)
        assert chunk, "the child wrote nothing"
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = b"".join(mask_key() for _ in range(8))
    assert child != parent

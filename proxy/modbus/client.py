"""A Modbus client on trio streams (pymodbus framer and PDU classes, no pymodbus I/O).

Measured choice (docs/modbus.md, "Measured"): pymodbus's framer over a trio stream reads in
about 250 µs on loopback and is cancellable; its sync client in a thread is
slower (~400 µs) and cannot be cancelled mid-call. Every request is bounded
by ``timeout``; a broken connection is dropped and reopened on the next call.

Three transports, one request path:

* ``tcp``: Modbus TCP (MBAP header, transaction ids);
* ``rtu-over-tcp``: RTU frames (CRC, no header) through a TCP socket, as RS485
  gateways in transparent mode pass them on;
* ``rtu``: RTU frames on the gateway box's own serial port (termios, no extra library).

One client is one bus: wallboxes behind the same gateway or serial port share
it (:func:`bus_key`), each request names its unit, and a lock keeps one
request on the wire at a time. On RS485 a device needs a silent interval
between frames (3.5 character times, at least 1.75 ms above 19200 baud, per
the Modbus over serial line specification) and many need a little more to
turn their transceiver around, so the client waits ``frame_gap`` after every
answer (or timeout) before the next request. After a timeout the connection
is dropped: a late answer must never be taken for the next request's.
"""

from __future__ import annotations

import itertools
import os
import termios
from dataclasses import dataclass

import trio
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, WriteSingleCoilRequest
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

TRANSPORTS = ("tcp", "rtu-over-tcp", "rtu")
_BAUDS = {1200: termios.B1200, 2400: termios.B2400, 4800: termios.B4800, 9600: termios.B9600,
          19200: termios.B19200, 38400: termios.B38400, 57600: termios.B57600, 115200: termios.B115200}
BAUDRATES = tuple(_BAUDS)


class ModbusError(Exception):
    """A request failed: timeout, connection trouble, or a Modbus exception response."""


@dataclass(frozen=True)
class SerialSettings:
    device: str
    baudrate: int = 9600
    parity: str = "N"      # N | E | O
    stopbits: int = 1
    bytesize: int = 8

    @property
    def char_time(self) -> float:
        """Seconds one character takes on the wire (start bit, data, parity, stop bits)."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate


def rtu_silence(baudrate: int) -> float:
    """The inter-frame silence of Modbus RTU: 3.5 characters, fixed at 1.75 ms above 19200 baud."""
    return 0.00175 if baudrate > 19200 else 3.5 * 11 / baudrate


def bus_key(transport: str, address: str) -> tuple[str, str]:
    """Wallboxes with the same key are on one bus (one gateway connection or one serial port)."""
    return transport, address


class ModbusClient:
    def __init__(self, host: str, port: int, unit: int = 1, timeout: float = 1.0, *, transport: str = "tcp",
                 serial: SerialSettings | None = None, frame_gap: float = 0.0) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        if transport == "rtu" and serial is None:
            raise ValueError("transport rtu needs serial settings")
        self.host, self.port, self.unit, self.timeout = host, port, unit, timeout
        self.transport, self.serial = transport, serial
        silence = rtu_silence(serial.baudrate) if serial else 0.0
        self.frame_gap = max(frame_gap, silence)
        self._stream: trio.abc.Stream | None = None
        rtu = transport != "tcp"
        self._framer: FramerRTU | FramerSocket = (FramerRTU if rtu else FramerSocket)(DecodePDU(is_server=False))
        self._tids = itertools.cycle(range(1, 65536))
        self._lock = trio.Lock()
        self._quiet_until = 0.0
        #: Requests sent, for tests and diagnostics (one bus, several wallboxes).
        self.requests = 0

    @property
    def where(self) -> str:
        return self.serial.device if self.serial else f"{self.host}:{self.port}"

    async def read(self, kind: str, address: int, count: int, unit: int | None = None) -> list[int]:
        """``count`` registers (or coils, as 0/1) of ``kind`` from ``unit`` (default: the client's)."""
        dev = self.unit if unit is None else unit
        if kind == "coil":
            response = await self._request(ReadCoilsRequest(address=address, count=count, dev_id=dev))
            bits = list(response.bits or [])
            if len(bits) < count:
                raise ModbusError(f"short answer: {len(bits)} of {count} coils")
            return [1 if b else 0 for b in bits[:count]]
        cls = ReadInputRegistersRequest if kind == "input" else ReadHoldingRegistersRequest
        response = await self._request(cls(address=address, count=count, dev_id=dev))
        registers = list(response.registers or [])
        if len(registers) < count:
            raise ModbusError(f"short answer: {len(registers)} of {count} registers")
        return registers

    async def write(self, address: int, values: list[int], unit: int | None = None, function: str = "fc16") -> None:
        """Holding registers: FC16 (write multiple) or FC6 (write single, one register)."""
        dev = self.unit if unit is None else unit
        if function == "fc6":
            if len(values) != 1:
                raise ValueError(f"fc6 writes one register, not {len(values)}")
            await self._request(WriteSingleRegisterRequest(address=address, registers=values, dev_id=dev))
        else:
            await self._request(WriteMultipleRegistersRequest(address=address, registers=values, dev_id=dev))

    async def write_coil(self, address: int, on: bool, unit: int | None = None) -> None:
        """FC5."""
        dev = self.unit if unit is None else unit
        await self._request(WriteSingleCoilRequest(address=address, bits=[on], dev_id=dev))

    async def aclose(self) -> None:
        """Close the connection (it reopens on the next request); waits for a request on the wire, so a
        wallbox leaving a shared bus never cuts another's exchange short."""
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await trio.aclose_forcefully(stream)

    async def _request(self, request: ModbusPDU) -> ModbusPDU:
        async with self._lock:
            await trio.sleep_until(self._quiet_until)  # the bus's silent interval since the last frame
            self.requests += 1
            try:
                with trio.fail_after(self.timeout):
                    return await self._exchange(request)
            except trio.TooSlowError:
                await self._drop()
                raise ModbusError(f"no answer from {self.where} unit {request.dev_id} "
                                  f"within {self.timeout:g} s") from None
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._drop()
                raise ModbusError(f"connection to {self.where} failed: {exc}") from exc
            finally:
                self._quiet_until = trio.current_time() + self.frame_gap

    async def _open(self) -> trio.abc.Stream:
        if self.serial is not None:
            fd = await trio.to_thread.run_sync(_open_serial, self.serial)
            return trio.lowlevel.FdStream(fd)
        return await trio.open_tcp_stream(self.host, self.port)

    async def _exchange(self, request: ModbusPDU) -> ModbusPDU:
        if self._stream is None:
            self._stream = await self._open()
        stream = self._stream
        rtu = self.transport != "tcp"
        request.transaction_id = 0 if rtu else next(self._tids)
        await stream.send_all(self._framer.buildFrame(request))
        buffer = b""
        while True:
            chunk = await stream.receive_some(512)
            if not chunk:
                raise trio.BrokenResourceError("connection closed by the device")
            buffer += chunk
            try:
                used, response = self._framer.handleFrame(buffer, request.dev_id, request.transaction_id)
            except Exception as exc:  # noqa: BLE001 - pymodbus raises several types for garbage
                raise ModbusError(f"undecodable answer: {exc}") from exc
            buffer = buffer[used:]
            if response is None:
                continue
            if response.isError():
                code = getattr(response, "exception_code", "?")
                raise ModbusError(f"device answered with Modbus exception {code}")
            return response


def _open_serial(settings: SerialSettings) -> int:
    """The serial port in raw mode (termios): baud rate, parity, stop bits; its file descriptor."""
    fd = os.open(settings.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        attrs = termios.tcgetattr(fd)
        speed = _BAUDS[settings.baudrate]
        cflag = termios.CLOCAL | termios.CREAD | {7: termios.CS7, 8: termios.CS8}[settings.bytesize]
        if settings.parity != "N":
            cflag |= termios.PARENB | (termios.PARODD if settings.parity == "O" else 0)
        if settings.stopbits == 2:
            cflag |= termios.CSTOPB
        attrs[0] = termios.IGNPAR if settings.parity == "N" else termios.INPCK  # iflag
        attrs[1] = 0                                                              # oflag
        attrs[2] = cflag
        attrs[3] = 0                                                              # lflag: raw
        attrs[4] = attrs[5] = speed
        attrs[6][termios.VMIN] = 1  # with O_NONBLOCK: no data is EAGAIN (trio waits), never a 0-byte "EOF"
        attrs[6][termios.VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        termios.tcflush(fd, termios.TCIOFLUSH)
    except Exception:
        os.close(fd)
        raise
    return fd

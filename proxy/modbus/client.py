"""A Modbus TCP client on trio streams (pymodbus framer and PDU classes, no pymodbus I/O).

Measured choice (STACK-NOTES): pymodbus's framer over a trio stream reads in
about 250 µs on loopback and is cancellable; its sync client in a thread is
slower (~400 µs) and cannot be cancelled mid-call. Every request is bounded
by ``timeout``; a broken connection is dropped and reopened on the next call.
"""

from __future__ import annotations

import itertools

import trio
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
)


class ModbusError(Exception):
    """A request failed: timeout, connection trouble, or a Modbus exception response."""


class ModbusClient:
    def __init__(self, host: str, port: int, unit: int = 1, timeout: float = 1.0) -> None:
        self.host, self.port, self.unit, self.timeout = host, port, unit, timeout
        self._stream: trio.SocketStream | None = None
        self._framer = FramerSocket(DecodePDU(is_server=False))
        self._tids = itertools.cycle(range(1, 65536))
        self._lock = trio.Lock()

    async def read(self, kind: str, address: int, count: int) -> list[int]:
        cls = ReadInputRegistersRequest if kind == "input" else ReadHoldingRegistersRequest
        response = await self._request(cls(address=address, count=count, dev_id=self.unit))
        registers = list(response.registers or [])
        if len(registers) < count:
            raise ModbusError(f"short answer: {len(registers)} of {count} registers")
        return registers

    async def write(self, address: int, values: list[int]) -> None:
        await self._request(WriteMultipleRegistersRequest(address=address, registers=values, dev_id=self.unit))

    async def aclose(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
            self._stream = None

    async def _request(self, request: ModbusPDU) -> ModbusPDU:
        async with self._lock:
            try:
                with trio.fail_after(self.timeout):
                    return await self._exchange(request)
            except trio.TooSlowError:
                await self.aclose()
                raise ModbusError(f"no answer from {self.host}:{self.port} within {self.timeout:g} s") from None
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self.aclose()
                raise ModbusError(f"connection to {self.host}:{self.port} failed: {exc}") from exc

    async def _exchange(self, request: ModbusPDU) -> ModbusPDU:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
        request.transaction_id = next(self._tids)
        await self._stream.send_all(self._framer.buildFrame(request))
        buffer = b""
        while True:
            chunk = await self._stream.receive_some(512)
            if not chunk:
                raise trio.BrokenResourceError("connection closed by the device")
            buffer += chunk
            try:
                used, response = self._framer.handleFrame(buffer, self.unit, request.transaction_id)
            except Exception as exc:  # noqa: BLE001 - pymodbus raises several types for garbage
                raise ModbusError(f"undecodable answer: {exc}") from exc
            buffer = buffer[used:]
            if response is None:
                continue
            if response.isError():
                code = getattr(response, "exception_code", "?")
                raise ModbusError(f"device answered with Modbus exception {code}")
            return response

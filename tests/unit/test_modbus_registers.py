"""Register encoding and the built-in meter maps (no device needed)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.modbus.maps import METERS
from proxy.modbus.meter import decode_reading
from proxy.modbus.registers import Block, Field, blocks


def f32(value: float) -> list[int]:
    data = struct.pack(">f", value)
    return [int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")]


@given(st.sampled_from(["int16", "uint16", "int32", "uint32"]), st.sampled_from(["big", "little"]),
       st.integers(-32768, 65535))
def test_integer_fields_round_trip(kind: str, order: str, raw: int) -> None:
    field = Field(10, "holding", kind, order, 0.1)
    low, high = {"int16": (-32768, 32767), "uint16": (0, 65535), "int32": (-2**31, 2**31 - 1),
                 "uint32": (0, 2**32 - 1)}[kind]
    raw = max(low, min(high, raw))
    assert field.decode(field.encode(raw * 0.1)) == pytest.approx(raw * 0.1)


def test_blocks_merge_nearby_registers() -> None:
    fields = METERS["sdm630"].fields
    assert blocks(fields) == [Block("input", 6, 6), Block("input", 52, 2), Block("input", 72, 2)]
    assert blocks(fields, max_gap=40) == [Block("input", 6, 68)]
    assert blocks([Field(0), Field(500)]) == [Block("input", 0, 1), Block("input", 500, 1)]


def test_sdm630_reading() -> None:
    registers = [0] * 68
    for address, value in ((6, 12.5), (8, 7.0), (10, 0.25), (52, 5400.0), (72, 1234.5)):
        registers[address - 6:address - 4] = f32(value)
    reading = decode_reading(METERS["sdm630"], {Block("input", 6, 68): registers})
    assert reading.currents == (12.5, 7.0, 0.25)
    assert reading.power_w == 5400.0 and reading.energy_wh == pytest.approx(1_234_500.0)


def test_em24_low_word_first() -> None:
    registers = [0] * 52
    registers[0x0C - 0x0C:0x0E - 0x0C] = [16000 & 0xFFFF, 16000 >> 16]  # 16.000 A
    reading = decode_reading(METERS["em24"], {Block("input", 0x0C, 52): registers})
    assert reading.currents[0] == pytest.approx(16.0)


@pytest.mark.parametrize("bad", [-3.0, float("nan"), 1e9])
def test_garbage_currents_are_refused(bad: float) -> None:
    registers = [0] * 68
    registers[0:2] = f32(bad)
    with pytest.raises(ValueError):
        decode_reading(METERS["sdm630"], {Block("input", 6, 68): registers})

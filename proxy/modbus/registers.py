"""Register values as meters and wallboxes encode them (sans-IO).

A :class:`Field` says where a value lives (input or holding register, address),
how it is encoded (16/32-bit integer or IEEE float, word order) and its scale.
Maps are data built from fields; decoding a block of registers is a pure
function, so every map is testable without a device.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_FORMATS = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f"}
KINDS = ("input", "holding")
TYPES = tuple(_FORMATS)


@dataclass(frozen=True)
class Field:
    address: int
    kind: str = "input"        # input | holding
    type: str = "uint16"       # uint16 | int16 | uint32 | int32 | float32
    word_order: str = "big"    # big: high word first; little: low word first
    scale: float = 1.0         # physical value = raw * scale

    @property
    def words(self) -> int:
        return 1 if self.type.endswith("16") else 2

    def decode(self, registers: Sequence[int]) -> float:
        words = list(registers[: self.words])
        if len(words) != self.words:
            raise ValueError(f"need {self.words} registers at {self.address}, got {len(words)}")
        if self.word_order == "little":
            words.reverse()
        raw = struct.unpack(_FORMATS[self.type], b"".join(w.to_bytes(2, "big") for w in words))[0]
        value = float(raw) * self.scale
        if not math.isfinite(value):
            raise ValueError(f"register {self.address} holds no number ({raw!r})")
        return value

    def encode(self, value: float) -> list[int]:
        raw: float | int = value / self.scale
        if self.type != "float32":
            raw = int(round(raw))
        data = struct.pack(_FORMATS[self.type], raw)
        words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
        return words[::-1] if self.word_order == "little" else words


@dataclass(frozen=True)
class Block:
    kind: str
    address: int
    count: int


def blocks(fields: Iterable[Field], max_gap: int = 16, max_count: int = 120) -> list[Block]:
    """Few contiguous reads covering every field (a read per field would be slow on RS485 gateways)."""
    result: list[Block] = []
    for kind in KINDS:
        spans = sorted((f.address, f.address + f.words) for f in fields if f.kind == kind)
        for start, end in spans:
            last = result[-1] if result and result[-1].kind == kind else None
            if last and start - (last.address + last.count) <= max_gap and end - last.address <= max_count:
                result[-1] = Block(kind, last.address, max(last.count, end - last.address))
            else:
                result.append(Block(kind, start, end - start))
    return result


def value_at(field: Field, data: dict[Block, list[int]]) -> float:
    for block, registers in data.items():
        if block.kind == field.kind and block.address <= field.address < block.address + block.count:
            offset = field.address - block.address
            return field.decode(registers[offset:offset + field.words])
    raise KeyError(f"register {field.address} was not read")
